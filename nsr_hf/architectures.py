"""Per-architecture knowledge, in one table.

A *neuron* is one coordinate of the MLP hidden activation: the input of the MLP's output projection
(GPT-2: the ``mlp.act`` output = input of ``mlp.c_proj``; Llama family: ``act_fn(gate_proj(x)) * up_proj(x)``
= input of ``mlp.down_proj``). Never a coordinate of the MLP output in the residual basis.

Adding an architecture is adding a row to ``ARCHITECTURES``.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from nsr_hf.utils import unwrap


@dataclass(frozen=True)
class ArchSpec:
    """Where things live in one family of causal LMs (paths are relative to the ``*ForCausalLM`` model).

    Attributes:
        layers: dotted path of the ``ModuleList`` of transformer blocks.
        final_norm: dotted path of the norm applied after the last block.
        mlp: path of the MLP inside a block.
        pre_mlp_norm: path of the norm whose output feeds the MLP, inside a block.
        neuron_module: path (inside a block) of the module whose *input* is the neuron vector.
        mlp_kind: how the MLP computes its hidden activation from its input, used to compute a few
            neurons without the whole MLP: ``"gated"`` (act(gate(x)) * up(x)), ``"conv1d"`` (GPT-2 Conv1D
            then act), ``"linear"`` (Linear then act).
        mlp_in: names (inside the MLP) of the input projections, in the order ``mlp_kind`` needs them.
        lora_targets: module names (regexes on the full name) for LoRA that stay inside the MLP and
            attention of a block; GPT-2's ``c_proj`` exists in both attention and MLP, so names are qualified.
        fan_in_fan_out: LoRA must transpose the weight (GPT-2's Conv1D).
        token_wise: paths (inside a block) of the attention's token-wise projections whose output at a token reaches
            the block's output at that token only: the query and output projections (GPT-2 and GPT-NeoX fuse the query
            with the keys and values, so only the output projection). A reader of the block at one token needs them
            there alone (``labelled_token_block``).
    """

    layers: str
    final_norm: str
    mlp: str
    pre_mlp_norm: str
    neuron_module: str
    mlp_kind: str
    mlp_in: tuple[str, ...]
    act: str
    lora_targets: tuple[str, ...] = field(default_factory=tuple)
    fan_in_fan_out: bool = False
    token_wise: tuple[str, ...] = field(default_factory=tuple)


# One row per architecture: where the blocks and the final norm are; the MLP (its input projections, activation and
# the module whose input is the neuron vector); the modules LoRA targets.
_LLAMA = ArchSpec(
    layers="model.layers", final_norm="model.norm", pre_mlp_norm="post_attention_layernorm",
    mlp="mlp", mlp_kind="gated", mlp_in=("gate_proj", "up_proj"), act="act_fn", neuron_module="mlp.down_proj",
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    token_wise=("self_attn.q_proj", "self_attn.o_proj"),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        layers="transformer.h", final_norm="transformer.ln_f", pre_mlp_norm="ln_2",
        mlp="mlp", mlp_kind="conv1d", mlp_in=("c_fc",), act="act", neuron_module="mlp.c_proj",
        lora_targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), fan_in_fan_out=True,
        token_wise=("attn.c_proj",),
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm", pre_mlp_norm="post_attention_layernorm",
        mlp="mlp", mlp_kind="linear", mlp_in=("dense_h_to_4h",), act="act", neuron_module="mlp.dense_4h_to_h",
        lora_targets=("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        token_wise=("attention.dense",),
    ),
}


def arch_spec(model_or_config) -> ArchSpec:
    """The ``ArchSpec`` of a model (or config); a clear error names the supported architectures."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"Unsupported architecture {model_type!r}. nsr_hf knows where the MLP neurons are for: "
            f"{', '.join(sorted(ARCHITECTURES))}. Add a row to nsr_hf.architectures.ARCHITECTURES to support it."
        )
    return ARCHITECTURES[model_type]


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def _config(model_or_config):
    return unwrap(model_or_config).config if isinstance(model_or_config, nn.Module) else model_or_config


