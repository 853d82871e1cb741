"""The one streaming engine: per-sample gradients -> diagonal Fisher -> pairwise scores, within a memory budget.

:func:`compute_interference` (task A × task B; with the pooled Fisher, the map of the conflict test) and
:func:`pooled_scores` (A ∪ B × A ∪ B, the matrix of the label-permutation test) both run :func:`run_engine`:

1. **Gradient pass.** Every sample's gradient factors are computed exactly once, in *sample shards* of
   ``plan.engine_chunk`` (one batched forward/backward each), and put into a
   :class:`~tl_circuits.interference.store.FactorStore`: held in memory, or spilled to a memory-mapped file
   when they do not fit. Nothing is ever recomputed because of the budget.
2. **Score pass** (:func:`~tl_circuits.interference.scoring.score_pass`). For each block and group of layers,
   rows are built from the factors, the group's Fisher comes from those very rows (or, when the tiles cannot
   hold all rows at once, from one extra pass over them), and the matrix is filled in *score tiles* of
   ``plan.tile_left × plan.tile_right`` samples, one batched contraction each.

The shards and the layers are where a distributed run splits the work (:mod:`tl_circuits.parallel`,
docs/spec.md "Distributed runs"): sample shards across ranks, and each rank holds and scores its own layers (the
owner of a shard sends every other rank that rank's layers of it; the scores and Fisher merged exactly). With
``checkpoint_dir`` finished shards are kept and a restarted run skips them
(:mod:`~tl_circuits.interference.checkpoint`). :mod:`~tl_circuits.interference.memory` makes the plan
(``result.settings['plan']``).

>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
>>> hf = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
...                                   num_attention_heads=4, num_key_value_heads=2))  # GQA, rotary, random weights
>>> model = build_bridge_from_module(hf, architecture="LlamaForCausalLM", hf_config=hf.config)
>>> gen = torch.Generator().manual_seed(0)
>>> tokens_a = torch.randint(0, 10, (3, 8), generator=gen)    # task A: low token ids
>>> tokens_b = torch.randint(10, 20, (2, 8), generator=gen)   # task B: high token ids
>>> result = compute_interference(model, tokens_a, tokens_b, ids_b=["x", "y"], progress=False)
>>> {block: tuple(s.shape) for block, s in result.scores.items()}
{'Q': (3, 2, 2, 4), 'K': (3, 2, 2, 2), 'V': (3, 2, 2, 2), 'O': (3, 2, 2, 4)}
>>> top = result.top_conflicts(1)[0]
>>> top.id_b in ("x", "y"), top.block in "QKVO"
(True, True)
"""

from __future__ import annotations

import functools
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Hashable, Iterable, Optional, Sequence

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_circuits.interference import memory
from tl_circuits.interference.checkpoint import task_checkpoint
from tl_circuits.interference.config import GradientConfig, InterferenceConfig
from tl_circuits.interference.fisher import DiagonalFisher
from tl_circuits.interference.chunk_engines import sample_chunks
from tl_circuits.interference.gradients import engine_bytes, gradient_chunks, resolve_method, shared_qkv_input
from tl_circuits.interference.inputs import TaskLoss, non_finite_error, prepare_inputs, prepare_loss
from tl_circuits.interference.loss_fn import LossFn
from tl_circuits.interference.result import InterferenceResult, PooledScores
from tl_circuits.interference.scoring import score_pass
from tl_circuits.interference.store import FactorStore, SampleSet, array_shapes, factor_arrays
from tl_circuits.models.spec import BLOCKS, ModelSpec, model_spec
from tl_circuits.models.types import Model
from tl_circuits.parallel.group import World, resolve_world
from tl_circuits.parallel.shards import FactorExchange, held_layers
from tl_circuits.selection import Selection, resolve_selection


@dataclass(frozen=True)
class TaskInput:
    """One task's tokens, 0/1 attention mask and loss (:class:`~tl_circuits.interference.inputs.TaskLoss`), with
    the name used in messages."""

    tokens: Tensor
    mask: Tensor
    what: str
    loss: TaskLoss


