"""What a reporter of many neurons is told about the neuron it is asked about: the neuron's *query*.

A conditioned reporter (head ``conditioned``) answers for any neuron of the model, including ones it never trained on:
it is given the neuron as an input, and the query is all it knows about it. Three conditionings:

* ``weights``: the neuron's own weights in the residual basis (``nsr_hf.architectures.neuron_weights``): its output
  direction scaled to read its value back (``w_out / |w_out|^2``: a value ``v`` written to the residual stream as
  ``v * w_out`` projects back onto it as ``v``), then its input direction(s) as unit vectors (GPT-2: ``c_fc``; Llama:
  ``gate_proj`` and ``up_proj``). A neuron the reporter never saw has weights too, so the query can generalise to it.
* ``weights+inputs``: the same query, and the readout also computes the neuron again from the representation with the
  neuron's own input weights (``NeuronInputs``: ``act(gate . x) * (up . x)``, or ``act(in . x + b)``, where ``x`` is the
  representation with the final norm's gain undone and the MLP norm's applied), times a learned weight. This generalises
  to unseen neurons as far as the neuron's input is still in the representation, and it is by construction not a report
  of the neuron: it reads what made the neuron fire, so it does not follow the neuron when the neuron is set (its slope
  ratio says so). It is the shortcut an any-neuron reporter can take, measured next to the others.
* ``name``: a fixed random vector of the same width drawn from the neuron's name (``"layer.index"`` seeds it). It tells
  the reporter which neuron it is asked about and nothing else: the control that cannot generalise to an unseen neuron.

The conditioned token head (``conditioned_token``) asks the model itself instead: ``QueryTokens`` maps the query to a few
soft-prompt embeddings that stand where the report prompt names the neuron, and the model's LM head answers with a bin's
report token. The same map for every conditioning, so the name-only control has the same capacity and only lacks the
information.

``ConditionedReadout`` turns a query into a read direction and a mean, and reports
``(h - center) . (sum_p gains[p] * q_p + M q) + b . q + c`` for the representation ``h`` (``center``: the mean
representation of the train rows, so that the direction reads the variation and ``b . q + c`` the neuron's mean;
``q_p``: the query's parts, ``gains``: one
learned gain per part and residual dimension, ``M`` a learned mixing). The gains start at 1 on the output part and 0
elsewhere, and ``M`` at 0: a weight-conditioned reporter starts by reading each neuron along its own output direction.
Per-dimension gains are the structure that can carry over to a neuron never seen (undoing the final norm's gain, for
instance, is one gain per dimension for every neuron), where a free map from queries to directions, fitted on a few dozen
neurons, reproduces those neurons and nothing else. The report is in activation units (no per-neuron statistics), so
that it needs nothing of a neuron it never saw.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch
from torch import nn

from nsr_hf.architectures import arch_spec, get_final_norm, get_mlp, get_pre_mlp_norm, neuron_weights
from nsr_hf.capture import Neuron
from nsr_hf.utils import unwrap

CONDITIONINGS = ("weights", "weights+inputs", "name")


def check_conditioning(conditioning) -> str:
    """``conditioning`` if it is one of ``CONDITIONINGS``; a ValueError that names them otherwise."""
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"conditioning must be one of {', '.join(CONDITIONINGS)}, got {conditioning!r}.")
    return conditioning


def query_parts(model_or_config) -> int:
    """How many residual-width vectors make a query: the output direction and each input projection's row."""
    return 1 + len(arch_spec(unwrap(model_or_config)).mlp_in)


def weight_query(base, neuron) -> torch.Tensor:
    """(parts * hidden,) the ``weights`` query of ``neuron``: ``w_out / |w_out|^2``, then each input direction (unit norm)."""
    neuron = Neuron.parse(neuron)
    weights = neuron_weights(base, neuron.layer, neuron.index)
    out = weights["out"].float()
    parts = [out / out.pow(2).sum().clamp_min(1e-12)]
    for name in arch_spec(unwrap(base)).mlp_in:
        w = weights[f"in:{name}"].float()
        parts.append(w / w.norm().clamp_min(1e-12))
    return torch.cat(parts)


