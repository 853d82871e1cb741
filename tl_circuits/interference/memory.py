"""Every byte rule of the package (the interference path, and at the end the sweep and the statistics), and the
memory plan of an interference run, in GB.

Nothing else in the package estimates memory. The rules (calibrated by peak RSS on a GPT-2-small-shaped
model at 64 positions):

- a sample's float32 gradient *rows* (all attention parameters): ``4 · n_attention_params`` bytes
  (~113 MB for GPT-2 small);
- its gradient *factors* (attention inputs, output gradients at q/k/v and at the attention output, z):
  ``4 · L · pos · ((1 or 3)·D + 2·H·d + 2·G·d + D)`` bytes (~14 MB at 64 positions), what a run holds;
- the working memory of one sample of a forward/backward chunk (:func:`engine_bytes_per_sample`);
- one sample's rows of one (block, layer), the unit of the score contraction.

:func:`plan_run` splits a budget into: the scores and the Fisher; 10% slack for the allocator; the held
factors (or none, when they are spilled to disk); and what is left, used first by the gradient chunks
(larger chunks are faster, up to 16 samples) and then, once the gradients are done, by 5% scratch (half for
building rows from factors, half for the score pass's float64 steps) and the contraction operands, whose size
decides the tiles. Gradients are never recomputed because of the budget: what does not fit is spilled
(:mod:`tl_circuits.interference.store`).

>>> from tl_circuits.models.spec import ModelSpec
>>> spec = ModelSpec(n_layers=12, n_heads=12, n_kv_heads=12, d_model=768, d_head=64, d_vocab=1000,
...                  n_ctx=64, grouped=False, rotary=True)
>>> round(gradient_bytes_per_sample(spec) / 2**20)   # MiB of one sample's gradient rows
108
>>> round(factor_bytes_per_sample(spec, 64) / 2**20, 1)  # MiB of its factors at 64 positions
13.5
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from tl_circuits.defaults import GB, STATS_WORKSPACE_GB
from tl_circuits.models.spec import BLOCKS, ModelSpec

SCRATCH_SHARE = 0.05  # of the budget: rows built from factors (half), float64 steps of the score pass (half)
FLOAT64_COPIES = 2  # float64 copies of a step's rows alive at once: C_i -> F_{-i} -> N -> 1/N in place, + masks
SLACK_SHARE = 0.10  # of the budget, left unplanned: allocator slack and estimation error
MAX_ENGINE_CHUNK = 16  # samples per forward/backward: larger batches gain nothing on a CPU and cost memory
# Factors are held in the process only when they are small next to the budget; larger sets go to the spill file,
# whose pages the OS keeps in its page cache while memory is free (read back per block at copy speed), so the
# process's own peak stays that of one gradient chunk or one tile of operands.
HOLD_SHARE = 0.15
# Operands past this size make a contraction no faster (it is already a large batched matmul), so a larger
# budget is left unused rather than filled with more layers per contraction.
EFFICIENT_OPERAND_BYTES = 256 * 2**20


def n_attention_params(spec: ModelSpec, include_biases: bool = False) -> int:
    """Attention parameters that get a per-sample gradient (all layers, all blocks)."""
    return sum(spec.n_layers * spec.n_block_heads(b) * spec.n_params_per_head(b, include_biases) for b in BLOCKS)


def gradient_bytes_per_sample(spec: ModelSpec, include_biases: bool = False) -> int:
    """Bytes of one sample's float32 per-head gradient rows."""
    return 4 * n_attention_params(spec, include_biases)


def layer_row_bytes(spec: ModelSpec, block: str, include_biases: bool = False) -> int:
    """Bytes of one sample's float32 rows of one block in one layer."""
    return 4 * spec.n_block_heads(block) * spec.n_params_per_head(block, include_biases)  # type: ignore[arg-type]


def factor_bytes_per_sample(spec: ModelSpec, n_pos: int, shared_inputs: bool = True) -> int:
    """Bytes of one sample's float32 gradient factors at ``n_pos`` positions.

    ``shared_inputs``: Q, K and V read one tensor (False with shortformer positions).
    """
    n_inputs = 1 if shared_inputs else 3
    per_position = (n_inputs + 1) * spec.d_model + (2 * spec.n_heads + 2 * spec.n_kv_heads) * spec.d_head
    return 4 * spec.n_layers * n_pos * per_position


