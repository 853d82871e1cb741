"""Per-sample gradients of the attention parameters (docs/spec.md §2).

Gradients are taken of the attention parameters only (per-head layout in :mod:`tl_circuits.models.spec`:
``W_Q``, ``W_K``/``_W_K``, ``W_V``/``_W_V``, ``W_O`` of every layer; ``b_Q``/``b_K``/``b_V`` if asked,
``b_O`` never) and returned as float32 per-head rows ``[N, n_layers, heads, n_params_per_head]`` per block
(heads are KV heads for K/V under GQA). The loss convention is :mod:`tl_circuits.interference.inputs`'.

Two engines (``GradientConfig.method``), equal to each other and to a plain per-sample
``loss.backward()`` loop (tested):

* ``"factored"`` (default): one batched forward and one backward per chunk of samples, with respect to zero
  perturbations added at ``hook_q``/``hook_k``/``hook_v`` and at the attention output, capturing the
  attention inputs and ``hook_z`` on the way. Samples do not interact in a forward pass, so the gradient of
  the summed loss at sample ``i``'s perturbation is sample ``i``'s own gradient; the products of inputs and
  these output gradients are the exact weight gradients (:class:`~tl_circuits.interference.factors.GradientFactors`).
  No ``torch.func`` transform is involved, so it runs with any forward hooks, random ops (a NOISE freeze:
  the noise is drawn per chunk, as a batch forward of that chunk draws it) and custom autograd functions.
* ``"direct"``: ``functional_call`` + ``vmap(grad(loss))`` with respect to the attention weights themselves
  (HookedTransformer only: a TransformerBridge is refused with a clear error, since TransformerLens warns that
  ``functional_call`` fails to restore a bridge's parameters). Simple, but each sample's full weight
  gradient lives inside the ``vmap``, random ops and backward hooks cannot run in it, and references of a
  RESAMPLE freeze must have one row.

Under a freeze, a per-sample gradient is that of the sample's loss in the batched frozen forward (a RESAMPLE
reference with one row per sample patches sample ``i`` from row ``i`` when the freeze is passed as ``freezes=``:
:mod:`tl_circuits.freezing.rows`).

The model is not modified: parameters, ``requires_grad`` flags, ``.grad``, train/eval mode and hooks are as
before.

>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
>>> hf = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
...                                   num_attention_heads=4, num_key_value_heads=2))  # GQA, rotary, random weights
>>> model = build_bridge_from_module(hf, architecture="LlamaForCausalLM", hf_config=hf.config)
>>> tokens = torch.randint(0, 20, (3, 8), generator=torch.Generator().manual_seed(0))
>>> grads = per_sample_gradients(model, tokens, config=GradientConfig(progress=False))
>>> {block: tuple(g.shape) for block, g in grads.per_block.items()}
{'Q': (3, 2, 4, 64), 'K': (3, 2, 2, 64), 'V': (3, 2, 2, 64), 'O': (3, 2, 4, 64)}
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Union

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_circuits.defaults import GB
from tl_circuits.interference import memory
from tl_circuits.interference.chunk_engines import direct_chunks, factor_chunks, sample_chunks
from tl_circuits.interference.config import GradientConfig
from tl_circuits.interference.factors import GradientFactors, PerSampleGradients
from tl_circuits.interference.inputs import (
    TaskLoss,
    non_finite_error,
    prepare_inputs,
    prepare_loss,
)
from tl_circuits.interference.loss_fn import LossFn
from tl_circuits.models.bridge import refuse_functional_call
from tl_circuits.models.spec import (
    ModelSpec,
    model_spec,
)
from tl_circuits.models.types import Model
from tl_circuits.parallel.group import World, resolve_world
from tl_circuits.parallel.shards import bad_samples, gather_gradient_chunks, own_chunks

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from tl_circuits.freezing.api import FreezeHandle

Part = Union[PerSampleGradients, GradientFactors]


def shared_qkv_input(model: Model) -> bool:
    """Q, K and V read one attention input (not with shortformer positions, added to queries and keys only)."""
    return model_spec(model).shared_qkv_input


def engine_bytes(model: Model, spec: ModelSpec, n_pos: int, include_biases: bool, method: str) -> int:
    """One sample's workspace plus result in a forward/backward chunk (:mod:`~tl_circuits.interference.memory`)."""
    itemsize = next(model.parameters()).element_size()
    d_mlp = spec.d_mlp or 0
    shared = spec.shared_qkv_input
    return (memory.engine_bytes_per_sample(spec, n_pos, d_mlp, itemsize, include_biases=include_biases,
                                           method=method, shared_inputs=shared)
            + memory.result_bytes_per_sample(spec, n_pos, include_biases=include_biases, method=method,
                                             shared_inputs=shared))