def name_query(neuron, width: int, hidden: int) -> torch.Tensor:
    """(width,) the ``name`` query: Gaussian entries seeded by the neuron's name, each part scaled like a unit vector."""
    digest = hashlib.blake2b(str(Neuron.parse(neuron)).encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    return torch.as_tensor(rng.standard_normal(width) / np.sqrt(hidden), dtype=torch.float32)


def neuron_queries(base, neurons: Sequence, conditioning: str) -> torch.Tensor:
    """(K, parts * hidden) the queries of ``neurons`` (float32, on the base's device), detached from the base's weights."""
    check_conditioning(conditioning)
    hidden = unwrap(base).config.hidden_size
    width = query_parts(base) * hidden
    with torch.no_grad():
        if conditioning != "name":
            rows = [weight_query(base, n) for n in neurons]
        else:
            rows = [name_query(n, width, hidden) for n in neurons]
    device = next(unwrap(base).parameters()).device
    return torch.stack(rows).to(device) if rows else torch.zeros(0, width, device=device)


class NeuronInputs:
    """What the ``weights+inputs`` readout needs to compute neurons again: their input weights ``weights`` (K, n_in, hidden),
    biases ``biases`` (K, n_in), the MLP's activation ``act``, whether it is gated (``act(first) * second``), and the gains
    that turn a final-normed representation into the MLP norm's output (``norm_gains``, (hidden,): the MLP norm's gain over
    the final norm's, of the first neuron's layer)."""

    def __init__(self, base, neurons: Sequence):
        base = unwrap(base)
        spec = arch_spec(base)
        neurons = [Neuron.parse(n) for n in neurons]
        if len({n.layer for n in neurons}) > 1:
            raise ValueError(f"The weights+inputs readout recomputes neurons of one layer (its MLP norm's gains), got layers "
                             f"{sorted({n.layer for n in neurons})}: give neurons of one layer, or use conditioning 'weights'.")
        rows, biases = [], []
        with torch.no_grad():
            for n in neurons:
                mlp = get_mlp(base, n.layer)
                weights = neuron_weights(base, n.layer, n.index)
                rows.append(torch.stack([weights[f"in:{name}"].float() for name in spec.mlp_in]))
                biases.append(torch.stack([getattr(mlp, name).bias[n.index].float() if getattr(getattr(mlp, name), "bias", None) is not None
                                           else torch.zeros((), device=rows[-1].device) for name in spec.mlp_in]))
            layer = neurons[0].layer if neurons else 0
            gain = lambda module: (module.weight.detach().float() if getattr(module, "weight", None) is not None  # noqa: E731
                                   else torch.ones(base.config.hidden_size, device=rows[0].device if rows else None))
            final = gain(get_final_norm(base))
            final = torch.where(final.abs() > 1e-6, final, torch.full_like(final, 1e-6))  # a gain may be negative: never clamp its sign
            self.norm_gains = gain(get_pre_mlp_norm(base, layer)) / final
        self.weights = torch.stack(rows) if rows else torch.zeros(0, len(spec.mlp_in), base.config.hidden_size)
        self.biases = torch.stack(biases) if biases else torch.zeros(0, len(spec.mlp_in))
        self.act = getattr(get_mlp(base, neurons[0].layer if neurons else 0), spec.act)
        self.gated = spec.mlp_kind == "gated"

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, K) the neurons computed from ``x`` (batch, hidden), already in the MLP norm's basis."""
        pre = torch.einsum("bh,kph->bkp", x, self.weights.to(x.dtype)) + self.biases.to(x.dtype)
        return self.act(pre[..., 0]) * pre[..., 1] if self.gated else self.act(pre[..., 0])