def activation_bytes(spec: ModelSpec, n_pos: int, d_mlp: int, itemsize: int) -> int:
    """Activations of one sample's forward and backward (residual, q/k/v/z, scores, MLP, logits)."""
    per_layer = n_pos * (32 * spec.d_model + 8 * spec.n_heads * spec.d_head + 8 * spec.n_heads * n_pos + 8 * d_mlp)
    return itemsize * spec.n_layers * per_layer + n_pos * spec.d_vocab * (2 * itemsize + 12)


def engine_bytes_per_sample(spec: ModelSpec, n_pos: int, d_mlp: int, itemsize: int, *, include_biases: bool = False,
                            method: str = "factored", shared_inputs: bool = True) -> int:
    """Working memory of one sample in a forward/backward chunk, excluding its result.

    ``"factored"``: the activations plus two copies of the factors (captured and stacked); ``"direct"``:
    the activations plus three copies of the attention weight gradient in the model's dtype (``vmap``-ed
    weight gradients and their reshaping).
    """
    base = activation_bytes(spec, n_pos, d_mlp, itemsize)
    if method == "direct":
        return base + 3 * itemsize * n_attention_params(spec, include_biases)
    return base + 2 * factor_bytes_per_sample(spec, n_pos, shared_inputs)


def result_bytes_per_sample(spec: ModelSpec, n_pos: int, *, include_biases: bool = False, method: str = "factored",
                            shared_inputs: bool = True) -> int:
    """Bytes of one sample's chunk result: float32 rows (``direct``) or factors (``factored``)."""
    if method == "direct":
        return gradient_bytes_per_sample(spec, include_biases)
    return factor_bytes_per_sample(spec, n_pos, shared_inputs)


