"""The frozen-prefix cache: train only the blocks that can change, on the residual stream cached where they begin.

When every block below block ``c`` is frozen for the whole run (``unfreeze`` ``after_target``, ``last_k``,
``lora_after_target``, ``head_only``), the residual stream entering block ``c`` is the same at every step for a given
training row. ``PrefixCache`` computes it once per row (no gradient, eval mode, in the Trainer's autocast context), keeps it
in memory (float32), and during a training step replaces blocks ``0..c-1`` by a passthrough and feeds the cached states
into block ``c`` (into the final norm when no block trains) with a forward pre-hook. The model's own forward still computes
the embedding, the rotary embeddings and the masks (cheap), so the losses and the weights are those of the full forward,
to float round-off.

Where the cache sits (``cache_point``): at the lowest block with a trainable parameter (LoRA adapters included), or after
the block the head reads when no block trains. With intervention training or live labels it sits at most at the input of
the lowest target neuron's block: the neuron is set, or read, inside that block, so the block must run.

Where it does not apply (``cache_point`` says why): a trainable embedding or block 0 (nothing frozen below), gradual
unfreezing (blocks join the optimizer during the run), gradient checkpointing (the backward pass recomputes the blocks
after the cache is lifted) and dropout before the cache point (a frozen block in train mode with dropout does not give the
same output twice, so a cached input would not be the one training sees).

Rows are found by content, not by index: a row's key is its real tokens and its labelled token, which fix the sequence the
head runs through the blocks (the text itself, or the token head's prompt: the text up to the labelled token, then the
suffix). So the dataset needs no index column, and the cache holds whatever sampler order, resume or shard the Trainer uses.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from nsr_hf.architectures import arch_spec, get_final_norm, get_layers
from nsr_hf.capture import StopForward
from nsr_hf.utils import unwrap

PREFIX_CACHE_MODES = ("auto", "on", "off")


def check_mode(mode) -> str:
    """``mode`` if it is one of ``PREFIX_CACHE_MODES``; a ValueError that says so otherwise."""
    if mode not in PREFIX_CACHE_MODES:
        raise ValueError(f"prefix_cache must be one of {', '.join(PREFIX_CACHE_MODES)}, got {mode!r}.")
    return mode


def strategy_refusal(unfreeze: str, k: Optional[int] = None, gradient_checkpointing: bool = False) -> Optional[str]:
    """Why the cache cannot serve a recipe, known from its settings alone (before the model is loaded); ``None`` if it may."""
    if gradient_checkpointing:
        return ("gradient_checkpointing recomputes the blocks in the backward pass, after the cached inputs are lifted; "
                "turn gradient_checkpointing off to use the cache")
    if unfreeze == "full":
        return ("unfreeze 'full' trains the embeddings and block 0, so no frozen prefix is left to cache; "
                "use after_target, last_k, lora_after_target or head_only to use the cache")
    if unfreeze == "gradual":
        return ("unfreeze 'gradual' adds blocks to the optimizer during the run, down to block 0, so the frozen prefix does not stay "
                "frozen; use last_k or after_target to use the cache")
    if unfreeze == "lora" and k is None:
        return ("unfreeze 'lora' puts LoRA adapters on every block up to the read layer, block 0 included, so no frozen prefix is "
                "left to cache; give unfreeze_k (LoRA on the last k blocks) or use lora_after_target to use the cache")
    return None


def cache_point(predictor, *, target_block_runs: bool = False) -> tuple[Optional[int], Optional[str]]:
    """``(c, None)``: the block whose input the cache holds (``read_layer + 1``: the final norm's input, when no block
    trains); or ``(None, why)`` when no frozen prefix exists. ``target_block_runs``: intervention training or live labels,
    which set or read the target neuron inside its block, so that block must run (the cache sits at most at its input)."""
    p = unwrap(predictor)
    if p.head.trains_prompt_input:
        return None, (f"the {p.head.name} head puts trained embeddings (the neuron's query) into the prompt that block 0 runs: "
                      "no frozen prefix is left to cache")
    base = p.base
    layers = get_layers(base)
    read = p.config.effective_read_layer
    trainable = [i for i, block in enumerate(layers) if i <= read and any(q.requires_grad for q in block.parameters())]
    # anything else of the base that trains, except the final norm and an untied output embedding (both after every block)
    after = {id(q) for q in get_final_norm(base).parameters()}
    out = base.get_output_embeddings()
    inputs = base.get_input_embeddings()
    if out is not None and (inputs is None or out.weight is not inputs.weight):
        after |= {id(q) for q in out.parameters()}
    in_blocks = {id(q) for block in layers for q in block.parameters()}
    below = [n for n, q in base.named_parameters() if q.requires_grad and id(q) not in after and id(q) not in in_blocks]
    if below:
        return None, (f"{below[0]} trains (the embeddings feed every block): no frozen prefix is left to cache; "
                      "use after_target, last_k, lora_after_target or head_only to use the cache")
    c = trainable[0] if trainable else read + 1
    if target_block_runs:
        c = min(c, min(n.layer for n in p.config.target_neurons))
    if c == 0 and trainable and trainable[0] == 0:
        what = "LoRA adapters" if any("lora_" in n for n, q in layers[0].named_parameters() if q.requires_grad) else "its weights"
        return None, (f"block 0 trains ({what}), so no frozen prefix is left to cache; train only later blocks (unfreeze_k, "
                      "lora_after_target, after_target) to use the cache")
    if c == 0:
        return None, "the target neuron is in block 0, which intervention training or live labels must run: no frozen prefix is left"
    dropout = prefix_dropout(base, c)
    if dropout:
        return None, (f"{dropout} is active before block {c}: in training mode a frozen block with dropout does not give the same output "
                      "twice, so a cached input would not be the one training sees; set the base model's dropout to 0 to use the cache")
    return c, None


def prefix_dropout(base, c: int) -> Optional[str]:
    """The name of a dropout with a rate above 0 that acts before block ``c`` (in the embedding or blocks ``0..c-1``), else ``None``."""
    layers = get_layers(base)
    skip = {id(m) for block in list(layers)[c:] for m in block.modules()} | {id(m) for m in get_final_norm(base).modules()}
    out = base.get_output_embeddings()
    if out is not None:
        skip |= {id(m) for m in out.modules()}
    for name, module in base.named_modules():
        if id(module) in skip:
            continue
        if isinstance(module, nn.Dropout) and module.p > 0:
            return f"dropout {name} (p={module.p})"
        # attention implementations keep their rate as a float (Llama's attention_dropout) and apply it only in training
        for attr, value in vars(module).items():
            if "dropout" in attr and isinstance(value, float) and value > 0:
                return f"dropout {name}.{attr} ({value})"
    return None


def row_keys(inputs: dict) -> list[bytes]:
    """Each batch row's key: its real tokens and its labelled token (they fix the sequence the head runs)."""
    ids = inputs["input_ids"].detach().cpu().numpy().astype(np.int64)
    mask = np.ones(ids.shape, dtype=bool) if inputs.get("attention_mask") is None else \
        inputs["attention_mask"].detach().cpu().numpy().astype(bool)
    positions = inputs.get("label_positions")
    positions = [-1] * len(ids) if positions is None else positions.detach().cpu().reshape(-1).tolist()
    return [ids[i][mask[i]].tobytes() + int(positions[i]).to_bytes(8, "little", signed=True) for i in range(len(ids))]