def resolve_method(model: Model, method: str) -> str:
    """The engine to use: ``use_attn_result`` models need no special engine unless ``hook_result`` is hooked; a
    TransformerBridge only takes the factored one (``functional_call`` corrupts a bridge: a clear ValueError)."""
    spec = model_spec(model)
    if method == "direct" and spec.kind == "bridge":
        refuse_functional_call(model)
    if method == "factored" and spec.use_attn_result:
        hooked = [name for name, m in model.named_modules() if name.endswith("hook_result") and m._forward_hooks]
        if hooked:
            raise ValueError(f"a forward hook at {hooked[0]} changes each head's output after W_O, which the factored "
                             "per-sample gradients cannot follow; remove it or use per_sample_gradients with "
                             "method='direct'")
    return method



def gradient_chunks(model: Model, tokens: Tensor, mask: Tensor, config: GradientConfig, what: str,
                    factors: bool = False, chunk: Optional[int] = None,
                    chunks: Optional[Sequence[slice]] = None, loss: Optional[TaskLoss] = None,
                    freezes: Sequence["FreezeHandle"] = (),
                    layers: Optional[Sequence[int]] = None) -> Iterator[tuple[slice, Part, list[int]]]:
    """Yield ``(samples, PerSampleGradients or GradientFactors, ids of NaN/inf samples)`` chunk by chunk.

    Never raises on NaN/inf (callers decide); ``factors=True`` needs the factored engine. ``chunk``: samples
    per forward (default: ``config.chunk_size`` or from the budget); ``chunks``: compute only these sample
    slices (a rank's share of :func:`sample_chunks`; default all); ``loss``: the task's
    :class:`~tl_circuits.interference.inputs.TaskLoss` (default: every valid target's cross-entropy);
    ``freezes``: active freezes told which rows each forward runs on (the factored engine).
    ``layers``: the factored engine's layers (default all; with ``factors=True`` only).
    """
    spec = prepare_inputs(model, tokens, mask, what, config.method)[0]
    method = resolve_method(model, config.method)
    if factors and method != "factored":
        raise ValueError(f"gradient factors need method='factored', not {method!r}")
    device = next(model.parameters()).device
    tokens, mask = tokens.to(device=device, dtype=torch.int64), mask.to(device)
    n, n_pos = tokens.shape
    per_sample = engine_bytes(model, spec, n_pos, config.include_biases, method)
    chunk = chunk or config.chunk_size or memory.chunk_size_for_budget(
        per_sample, config.memory_budget_gb * GB)
    for handle in freezes:
        if handle.model is not model or not handle.active:
            raise ValueError(f"freezes holds {handle!r}, which is not active on this model")
    if freezes and method != "factored":
        raise ValueError("freezes= (per-sample references, patched chunk by chunk) needs method='factored'")
    if layers is not None and not factors:
        raise ValueError("a layer subset is computed as gradient factors (factors=True)")
    engine = (functools.partial(factor_chunks, freezes=freezes, layers=layers) if method == "factored"
              else direct_chunks)
    loss = loss or prepare_loss(tokens, mask, None, None, what)
    loss.check(tokens, mask, spec.d_vocab, device)
    n_targets = loss.n_counted
    total = n if chunks is None else sum(sl.stop - sl.start for sl in chunks)
    bar = tqdm(total=total, desc=f"per-sample gradients ({what})", unit="sample", disable=not config.progress,
               leave=False)
    try:
        for sl, part, losses in engine(model, spec, tokens, mask, loss, chunk, config.include_biases, chunks):
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
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
    config: Optional[GradientConfig] = None,
    *,
    what: str = "tokens",
    progress: Optional[bool] = None,
    loss_mask: Optional[Int[Tensor, "batch pos"]] = None,
    loss_fn: Optional[LossFn] = None,
    freezes: Sequence["FreezeHandle"] = (),
) -> Iterator[tuple[slice, PerSampleGradients]]:
    """Yield ``(sample slice, gradients of those samples)`` chunk by chunk; memory stays at one chunk.

    Arguments as :func:`per_sample_gradients`. Raises ValueError at the first chunk with NaN/inf gradients,
    naming its samples (``what`` names the tensor in messages). ``progress``: ``None`` (default) is
    ``config.progress``.
    """
    config = (config or GradientConfig()).with_progress(progress)
    mask = prepare_inputs(model, tokens, attention_mask, what, config.method)[1]
    loss = prepare_loss(tokens, mask, loss_mask, loss_fn, what)
    for sl, grads, bad in gradient_chunks(model, tokens, mask, config, what, loss=loss, freezes=freezes):
        if bad:
            raise non_finite_error(bad, what)
        assert isinstance(grads, PerSampleGradients)
        yield sl, grads