def chunk_size_for_budget(per_sample_bytes: float, budget_bytes: float, cap: int = MAX_ENGINE_CHUNK) -> int:
    """Samples per forward/backward so that a chunk uses at most ``budget_bytes`` (between 1 and ``cap``)."""
    return max(1, min(cap, int(budget_bytes // max(per_sample_bytes, 1))))


@dataclass(frozen=True)
class MemoryPlan:
    """How one run uses its budget (recorded in ``settings['plan']``).

    Attributes:
        budget_gb: the budget planned for.
        engine_chunk: samples per forward/backward pass.
        spill: the gradient factors go to a temporary memory-mapped file (else they are held in memory).
        factor_gb: the size of the factors this process holds or spills (a rank's: its share of the layers).
        layer_group: layers per score contraction.
        tile_left, tile_right: samples per operand tile of the left (A, or pooled) and right (B, or pooled) side.
        fisher_pass: the Fisher of each (block, layer group) needs its own pass over the rows (tiles too small
            to hold all of them at once); else it comes from the very rows that are scored.
        n_gradient_evaluations: per-sample gradients computed (each sample exactly once).
        n_tiles: score tiles per (block, layer group): the unit a distributed run would hand out.
        estimated_peak_gb: the planned peak without the slack.
    """

    budget_gb: float
    engine_chunk: int
    spill: bool
    factor_gb: float
    layer_group: int
    tile_left: int
    tile_right: int
    fisher_pass: bool
    n_gradient_evaluations: int
    n_tiles: int
    estimated_peak_gb: float

    def to_dict(self) -> dict:
        return asdict(self)


def rows_scratch_bytes(budget_gb: float) -> float:
    """Scratch for building rows from factors (half of the scratch share of the budget)."""
    return 0.5 * SCRATCH_SHARE * budget_gb * GB


def float64_step(row_bytes: int, budget_gb: float) -> int:
    """Samples per float64 step of the score pass (leave-one-out normalisers: docs/spec.md §3.1),
    ``row_bytes`` float32 bytes of one sample's rows of the (block, layer group): its ``FLOAT64_COPIES`` float64
    temporaries within the other half of the scratch share; at least 1.

    >>> float64_step(row_bytes=2**20, budget_gb=1.0)   # 1 MiB of rows a sample, 1 GB: six samples a step
    6
    >>> float64_step(row_bytes=2**10, budget_gb=1.0)
    6553
    """
    return max(1, int(0.5 * SCRATCH_SHARE * budget_gb * GB // (2 * FLOAT64_COPIES * max(1, row_bytes))))


def _layer_group(n_layers: int, room: float, per_layer: float) -> int:
    """Layers per contraction: as many as fit, but no more than make the operands efficiently large."""
    fits = int(room // per_layer)
    efficient = max(1, math.ceil(EFFICIENT_OPERAND_BYTES / per_layer))
    return max(1, min(n_layers, fits, efficient))


def plan_run(spec: ModelSpec, *, n_left: int, n_right: int, n_samples: int, factor_bytes: int, engine_per_sample: int,
             budget_gb: float, include_biases: bool = False, symmetric_variant: bool = False, same_sides: bool = False,
             chunk_size: int | None = None, max_held_samples: int | None = None,
             n_layers_held: int | None = None) -> MemoryPlan:
    """The memory plan of a run scoring ``n_left × n_right`` pairs from the factors of ``n_samples`` samples.

    ``factor_bytes``: all samples' factors together (the process's share of them: its held layers);
    ``engine_per_sample``: one sample's forward/backward workspace plus its factors; ``same_sides``: the pooled
    matrix (both sides are the same samples); ``n_layers_held``: the most layers one process scores (a rank of a
    process group; default all), which bounds the layers per contraction.
    Raises ValueError when the budget cannot hold even one sample's operands.
    """
    budget = budget_gb * GB
    n_held = max(1, min(spec.n_layers, n_layers_held or spec.n_layers))
    s = gradient_bytes_per_sample(spec, include_biases)
    s_layer = max(layer_row_bytes(spec, b, include_biases) for b in BLOCKS)
    n_block_heads = sum(spec.n_block_heads(b) for b in BLOCKS)
    fixed = 2 * s + 2 * spec.n_layers * s_layer  # the result's float64 Fisher + float64 sums of one group
    fixed += 2 * n_left * n_right * spec.n_layers * n_block_heads * 4  # the scores (+ a tile's temporary)
    scratch, slack = SCRATCH_SHARE * budget, SLACK_SHARE * budget
    k = 2 if symmetric_variant else 1
    per_op = (k + 0.5) * s_layer  # one sample's operand(s) of one block and layer, + transients
    per_op_shared = (2 * k + 0.5) * s_layer  # both operands from one sample's rows (pooled)
    min_ops = per_op_shared if same_sides else 2 * per_op
    # The gradient pass and the score pass do not overlap: the chunk's workspace and the operands share the
    # memory left next to the fixed part and the held factors.
    base = budget - fixed - slack
    if base - scratch < min_ops:
        need = (budget - base + scratch + min_ops) / GB
        raise ValueError(f"memory_budget_gb={budget_gb} is too small for this model and these tasks: at least "
                         f"{need:.3f} GB is needed (Fisher, scores, one sample's operands)")
    cap_exceeded = max_held_samples is not None and n_samples > max_held_samples
    spill = cap_exceeded or factor_bytes > HOLD_SHARE * budget
    if not spill and base - factor_bytes - scratch < min_ops:  # the factors would crowd out the operands
        spill = True
    held = 0 if spill else factor_bytes
    # the Fisher and the scores are only allocated once the gradients are done
    chunk = chunk_size or chunk_size_for_budget(engine_per_sample, budget - slack - held)
    engine = chunk * engine_per_sample
    room = base - held - scratch
    if same_sides:
        whole = n_left * per_op_shared <= room
        if whole:
            layer_group = _layer_group(n_held, room, n_left * per_op_shared)
            tile_left = tile_right = n_left
        else:
            layer_group = 1
            tile_left = tile_right = max(1, int(room // (2 * per_op)))
    else:
        whole = (n_left + n_right) * per_op <= room
        if whole:
            layer_group = _layer_group(n_held, room, (n_left + n_right) * per_op)
            tile_left, tile_right = n_left, n_right
        else:
            layer_group = 1
            if n_right * per_op <= 0.5 * room:  # hold B's rows, tile A
                tile_right = n_right
                tile_left = max(1, int((room - n_right * per_op) // per_op))
            else:
                tile_left = tile_right = max(1, int(room // (2 * per_op)))
    tile_left, tile_right = min(tile_left, n_left), min(tile_right, n_right)
    n_tiles = math.ceil(n_left / tile_left) * math.ceil(n_right / tile_right)
    operands = (tile_left + tile_right) * layer_group * per_op
    peak = held + max(engine, fixed + scratch + operands)
    return MemoryPlan(budget_gb=budget_gb, engine_chunk=chunk, spill=spill, factor_gb=factor_bytes / GB,
                      layer_group=layer_group, tile_left=tile_left, tile_right=tile_right, fisher_pass=not whole,
                      n_gradient_evaluations=n_samples, n_tiles=n_tiles, estimated_peak_gb=peak / GB)


# ----- the byte rules of the freeze sweep, the MEAN reference and the statistics ---------------------------------
LOGIT_COPIES = 4
"""A no-grad forward row's float32 logits are held about this many times (the logits, their log-softmax and the
metric's temporaries); they dominate a freeze sweep's and a MEAN reference's memory at any real vocabulary."""
STATS_SCRATCH_CAP_GB = STATS_WORKSPACE_GB
"""The largest scratch product of one chunk of relabelings or resamples: once a chunk is a large GEMM, bigger chunks
buy nothing, while every fresh GB costs page faults (:data:`tl_circuits.defaults.STATS_WORKSPACE_GB`)."""


def forward_row_bytes(spec: ModelSpec, n_pos: int, cached_heads: int = 0) -> int:
    """Memory of one row (one sample, or one stacked copy of it) of a no-grad forward: its logits
    (:data:`LOGIT_COPIES` float32 copies) and ``cached_heads`` per-head activations per layer kept from the pass."""
    cache = cached_heads * spec.n_layers * spec.n_heads * spec.d_head
    return 4 * n_pos * (LOGIT_COPIES * spec.d_vocab + 2 * cache)


def rows_for_budget(row_bytes: int, budget_gb: float) -> int:
    """Rows of ``row_bytes`` that fit ``budget_gb`` (at least one).

    >>> rows_for_budget(2**20, 0.5)
    512
    """
    return max(1, int(budget_gb * GB) // max(1, row_bytes))


def statistics_held_bytes(n: int, block_cells: list[int], itemsize: int, *, n_relabelings: int = 0,
                          n_resamples: int = 0) -> int:
    """What a statistics call holds besides its scratch: one prepared block at a time (its centred copy and the A × B
    sub-block, ``[N, N, cells]`` each), the null distribution and its standardised copy of every cell (float64,
    ``[P, cells]`` each, kept for the result) and a block's transient null and bootstrap arrays."""
    largest, total = max(block_cells), sum(block_cells)
    prepared = 2 * n * n * largest * itemsize
    kept = 2 * 8 * n_relabelings * total
    transient = 4 * 8 * (n_relabelings + n_resamples) * largest
    return prepared + kept + transient


def statistics_scratch_gb(budget_gb: float, held_bytes: int, row_bytes: int) -> float:
    """The scratch of one chunk of a statistics call that may allocate ``budget_gb`` and holds ``held_bytes``:
    what is left, at most :data:`STATS_SCRATCH_CAP_GB`. ValueError when not even one row of ``row_bytes`` fits.

    >>> statistics_scratch_gb(4.0, 2**30, 2**20)
    0.25
    """
    room = budget_gb * GB - held_bytes
    if room < row_bytes:
        raise ValueError(f"memory_budget_gb={budget_gb:g} is below what this call must hold: {held_bytes / GB:.3g} GB "
                         f"(the prepared scores and the null distribution) plus {row_bytes / GB:.3g} GB of scratch; "
                         "raise memory_budget_gb (it is what the call may allocate, in GB)")
    return min(STATS_SCRATCH_CAP_GB, room / GB)