def release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``), so RSS tracks what is in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def gradient_pass(model: Model, spec: ModelSpec, tasks: Sequence[TaskInput], cfg: InterferenceConfig,
                  plan: memory.MemoryPlan, stack: ExitStack, timings: dict,
                  world: Optional[World] = None, layers: Optional[Sequence[int]] = None) -> list[FactorStore]:
    """Each task's gradient factors, each sample computed once, in shards of ``plan.engine_chunk`` samples.

    ``layers``: only these layers' factors (default all); the stores then hold them as a model of their own
    (:meth:`~tl_circuits.models.spec.ModelSpec.of_layers`: their layer ``i`` is ``layers[i]``).

    In a process group each rank computes its own shards and ends with its held layers' factors of every sample
    (:class:`~tl_circuits.parallel.shards.FactorExchange`). Raises ValueError after a task's pass naming every
    sample with NaN/inf gradients. The stores are closed by ``stack`` (every exit path).
    """
    device = next(model.parameters()).device
    world = world or World()
    stores = []
    bar = stack.enter_context(tqdm(total=sum(t.tokens.shape[0] for t in tasks), unit="sample",
                                   desc="interference: per-sample gradients", disable=not cfg.progress))
    gcfg = cfg.gradients.replace(progress=False)
    shared = shared_qkv_input(model)
    run_spec = spec if layers is None else spec.of_layers(len(layers))
    for task in tasks:
        n, n_pos = task.tokens.shape
        store = stack.enter_context(FactorStore(run_spec, n, n_pos, shared_inputs=shared,
                                                include_biases=cfg.include_biases, spill=plan.spill,
                                                directory=cfg.spill_dir, device=device,
                                                layers=held_layers(run_spec.n_layers, world)))
        t0 = time.perf_counter()
        chunks = sample_chunks(n, plan.engine_chunk)
        exchange = FactorExchange(store, chunks, world)
        shards = None
        if cfg.checkpoint_dir is not None:  # resume: read the finished shards, compute the rest (and keep them)
            settings = {"include_biases": cfg.include_biases, "method": "factored", "chunk": plan.engine_chunk,
                        **({} if layers is None else {"layers": list(layers)})}
            shards = task_checkpoint(cfg.checkpoint_dir, model, task.tokens, task.mask, task.what, settings,
                                     task.loss)
        for index in range(world.rank, len(chunks), world.size):  # this rank's shards, in order
            sl = chunks[index]
            saved = shards.load(sl, array_shapes(run_spec, sl.stop - sl.start, n_pos, shared)) if shards else None
            if saved is not None:
                arrays, bad_ids = saved
            else:
                (_, factors, bad_ids), = gradient_chunks(model, task.tokens, task.mask, gcfg, task.what,
                                                          factors=True, chunk=plan.engine_chunk, chunks=[sl],
                                                          loss=task.loss, layers=layers)
                arrays = factor_arrays(factors, shared)  # type: ignore[arg-type]  # factors=True: GradientFactors
                if shards is not None:
                    shards.save(arrays, sl, bad_ids)
            exchange.deliver(index, arrays, bad_ids)
            bar.update(sl.stop - sl.start)
        bad = exchange.finish()
        timings["gradients_s"] += time.perf_counter() - t0
        if bad:
            raise non_finite_error(bad, task.what)
        stores.append(store)
    return stores


