"""Per-sample gradients of the attention parameters, with ``torch.func`` (SPEC §2).

The loss of sample ``i`` is the token-mean next-token cross-entropy over its valid positions: target
position ``t`` (predicting ``tokens[i, t]`` from position ``t - 1``) counts when both ``t`` and
``t - 1`` are valid in ``attention_mask``. Left or right padding both work: the mask is also given to
the model, so padded keys are not attended and positions are counted from the first real token — a
left-padded sample has the same gradient as the unpadded one. A ``TransformerBridge``'s masked forward
cannot run under ``vmap``; there each padded sample is trimmed to its tokens (samples grouped by their
valid span), which gives exactly that gradient, and masks must be left or right padding (no gaps).

Gradients are taken of the attention parameters only (per-head layout in :mod:`tl_circuits.models.spec`:
``W_Q``, ``W_K``/``_W_K``, ``W_V``/``_W_V``, ``W_O`` of every layer; ``b_Q``/``b_K``/``b_V`` if asked,
``b_O`` never) and returned as float32 per-head rows ``[N, n_layers, heads, n_params_per_head]`` per
block (heads are KV heads for K/V under GQA), in chunks of samples with ``vmap(grad(...))``.

Two engines (``GradientConfig.method``), equal to each other and to a plain per-sample
``loss.backward()`` loop (tested):

* ``"direct"``: ``functional_call`` + ``vmap(grad(loss))`` with respect to the attention weights
  themselves. Simple, but each sample's full weight gradient lives inside the ``vmap`` (~0.3 GB per
  sample of a chunk for GPT-2 small).
* ``"factored"`` (default): ``vmap(grad(loss))`` with respect to zero perturbations added at
  ``hook_q``/``hook_k``/``hook_v`` and at the attention output, capturing the attention inputs and
  ``hook_z`` on the way (``has_aux``). A weight gradient is a sum over positions of outer products
  (``dL/dW_Q[h] = Σ_t x_t ⊗ dL/dq_t[h]``, :meth:`ModelSpec.rows_from_factors`), so these
  :class:`GradientFactors` — ``O(pos·(D + H·d))`` per layer instead of ``O(H·D·d)`` — give the exact
  rows on demand. They are ~8× smaller than the rows for GPT-2 small at 64 positions, which is what
  lets :func:`tl_circuits.interference.engine.compute_interference` hold whole tasks in a few GB.

Memory: the chunk size follows from ``memory_budget_gb`` and the model's size
(:func:`engine_bytes_per_sample`); the rows returned by :func:`per_sample_gradients` take
``N * n_attention_params * 4`` bytes and must fit the budget too — for more, iterate
(:func:`iter_per_sample_gradients`) or use ``compute_interference``, which streams.

The model is not modified: parameters, ``requires_grad`` flags, ``.grad``, train/eval mode and hooks
are as before. Forward hooks attached to the model (e.g. a circuit freeze) take part in the forward
pass, so the gradients are those of the hooked model (the factored engine perturbs q/k/v before and
reads z after the caller's hooks); backward hooks cannot run inside ``torch.func`` transforms and are
refused with a clear error.

>>> from transformer_lens import HookedTransformer, HookedTransformerConfig
>>> cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=4, d_head=4, n_ctx=8, d_vocab=20,
...                               act_fn="gelu", n_key_value_heads=2, positional_embedding_type="rotary")
>>> model = HookedTransformer(cfg)
>>> tokens = torch.randint(0, 20, (3, 8), generator=torch.Generator().manual_seed(0))
>>> grads = per_sample_gradients(model, tokens, config=GradientConfig(progress=False))
>>> {block: tuple(g.shape) for block, g in grads.per_block.items()}
{'Q': (3, 2, 4, 64), 'K': (3, 2, 2, 64), 'V': (3, 2, 2, 64), 'O': (3, 2, 4, 64)}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.func import grad, vmap
from tqdm.auto import tqdm

from tl_circuits.models.spec import (
    BLOCKS,
    ModelSpec,
    check_tokens,
    functional_logits,
    model_logits,
    model_spec,
    register_factor_hooks,
)

from tl_circuits.defaults import GB
from tl_circuits.interference.config import GradientConfig, Method


def _pick(t: Optional[Tensor], index) -> Optional[Tensor]:
    return None if t is None else t[index]


def _cat_optional(parts, name: str) -> Optional[Tensor]:
    values = [getattr(p, name) for p in parts]
    return None if any(v is None for v in values) else torch.cat(values)


@dataclass
class PerSampleGradients:
    """Per-sample gradients as per-head rows, one float32 tensor per block.

    Attributes:
        per_block: ``{"Q"|"K"|"V"|"O": [n_samples, n_layers, heads, n_params_per_head]}``; rows as
            :meth:`ModelSpec.per_head` lays them out (a head's weight slice flattened, then its bias).
        spec: the model's :class:`ModelSpec`.
        include_biases: whether bias gradients are part of the rows.
        losses: each sample's loss (token-mean next-token cross-entropy).
        n_targets: each sample's number of valid target positions.
    """

    per_block: dict[str, Float[Tensor, "n n_layers heads per_head"]]
    spec: ModelSpec
    include_biases: bool = False
    losses: Optional[Float[Tensor, " n"]] = None
    n_targets: Optional[Int[Tensor, " n"]] = None

    @property
    def n_samples(self) -> int:
        return next(iter(self.per_block.values())).shape[0]

    def __len__(self) -> int:
        return self.n_samples

    def select(self, index) -> "PerSampleGradients":
        """The gradients of a subset of samples (an int, slice, list or index tensor)."""
        if isinstance(index, int):
            index = [index]
        return PerSampleGradients({b: g[index] for b, g in self.per_block.items()}, self.spec,
                                  self.include_biases, _pick(self.losses, index), _pick(self.n_targets, index))

    def scaled(self, factor: float) -> "PerSampleGradients":
        """Every gradient multiplied by ``factor`` (used to check the scaling law of SPEC §3)."""
        return PerSampleGradients({b: g * factor for b, g in self.per_block.items()}, self.spec,
                                  self.include_biases, self.losses, self.n_targets)

    def contributions(self) -> dict[str, Float[Tensor, "n n_layers heads per_head"]]:
        """C_i = g_i ⊙ g_i per block."""
        return {b: g.square() for b, g in self.per_block.items()}

    @property
    def nbytes(self) -> int:
        return sum(g.numel() * g.element_size() for g in self.per_block.values())

    @staticmethod
    def cat(parts: Sequence["PerSampleGradients"]) -> "PerSampleGradients":
        """Concatenate along the sample dimension."""
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        for p in parts[1:]:
            if p.spec != first.spec or p.include_biases != first.include_biases:
                raise ValueError("cannot concatenate gradients of different models or bias settings")
        return PerSampleGradients({b: torch.cat([p.per_block[b] for p in parts]) for b in first.per_block},
                                  first.spec, first.include_biases, _cat_optional(parts, "losses"),
                                  _cat_optional(parts, "n_targets"))


@dataclass
class GradientFactors:
    """Per-sample factors of the attention gradients (the ``"factored"`` engine), float32.

    Attributes:
        inputs: ``{"Q"|"K"|"V": [n, L, pos, D]}`` — the attention module's query/key/value inputs (often
            one shared tensor).
        out_grads: ``{"Q": [n, L, pos, H, d], "K"|"V": [n, L, pos, G, d]}`` — gradients at
            ``hook_q``/``hook_k``/``hook_v``; ``"O": [n, L, pos, D]`` — at the attention output.
        z: ``[n, L, pos, H, d]`` — ``hook_z``, the input of ``W_O``.
    """

    inputs: dict[str, Tensor]
    out_grads: dict[str, Tensor]
    z: Tensor
    spec: ModelSpec
    include_biases: bool = False
    losses: Optional[Float[Tensor, " n"]] = None
    n_targets: Optional[Int[Tensor, " n"]] = None

    @property
    def n_samples(self) -> int:
        return self.z.shape[0]

    def __len__(self) -> int:
        return self.n_samples

    @property
    def nbytes(self) -> int:
        tensors = {id(t): t for t in [*self.inputs.values(), *self.out_grads.values(), self.z]}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def rows(self, block: str, layers: slice = slice(None)) -> Float[Tensor, "n n_layers heads per_head"]:
        """Per-head gradient rows of one block (optionally some layers), float32."""
        inputs = self.z if block == "O" else self.inputs[block]
        return self.spec.rows_from_factors(block, inputs[:, layers], self.out_grads[block][:, layers],
                                           self.include_biases)

    def to_gradients(self) -> PerSampleGradients:
        return PerSampleGradients({b: self.rows(b) for b in BLOCKS}, self.spec, self.include_biases,
                                  self.losses, self.n_targets)

    def select(self, index) -> "GradientFactors":
        if isinstance(index, int):
            index = [index]
        shared = {}  # keep shared input tensors shared
        inputs = {}
        for b, t in self.inputs.items():
            inputs[b] = shared.setdefault(id(t), t[index])
        return GradientFactors(inputs, {b: t[index] for b, t in self.out_grads.items()}, self.z[index], self.spec,
                               self.include_biases, _pick(self.losses, index), _pick(self.n_targets, index))


# ----- sizes and the memory rule --------------------------------------------------------------------

def n_attention_params(spec: ModelSpec, include_biases: bool = False) -> int:
    """Number of attention parameters that get a per-sample gradient (all layers, all blocks)."""
    return sum(spec.n_layers * spec.n_block_heads(b) * spec.n_params_per_head(b, include_biases) for b in BLOCKS)


def gradient_bytes_per_sample(spec: ModelSpec, include_biases: bool = False) -> int:
    """Bytes of one sample's float32 per-head gradient rows."""
    return 4 * n_attention_params(spec, include_biases)