def per_sample_gradients(
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
    config: Optional[GradientConfig] = None,
    *,
    progress: Optional[bool] = None,
    loss_mask: Optional[Int[Tensor, "batch pos"]] = None,
    loss_fn: Optional[LossFn] = None,
    world: Optional[World] = None,
    freezes: Sequence["FreezeHandle"] = (),
) -> PerSampleGradients:
    """Per-sample gradients of every attention parameter, as float32 per-head rows per block.

    Args:
        model: a HookedTransformer or TransformerBridge (any dtype; gradients are returned in float32).
        tokens: ``[N, pos]`` token ids.
        attention_mask: ``[N, pos]`` of 0/1 (left or right padding); ``None``: every position valid.
        config: :class:`GradientConfig` (default: ``GradientConfig()``).
        loss_mask: ``[N, pos]`` 0/1 or bool, the predictions that count (docs/spec.md §2.1): ``loss_mask[i, p]``
            counts the prediction of token ``p + 1`` (the bundled ``scored`` convention; Hugging Face ``labels``:
            :func:`~tl_circuits.interference.inputs.loss_mask_from_labels`). Sample i's loss is the token mean
            over its counted predictions; padding is the attention mask's job (a set position whose target or
            predecessor is padding does not count). ``None``: every valid target.
        loss_fn: the task's own per-sample loss ``loss_fn(logits, tokens) -> [N]`` instead of the cross-entropy:
            one float value per sample, depending on that sample's logits only
            (:mod:`~tl_circuits.interference.loss_fn`: the contract, and the optional ``attention_mask=``,
            ``loss_mask=`` and ``samples=`` arguments it may take; with a ``loss_mask`` it must take
            ``loss_mask=``).
        progress: tqdm progress bars; ``None`` (default): ``config.progress``.
        world: ``None`` (default): this process computes every sample, whatever process group exists.
            ``distributed.current_world()`` on every rank of a process group: chunks are shared out and every rank
            gets every sample's gradients.
        freezes: active :func:`tl_circuits.freeze` handles whose RESAMPLE reference has one row per sample: each
            chunk's forward patches sample ``i`` from reference row ``i`` (a freeze not named here is part of the
            forward as any hook is, and its reference must have 1 row or the chunk's batch size).
    Returns:
        :class:`PerSampleGradients` with ``per_block[B]`` of shape ``[N, n_layers, heads_B, P_B]``, ``losses``
        and ``n_targets`` (each sample's counted predictions).
    Raises:
        ValueError: bad tokens/mask (empty, ids outside the vocabulary, longer than ``n_ctx``, a sample
            without a valid target), a bad loss mask (shape, values, the last position set, a sample with no
            counted prediction: named), a loss_fn that breaks its contract, NaN/inf gradients (naming every
            such sample), or rows that would not fit ``config.memory_budget_gb``.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
    >>> hf = GPT2LMHeadModel(GPT2Config(vocab_size=10, n_positions=6, n_embd=8, n_layer=1, n_head=2))
    >>> model = build_bridge_from_module(hf, architecture="GPT2LMHeadModel", hf_config=hf.config)
    >>> tokens = torch.randint(0, 10, (2, 6), generator=torch.Generator().manual_seed(0))
    >>> mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])  # left- and right-padded
    >>> g = per_sample_gradients(model, tokens, mask, GradientConfig(include_biases=True), progress=False)
    >>> g.per_block["Q"].shape, g.per_block["O"].shape  # Q rows: 8·4 weights + 4 biases; O: no bias
    (torch.Size([2, 1, 2, 36]), torch.Size([2, 1, 2, 32]))

    Only the predictions of the last two tokens, and a logit difference (each sample's answer against token 0):

    >>> scored = torch.zeros_like(tokens); scored[:, 3:5] = 1  # predictions of tokens 4 and 5
    >>> g = per_sample_gradients(model, tokens, mask, GradientConfig(progress=False), loss_mask=scored)
    >>> g.n_targets.tolist()  # sample 1's last token is padding
    [2, 1]
    >>> def logit_difference(logits, tokens, *, loss_mask):  # at each counted prediction, answer minus token 0
    ...     answer = logits[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0] - logits[:, :-1, 0]
    ...     return (answer * loss_mask[:, :-1]).sum(-1) / loss_mask.sum(-1)
    >>> g = per_sample_gradients(model, tokens, mask, GradientConfig(progress=False), loss_mask=scored,
    ...                          loss_fn=logit_difference)
    >>> g.per_block["O"].shape
    torch.Size([2, 1, 2, 32])
    """
    config = (config or GradientConfig()).with_progress(progress)
    spec, mask = prepare_inputs(model, tokens, attention_mask, "tokens", config.method)
    loss = prepare_loss(tokens, mask, loss_mask, loss_fn, "tokens")
    n, n_pos = tokens.shape
    method = resolve_method(model, config.method)
    budget = config.memory_budget_gb * GB
    rows = n * memory.gradient_bytes_per_sample(spec, config.include_biases)
    per_sample = engine_bytes(model, spec, n_pos, config.include_biases, method)
    chunk = config.chunk_size or memory.chunk_size_for_budget(per_sample, max(budget - rows, 0))
    workspace = min(chunk, n) * per_sample
    if config.chunk_size is None and rows + workspace > budget:
        raise ValueError(
            f"{n} per-sample gradients need {rows / GB:.2f} GB (+{workspace / GB:.2f} GB workspace), over "
            f"memory_budget_gb={config.memory_budget_gb}; raise the budget, or stream with "
            "iter_per_sample_gradients / compute_interference"
        )
    world = resolve_world(world)
    chunks = sample_chunks(n, chunk)  # a distributed run: each rank its own chunks, then every chunk everywhere
    mine = dict(zip(range(world.rank, len(chunks), world.size), own_chunks(chunks, world)))
    parts, bad, computed = [], [], {}
    for sl, g, bad_ids in gradient_chunks(model, tokens, mask, config, "tokens", chunk=chunk,
                                          chunks=list(mine.values()) if world.active else None, loss=loss,
                                          freezes=freezes):
        assert isinstance(g, PerSampleGradients)
        parts.append(g)
        computed[chunks.index(sl)] = g
        bad += bad_ids
    if world.active:
        bad = bad_samples(bad, n, world)
        if not bad:
            parts = gather_gradient_chunks(computed, chunks, spec, config.include_biases,
                                           next(model.parameters()).device, world)
    if bad:
        raise non_finite_error(bad, "tokens")
    return parts[0] if len(parts) == 1 else PerSampleGradients.cat(parts)