def run_engine(model: Model, task_a: TaskInput, task_b: TaskInput, cfg: InterferenceConfig, *, pooled: bool,
               fisher: Optional[DiagonalFisher] = None,
               selection: Optional[Selection] = None,
               world: Optional[World] = None) -> tuple[dict[str, Tensor], DiagonalFisher, dict]:
    """Gradients of A and B once, then A × B scores (``pooled=False``) or A ∪ B × A ∪ B scores (``pooled=True``,
    pooled Fisher). Returns ``(scores, undamped Fisher, settings)``. ``world``: the ranks the work is shared
    over (``None``: this process alone).

    ``selection``: only its layers' factors are computed, planned for and scored (the backward stops at the lowest);
    every grid keeps ``[n_layers, heads]``, NaN outside the selected cells (docs/spec.md §0.7)."""
    full_spec = model_spec(model)  # the tasks were validated when they were made (_task)
    layers = None if selection is None or len(selection.layers) == full_spec.n_layers else selection.layers
    spec = full_spec if layers is None else full_spec.of_layers(len(layers))  # what the run's stages see
    given = fisher
    if fisher is not None and layers is not None:  # the selected layers of the caller's Fisher
        fisher = DiagonalFisher({b: f[list(layers)] for b, f in fisher.per_block.items()}, fisher.n_samples,
                                spec, fisher.include_biases, fisher.source)
    resolve_method(model, "factored")
    n_a, n_b = task_a.tokens.shape[0], task_b.tokens.shape[0]
    source = cfg.fisher_source
    n_left, n_right = (n_a + n_b, n_a + n_b) if pooled else (n_a, n_b)
    world = resolve_world(world)
    n_held = held_layers(spec.n_layers, World(0, world.size)).stop  # rank 0 holds the most layers
    factor_bytes = sum(memory.factor_bytes_per_sample(spec, t.tokens.shape[1], shared_qkv_input(model))
                       * t.tokens.shape[0] for t in (task_a, task_b)) * n_held // spec.n_layers
    # chunks sized by the whole forward's workspace (every layer runs; a subset keeps less, only its layers' graph):
    # a subset's chunk is not grown by its selection
    pos = max(task_a.tokens.shape[1], task_b.tokens.shape[1])
    plan = memory.plan_run(spec, n_left=n_left, n_right=n_right, n_samples=n_a + n_b, factor_bytes=factor_bytes,
                           engine_per_sample=engine_bytes(model, full_spec, pos, cfg.include_biases, "factored"),
                           budget_gb=cfg.memory_budget_gb, include_biases=cfg.include_biases,
                           symmetric_variant=cfg.variant == "symmetric", same_sides=pooled,
                           chunk_size=cfg.chunk_size, max_held_samples=cfg.max_held_samples, n_layers_held=n_held)
    timings = {"gradients_s": 0.0, "scoring_s": 0.0}
    device = next(model.parameters()).device
    scoring = functools.partial(score_pass, world=world)  # under a process group: items split over the ranks
    with torch.no_grad(), ExitStack() as stack:
        stores = gradient_pass(model, full_spec, [task_a, task_b], cfg, plan, stack, timings, world, layers)
        release_free_memory()
        if pooled:
            both = SampleSet(stores)
            scores, used = scoring(spec, both, both, cfg, plan, fisher_sides=(True, True), external=fisher,
                                   same_sides=True, device=device, timings=timings, stack=stack)
        else:
            sides = (source in ("a", "pooled"), source in ("b", "pooled"))
            scores, used = scoring(spec, SampleSet(stores[:1]), SampleSet(stores[1:]), cfg, plan,
                                   fisher_sides=sides, external=fisher, same_sides=False, device=device,
                                   timings=timings, stack=stack)
    release_free_memory()
    if selection is not None:
        scores, used = _whole_grids(full_spec, selection, scores, used, cfg.include_biases)
    used = used if given is None else given
    settings = {
        "n_a": n_a, "n_b": n_b, "fisher_n_samples": used.n_samples, "fisher_source": source,
        "normalization": cfg.normalization,
        "n_layers": full_spec.n_layers, "n_heads": spec.n_heads, "n_kv_heads": spec.n_kv_heads, "grouped": spec.grouped,
        "params_per_head": {b: spec.n_params_per_head(b, cfg.include_biases) for b in BLOCKS},
        "loss": {"a": task_a.loss.describe(), "b": task_b.loss.describe()},
        "plan": plan.to_dict(), "timings": timings, **({"world_size": world.size} if world.active else {}),
        **({} if selection is None else {"selection": selection.to_dict()}),
    }
    return scores, used, settings


def _whole_grids(spec: ModelSpec, selection: Selection, scores: dict[str, Tensor], fisher: DiagonalFisher,
                 include_biases: bool) -> tuple[dict[str, Tensor], DiagonalFisher]:
    """Scores and Fisher of the selected layers back in the model's ``[.., n_layers, heads]`` grids, NaN outside the
    selected cells."""
    cells, layers = selection.cells(spec), list(selection.layers)
    out = {}
    for block, part in scores.items():
        whole = torch.full((*part.shape[:2], spec.n_layers, part.shape[3]), math.nan, dtype=part.dtype)
        whole[:, :, layers] = part  # the run's layer i is layers[i]
        out[block] = whole.masked_fill_(~cells[block], math.nan)
    per_block = {}
    for block, part in fisher.per_block.items():
        whole = torch.full((spec.n_layers, *part.shape[1:]), math.nan, dtype=part.dtype)
        whole[layers] = part
        per_block[block] = whole.masked_fill_(~cells[block][:, :, None], math.nan)
    return out, DiagonalFisher(per_block, fisher.n_samples, spec, include_biases, fisher.source)