def _shared_inputs(model) -> bool:
    # In a HookedTransformer block the query, key and value inputs are the same tensor's values except
    # with shortformer positions (added to queries and keys only); split inputs are rejected by model_spec.
    return model.cfg.positional_embedding_type != "shortformer"


def factor_bytes_per_sample(model, n_pos: int) -> int:
    """Bytes of one sample's float32 :class:`GradientFactors` at ``n_pos`` positions."""
    spec = model_spec(model)
    n_inputs = 1 if _shared_inputs(model) else 3
    per_position = (n_inputs + 1) * spec.d_model + (2 * spec.n_heads + 2 * spec.n_kv_heads) * spec.d_head
    return 4 * spec.n_layers * n_pos * per_position


def _activation_bytes(model, n_pos: int) -> int:
    spec = model_spec(model)
    itemsize = next(model.parameters()).element_size()
    d_mlp = model.cfg.d_mlp or 0
    per_layer = n_pos * (32 * spec.d_model + 8 * spec.n_heads * spec.d_head + 8 * spec.n_heads * n_pos + 8 * d_mlp)
    return itemsize * spec.n_layers * per_layer + n_pos * spec.d_vocab * (2 * itemsize + 12)


def engine_bytes_per_sample(model, n_pos: int, include_biases: bool = False, method: Method = "factored") -> int:
    """Working memory of one sample inside a ``vmap(grad)`` chunk, excluding its float32 result.

    The rule (calibrated by peak RSS on a GPT-2-small-shaped model at 64 positions and vocab 1000, where
    it gives ~0.22 GB per sample for ``"factored"`` and ~0.5 GB for ``"direct"``): an activation estimate
    (residual, q/k/v/z, scores and pattern, MLP, logits with their log-softmax, and their gradients
    under ``vmap``), plus for ``"direct"`` three copies of the attention weight gradient in the model's
    dtype (the ``vmap``-ed weight gradients and their reshaping), for ``"factored"`` two copies of the
    factors.
    """
    spec = model_spec(model)
    if method == "direct":
        itemsize = next(model.parameters()).element_size()
        return _activation_bytes(model, n_pos) + 3 * itemsize * n_attention_params(spec, include_biases)
    return _activation_bytes(model, n_pos) + 2 * factor_bytes_per_sample(model, n_pos)


