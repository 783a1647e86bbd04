"""Reading and setting MLP neurons during a forward pass.

These live here, all built on PyTorch forward hooks that are always removed on exit (also when
the forward raises):

* ``encode_texts`` / ``model_inputs``: the one tokenisation rule and the one way of calling the model.
  Position ids are computed from the attention mask, so a text's activations do not depend on the
  batch it sits in nor on the padding side.
* ``capture_activations``: neuron values of chosen layers at chosen positions, stopping the forward
  after the deepest layer it needs (and computing only the requested neurons of that layer).
* ``read_live_neurons``: the target neurons' values now, at each row's labelled token (live labels, drift, causal
  tests); ``pad_right``: the one rule that right-pads token rows into ``input_ids`` / ``attention_mask``.
* ``intervene``: set, scale or shift chosen neurons during a forward pass, in every row or chosen rows (causal tests,
  intervention training).

Position rules (``position=``), the same everywhere in nsr_hf:

* ``"last"`` (default): the last real (non-padding) token of each text.
* ``"all"``: every token; padding positions are NaN so that a misuse is loud.
* an ``int`` ``k``: the k-th real token (``0`` = first, ``-1`` = last, as in Python indexing).
* ``"max"``: the token where each neuron is largest.

Tokenisation uses the tokenizer's own special-token rule (``add_special_tokens=True``): a tokenizer
that adds a BOS token gets it, one that does not (GPT-2, SmolLM2) does not. The labelled token is
counted among real tokens, so a BOS token, when present, is real token 0.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np
import torch
from torch import nn

from nsr_hf.architectures import compute_neurons, get_mlp, get_neuron_module, num_layers, num_neurons

Position = Union[str, int]
POSITION_RULES = ("last", "all", "max", "<int>")


@dataclass(frozen=True, order=True)
class Neuron:
    """One MLP neuron, named ``layer.index`` (e.g. ``Neuron(12, 345)`` is ``"12.345"``)."""

    layer: int
    index: int

    @classmethod
    def parse(cls, name: "str | Neuron | tuple[int, int]") -> "Neuron":
        """``"12.345"``, ``"L12.N345"``, ``"L12N345"``, ``(12, 345)`` or a ``Neuron``."""
        if isinstance(name, Neuron):
            return name
        if isinstance(name, (tuple, list)) and len(name) == 2:
            return cls(int(name[0]), int(name[1]))
        text = str(name).strip().upper().replace("L", "").replace("N", ".").replace("..", ".")
        parts = text.split(".")
        if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
            raise ValueError(f"Cannot read a neuron from {name!r}: write it as 'layer.index', e.g. '12.345'.")
        return cls(int(parts[0]), int(parts[1]))

    def __str__(self) -> str:
        return f"{self.layer}.{self.index}"


def validate_layer(model_or_config, layer: int) -> int:
    n = num_layers(model_or_config)
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n:
        raise ValueError(f"Layer {layer!r} is out of range: this model has layers 0..{n - 1}.")
    return layer


def validate_neuron(model_or_config, neuron) -> Neuron:
    """A ``Neuron`` checked against the model's shape, with a clear error when out of range."""
    neuron = Neuron.parse(neuron)
    validate_layer(model_or_config, neuron.layer)
    m = num_neurons(model_or_config)
    if not 0 <= neuron.index < m:
        raise ValueError(f"Neuron index {neuron.index} is out of range for layer {neuron.layer}: "
                         f"this model has neurons 0..{m - 1} per layer.")
    return neuron


def parse_position(value: "str | int") -> Position:
    """A position rule as written in a recipe or on the command line: ``"last"`` / ``"all"`` / ``"max"``, or an
    integer token index given as text (``"-1"`` -> ``-1``). Anything else is returned as given, for
    ``validate_position`` to refuse with the list of rules."""
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return value.strip()
    return value


def validate_position(position: Position) -> Position:
    if isinstance(position, bool) or not (isinstance(position, int) or position in ("last", "all", "max")):
        raise ValueError(f"Unknown position rule {position!r}: use 'last', 'all', 'max' or an integer token index (0 = first, -1 = last).")
    return position


# ----------------------------------------------------------------------------------------------
# Tokenisation and model inputs