def check_ids(ids: Optional[Sequence[Hashable]], n: int, what: str) -> list:
    """The caller's sample ids (unique, one per sample), or ``0..n-1``."""
    if ids is None:
        return list(range(n))
    ids = list(ids)
    if len(ids) != n:
        raise ValueError(f"{what} has {len(ids)} ids for {n} samples")
    if len(set(ids)) != n:
        raise ValueError(f"{what} has duplicate ids")
    return ids


def _task(model: Model, tokens: Tensor, mask: Optional[Tensor], what: str, loss_mask: Optional[Tensor] = None,
          loss_fn: Optional[LossFn] = None) -> TaskInput:
    checked = prepare_inputs(model, tokens, mask, what)[1]
    return TaskInput(tokens, checked, what, prepare_loss(tokens, checked, loss_mask, loss_fn, what))


def compute_interference(
    model: Model,
    tokens_a: Int[Tensor, "n_a pos_a"],
    tokens_b: Int[Tensor, "n_b pos_b"],
    *,
    attention_mask_a: Optional[Int[Tensor, "n_a pos_a"]] = None,
    attention_mask_b: Optional[Int[Tensor, "n_b pos_b"]] = None,
    loss_mask_a: Optional[Int[Tensor, "n_a pos_a"]] = None,
    loss_mask_b: Optional[Int[Tensor, "n_b pos_b"]] = None,
    loss_fn_a: Optional[LossFn] = None,
    loss_fn_b: Optional[LossFn] = None,
    ids_a: Optional[Sequence[Hashable]] = None,
    ids_b: Optional[Sequence[Hashable]] = None,
    layers: Optional[Iterable[int]] = None,
    heads: Optional[Iterable[int]] = None,
    config: Optional[InterferenceConfig] = None,
    fisher: Optional[DiagonalFisher] = None,
    progress: Optional[bool] = None,
    world: Optional[World] = None,
) -> InterferenceResult:
    """QK-OV interference of every pair (i ∈ A, j ∈ B), block, layer and head, end to end (:func:`run_engine`).

    Args:
        model: a HookedTransformer or TransformerBridge (not modified).
        tokens_a, tokens_b: ``[N, pos]`` token ids of task A and task B (lengths may differ).
        attention_mask_a, attention_mask_b: 0/1 masks (left or right padding); ``None``: all valid.
        loss_mask_a, loss_mask_b: the predictions each task's loss counts (``loss_mask[i, p]``: the prediction
            of token ``p + 1``); ``None``: every valid target. See :func:`tl_circuits.per_sample_gradients`.
        loss_fn_a, loss_fn_b: each task's own per-sample loss ``loss_fn(logits, tokens) -> [N]`` (they may
            differ); see :mod:`tl_circuits.interference.loss_fn` for the contract.
        ids_a, ids_b: the caller's sample ids (unique); default ``0..N-1``.
        layers, heads: score only the cells ``layers × heads`` (``None``: all; :mod:`tl_circuits.selection`,
            docs/spec.md §0.7): only the selected layers' factors are computed, held and scored, and the backward
            stops at the lowest of them. Grids keep ``[n_layers, heads]``, NaN outside the selection (K/V: the KV
            heads the selected query heads read); the selected cells equal the full run's.
        config: :class:`InterferenceConfig` (default: ``InterferenceConfig()``, the signed variant, task-A Fisher).
        fisher: an external undamped Fisher to normalise with, instead of estimating one.
        progress: tqdm progress bars; ``None`` (default): ``config.progress``.
        world: ``None`` (default): this process computes everything, whatever process group exists.
            ``distributed.current_world()``, passed on every rank of a process group: samples, layers and score
            items are shared out and every rank gets the whole result (docs/spec.md "Distributed runs").
    Returns:
        :class:`InterferenceResult` (with ``result.fisher``, the undamped Fisher used,
        ``result.settings['plan']``, the memory plan, and ``result.settings['loss']``, what each task scored).
    Raises:
        ValueError: an empty task, ids outside the vocabulary, sequences longer than ``n_ctx``, bad masks or
            ids, bad loss masks or a loss_fn that breaks its contract, NaN/inf gradients (naming the samples), a
            budget too small for one sample's operands.
    """
    cfg = (config or InterferenceConfig()).with_progress(progress).resolved(external_fisher=fisher is not None)
    selection = None if layers is None and heads is None else resolve_selection(model_spec(model), layers, heads)
    task_a = _task(model, tokens_a, attention_mask_a, "tokens_a", loss_mask_a, loss_fn_a)
    task_b = _task(model, tokens_b, attention_mask_b, "tokens_b", loss_mask_b, loss_fn_b)
    ids_a, ids_b = check_ids(ids_a, tokens_a.shape[0], "ids_a"), check_ids(ids_b, tokens_b.shape[0], "ids_b")
    if fisher is not None:
        spec = model_spec(model)
        for b in BLOCKS:
            expect = (spec.n_layers, spec.n_block_heads(b), spec.n_params_per_head(b, cfg.include_biases))
            if b not in fisher.per_block or tuple(fisher.per_block[b].shape) != expect:
                raise ValueError(f"the Fisher's block {b} does not match this model's per-head rows {expect} "
                                 "(different model or include_biases?)")
    scores, used, settings = run_engine(model, task_a, task_b, cfg, pooled=False, fisher=fisher, selection=selection,
                                        world=world)
    return InterferenceResult(scores, ids_a, ids_b, cfg, settings, fisher=used)