def get_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a causal LM."""
    model = unwrap(model)
    return get_submodule(model, arch_spec(model).layers)


def num_layers(model_or_config) -> int:
    config = _config(model_or_config)
    for name in ("num_hidden_layers", "n_layer"):
        if hasattr(config, name):
            return int(getattr(config, name))
    raise ValueError(f"Cannot tell the number of layers of {type(config).__name__}")


def num_neurons(model_or_config) -> int:
    """Neurons per layer: the MLP hidden size."""
    config = _config(model_or_config)
    for name in ("intermediate_size", "n_inner"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    if getattr(config, "model_type", None) == "gpt2":
        return 4 * int(config.n_embd)
    raise ValueError(f"Cannot tell the MLP size of {type(config).__name__}")


def get_mlp(model: nn.Module, layer: int) -> nn.Module:
    return get_submodule(get_layers(model)[layer], arch_spec(unwrap(model)).mlp)


def get_neuron_module(model: nn.Module, layer: int) -> nn.Module:
    """The module whose input is the neuron vector of ``layer`` (hook its input to read neurons)."""
    return get_submodule(get_layers(model)[layer], arch_spec(unwrap(model)).neuron_module)


def get_pre_mlp_norm(model: nn.Module, layer: int) -> nn.Module:
    return get_submodule(get_layers(model)[layer], arch_spec(unwrap(model)).pre_mlp_norm)


def get_final_norm(model: nn.Module) -> nn.Module:
    model = unwrap(model)
    return get_submodule(model, arch_spec(model).final_norm)


def neuron_weights(model: nn.Module, layer: int, index: int) -> dict[str, torch.Tensor]:
    """The neuron's input direction(s) (rows of the input projections) and its output direction
    (the column of the output projection), each as a vector in the residual basis."""
    spec = arch_spec(unwrap(model))
    mlp = get_mlp(model, layer)
    out_module = get_neuron_module(model, layer)
    result = {}
    for name in spec.mlp_in:
        w = getattr(mlp, name).weight
        result[f"in:{name}"] = (w[:, index] if spec.mlp_kind == "conv1d" else w[index, :]).detach()
    w = out_module.weight
    result["out"] = (w[index, :] if spec.mlp_kind == "conv1d" else w[:, index]).detach()
    return result


def compute_neurons(model: nn.Module, layer: int, mlp_input: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
    """The hidden activation of ``layer``'s MLP for ``mlp_input`` (the output of the pre-MLP norm),
    restricted to ``indices`` (all neurons when None) without computing the others."""
    spec = arch_spec(unwrap(model))
    mlp = get_mlp(model, layer)
    act = getattr(mlp, spec.act)

    def project(module: nn.Module) -> torch.Tensor:
        if spec.mlp_kind == "conv1d":  # GPT-2 Conv1D: weight is (in, out)
            w = module.weight if indices is None else module.weight[:, indices]
            b = module.bias if indices is None else module.bias[indices]
            return torch.addmm(b, mlp_input.reshape(-1, mlp_input.shape[-1]), w).reshape(*mlp_input.shape[:-1], -1)
        w = module.weight if indices is None else module.weight[indices]
        b = None if module.bias is None else (module.bias if indices is None else module.bias[indices])
        return nn.functional.linear(mlp_input, w, b)

    if spec.mlp_kind == "gated":
        gate, up = (getattr(mlp, name) for name in spec.mlp_in)
        return act(project(gate)) * project(up)
    return act(project(getattr(mlp, spec.mlp_in[0])))


def lora_target_modules(model_or_config, layers: list[int] | None = None, mlp_only: bool = False) -> list[str] | str:
    """PEFT ``target_modules`` for this architecture: a regex over full module names, so that GPT-2's
    ``c_proj`` in attention and MLP are told apart, optionally restricted to some layers."""
    spec = arch_spec(model_or_config)
    names = [t for t in spec.lora_targets if not mlp_only or t.startswith("mlp.") or t in ("gate_proj", "up_proj", "down_proj")]
    layer_pattern = r"\d+" if layers is None else "(?:" + "|".join(str(i) for i in layers) + ")"
    alternatives = "|".join(re.escape(n) for n in names)
    return rf".*{re.escape(spec.layers)}\.{layer_pattern}\..*(?:{alternatives})$"


@contextlib.contextmanager
def truncated(model: nn.Module, read_layer: int):
    """Run only blocks ``0..read_layer`` of ``model`` inside the ``with`` block (the model's own forward
    then applies its final norm to that block's output)."""
    spec = arch_spec(model)
    parent_path, _, name = spec.layers.rpartition(".")
    parent = model.get_submodule(parent_path)
    layers = getattr(parent, name)
    if read_layer == len(layers) - 1:
        yield
        return
    setattr(parent, name, layers[: read_layer + 1])
    try:
        yield
    finally:
        setattr(parent, name, layers)


class AtLabelledTokens(nn.Module):
    """A token-wise module (a block's MLP, its attention's query or output projection) run at one token per row
    (``positions``), zero at every other token: the block's output is then right at those tokens only, which is all a
    reader of that block at its labelled token needs (``labelled_token_block``)."""

    def __init__(self, module: nn.Module, positions: torch.Tensor):
        super().__init__()
        self.module = module
        self.positions = positions

    def forward(self, hidden_states, *args, **kwargs):
        rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
        at = self.positions.to(hidden_states.device)
        picked = self.module(hidden_states[rows, at].unsqueeze(1), *args, **kwargs)
        picked = picked[0] if isinstance(picked, tuple) else picked
        out = picked.new_zeros(*hidden_states.shape[:-1], picked.shape[-1])
        return out.index_put((rows, at), picked[:, 0])


def token_wise_modules(block: nn.Module, spec: ArchSpec) -> list[str]:
    """The paths inside ``block`` of what ``labelled_token_block`` runs at the labelled tokens: the MLP and the
    attention's token-wise projections (``ArchSpec.token_wise``) that the block has."""
    paths = [spec.mlp]
    for path in spec.token_wise:
        try:
            get_submodule(block, path)
        except AttributeError:  # a variant of the family without it: the projection runs at every token
            continue
        paths.append(path)
    return paths


def labelled_token_block_applies(model: nn.Module, layer: int) -> bool:
    """Whether block ``layer``'s token-wise work (``token_wise_modules``) may run at the labelled tokens alone: the
    block runs (not a passthrough), nothing hooks those modules or the block's output (a neuron read, set or recorded
    there sees every token), no dropout in them acts (fewer tokens would draw other random numbers), and no gradient
    checkpointing (its backward pass recomputes the block outside the ``with``)."""
    model = unwrap(model)
    block = get_layers(model)[layer]
    try:
        get_submodule(block, arch_spec(model).mlp)
    except AttributeError:  # a block that does not run (the frozen-prefix cache's passthrough)
        return False
    # transformers 5 names it is_activation_checkpointing (is_gradient_checkpointing warns); older versions only the latter
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    if getattr(model, name, False):
        return False
    modules = [get_submodule(block, path) for path in token_wise_modules(block, arch_spec(model))]
    # a hook on the block's output could read its other tokens; one on its input (the prefix cache feeding it) is fine
    if block._forward_hooks or any(m._forward_hooks or m._forward_pre_hooks for module in modules for m in module.modules()):
        return False
    return not (model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for module in modules for m in module.modules()))


@contextlib.contextmanager
def labelled_token_block(model: nn.Module, layer: int, positions: torch.Tensor):
    """Inside the ``with`` block, block ``layer``'s MLP and its attention's query and output projections run at
    ``positions`` (one token per row) only, when that is exact (``labelled_token_block_applies``; else nothing
    changes). For the block a head reads: its output is read at the labelled token alone, and that work at the other
    tokens would be thrown away (the MLP is about three quarters of a block's multiplications, a Llama block's query and
    output projections most of the rest). The keys and values still come from every token. Yields whether it applies.
    The outputs at ``positions`` equal the full block's to float round-off."""
    if not labelled_token_block_applies(model, layer):
        yield False
        return
    block = get_layers(model)[layer]
    replaced = []
    for path in token_wise_modules(block, arch_spec(unwrap(model))):
        parent_path, _, name = path.rpartition(".")
        parent = get_submodule(block, parent_path)
        module = getattr(parent, name)
        setattr(parent, name, AtLabelledTokens(module, positions))
        replaced.append((parent, name, module))
    try:
        yield True
    finally:
        for parent, name, module in reversed(replaced):
            setattr(parent, name, module)
