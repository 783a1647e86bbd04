"""Which weights of an ``ActivationPredictor`` train: one function, ``apply_unfreezing``.

Strategies (``STRATEGIES``):

* ``head_only``: the head alone. The base model is bit-identical after training, so the neuron cannot move.
* ``last_k``: the last ``k`` blocks the head reads, the final norm and the head.
* ``after_target``: only blocks strictly after the highest target layer (and up to the read layer), the final
  norm and the head. Every block that computes the target neurons is frozen, and so are the embeddings, so the
  neurons are unchanged by construction (PITFALL 4).
* ``full``: every weight that reaches the head, embeddings included. The neurons drift: measure it.
* ``lora``: returns a ``peft.LoraConfig`` (pass it as ``peft_config``); the predictor itself is not touched
  (PEFT freezes the base). Targets the blocks up to the read layer (the last ``k`` with ``k``), ``fan_in_fan_out``
  for GPT-2's Conv1D, the head in ``modules_to_save``.
* ``lora_after_target``: ``lora`` on exactly the blocks of ``after_target`` (strictly after the highest target layer,
  up to the read layer), whatever the read layer: the neurons are unchanged by construction, as under ``after_target``,
  with a fraction of its trainable weights (e.g. the token head reading the last block of a 30-block model).
* ``gradual``: returns a ``GradualUnfreezing`` callback: training starts from ``head_only`` (plus the final norm)
  and every ``every_n_steps`` steps one more block, from the top, joins the existing optimizer as a new
  parameter group (the optimizer takes its parameters once, PITFALLS HF-8). One process only: DDP registers the
  trainable parameters when it wraps the model and would not synchronise the gradients of later ones.

The "head" of the token head is the model's LM head; when it is tied to the input embeddings (GPT-2, SmolLM2,
Llama tiny tests) training it would also move the embeddings and so every neuron. For the token head the head is
therefore the final norm plus the LM head only when the LM head is untied; tied embeddings train only under ``full``.

For the regression and classification heads, blocks after ``read_layer`` are never run: they are never trainable.
"""
from __future__ import annotations

import logging
from typing import Optional

from transformers import TrainerCallback

from nsr_hf.architectures import arch_spec, get_layers, lora_target_modules
from nsr_hf.modeling.heads import lm_head_tied
from nsr_hf.utils import unwrap

logger = logging.getLogger(__name__)

STRATEGIES = ("head_only", "last_k", "after_target", "full", "lora", "lora_after_target", "gradual")


def _prefix(path: str) -> str:
    """The parameter-name prefix of a module of the base model (``path`` from the architecture table)."""
    return f"base.{path}."


def head_prefixes(predictor) -> list[str]:
    """Parameter-name prefixes of the head, as the head names them (``Head.trainable_prefixes``; see the module
    docstring for the token head)."""
    p = unwrap(predictor)
    return p.head.trainable_prefixes(p)


def last_block(predictor) -> int:
    """The last block whose output reaches the head (``read_layer``; the last block by default, also for the token head)."""
    return unwrap(predictor).config.effective_read_layer


def block_prefixes(predictor, blocks) -> list[str]:
    spec = arch_spec(unwrap(predictor).base)
    return [f"base.{spec.layers}.{i}." for i in blocks]


def set_trainable(predictor, prefixes) -> list[str]:
    """Make exactly the parameters whose names start with one of ``prefixes`` trainable; return their names."""
    names = []
    for name, param in unwrap(predictor).named_parameters():
        param.requires_grad_(any(name.startswith(pre) for pre in prefixes))
        if param.requires_grad:
            names.append(name)
    return names


def _blocks_for(predictor, strategy: str, k: Optional[int]) -> list[int]:
    p = unwrap(predictor)
    top = last_block(p)
    if strategy in ("last_k", "lora") and k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= top + 1:
            raise ValueError(f"k must be an integer in 1..{top + 1} (the blocks up to the one the head reads), got {k!r}.")
        return list(range(top - k + 1, top + 1))
    if strategy == "last_k":
        raise ValueError("last_k needs k: the number of blocks to unfreeze, counted down from the block the head reads.")
    if strategy == "after_target":
        highest = max(n.layer for n in p.config.target_neurons)
        if highest >= top:
            logger.warning("after_target: no block lies after target layer %d and up to block %d: only the head trains.", highest, top)
        return list(range(highest + 1, top + 1))
    return list(range(top + 1))


def lora_config(predictor, r: int = 8, alpha: Optional[int] = None, dropout: float = 0.0, k: Optional[int] = None, mlp_only: bool = False,
                after_target: bool = False):
    """A ``peft.LoraConfig`` for the predictor: LoRA on the blocks the head reads (the last ``k`` with ``k``; with
    ``after_target`` only those strictly after the highest target layer)."""
    from peft import LoraConfig

    p = unwrap(predictor)
    spec = arch_spec(p.base)
    blocks = _blocks_for(p, "after_target", None) if after_target else _blocks_for(p, "lora", k)
    if not blocks:
        raise ValueError(f"lora_after_target: no block lies after target layer {max(n.layer for n in p.config.target_neurons)} "
                         f"and up to the read layer {last_block(p)}: read a later block (read_layer) or use head_only.")
    # the regex is over the predictor's names (base.<layers path>...): it starts with .* so it matches there too
    targets = lora_target_modules(p.base, layers=blocks, mlp_only=mlp_only)
    save = ["neuron_head"] if p.neuron_head is not None else None
    return LoraConfig(r=r, lora_alpha=alpha or 2 * r, lora_dropout=dropout, target_modules=targets,
                      fan_in_fan_out=spec.fan_in_fan_out, modules_to_save=save, bias="none")