def pooled_scores(
    model: Model,
    tokens_a: Int[Tensor, "n_a pos_a"],
    tokens_b: Int[Tensor, "n_b pos_b"],
    *,
    attention_mask_a: Optional[Int[Tensor, "n_a pos_a"]] = None,
    attention_mask_b: Optional[Int[Tensor, "n_b pos_b"]] = None,
    loss_mask_a: Optional[Int[Tensor, "n_a pos_a"]] = None,
    loss_mask_b: Optional[Int[Tensor, "n_b pos_b"]] = None,
    loss_fn_a: Optional[LossFn] = None,
    loss_fn_b: Optional[LossFn] = None,
    layers: Optional[Iterable[int]] = None,
    heads: Optional[Iterable[int]] = None,
    config: Optional[InterferenceConfig] = None,
    progress: Optional[bool] = None,
    world: Optional[World] = None,
) -> PooledScores:
    """A ∪ B scored against itself under the pooled Fisher: a :class:`~tl_circuits.interference.result.PooledScores`
    (``scores`` ``{block: [N, N, L, H_B]}``, ``n_a``, the resolved ``config``, ``fisher``, ``settings``).

    The matrix of the label-permutation and conflict tests (rows and columns: A's samples, then B's). Uses
    ``config``'s variant, reduction, damping, leave-one-out and budget; its ``fisher_source`` is ignored. The
    tasks' losses and ``layers``/``heads`` as :func:`compute_interference` (the tests' families then hold the selected
    cells only). ``progress``: ``None`` (default) is ``config.progress``.
    ``world``: as :func:`compute_interference` (``None``: this process alone).
    """
    cfg = (config or InterferenceConfig()).with_progress(progress).replace(fisher_source="pooled").resolved()
    selection = None if layers is None and heads is None else resolve_selection(model_spec(model), layers, heads)
    task_a = _task(model, tokens_a, attention_mask_a, "tokens_a", loss_mask_a, loss_fn_a)
    task_b = _task(model, tokens_b, attention_mask_b, "tokens_b", loss_mask_b, loss_fn_b)
    scores, fisher, settings = run_engine(model, task_a, task_b, cfg, pooled=True, selection=selection, world=world)
    return PooledScores(scores, tokens_a.shape[0], cfg, fisher, settings)


__all__ = ["GradientConfig", "InterferenceConfig", "InterferenceResult", "PooledScores", "compute_interference",
           "pooled_scores", "run_engine"]