def run_lengths(predictor, inputs: dict) -> torch.Tensor:
    """(batch,) real length of the sequence the head runs through the blocks for each row: the text, or the token head's
    prompt (no forward pass)."""
    p = unwrap(predictor)
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(inputs["input_ids"]) if mask is None else mask
    if p.head.takes_prompt:
        _, mask = p.report_prompts(inputs["input_ids"], mask, inputs.get("label_positions"))
    return mask.sum(-1).cpu()


class Passthrough(nn.Module):
    """A block that returns its input residual stream, in the format of the block it stands for: the hidden states alone
    (transformers 5) or a tuple that starts with them (``as_tuple``; older blocks)."""

    def __init__(self, as_tuple: bool = False):
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


class PrefixCache:
    """The residual stream entering block ``layer`` of every training row (see the module docstring).

    ``states`` is one float32 (positions, hidden) tensor of all rows' real positions one after the other; ``spans`` maps a
    row's key (``row_keys``) to its (start, length) in it.
    """

    def __init__(self, layer: int):
        self.layer = int(layer)
        self.states = torch.empty(0)
        self.spans: dict[bytes, tuple[int, int]] = {}
        self.seconds = 0.0
        self.blocks_return_tuples = False  # seen in build: what a passthrough must return
        self.started_at: Optional[int] = None  # the block of the lower cache it was built from, if any

    @property
    def rows(self) -> int:
        return len(self.spans)

    @property
    def nbytes(self) -> int:
        return self.states.numel() * self.states.element_size()

    def describe(self) -> str:
        """One line for the log: where, how many rows, how large."""
        source = f", from the head's probe pass at block {self.started_at}" if self.started_at is not None else ""
        return (f"prefix cache: the residual stream entering block {self.layer} for {self.rows} training rows "
                f"({self.nbytes / 1e6:.1f} MB, built in {self.seconds:.1f} s{source}); training steps run the blocks from there")

    def summary(self) -> dict:
        """What ``metrics.json`` records: the block whose input is cached, the rows and the bytes."""
        return {"used": True, "layer": self.layer, "rows": self.rows, "bytes": self.nbytes,
                **({"started_at_block": self.started_at} if self.started_at is not None else {})}

    def _entry(self, predictor) -> nn.Module:
        """The module whose input is the cached stream: block ``layer``, or the final norm when no block runs after it."""
        p = unwrap(predictor)
        if self.layer <= p.config.effective_read_layer:
            return get_layers(p.base)[self.layer]
        return get_final_norm(p.base)

    @classmethod
    def from_states(cls, recorded: "RecordedStates", rows) -> Optional["PrefixCache"]:
        """A ``PrefixCache`` at ``recorded.layer`` of ``rows`` (dicts or a split with ``input_ids`` and ``label_position``;
        unpadded) from the states ``recording_states`` kept, for a head that runs the rows themselves (not the token head's
        prompt); ``None`` when a row's states were not recorded."""
        cache = cls(recorded.layer)
        cache.blocks_return_tuples = recorded.blocks_return_tuples
        states = recorded.states
        chunks, start = [], 0
        ids_column = rows["input_ids"] if hasattr(rows, "column_names") else [r["input_ids"] for r in rows]
        positions = rows["label_position"] if hasattr(rows, "column_names") else [r["label_position"] for r in rows]
        for ids, position in zip(ids_column, positions):
            tokens = np.asarray(ids, dtype=np.int64).tobytes()
            key = tokens + int(position).to_bytes(8, "little", signed=True)
            if key in cache.spans:
                continue
            state = states.get(tokens)
            if state is None:
                return None
            chunks.append(state)
            cache.spans[key] = (start, len(state))
            start += len(state)
        cache.states = torch.cat(chunks) if chunks else torch.empty(0)
        return cache

    def holds(self, keys: list[bytes]) -> bool:
        """Whether every one of ``keys`` (``row_keys``) is cached."""
        return all(key in self.spans for key in keys)

    def holds_rows(self, rows) -> bool:
        """Whether every one of ``rows`` (a split, or dicts with ``input_ids`` and ``label_position``; unpadded) is cached."""
        ids = rows["input_ids"] if hasattr(rows, "column_names") else [r["input_ids"] for r in rows]
        positions = rows["label_position"] if hasattr(rows, "column_names") else [r["label_position"] for r in rows]
        return self.holds([np.asarray(i, dtype=np.int64).tobytes() + int(p).to_bytes(8, "little", signed=True)
                           for i, p in zip(ids, positions)])

    @torch.no_grad()
    def build(self, predictor, batches: Iterable[dict], context=contextlib.nullcontext,
              start: Optional["PrefixCache"] = None) -> "PrefixCache":
        """Run the head's own forward pass on ``batches`` (collated training rows on the model's device), stopped at the
        cache point, in eval mode and in ``context`` (the Trainer's autocast), and keep each new row's states.

        ``start``: a cache of the same model at a lower block (``start.layer <= layer``) whose blocks below it are the ones
        this cache's rows run through: a batch whose rows it holds runs from there (only blocks ``start.layer..layer-1``)."""
        if start is not None and start.layer > self.layer:
            raise ValueError(f"A PrefixCache at block {self.layer} cannot start from one at block {start.layer}, above it.")
        if start is not None:
            self.blocks_return_tuples = start.blocks_return_tuples
        if self.spans:
            raise RuntimeError("A PrefixCache is built once: make a new one for other rows.")
        p = unwrap(predictor)
        was_training = p.training
        p.eval()
        chunks, offset, recorded = [], 0, {}

        def record(module, args):
            recorded["hidden"] = args[0]
            raise StopForward

        def record_format(module, args, output):
            self.blocks_return_tuples = isinstance(output, tuple)

        handles = [self._entry(p).register_forward_pre_hook(record),
                   get_layers(p.base)[self.layer - 1].register_forward_hook(record_format)]
        try:
            for batch in batches:
                keys, lengths = row_keys(batch), run_lengths(p, batch).tolist()
                fresh = [i for i, key in enumerate(keys) if key not in self.spans]
                if not fresh:
                    continue
                recorded.clear()
                lower = start is not None and start.holds(keys)
                if lower:
                    self.started_at = start.layer
                if lower and start.layer == self.layer:  # the states are given: copied, nothing runs
                    hidden = start.batch_states(keys, torch.zeros(len(keys), max(lengths), start.states.shape[-1]))
                else:
                    with context(), (start.feeding(p, batch) if lower else contextlib.nullcontext()):
                        try:
                            p.head.logits(p, batch["input_ids"], batch.get("attention_mask"), batch.get("label_positions"))
                        except StopForward:
                            pass
                    hidden = recorded["hidden"].detach().float().cpu()
                for i in fresh:
                    if keys[i] in self.spans:  # the same row twice in one batch
                        continue
                    chunks.append(hidden[i, : lengths[i]].clone())  # a copy: a view would keep the whole padded batch alive
                    self.spans[keys[i]] = (offset, lengths[i])
                    offset += lengths[i]
        finally:
            for handle in handles:
                handle.remove()
            p.train(was_training)
        self.states = torch.cat(chunks) if chunks else torch.empty(0, p.base.config.hidden_size)
        return self

    def batch_states(self, keys: list[bytes], hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` (batch, positions, width) with each row's real positions replaced by its cached states. Padding
        positions keep what reached them: the attention mask hides them from every real token."""
        if hidden.shape[0] != len(keys):
            raise RuntimeError(f"The prefix cache got {hidden.shape[0]} sequences for a batch of {len(keys)} rows.")
        try:
            spans = [self.spans[key] for key in keys]
        except KeyError:
            raise RuntimeError("A training row is not in the prefix cache: the cache was built on another train_dataset.") from None
        length = hidden.shape[1]
        if max(n for _, n in spans) > length:
            raise RuntimeError("The prefix cache holds a row longer than the sequence the head runs: the cache does not match the head.")
        t = torch.arange(length)
        starts = torch.tensor([s for s, _ in spans])[:, None]
        valid = t[None, :] < torch.tensor([n for _, n in spans])[:, None]
        cached = self.states[torch.where(valid, starts + t[None, :], 0)]
        valid = valid.to(hidden.device)[..., None]
        return torch.where(valid, cached.to(device=hidden.device, dtype=hidden.dtype), hidden)

    @contextlib.contextmanager
    def feeding(self, predictor, inputs: dict) -> Iterator[None]:
        """Inside the ``with`` block, the predictor's forward passes on the batch ``inputs`` run blocks ``0..layer-1`` as a
        passthrough and start block ``layer`` (or the final norm) from the cached states of the batch's rows.
        ``predictor`` may also be a causal LM itself: its block ``layer`` starts from the states."""
        p = unwrap(predictor)
        keys = row_keys(inputs)
        base, entry = (p.base, self._entry(p)) if hasattr(p, "head") else (p, get_layers(p)[self.layer])
        spec = arch_spec(base)
        parent_path, _, name = spec.layers.rpartition(".")
        parent = base.get_submodule(parent_path)
        layers = getattr(parent, name)

        def feed(module, args):
            return (self.batch_states(keys, args[0]),) + tuple(args[1:])

        # the same list, the prefix blocks swapped for passthroughs: block indices (interventions, live-label hooks) still hold
        passthroughs = [Passthrough(self.blocks_return_tuples) for _ in range(self.layer)]
        setattr(parent, name, nn.ModuleList(passthroughs + list(layers)[self.layer:]))
        handle = entry.register_forward_pre_hook(feed)
        try:
            yield
        finally:
            handle.remove()
            setattr(parent, name, layers)


@dataclass
class RecordedStates:
    """What ``recording_states`` kept: the block, each sequence's states by its real tokens, the blocks' output format."""

    layer: int
    states: dict = field(default_factory=dict)  # real tokens (int64 bytes) -> (length, hidden) float32
    blocks_return_tuples: bool = False


@contextlib.contextmanager
def recording_states(base, layer: int) -> Iterator[RecordedStates]:
    """Inside the ``with`` block, every forward pass of ``base`` (a causal LM) that reaches block ``layer`` keeps the
    residual stream entering that block for each sequence (``RecordedStates``). For a pass that runs anyway (the probe
    features the head starts from) to give the frozen-prefix cache too: ``PrefixCache.from_states``."""
    spec = arch_spec(base)
    layers = get_layers(base)
    if not 0 < layer < len(layers):
        raise ValueError(f"recording_states needs a block 1..{len(layers) - 1}, got {layer}.")
    parent = base.get_submodule(spec.layers.rpartition(".")[0])  # the model whose forward takes the token ids
    seen: dict = {}
    recorded = RecordedStates(int(layer))
    out = recorded.states

    def inputs(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen["ids"], seen["mask"] = ids, kwargs.get("attention_mask")

    def record(module, args):
        ids, mask = seen.get("ids"), seen.get("mask")
        if ids is None:
            return
        hidden = args[0].detach().float().cpu()
        ids = ids.detach().cpu().numpy().astype(np.int64)
        mask = np.ones(ids.shape, dtype=bool) if mask is None or mask.dim() != 2 else mask.detach().cpu().numpy().astype(bool)
        for i in range(len(ids)):
            key = ids[i][mask[i]].tobytes()
            if key not in out:
                out[key] = hidden[i, : int(mask[i].sum())].clone()

    def record_format(module, args, output):
        recorded.blocks_return_tuples = isinstance(output, tuple)

    handles = [parent.register_forward_pre_hook(inputs, with_kwargs=True), layers[layer].register_forward_pre_hook(record),
               layers[layer - 1].register_forward_hook(record_format)]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def build_prefix_cache(predictor, layer: int, batches: Iterable[dict], sizes: Iterable[dict], max_bytes: float,
                       context=contextlib.nullcontext, start: Optional[PrefixCache] = None) -> tuple[Optional[PrefixCache], Optional[str]]:
    """A built ``PrefixCache`` at ``layer``, or ``(None, why)`` when the rows' states would take more than ``max_bytes``
    (``sizes``: the same batches, only measured, before anything is computed)."""
    p = unwrap(predictor)
    width = p.base.config.hidden_size
    keys, positions = set(), 0
    for batch in sizes:
        for key, n in zip(row_keys(batch), run_lengths(p, batch).tolist()):
            if key not in keys:
                keys.add(key)
                positions += n
    need = positions * width * 4
    if need > max_bytes:
        return None, (f"the cache would take {need / 1e9:.3g} GB ({len(keys)} rows), over prefix_cache_max_gb "
                      f"({max_bytes / 1e9:.3g} GB): the frozen blocks are recomputed at every step instead")
    began = time.perf_counter()
    if start is not None and start.layer == layer and start.holds(list(keys)):
        cache = start  # the rows' states at this very block are given
    else:
        cache = PrefixCache(layer).build(p, batches, context, start=start if start is not None and start.layer <= layer else None)
    cache.seconds = time.perf_counter() - began
    return cache, None