class ConditionedReadout(nn.Module):
    """``report[i, n] = (h_i - center) . (sum_p gains[p] * q_n[p] + q_n @ mix.T) + q_n . query_bias + bias`` (module docstring)."""

    def __init__(self, hidden: int, parts: int, recompute: bool = False):
        super().__init__()
        self.hidden, self.parts = hidden, parts
        gains = torch.zeros(parts, hidden)
        gains[0] = 1.0
        self.gains = nn.Parameter(gains)
        self.mix = nn.Parameter(torch.zeros(hidden, parts * hidden))
        self.query_bias = nn.Parameter(torch.zeros(parts * hidden))
        self.bias = nn.Parameter(torch.zeros(()))
        self.register_buffer("center", torch.zeros(hidden))
        if recompute:  # the weights+inputs term: fixed gains on the representation (the norms' ratio, set by fit) and a learned
            # weight. Gains learned inside act(gate) * up diverge (a product of two learned projections): one number carries over
            self.register_buffer("input_gains", torch.ones(hidden))
            self.recompute_weight = nn.Parameter(torch.zeros(()))

    def directions(self, queries: torch.Tensor) -> torch.Tensor:
        """(K, hidden) the read direction of each query."""
        queries = queries.to(self.mix.dtype)
        return (queries.reshape(-1, self.parts, self.hidden) * self.gains).sum(1) + queries @ self.mix.T

    def offsets(self, queries: torch.Tensor) -> torch.Tensor:
        """(K,) the offset of each query."""
        return queries.to(self.query_bias.dtype) @ self.query_bias + self.bias

    def recomputed(self, h: torch.Tensor, inputs: NeuronInputs) -> torch.Tensor:
        """(batch, K) the neurons computed again from the representation with their input weights (``weights+inputs``)."""
        return inputs.values(h.to(self.mix.dtype) * self.input_gains)

    def forward(self, h: torch.Tensor, queries: torch.Tensor, inputs: NeuronInputs | None = None) -> torch.Tensor:
        out = (h.to(self.mix.dtype) - self.center) @ self.directions(queries).T + self.offsets(queries)
        if inputs is not None:
            if not hasattr(self, "recompute_weight"):
                raise ValueError("This readout was built without the recompute term (conditioning 'weights+inputs'): pass no inputs.")
            out = out + self.recompute_weight * self.recomputed(h, inputs)
        return out

    @torch.no_grad()
    def fit(self, queries: np.ndarray, X: np.ndarray, y: np.ndarray, inputs: NeuronInputs | None = None) -> dict:
        """Closed-form start from some neurons' values ``y`` (rows, K) on representations ``X`` (rows, hidden), their queries
        ``queries`` (K, width): ``center`` the rows' mean representation; the output part's gain one number ``s`` for every
        dimension (and, with ``inputs``, the recompute term's weight ``w``, its gains the norms' ratio), fitted by least
        squares pooled over rows and neurons (each in its own standard deviations) of each neuron's deviation from its mean
        on ``s * (h - center) . q_out + w * recomputed``; the mean a ridge regression of what is left of the neurons' means
        on their queries; the other gains and the mixing at 0. A few numbers carry over to an unseen neuron; a fit per
        neuron would not."""
        K = queries.shape[0]
        center = X.mean(0)
        read = (X - center) @ queries[:, : self.hidden].T  # (rows, K)
        weight = 1.0 / np.maximum(y.var(0), 1e-12)
        regressors = [read]
        if inputs is not None and not hasattr(self, "recompute_weight"):
            raise ValueError("This readout was built without the recompute term (conditioning 'weights+inputs'): pass no inputs.")
        if inputs is not None:
            self.input_gains.copy_(inputs.norm_gains.to(self.input_gains.dtype).cpu())
            regressors.append(self.recomputed(torch.as_tensor(X, dtype=self.mix.dtype), inputs).double().numpy())
        centred = [r - r.mean(0) for r in regressors]
        dev = y - y.mean(0)
        A = np.array([[np.sum(weight * a * b) for b in centred] for a in centred])
        coef = np.linalg.lstsq(A + 1e-12 * np.eye(len(centred)), np.array([np.sum(weight * a * dev) for a in centred]), rcond=None)[0]
        scale, recompute = float(coef[0]), (float(coef[1]) if inputs is not None else 0.0)
        # the mean: what the recompute term does not give of each neuron's mean, from its query
        means = y.mean(0) - (recompute * regressors[1].mean(0) if inputs is not None else 0.0)
        q_centred = queries - queries.mean(0)
        kernel = q_centred @ q_centred.T
        lam = max(np.trace(kernel) / max(K, 1), 1e-12)
        query_bias = q_centred.T @ np.linalg.solve(kernel + lam * np.eye(K), means - means.mean())
        gains = np.zeros((self.parts, self.hidden))
        gains[0] = scale
        self.gains.copy_(torch.as_tensor(gains, dtype=self.gains.dtype))
        self.mix.zero_()
        self.query_bias.copy_(torch.as_tensor(query_bias, dtype=self.query_bias.dtype))
        self.bias.fill_(float(means.mean() - queries.mean(0) @ query_bias))
        self.center.copy_(torch.as_tensor(center, dtype=self.center.dtype))
        if inputs is not None:
            self.recompute_weight.fill_(recompute)
        pred = scale * read + (queries @ query_bias + float(self.bias)) + (recompute * regressors[1] if inputs is not None else 0.0)
        r2 = 1 - ((pred - y) ** 2).sum(0) / np.maximum(((y - y.mean(0)) ** 2).sum(0), 1e-12)
        return {"scale": scale, "recompute_weight": recompute, "train_r2_median": float(np.median(r2))}


class QueryTokens(nn.Module):
    """``(K, width) -> (K, tokens, hidden)``: the soft-prompt embeddings that name each neuron in the conditioned token head's
    prompt, a learned linear map of its query. They start at 0 (the prompt holds nothing where the neuron is named): training
    learns how to name a neuron from its query, and a neuron never seen is named by the same map."""

    def __init__(self, width: int, hidden: int, tokens: int):
        super().__init__()
        if tokens < 1:
            raise ValueError(f"query_tokens must be at least 1, got {tokens}.")
        self.tokens, self.hidden = tokens, hidden
        # parameters, not an nn.Linear: the predictor's own init (a random normal for its heads' linear layers) leaves them at 0
        self.weight = nn.Parameter(torch.zeros(tokens * hidden, width))
        self.bias = nn.Parameter(torch.zeros(tokens * hidden))

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(queries.to(self.weight.dtype), self.weight, self.bias).reshape(-1, self.tokens, self.hidden)
