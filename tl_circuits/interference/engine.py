"""The one streaming engine: per-sample gradients -> diagonal Fisher -> pairwise scores, within a memory budget.

:func:`compute_interference` (task A × task B) and :func:`pooled_scores` (A ∪ B × A ∪ B, the matrix of the
permutation and conflict tests) both run :func:`run_engine`:

1. **Gradient pass.** Every sample's gradient factors are computed exactly once, in *sample shards* of
   ``plan.engine_chunk`` (one batched forward/backward each), and put into a
   :class:`~tl_circuits.interference.store.FactorStore`: held in memory, or spilled to a memory-mapped file
   when they do not fit. Nothing is ever recomputed because of the budget.
2. **Score pass.** For each block and group of layers, rows are built from the factors
   (:func:`~tl_circuits.interference.scoring.rows_into`), the group's Fisher comes from those very rows
   (or, when the tiles cannot hold all rows at once, from one extra pass over them), and the matrix is
   filled in *score tiles* of ``plan.tile_left × plan.tile_right`` samples, one batched contraction each.

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
>>> quiet = InterferenceConfig(gradients=GradientConfig(progress=False))
>>> result = compute_interference(model, tokens_a, tokens_b, ids_b=["x", "y"], config=quiet)
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
from typing import Hashable, Optional, Sequence

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_circuits.defaults import GB
from tl_circuits.interference import memory
from tl_circuits.interference.checkpoint import task_checkpoint
from tl_circuits.interference.config import GradientConfig, InterferenceConfig
from tl_circuits.interference.fisher import FISHER_DTYPE, DiagonalFisher
from tl_circuits.interference.gradients import (
    engine_bytes,
    gradient_chunks,
    resolve_method,
    sample_chunks,
    shared_qkv_input,
)
from tl_circuits.interference.inputs import TaskLoss, non_finite_error, prepare_inputs, prepare_loss
from tl_circuits.interference.loss_fn import LossFn
from tl_circuits.interference.result import InterferenceResult
from tl_circuits.interference.scoring import Scorer, Workspace, rows_into, sum_squares
from tl_circuits.interference.store import FactorStore, SampleSet, array_shapes, factor_arrays
from tl_circuits.models.spec import BLOCKS, Block, ModelSpec, model_spec
from tl_circuits.models.types import Model
from tl_circuits.parallel.group import World, current_world
from tl_circuits.parallel import scores as parallel_scores
from tl_circuits.parallel.shards import FactorExchange, held_layers


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
                  world: Optional[World] = None) -> list[FactorStore]:
    """Each task's gradient factors, each sample computed once, in shards of ``plan.engine_chunk`` samples.

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
    for task in tasks:
        n, n_pos = task.tokens.shape
        store = stack.enter_context(FactorStore(spec, n, n_pos, shared_inputs=shared, include_biases=cfg.include_biases,
                                                spill=plan.spill, directory=cfg.spill_dir, device=device,
                                                layers=held_layers(spec.n_layers, world)))
        t0 = time.perf_counter()
        chunks = sample_chunks(n, plan.engine_chunk)
        exchange = FactorExchange(store, chunks, world)
        shards = None
        if cfg.checkpoint_dir is not None:  # resume: read the finished shards, compute the rest (and keep them)
            settings = {"include_biases": cfg.include_biases, "method": "factored", "chunk": plan.engine_chunk}
            shards = task_checkpoint(cfg.checkpoint_dir, model, task.tokens, task.mask, task.what, settings,
                                     task.loss)
        for index in range(world.rank, len(chunks), world.size):  # this rank's shards, in order
            sl = chunks[index]
            saved = shards.load(sl, array_shapes(spec, sl.stop - sl.start, n_pos, shared)) if shards else None
            if saved is not None:
                arrays, bad_ids = saved
            else:
                (_, factors, bad_ids), = gradient_chunks(model, task.tokens, task.mask, gcfg, task.what,
                                                          factors=True, chunk=plan.engine_chunk, chunks=[sl],
                                                          loss=task.loss)
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