def encode_texts(tokenizer, texts: Sequence[str], max_length: int | None = None, padding_side: str | None = None):
    """Tokenise ``texts`` into a padded batch (padding to the longest text only), cut at ``max_length``
    tokens at token boundaries. This is the one tokenisation rule of nsr_hf."""
    if isinstance(texts, str):
        texts = [texts]
    kwargs = {} if padding_side is None else {"padding_side": padding_side}
    return tokenizer(
        list(texts),
        return_tensors="pt",
        padding=True,
        truncation=max_length is not None,
        max_length=max_length,
        add_special_tokens=True,
        **kwargs,
    )


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift a text."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def model_inputs(batch: Mapping[str, torch.Tensor], device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and mask-derived ``position_ids`` for a forward pass."""
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids_from_mask(attention_mask)}
    if device is not None:
        inputs = {k: v.to(device) for k, v in inputs.items()}
    return inputs


def pad_right(rows: Sequence, pad_id: int = 0, masks: Sequence | None = None, *, dtype: torch.dtype = torch.long,
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``: token rows right-padded with ``pad_id`` to the longest one: the one padding rule.

    ``rows`` are token-id sequences (lists, arrays or tensors); ``masks``, when given, their attention masks (``None``
    for a row = all real), else every token of a row is real. Right padding never moves a row's labelled token.
    """
    if not len(rows):
        raise ValueError("pad_right got no rows: give at least one token row.")
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), int(pad_id), dtype=dtype, device=device)
    mask = torch.zeros((len(rows), length), dtype=dtype, device=device)
    for i, row in enumerate(rows):
        n = len(row)
        ids[i, :n] = torch.as_tensor(row if isinstance(row, torch.Tensor) else np.asarray(row), dtype=dtype, device=device)
        given = None if masks is None else masks[i]
        if given is None:
            mask[i, :n] = 1
        else:
            mask[i, :n] = torch.as_tensor(given if isinstance(given, torch.Tensor) else np.asarray(given), dtype=dtype, device=device)
    return ids, mask


def real_token_bounds(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the first and of the last real token of each row (left or right padding)."""
    mask = attention_mask.bool()
    if not mask.any(-1).all():
        raise ValueError("A row of the batch has no real token (empty text?): drop empty texts before capturing.")
    seq_len = mask.shape[-1]
    first = mask.long().argmax(-1)
    last = seq_len - 1 - mask.flip(-1).long().argmax(-1)
    return first, last


def label_positions(attention_mask: torch.Tensor, position: Position) -> torch.Tensor:
    """The labelled token index of each row for ``"last"`` or an integer rule (shape ``(batch,)``)."""
    first, last = real_token_bounds(attention_mask)
    if position == "last":
        return last
    if isinstance(position, int) and not isinstance(position, bool):
        pos = first + position if position >= 0 else last + 1 + position
        bad = (pos < first) | (pos > last)
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            length = int(last[row] - first[row] + 1)
            raise ValueError(f"Token index {position} is outside text {row}, which has {length} tokens; use a smaller index or 'last'.")
        return pos
    raise ValueError(f"label_positions takes 'last' or an integer, not {position!r}")


def select_positions(acts: torch.Tensor, attention_mask: torch.Tensor, position: Position) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reduce ``(batch, seq, k)`` activations by a position rule.

    Returns ``(values, positions)``: ``(batch, k)`` values and the ``(batch, k)`` token index each came
    from, or for ``"all"`` the ``(batch, seq, k)`` tensor with NaN at padding and ``None``.
    """
    validate_position(position)
    mask = attention_mask.bool().to(acts.device)
    if position == "all":
        return acts.masked_fill(~mask[..., None], float("nan")), None
    if position == "max":
        real_token_bounds(attention_mask)
        pos = acts.masked_fill(~mask[..., None], float("-inf")).argmax(1)  # (batch, k)
    else:
        pos = label_positions(attention_mask, position).to(acts.device)[:, None].expand(-1, acts.shape[-1])
    return acts.gather(1, pos[:, None, :]).squeeze(1), pos


# ----------------------------------------------------------------------------------------------
# Recording


class StopForward(Exception):
    """Raised by a hook to end the forward pass once the deepest needed layer is read."""


# Modules whose neuron input an active intervention rewrites; the early-stop shortcut (which computes
# neurons from the MLP input) must not bypass them.
_INTERVENED: dict[int, int] = {}


def _normalise_neurons(model, neurons) -> dict[int, torch.Tensor | None]:
    """``{layer: indices or None}`` from a layer, a list of layers, a dict, or a list of Neurons."""
    if isinstance(neurons, int):
        neurons = {neurons: None}
    elif isinstance(neurons, Neuron) or isinstance(neurons, str):
        n = Neuron.parse(neurons)
        neurons = {n.layer: [n.index]}
    elif not isinstance(neurons, Mapping):
        items = list(neurons)
        if all(isinstance(x, int) and not isinstance(x, bool) for x in items):
            neurons = {layer: None for layer in items}
        else:
            grouped: dict[int, list[int]] = {}
            for item in items:
                n = Neuron.parse(item)
                grouped.setdefault(n.layer, []).append(n.index)
            neurons = grouped
    if not neurons:
        raise ValueError("No layer or neuron requested.")
    out = {}
    for layer, idx in neurons.items():
        validate_layer(model, layer)
        if idx is None:
            out[layer] = None
            continue
        idx = torch.as_tensor(list(idx) if not isinstance(idx, torch.Tensor) else idx, dtype=torch.long).reshape(-1)
        for i in idx.tolist():
            validate_neuron(model, Neuron(layer, i))
        out[layer] = idx
    return out


class NeuronRecorder:
    """Records the neuron vectors of chosen layers on every forward pass while it is active.

    >>> with NeuronRecorder(model, {3: [17, 42], 5: None}) as rec:
    ...     model(**model_inputs(batch))
    >>> rec.activations[3].shape   # (batch, seq, 2); rec.activations[5]: all neurons of layer 5

    ``stop_early=True`` ends the forward after the deepest recorded layer (use ``run``). Values are
    detached: recording never carries gradient. ``callback(layer, tensor)``, when given, is called
    instead of storing (for streaming statistics).
    """

    def __init__(
        self,
        model: nn.Module,
        neurons,
        *,
        stop_early: bool = False,
        callback: Callable[[int, torch.Tensor], None] | None = None,
    ):
        self.model = model
        self.neurons = _normalise_neurons(model, neurons)
        self.stop_early = stop_early
        self.callback = callback
        self.activations: dict[int, torch.Tensor] = {}
        self._handles: list = []
        self.deepest = max(self.neurons)

    def _store(self, layer: int, value: torch.Tensor) -> None:
        value = value.detach()
        if self.callback is not None:
            self.callback(layer, value)
        else:
            self.activations[layer] = value

    def _neuron_hook(self, layer: int, idx: torch.Tensor | None):
        def hook(module, args):
            hidden = args[0]
            self._store(layer, hidden if idx is None else hidden[..., idx.to(hidden.device)])
            if self.stop_early and layer == self.deepest:
                raise StopForward
        return hook

    def _partial_mlp_hook(self, layer: int, idx: torch.Tensor | None):
        # The deepest layer's MLP need not be computed whole: only the requested neurons, and never
        # its output projection.
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            with torch.no_grad():
                self._store(layer, compute_neurons(self.model, layer, x, None if idx is None else idx.to(x.device)))
            raise StopForward
        return hook

    def __enter__(self) -> "NeuronRecorder":
        try:
            for layer, idx in self.neurons.items():
                # the shortcut recomputes the neurons from the plain weights: not when an intervention or a PEFT
                # adapter (a wrapped layer with `base_layer`) changes how the MLP computes them
                adapted = any(hasattr(m, "base_layer") for m in get_mlp(self.model, layer).modules())
                intervened = id(get_neuron_module(self.model, layer)) in _INTERVENED
                shortcut = self.stop_early and layer == self.deepest and not intervened and not adapted
                if shortcut:
                    handle = get_mlp(self.model, layer).register_forward_pre_hook(self._partial_mlp_hook(layer, idx), with_kwargs=True)
                else:
                    handle = get_neuron_module(self.model, layer).register_forward_pre_hook(self._neuron_hook(layer, idx))
                self._handles.append(handle)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        """One forward pass on ``inputs`` (a tokenised batch) that returns ``{layer: (batch, seq, k)}``."""
        self.activations = {}
        device = next(self.model.parameters()).device
        with self:
            try:
                self.model(**model_inputs(inputs, device), use_cache=False)
            except StopForward:
                pass
        missing = set(self.neurons) - set(self.activations) if self.callback is None else set()
        if missing:
            raise RuntimeError(f"The forward pass never reached layer(s) {sorted(missing)}.")
        return self.activations


@dataclass
class Capture:
    """What ``capture_activations`` returns.

    Attributes:
        activations: ``{layer: values}``; ``(batch, k)`` for ``"last"``, ``"max"`` and integer rules,
            ``(batch, seq, k)`` with NaN at padding for ``"all"``. ``k`` is the number of requested
            neurons of that layer, in the order requested (all neurons when none were named).
        positions: ``{layer: (batch, k)}`` token index each value came from (``None`` for ``"all"``).
        neuron_indices: ``{layer: indices or None}`` as requested.
        attention_mask: the batch's mask.
    """

    activations: dict[int, torch.Tensor]
    positions: dict[int, torch.Tensor] | None
    neuron_indices: dict[int, torch.Tensor | None]
    attention_mask: torch.Tensor

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.activations[layer]


def capture_activations(
    model: nn.Module,
    inputs,
    neurons,
    *,
    position: Position = "last",
    tokenizer=None,
    max_length: int | None = None,
    stop_early: bool = True,
) -> Capture:
    """Neuron activations of a batch, read at ``position`` (see the module docstring for the rules).

    >>> cap = capture_activations(model, ["Hello world", "A longer text here"], "12.345", tokenizer=tok)
    >>> cap[12]            # tensor of shape (2, 1): neuron 12.345 at each text's last real token

    ``inputs`` is a tokenised batch (``input_ids`` and ``attention_mask``) or a list of texts (then pass
    ``tokenizer``). ``neurons`` is a layer, a list of layers (all their neurons), ``{layer: indices}``,
    or neuron names such as ``"12.345"`` / ``Neuron(12, 345)``. The forward stops after the deepest
    layer needed unless ``stop_early=False``.
    """
    validate_position(position)
    if isinstance(inputs, str) or (isinstance(inputs, Sequence) and inputs and isinstance(inputs[0], str)):
        if tokenizer is None:
            raise ValueError("Pass tokenizer= to capture activations from texts.")
        inputs = encode_texts(tokenizer, inputs, max_length=max_length)
    recorder = NeuronRecorder(model, neurons, stop_early=stop_early)
    with torch.inference_mode():
        raw = recorder.run(inputs)
    mask = inputs["attention_mask"] if inputs.get("attention_mask") is not None else torch.ones_like(inputs["input_ids"])
    values, positions = {}, {}
    for layer, acts in raw.items():
        values[layer], positions[layer] = select_positions(acts, mask, position)
    return Capture(values, None if position == "all" else positions, recorder.neurons, mask)


def read_live_neurons(model: nn.Module, neurons, inputs: Mapping[str, torch.Tensor], positions: torch.Tensor, *,
                      run: Callable[[], object] | None = None, offset: torch.Tensor | None = None,
                      keep_grad: bool = False) -> tuple[object, torch.Tensor]:
    """``(output of run or None, values)``: the live values of ``neurons`` in ``model`` (a causal LM, its weights as they
    are now) at each row's labelled token, ``(batch, K)`` float32 in the order of ``neurons``: the one live-neuron reader.

    ``positions`` (batch,) are the labelled tokens in ``inputs`` (``input_ids``, ``attention_mask``). ``run``, when given,
    is a forward pass through ``model``'s blocks to read them in (e.g. the predictor's own forward, so that labels and
    report come from one pass); in that pass a row's labelled token sits at ``positions - offset`` (e.g. a prompt that
    starts at the text's first real token). When there is no ``run``, or its pass never reaches a target layer, one pass
    of ``model`` over ``inputs`` reads them, through the modules' own forwards (so adapters and interventions count),
    ended as soon as the deepest target neuron is computed. ``keep_grad`` keeps the values' gradient (live labels train
    through them); otherwise they are detached and that extra pass runs without gradient.
    """
    neurons = [Neuron.parse(n) for n in neurons]
    layers = sorted({n.layer for n in neurons})
    found: dict[int, torch.Tensor] = {}
    state = {"offset": offset, "stop": False}

    def hook_for(layer):
        def hook(module, args):
            if layer not in found:
                hidden = args[0]
                at = positions if state["offset"] is None else positions - state["offset"].to(positions.device)
                value = hidden[torch.arange(hidden.shape[0], device=hidden.device), at.to(hidden.device)]
                found[layer] = value if keep_grad else value.detach()
                if state["stop"] and layer == layers[-1]:
                    raise StopForward
        return hook

    handles = [get_neuron_module(model, layer).register_forward_pre_hook(hook_for(layer)) for layer in layers]
    output = None
    try:
        if run is not None:
            output = run()
        if len(found) < len(layers):
            # the pass read a layer before a target one (or there was none): one more, partial, pass reaches it
            found.clear()
            state.update(offset=None, stop=True)
            with torch.set_grad_enabled(keep_grad and torch.is_grad_enabled()):
                try:
                    model(**model_inputs(inputs, next(model.parameters()).device), use_cache=False)
                except StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [layer for layer in layers if layer not in found]
    if missing:
        raise RuntimeError(f"The forward pass never reached layer(s) {missing}.")
    return output, torch.stack([found[n.layer][:, n.index] for n in neurons], 1).float()


# ----------------------------------------------------------------------------------------------
# Interventions


@dataclass
class Intervention:
    """Set, scale or shift neurons of one layer during a forward pass.

    Attributes:
        layer: the layer.
        indices: neuron indices in that layer.
        mode: ``"set"`` (clamp to ``value``), ``"scale"`` (multiply by ``value``) or ``"add"``.
        value: a number, or a tensor broadcastable to ``(batch, len(indices))`` for per-text values.
        positions: ``None`` to act at every token, or a ``(batch,)`` tensor of token indices (one per text).
        rows: ``None`` to act on every text, or a bool tensor ``(batch,)`` (which texts) or ``(batch, len(indices))``
            (which neurons of which texts): the others keep their natural values exactly (intervention training sets
            the neuron in some rows of a batch and leaves the rest natural).
    """

    layer: int
    indices: Sequence[int]
    mode: str = "set"
    value: float | torch.Tensor = 0.0
    positions: torch.Tensor | None = None
    rows: torch.Tensor | None = None

    def __post_init__(self):
        if self.mode not in ("set", "scale", "add"):
            raise ValueError(f"Unknown intervention mode {self.mode!r}: use 'set', 'scale' or 'add'.")
        if isinstance(self.indices, int):
            self.indices = [self.indices]
        if self.rows is not None and torch.as_tensor(self.rows).dtype != torch.bool:
            raise ValueError("Intervention rows must be a bool tensor (True: intervene on that row), e.g. mask > 0.5.")

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        idx = torch.as_tensor(list(self.indices), dtype=torch.long, device=hidden.device)
        value = torch.as_tensor(self.value, dtype=hidden.dtype, device=hidden.device)
        if value.dim() == 1 and value.shape[0] == hidden.shape[0] and len(idx) != hidden.shape[0]:
            value = value[:, None]  # one value per text
        selected = self._selected_rows(hidden.shape[0], len(idx), hidden.device)  # (batch, k) or None
        if self.positions is None:
            current = hidden[..., idx]
            if value.dim() == 2:
                value = value[:, None, :]
            changed = self._combine(current, value)
            hidden[..., idx] = changed if selected is None else torch.where(selected[:, None, :], changed, current)
        else:
            rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
            pos = self.positions.to(hidden.device).reshape(-1, 1)
            current = hidden[rows, pos, idx[None, :]]
            changed = self._combine(current, value)
            hidden[rows, pos, idx[None, :]] = changed if selected is None else torch.where(selected, changed, current)
        return hidden

    def _selected_rows(self, batch: int, k: int, device) -> torch.Tensor | None:
        """``rows`` as a (batch, k) bool tensor (``None``: every row)."""
        if self.rows is None:
            return None
        rows = torch.as_tensor(self.rows, device=device).bool()
        if rows.dim() == 1:
            rows = rows[:, None]
        if rows.dim() != 2 or rows.shape[0] != batch or rows.shape[1] not in (1, k):
            raise ValueError(f"Intervention rows must be a bool tensor of shape ({batch},) or ({batch}, {k}) for this batch of {batch} "
                             f"texts and {k} neuron(s); got shape {tuple(rows.shape)}.")
        return rows.expand(batch, k)

    def _combine(self, current: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if self.mode == "set":
            return value.expand_as(current).to(current.dtype)
        if self.mode == "scale":
            return current * value
        return current + value


@contextlib.contextmanager
def intervene(model: nn.Module, interventions: "Intervention | Iterable[Intervention]") -> Iterator[None]:
    """Apply interventions on every forward pass inside the ``with`` block.

    >>> with intervene(model, Intervention(layer=3, indices=[17], mode="set", value=5.0)):
    ...     out = model(**model_inputs(batch))

    The change is made on the input of the MLP's output projection, so the layer's output and every
    later layer see it, and nothing earlier does. Recorders active at the same time see the changed value.
    """
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    handles, modules = [], []
    try:
        for iv in interventions:
            validate_layer(model, iv.layer)
            for i in iv.indices:
                validate_neuron(model, Neuron(iv.layer, int(i)))
            module = get_neuron_module(model, iv.layer)

            def hook(mod, args, iv=iv):
                return (iv.apply(args[0]),) + tuple(args[1:])

            # prepend: recorders on the same module, registered earlier, see the intervened value
            handles.append(module.register_forward_pre_hook(hook, prepend=True))
            modules.append(id(module))
            _INTERVENED[id(module)] = _INTERVENED.get(id(module), 0) + 1
        yield
    finally:
        for handle in handles:
            handle.remove()
        for key in modules:
            _INTERVENED[key] -= 1
            if not _INTERVENED[key]:
                del _INTERVENED[key]