class GradualUnfreezing(TrainerCallback):
    """Start from the head (plus the final norm); every ``every_n_steps`` optimizer steps unfreeze the next block
    from the top, down to ``lowest_block``, and add its parameters to the running optimizer as a new group
    (the LR scheduler is extended so that the group follows the same schedule).

    ``history`` records ``(global_step, block)`` for each block that joined.
    """

    def __init__(self, predictor, every_n_steps: int = 10, lowest_block: int = 0, learning_rate: Optional[float] = None,
                 weight_decay: float = 0.0):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}.")
        self.predictor = unwrap(predictor)
        self.every_n_steps = int(every_n_steps)
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        top = last_block(self.predictor)
        if not 0 <= lowest_block <= top:
            raise ValueError(f"lowest_block must be in 0..{top}, got {lowest_block}.")
        self.pending = list(range(top, lowest_block - 1, -1))
        self.history: list[tuple[int, int]] = []
        prefixes = head_prefixes(self.predictor) + [_prefix(arch_spec(self.predictor.base).final_norm)]
        self.trainable = set_trainable(self.predictor, prefixes)

    def unfreeze_next(self, optimizer, lr_scheduler=None, step: int = 0) -> list[str]:
        """Unfreeze the next block and add its parameters to ``optimizer``; returns their names."""
        block = self.pending.pop(0)
        (prefix,) = block_prefixes(self.predictor, [block])
        named = [(n, p) for n, p in self.predictor.named_parameters() if n.startswith(prefix)]
        for _, p in named:
            p.requires_grad_(True)
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
        lr = self.learning_rate if self.learning_rate is not None else inner.param_groups[0].get("initial_lr", inner.param_groups[0]["lr"])
        inner.add_param_group({"params": [p for _, p in named], "lr": lr, "initial_lr": lr, "weight_decay": self.weight_decay})
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs.append(lr)
            if hasattr(scheduler, "lr_lambdas"):
                scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
        self.history.append((step, block))
        names = [n for n, _ in named]
        self.trainable += names
        logger.info("gradual unfreezing: block %d joined the optimizer at step %d (%d tensors)", block, step, len(names))
        return names

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if self.pending and state.global_step > 0 and state.global_step % self.every_n_steps == 0:
            if optimizer is None:
                raise RuntimeError("GradualUnfreezing needs the Trainer's optimizer in its callback arguments.")
            self.unfreeze_next(optimizer, lr_scheduler, state.global_step)
        return control


def apply_unfreezing(predictor, strategy: str, *, k: Optional[int] = None, lora_r: int = 8, lora_alpha: Optional[int] = None,
                     every_n_steps: int = 10):
    """Set which parameters of ``predictor`` train, by ``strategy`` (see the module docstring).

    Returns the names of the trainable parameters; for ``"lora"`` and ``"lora_after_target"`` the ``LoraConfig`` to pass as ``peft_config``;
    for ``"gradual"`` the ``GradualUnfreezing`` callback (the predictor is then set to its starting point).

    >>> apply_unfreezing(predictor, "last_k", k=2)
    ['base.model.layers.28.self_attn.q_proj.weight', ..., 'neuron_head.weight', 'neuron_head.bias']
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown unfreezing strategy {strategy!r}: use one of {', '.join(STRATEGIES)}.")
    p = unwrap(predictor)
    if strategy in ("lora", "lora_after_target"):
        if strategy == "lora_after_target" and k is not None:
            raise ValueError("lora_after_target chooses its blocks (those after the target): leave k (unfreeze_k) unset, "
                             "or use lora with k.")
        return lora_config(p, r=lora_r, alpha=lora_alpha, k=k, after_target=strategy == "lora_after_target")
    if strategy == "gradual":
        return GradualUnfreezing(p, every_n_steps=every_n_steps)
    if strategy == "full":
        # everything that can reach the head: not the blocks after read_layer, nor an untied LM head a reading head never uses
        unused = block_prefixes(p, range(last_block(p) + 1, len(get_layers(p.base))))
        if not p.head.uses_lm_head and not lm_head_tied(p.base):
            unused += [f"base.{n}." for n, m in p.base.named_modules() if m is p.base.get_output_embeddings()]
        return [n for n, param in p.named_parameters() if param.requires_grad_(not any(n.startswith(u) for u in unused)).requires_grad]
    prefixes = head_prefixes(p)
    if strategy in ("last_k", "after_target"):
        prefixes += block_prefixes(p, _blocks_for(p, strategy, k)) + [_prefix(arch_spec(p.base).final_norm)]
    names = set_trainable(p, prefixes)
    if not names:
        raise ValueError(f"{strategy} leaves no parameter trainable for this predictor.")
    return names