class _Rows:
    """Builds raw per-head rows ``[Lg, H, n, P]`` of a sample range of a :class:`SampleSet` into reused buffers."""

    def __init__(self, spec: ModelSpec, ws: Workspace, sub_bytes: float, device: torch.device):
        self.spec, self.ws, self.sub_bytes, self.device = spec, ws, sub_bytes, device

    def __call__(self, samples: SampleSet, block: Block, layers: slice, rows: slice, name: str,
                 include_biases: bool) -> Tensor:
        spec = self.spec
        n_layers = len(range(*layers.indices(spec.n_layers)))
        heads = spec.n_block_heads(block)
        width = spec.n_params_per_head(block, include_biases)
        out = self.ws.get(name, (n_layers, heads, rows.stop - rows.start, width))
        n_in = spec.n_heads * spec.d_head if block == "O" else spec.d_model
        n_out = spec.d_model if block == "O" else heads * spec.d_head
        sub = max(1, int(self.sub_bytes // (4 * n_layers * n_in * n_out)))
        for store, local, dest in samples.pieces(rows):
            factors = store.get(local, layers, self.device, block=block)
            rows_into(factors, block, slice(None), slice(0, local.stop - local.start), sub, out[:, :, dest], self.ws)
        return out


def score_pass(spec: ModelSpec, left: SampleSet, right: SampleSet, cfg: InterferenceConfig, plan: memory.MemoryPlan,
               *, fisher_sides: tuple[bool, bool], external: Optional[DiagonalFisher], same_sides: bool,
               device: torch.device, timings: dict, stack: ExitStack, world: Optional[World] = None,
               ) -> tuple[dict[str, Tensor], DiagonalFisher]:
    """Scores ``{block: [n_left, n_right, L, H_B]}`` and the undamped Fisher used (docstring of the module).

    ``fisher_sides``: whether the left / right samples make up the Fisher set (ignored with ``external``).
    ``world``: under a process group each rank runs its share of the (block, layer group) items and every rank
    gets every item's result (:mod:`tl_circuits.parallel.scores`).
    """
    world = world or World()
    n_l, n_r = len(left), len(right)
    ws = Workspace(device)
    rows = _Rows(spec, ws, memory.SCRATCH_SHARE * cfg.memory_budget_gb * GB, device)
    scores: dict[str, Tensor] = {b: torch.full((n_l, n_r, spec.n_layers, spec.n_block_heads(b)), math.nan)
                                 for b in BLOCKS}
    fisher_full: dict[str, Tensor] = {} if external is not None else {
        b: torch.full((spec.n_layers, spec.n_block_heads(b), spec.n_params_per_head(b, cfg.include_biases)),
                      math.nan, dtype=FISHER_DTYPE) for b in BLOCKS}
    n_fisher = external.n_samples if external is not None else (n_l if fisher_sides[0] else 0) + (
        0 if same_sides else (n_r if fisher_sides[1] else 0))
    items = parallel_scores.my_items(spec.n_layers, plan.layer_group, world)  # this rank's layers
    tiles_l = [slice(a, min(n_l, a + plan.tile_left)) for a in range(0, n_l, plan.tile_left)]
    tiles_r = [slice(b, min(n_r, b + plan.tile_right)) for b in range(0, n_r, plan.tile_right)]
    symmetric, biases = cfg.variant == "symmetric", cfg.include_biases
    whole = len(tiles_l) == 1 and len(tiles_r) == 1
    where = f" ({world.describe()})" if world.active else ""
    bar = stack.enter_context(tqdm(total=len(items) * len(tiles_l) * len(tiles_r), unit="tile",
                                   desc=f"interference: scores{where}", disable=not cfg.progress))
    t0 = time.perf_counter()
    for block, layers in items:
        raw_l = raw_r = None
        if external is not None:
            f_group = external.per_block[block][layers].to(device)
        else:
            sides = [(left, "l")] if same_sides else [(s, tag) for s, tag, use in
                                                     ((left, "l", fisher_sides[0]), (right, "r", fisher_sides[1]))
                                                     if use]
            sums: Tensor | float = 0.0
            if whole:  # the group's Fisher from the very rows that are scored
                raw_l = rows(left, block, layers, slice(0, n_l), "l", biases)
                raw_r = raw_l if same_sides else rows(right, block, layers, slice(0, n_r), "r", biases)
                for _side, tag in sides:
                    sums = sums + sum_squares(raw_l if tag == "l" else raw_r)
            else:  # one extra pass over the Fisher set's rows of this group
                for side, _tag in sides:
                    for a in range(0, len(side), plan.tile_left):
                        part = slice(a, min(len(side), a + plan.tile_left))
                        sums = sums + sum_squares(rows(side, block, layers, part, "l", biases))
            f_group = sums / n_fisher  # type: ignore[assignment]
            fisher_full[block][layers] = f_group.cpu()  # type: ignore[union-attr]
        scorer = Scorer(DiagonalFisher({block: f_group}, n_fisher), cfg.variant, cfg.reduction,  # type: ignore
                        cfg.leave_one_out, cfg.damping_abs, cfg.damping_rel, sub_chunk=4,
                        float32_squares=external is None)
        right_ops = None
        for ta in tiles_l:
            x = raw_l if raw_l is not None else rows(left, block, layers, ta, "l", biases)
            if same_sides and raw_l is not None:  # both operands come from one buffer: copy the left one
                x = ws.get("l_copy", tuple(raw_l.shape)).copy_(raw_l)
            extra_l: Optional[dict[str, Tensor]] = {block: ws.get("l2", tuple(x.shape))} if symmetric else None
            left_ops = scorer.left({block: x}, extra_l)
            for tb in tiles_r:
                if right_ops is None or len(tiles_r) > 1:
                    y = raw_r if raw_r is not None else rows(right, block, layers, tb, "r", biases)
                    extra_r: Optional[dict[str, Tensor]] = (
                        {block: ws.get("r2", tuple(y.shape))} if symmetric else None)
                    right_ops = scorer.right({block: y}, extra_r)
                out = scorer.contract(left_ops, right_ops)[block]
                scores[block][ta, tb, layers] = out.cpu()
                bar.update(1)
    scores, fisher_full = parallel_scores.merge_items(scores, fisher_full, spec.n_layers, world)
    timings["scoring_s"] += time.perf_counter() - t0
    fisher = external if external is not None else DiagonalFisher(fisher_full, n_fisher, spec, biases, cfg.fisher_source
                                                                  or "")
    return scores, fisher


def run_engine(model: Model, task_a: TaskInput, task_b: TaskInput, cfg: InterferenceConfig, *, pooled: bool,
               fisher: Optional[DiagonalFisher] = None) -> tuple[dict[str, Tensor], DiagonalFisher, dict]:
    """Gradients of A and B once, then A × B scores (``pooled=False``) or A ∪ B × A ∪ B scores (``pooled=True``,
    pooled Fisher). Returns ``(scores, undamped Fisher, settings)``."""
    spec = model_spec(model)  # the tasks were validated when they were made (_task)
    resolve_method(model, "factored")
    n_a, n_b = task_a.tokens.shape[0], task_b.tokens.shape[0]
    source = cfg.fisher_source
    n_left, n_right = (n_a + n_b, n_a + n_b) if pooled else (n_a, n_b)
    world = current_world()
    n_held = held_layers(spec.n_layers, World(0, world.size)).stop  # rank 0 holds the most layers
    factor_bytes = sum(memory.factor_bytes_per_sample(spec, t.tokens.shape[1], shared_qkv_input(model))
                       * t.tokens.shape[0] for t in (task_a, task_b)) * n_held // spec.n_layers
    pos = max(task_a.tokens.shape[1], task_b.tokens.shape[1])
    plan = memory.plan_run(spec, n_left=n_left, n_right=n_right, n_samples=n_a + n_b, factor_bytes=factor_bytes,
                           engine_per_sample=engine_bytes(model, spec, pos, cfg.include_biases, "factored"),
                           budget_gb=cfg.memory_budget_gb, include_biases=cfg.include_biases,
                           symmetric_variant=cfg.variant == "symmetric", same_sides=pooled,
                           chunk_size=cfg.chunk_size, max_held_samples=cfg.max_held_samples, n_layers_held=n_held)
    timings = {"gradients_s": 0.0, "scoring_s": 0.0}
    device = next(model.parameters()).device
    scoring = functools.partial(score_pass, world=world)  # under a process group: items split over the ranks
    with torch.no_grad(), ExitStack() as stack:
        stores = gradient_pass(model, spec, [task_a, task_b], cfg, plan, stack, timings, world)
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
    settings = {
        "n_a": n_a, "n_b": n_b, "fisher_n_samples": used.n_samples, "fisher_source": source,
        "n_layers": spec.n_layers, "n_heads": spec.n_heads, "n_kv_heads": spec.n_kv_heads, "grouped": spec.grouped,
        "params_per_head": {b: spec.n_params_per_head(b, cfg.include_biases) for b in BLOCKS},
        "loss": {"a": task_a.loss.describe(), "b": task_b.loss.describe()},
        "plan": plan.to_dict(), "timings": timings, **({"world_size": world.size} if world.active else {}),
    }
    return scores, used, settings


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
    config: Optional[InterferenceConfig] = None,
    fisher: Optional[DiagonalFisher] = None,
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
        config: :class:`InterferenceConfig` (default: ``InterferenceConfig()``, the signed variant, task-A Fisher).
        fisher: an external undamped Fisher to normalise with, instead of estimating one.
    Returns:
        :class:`InterferenceResult` (with ``result.fisher``, the undamped Fisher used,
        ``result.settings['plan']``, the memory plan, and ``result.settings['loss']``, what each task scored).
    Raises:
        ValueError: an empty task, ids outside the vocabulary, sequences longer than ``n_ctx``, bad masks or
            ids, bad loss masks or a loss_fn that breaks its contract, NaN/inf gradients (naming the samples), a
            budget too small for one sample's operands.
    """
    cfg = (config or InterferenceConfig()).resolved(external_fisher=fisher is not None)
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
    scores, used, settings = run_engine(model, task_a, task_b, cfg, pooled=False, fisher=fisher)
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
    config: Optional[InterferenceConfig] = None,
) -> tuple[dict[str, Tensor], DiagonalFisher, dict]:
    """A ∪ B scored against itself under the pooled Fisher: ``({block: [N, N, L, H_B]}, Fisher, settings)``.

    The matrix of the label-permutation and conflict tests (rows and columns: A's samples, then B's). Uses
    ``config``'s variant, reduction, damping, leave-one-out and budget; its ``fisher_source`` is ignored. The
    tasks' losses as :func:`compute_interference`.
    """
    cfg = (config or InterferenceConfig()).replace(fisher_source="pooled").resolved()
    task_a = _task(model, tokens_a, attention_mask_a, "tokens_a", loss_mask_a, loss_fn_a)
    task_b = _task(model, tokens_b, attention_mask_b, "tokens_b", loss_mask_b, loss_fn_b)
    return run_engine(model, task_a, task_b, cfg, pooled=True)


__all__ = ["GradientConfig", "InterferenceConfig", "InterferenceResult", "compute_interference", "pooled_scores",
           "run_engine"]