def result_bytes_per_sample(model, n_pos: int, include_biases: bool = False, method: Method = "factored") -> int:
    """Bytes of one sample's chunk result: float32 rows (``direct``) or factors (``factored``)."""
    if method == "direct":
        return gradient_bytes_per_sample(model_spec(model), include_biases)
    return factor_bytes_per_sample(model, n_pos)


def chunk_size_for_budget(model, n_pos: int, budget_bytes: float, include_biases: bool = False,
                          method: Method = "factored") -> int:
    """Samples per ``vmap`` call so that a chunk (workspace + result) uses at most ``budget_bytes`` (>= 1)."""
    per_sample = (engine_bytes_per_sample(model, n_pos, include_biases, method)
                  + result_bytes_per_sample(model, n_pos, include_biases, method))
    return max(1, int(budget_bytes // per_sample))


# ----- validation -----------------------------------------------------------------------------------

def valid_targets(attention_mask: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos_minus_1"]:
    """Target positions that count: both position ``t`` and ``t - 1`` valid (0/1 float)."""
    return (attention_mask[:, 1:] * attention_mask[:, :-1]).float()


def _check_mask(tokens: Tensor, attention_mask: Optional[Tensor], what: str) -> Tensor:
    if attention_mask is None:
        return torch.ones_like(tokens)
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention mask of {what} must be a torch.Tensor, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != tuple(tokens.shape):
        raise ValueError(f"attention mask of {what} has shape {tuple(attention_mask.shape)}, "
                         f"but {what} has shape {tuple(tokens.shape)}")
    values = torch.unique(attention_mask)
    if not bool(((values == 0) | (values == 1)).all()):
        raise ValueError(f"attention mask of {what} must hold only 0 and 1, got values {values.tolist()}")
    mask = attention_mask.to(torch.int64)
    empty = (valid_targets(mask).sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"samples {empty} of {what} have no valid target position (a target needs it and "
                         "its predecessor unmasked): their loss is undefined")
    return mask


def _check_hooks(model) -> None:
    from transformer_lens.hook_points import HookPoint

    for name, module in model.named_modules():
        if (isinstance(module, HookPoint) and module.bwd_hooks) or module._backward_hooks or getattr(
            module, "_backward_pre_hooks", None
        ):
            raise ValueError(f"module {name or '<root>'} has a backward hook; backward hooks cannot run inside "
                             "torch.func transforms — remove them before computing per-sample gradients")


def _prepare(model, tokens, attention_mask, what):
    spec = model_spec(model)
    check_tokens(spec, tokens, what)
    if tokens.shape[1] < 2:
        raise ValueError(f"{what} needs at least 2 positions for a next-token loss, got {tokens.shape[1]}")
    mask = _check_mask(tokens, attention_mask, what)
    if not spec.masks_under_vmap:  # padding is trimmed (_vmap_groups): it must be one run of valid positions
        for i in range(mask.shape[0]):
            first, stop = _valid_span(mask[i])
            if not bool(mask[i, first:stop].all()):
                raise ValueError(f"sample {i} of {what} has gaps in its attention mask; on a TransformerBridge "
                                 "only left or right padding is supported")
    _check_hooks(model)
    return spec, mask


def _non_finite_error(bad_ids: list, what: str) -> ValueError:
    return ValueError(f"per-sample gradients of samples {bad_ids} of {what} are not finite (NaN/inf); "
                      "check the model's weights and those inputs")


def _resolve_method(model, method: str) -> str:
    # With use_attn_result, W_O's output passes through hook_result per head: a caller's hook there would
    # break the factorisation at the attention output, so such models use the direct engine.
    if method == "factored" and getattr(model.cfg, "use_attn_result", False):
        return "direct"
    return method


# ----- the engines ----------------------------------------------------------------------------------

def _next_token_loss(logits: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """Token-mean next-token cross-entropy of one sample over its valid targets (logits [pos, vocab])."""
    log_probs = torch.log_softmax(logits[:-1].float(), dim=-1)
    target = log_probs.gather(-1, tokens[1:, None])[:, 0]
    valid = (mask[1:] * mask[:-1]).to(log_probs.dtype)
    return -(target * valid).sum() / valid.sum()


def _valid_span(row: Tensor) -> tuple[int, int]:
    """(first, last + 1) of a sample's valid positions."""
    valid = row.nonzero().flatten()
    return int(valid[0]), int(valid[-1]) + 1


def _vmap_groups(spec: ModelSpec, mask: Int[Tensor, "n pos"]) -> list[tuple[Optional[Tensor], slice]]:
    """(samples, positions) of each ``vmap`` call over a chunk: the whole chunk at once (index ``None``), or,
    where the model's masked forward cannot run under ``vmap`` (a TransformerBridge), one call per valid
    span with the padding trimmed off — the gradient of a padded sample is that of its unpadded tokens."""
    n, n_pos = mask.shape
    if spec.masks_under_vmap:
        return [(None, slice(0, n_pos))]
    groups: dict[tuple[int, int], list[int]] = {}
    for i in range(n):
        groups.setdefault(_valid_span(mask[i]), []).append(i)
    if list(groups) == [(0, n_pos)]:
        return [(None, slice(0, n_pos))]
    return [(torch.tensor(rows, device=mask.device), slice(*span)) for span, rows in groups.items()]


def _scatter(parts, n: int, n_pos: Optional[int]) -> dict:
    """Put each group's ``{key: [n_group, (pos_group,) ...]}`` back at its samples (and positions), zeros elsewhere."""
    if len(parts) == 1 and parts[0][0] is None:
        return parts[0][2]
    out: dict = {}
    for rows, positions, tensors in parts:
        for key, t in tensors.items():
            if key not in out:
                shape = (n, *t.shape[1:]) if n_pos is None else (n, n_pos, *t.shape[2:])
                out[key] = t.new_zeros(shape)
            if n_pos is None:
                out[key][rows] = t
            else:
                out[key][rows, positions] = t
    return out


def _group_inputs(tokens: Tensor, mask: Tensor, rows: Optional[Tensor], positions: slice):
    t = tokens if rows is None else tokens[rows]
    m = mask if rows is None else mask[rows]
    return t[:, positions], m[:, positions]


def _direct_chunks(model, spec, tokens, mask, chunk, include_biases):
    """Yield (slice, PerSampleGradients, losses): vmap(grad) w.r.t. the attention weights themselves."""
    try:
        names = spec.attention_param_names(include_biases)
    except ValueError as missing:  # a bridge around projections without biases (LLaMA)
        raise ValueError(f"method='direct' differentiates bias parameters, and {missing}; the default "
                         "method='factored' gives bias gradients without a parameter") from None
    all_params = dict(model.named_parameters())
    params = {name: all_params[name].detach() for name in names}
    model_mask = spec.masks_under_vmap  # else the padding is trimmed and the model sees no mask

    def sample_loss(p, t, m):
        logits = functional_logits(model, spec, p, t[None], m[None] if model_mask else None)
        loss = _next_token_loss(logits[0], t, m)
        return loss, loss.detach()

    grad_fn = vmap(grad(sample_loss, has_aux=True), in_dims=(None, 0, 0))
    for start in range(0, tokens.shape[0], chunk):
        sl = slice(start, min(tokens.shape[0], start + chunk))
        parts = []
        for rows, positions in _vmap_groups(spec, mask[sl]):
            with torch.no_grad():  # grad() ignores the outer no_grad; no autograd graph is kept around it
                raw, losses = grad_fn(params, *_group_inputs(tokens[sl], mask[sl], rows, positions))
            parts.append((rows, positions, {**raw, "_losses": losses}))
        raw = _scatter(parts, sl.stop - sl.start, None)
        losses = raw.pop("_losses")
        per_block = {}
        for block in BLOCKS:  # per-head rows in float32, freeing the raw gradients as we go
            keys = [spec.param_name(layer, block) for layer in range(spec.n_layers)]
            if include_biases and block != "O":
                keys += [spec.param_name(layer, block, bias=True) for layer in range(spec.n_layers)]
            per_block[block] = spec.per_head(raw, block, include_biases).float()
            for key in keys:
                del raw[key]
        yield sl, PerSampleGradients(per_block, spec, include_biases), losses


def _factor_chunks(model, spec, tokens, mask, chunk, include_biases):
    """Yield (slice, GradientFactors, losses): vmap(grad) w.r.t. zero perturbations of q, k, v and the
    attention output, capturing the attention inputs and z (where :func:`tl_circuits.models.spec.register_factor_hooks`
    puts them on this kind of model)."""
    n_pos = tokens.shape[1]
    dtype = next(model.parameters()).dtype
    device = tokens.device
    model_mask = spec.masks_under_vmap  # else the padding is trimmed and the model sees no mask

    def zero_perturbations(n_pos: int) -> dict[str, Tensor]:
        eps = {}
        for layer in range(spec.n_layers):
            eps[f"Q{layer}"] = torch.zeros(n_pos, spec.n_heads, spec.d_head, dtype=dtype, device=device)
            eps[f"K{layer}"] = torch.zeros(n_pos, spec.n_kv_heads, spec.d_head, dtype=dtype, device=device)
            eps[f"V{layer}"] = torch.zeros(n_pos, spec.n_kv_heads, spec.d_head, dtype=dtype, device=device)
            eps[f"O{layer}"] = torch.zeros(n_pos, spec.d_model, dtype=dtype, device=device)
        return eps

    state: dict = {}

    def hooks_of(layer):
        def perturb(block, output):
            return output + state["eps"][f"{block}{layer}"]

        def capture_input(block, x):
            state["captured"][f"x{block}{layer}"] = x

        def capture_z(z):
            state["captured"][f"z{layer}"] = z

        return perturb, capture_input, capture_z

    handles = []
    try:
        for layer in range(spec.n_layers):
            handles += register_factor_hooks(model, spec, layer, *hooks_of(layer))

        def sample_loss(e, t, m):
            state["eps"], state["captured"] = e, {}
            logits = model_logits(model, spec, t[None], m[None] if model_mask else None)
            loss = _next_token_loss(logits[0], t, m)
            captured = {k: v[0].detach() for k, v in state.pop("captured").items()}
            state.pop("eps")
            return loss, (loss.detach(), captured)

        grad_fn = vmap(grad(sample_loss, has_aux=True), in_dims=(None, 0, 0))
        for start in range(0, tokens.shape[0], chunk):
            sl = slice(start, min(tokens.shape[0], start + chunk))
            parts, loss_parts = [], []
            for rows, positions in _vmap_groups(spec, mask[sl]):
                t, m = _group_inputs(tokens[sl], mask[sl], rows, positions)
                with torch.no_grad():
                    grads, (losses, captured) = grad_fn(zero_perturbations(t.shape[1]), t, m)
                parts.append((rows, positions, {**grads, **captured}))
                loss_parts.append((rows, positions, {"loss": losses}))
            # padded positions get zero inputs and gradients: they add nothing to the rows
            found = _scatter(parts, sl.stop - sl.start, n_pos)
            losses = _scatter(loss_parts, sl.stop - sl.start, None)["loss"]
            stack = lambda fmt: torch.stack([fmt(layer) for layer in range(spec.n_layers)], 1).float()  # noqa: E731
            inputs = {"Q": stack(lambda l: found.pop(f"xQ{l}"))}
            for block in "KV":
                x = stack(lambda l: found.pop(f"x{block}{l}"))
                inputs[block] = next((y for y in inputs.values() if torch.equal(x, y)), x)
            out_grads = {b: stack(lambda l: found.pop(f"{b}{l}")) for b in BLOCKS}
            z = stack(lambda l: found.pop(f"z{l}"))
            yield sl, GradientFactors(inputs, out_grads, z, spec, include_biases), losses
    finally:
        for handle in handles:
            handle.remove()


def _chunks(model, tokens, mask, config: GradientConfig, what: str, factors: bool = False):
    """Yield (slice, PerSampleGradients or GradientFactors, ids of NaN/inf samples) per vmap chunk.

    Never raises on NaN/inf (callers decide); ``factors=True`` needs the factored engine.
    """
    spec = model_spec(model)
    method = _resolve_method(model, config.method)
    if factors and method != "factored":
        raise ValueError(f"gradient factors need the factored engine, not {method!r}")
    device = next(model.parameters()).device
    tokens = tokens.to(device=device, dtype=torch.int64)
    mask = mask.to(device)
    n, n_pos = tokens.shape
    chunk = config.chunk_size or chunk_size_for_budget(model, n_pos, config.memory_budget_gb * GB,
                                                       config.include_biases, method)
    engine = _factor_chunks if method == "factored" else _direct_chunks
    n_targets = valid_targets(mask).sum(1).long().cpu()
    bar = tqdm(total=n, desc=f"per-sample gradients ({what})", unit="sample", disable=not config.progress,
               leave=False)
    try:
        for sl, part, losses in engine(model, spec, tokens, mask, chunk, config.include_biases):
            bad = ~torch.isfinite(losses)
            tensors = (part.per_block.values() if isinstance(part, PerSampleGradients)
                       else [*part.inputs.values(), *part.out_grads.values(), part.z])
            for t in tensors:  # a float64 sum is finite iff every float32 entry is (no full-size temporary)
                bad |= ~torch.isfinite(t.flatten(1).sum(1, dtype=torch.float64)).to(bad.device)
            part.losses, part.n_targets = losses.float().cpu(), n_targets[sl]
            if isinstance(part, GradientFactors) and not factors:
                part = part.to_gradients()
            yield sl, part, (bad.nonzero().flatten() + sl.start).tolist()
            bar.update(sl.stop - sl.start)
    finally:
        bar.close()


def iter_per_sample_gradients(
    model,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
    config: GradientConfig = GradientConfig(),
    *,
    what: str = "tokens",
) -> Iterator[tuple[slice, PerSampleGradients]]:
    """Yield ``(sample slice, gradients of those samples)`` chunk by chunk; memory stays at one chunk.

    The chunk size is ``config.chunk_size`` or follows from ``config.memory_budget_gb``
    (:func:`chunk_size_for_budget`). Raises ValueError at the first chunk with NaN/inf gradients,
    naming its samples (``what`` names the tensor in messages).
    """
    _, mask = _prepare(model, tokens, attention_mask, what)
    for sl, grads, bad in _chunks(model, tokens, mask, config, what):
        if bad:
            raise _non_finite_error(bad, what)
        yield sl, grads


def per_sample_gradients(
    model,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
    config: GradientConfig = GradientConfig(),
) -> PerSampleGradients:
    """Per-sample gradients of every attention parameter, as float32 per-head rows per block.

    Args:
        model: a HookedTransformer (any dtype; gradients are returned in float32).
        tokens: ``[N, pos]`` token ids.
        attention_mask: ``[N, pos]`` of 0/1 (left or right padding); ``None``: every position valid.
        config: :class:`GradientConfig`.
    Returns:
        :class:`PerSampleGradients` with ``per_block[B]`` of shape ``[N, n_layers, heads_B, P_B]``.
    Raises:
        ValueError: bad tokens/mask (empty, ids outside the vocabulary, longer than ``n_ctx``, a sample
            without a valid target), NaN/inf gradients (naming every such sample), backward hooks on
            the model, or rows that would not fit ``config.memory_budget_gb``.

    >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
    >>> cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, n_ctx=6, d_vocab=10,
    ...                               act_fn="gelu")
    >>> model = HookedTransformer(cfg)
    >>> tokens = torch.randint(0, 10, (2, 6), generator=torch.Generator().manual_seed(0))
    >>> mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])  # left- and right-padded
    >>> g = per_sample_gradients(model, tokens, mask, GradientConfig(include_biases=True, progress=False))
    >>> g.per_block["Q"].shape, g.per_block["O"].shape  # Q rows: 8·4 weights + 4 biases; O: no bias
    (torch.Size([2, 1, 2, 36]), torch.Size([2, 1, 2, 32]))
    """
    spec, mask = _prepare(model, tokens, attention_mask, "tokens")
    n, n_pos = tokens.shape
    method = _resolve_method(model, config.method)
    budget = config.memory_budget_gb * GB
    rows = n * gradient_bytes_per_sample(spec, config.include_biases)
    chunk = config.chunk_size or chunk_size_for_budget(model, n_pos, max(budget - rows, 0), config.include_biases,
                                                       method)
    workspace = min(chunk, n) * (engine_bytes_per_sample(model, n_pos, config.include_biases, method)
                                 + result_bytes_per_sample(model, n_pos, config.include_biases, method))
    if config.chunk_size is None and rows + workspace > budget:
        raise ValueError(
            f"{n} per-sample gradients need {rows / GB:.2f} GB (+{workspace / GB:.2f} GB workspace), over "
            f"memory_budget_gb={config.memory_budget_gb}; raise the budget, or stream with "
            "iter_per_sample_gradients / compute_interference"
        )
    cfg = GradientConfig(config.include_biases, config.memory_budget_gb, chunk, config.progress, method)
    parts, bad = [], []
    for _, g, bad_ids in _chunks(model, tokens, mask, cfg, "tokens"):
        parts.append(g)
        bad += bad_ids
    if bad:
        raise _non_finite_error(bad, "tokens")
    return parts[0] if len(parts) == 1 else PerSampleGradients.cat(parts)
