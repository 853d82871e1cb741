"""Freeze each head in turn, per circuit, and measure the effect on a metric (docs/spec.md §1.7, §1.8).

The sweep runs the clean model once, caches every ``resid_pre``, and runs each layer's (circuit, head)
variants stacked along the batch from that layer's cached input (:mod:`~tl_circuits.freezing.stacked`).
With ``per_sample=True`` it keeps each sample's effect (from the same forward passes), which
:meth:`SweepResult.test` turns into intervals, paired tests and q-values (:mod:`~tl_circuits.freezing.sweep_stats`);
NOISE over several seeds and RESAMPLE over several reference batches are *draws*, averaged.

>>> import torch
>>> from tl_circuits import load_bundled_model
>>> model = load_bundled_model("induction-2l")  # 2 layers x 4 heads, vocabulary 64
>>> result = freeze_sweep(model, torch.randint(0, 64, (2, 6)), progress=False)
>>> result.effect["qk"].shape, result.effect["ov"].shape
(torch.Size([2, 4]), torch.Size([2, 4]))
>>> result = freeze_sweep(model, torch.randint(0, 64, (3, 6)), per_sample=True, progress=False)
>>> result.per_sample_effect["qk"].shape, result.clean_per_sample.shape
(torch.Size([3, 2, 4]), torch.Size([3]))

A padded batch whose loss counts only the predictions of the last two tokens of each sample:

>>> tokens = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
>>> attention_mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # sample 0 left-padded
>>> loss_mask = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 0]])      # predictions of tokens 4 and 5
>>> result = freeze_sweep(model, tokens, per_sample=True, attention_mask=attention_mask, loss_mask=loss_mask,
...                       progress=False)
>>> result.settings["loss"]["counted_predictions"]
{'min': 2, 'median': 2.0, 'max': 2, 'total': 4}
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

try:  # TransformerLens >= 3 (and 4.x, which has no transformer_lens.utils)
    from transformer_lens.utilities.lm_utils import lm_cross_entropy_loss
except ImportError:  # TransformerLens 2.x
    from transformer_lens.utils import lm_cross_entropy_loss  # type: ignore[no-redef, unused-ignore]

from tl_circuits import defaults
from tl_circuits.defaults import GB, SEED
from tl_circuits.deprecation import renamed_argument
from tl_circuits.freezing.options import (
    NOISE_SCALE,
    Circuit,
    FreezeSpec,
    GradientMode,
    Replacement,
    check_noise_scale,
    check_qk_freezable,
    check_replacement_fits,
    parse_option,
)
from tl_circuits.freezing.references import ReferenceLike, prepare_reference
from tl_circuits.freezing.stacked import DrawSettings, clean_run, evaluate_metric, sweep_draw
from tl_circuits.freezing.sweep_inputs import check_padded_qk, check_resample_masks
from tl_circuits.interference import memory
from tl_circuits.freezing.sweep_io import SWEEP_FORMAT, SWEEP_FORMAT_VERSION, sweep_result_files
from tl_circuits.interference.inputs import check_mask, next_token_losses, prepare_loss
from tl_circuits.models.spec import check_tokens, model_spec
from tl_circuits.models.types import Model
from tl_circuits.parallel.group import World, agreed_int, resolve_world
from tl_circuits.parallel.sweep import SweepShare
from tl_circuits.freezing.sweep_result import SweepResult
from tl_circuits.selection import Selection, resolve_selection

if TYPE_CHECKING:  # pragma: no cover - for type checkers only

    pass

__all__ = ["SWEEP_FORMAT", "SWEEP_FORMAT_VERSION", "Metric", "PerSampleMetric", "SweepResult", "freeze_sweep",
           "sweep_result_files"]

Metric = Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, ""]]
PerSampleMetric = Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, " batch"]]
"""``logits -> [batch]``: one value per sample (NaN = missing, e.g. a sample with no scored position)."""



def freeze_sweep(
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    metric: Optional[Union[Metric, PerSampleMetric]] = None,
    *,
    circuits: Sequence[Union[str, Circuit]] = ("qk", "ov"),
    layers: Optional[Iterable[int]] = None,
    heads: Optional[Iterable[int]] = None,
    replacement: Union[str, Replacement] = "zero",
    reference: Optional[Union[ReferenceLike, Sequence[ReferenceLike]]] = None,
    noise_scale: float = NOISE_SCALE,
    seed: Optional[int] = SEED,
    per_sample: bool = False,
    n_draws: Optional[int] = None,
    memory_budget_gb: float = defaults.MEMORY_BUDGET_GB,
    chunk_size: Optional[int] = None,
    cells: Optional[Sequence[tuple[Union[str, Circuit], int, int]]] = None,
    progress: bool = True,
    max_batch_rows: Optional[int] = None,
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
    loss_mask: Optional[Int[Tensor, "batch pos"]] = None,
    reference_attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
    world: Optional[World] = None,
) -> SweepResult:
    """Freeze every head's circuit in turn and evaluate ``metric`` on the logits.

    Args:
        tokens: the input batch [batch, pos].
        metric: ``logits -> scalar`` (TransformerLens's patching-metric convention); default: the
            mean next-token cross-entropy on ``tokens``. With ``per_sample=True``: ``logits -> [batch]``, one
            value per sample (NaN = missing); default: each sample's mean next-token loss over its positions.
            With an ``attention_mask`` or a ``loss_mask`` the default is the per-sample loss of the gradients
            (docs/spec.md §2.1): each sample's token-mean cross-entropy over its counted predictions (valid
            targets, and those set in ``loss_mask``); its batch metric is the mean over samples of these
            per-sample means (so ``per_sample=False`` gives the nan-mean of the ``per_sample=True`` effects). A
            metric of your own gets the logits only: it must ignore padding itself (and a ``loss_mask`` with it
            is refused).
        circuits: which circuits to sweep, each giving an [n_layers, n_heads] tensor.
        layers, heads: the cells swept, ``layers × heads`` (``None``: all; :mod:`tl_circuits.selection`, docs/spec.md
            §0.7). The grids keep their shape, NaN outside the selection; the sweep restarts at each selected
            layer only, so k of L layers costs about the clean forward plus k layers' passes; ``settings
            ["selection"]`` records it.
        replacement, reference, noise_scale, seed: as :func:`tl_circuits.freeze`. A RESAMPLE sweep
            with ``reference=clean_cache`` on corrupted ``tokens`` equals TransformerLens's
            ``patching.get_act_patch_attn_head_pattern_all_pos`` (QK) and
            ``get_act_patch_attn_head_out_all_pos`` (OV). RESAMPLE with a *list* ``[ref_1, ..., ref_k]``
            runs one draw per reference.
        per_sample: keep each sample's effect (``per_sample_effect``, ``clean_per_sample``), from the same
            forward passes; needed by :meth:`SweepResult.test`.
        n_draws: NOISE only: k draws with seeds ``seed, seed + 1, ..., seed + k - 1`` (each the sweep of that
            seed); effects are averaged over draws and each draw's kept in ``per_draw_effect``. Default 1 (or
            the length of a RESAMPLE reference list).
        attention_mask: ``[batch, pos]`` 0/1 padding mask, given to every forward of the sweep (clean, frozen and
            restarted); ``None``: every position real.
        loss_mask: ``[batch, pos]`` 0/1 or bool, the predictions the default metric scores, in the ``scored``
            convention (``loss_mask[i, p]``: the prediction of token ``p + 1``; as
            :func:`~tl_circuits.per_sample_gradients`); a sample with no counted prediction is a ValueError
            naming it.
        reference_attention_mask: the padding of RESAMPLE reference tokens (default: ``attention_mask``). With an
            attention mask, RESAMPLE reference tokens are a per-sample corrupted batch of the same shape (sample
            ``i`` patched from row ``i``), padded the same way: a sample whose corrupted row has another number
            of valid tokens (or other positions) is a ValueError naming it.
        memory_budget_gb: what the call may allocate, in GB (:data:`tl_circuits.defaults.MEMORY_BUDGET_GB`); it
            sets the rows of one stacked forward (:func:`tl_circuits.interference.memory.forward_row_bytes`: the
            default 4 GB is about 1 GB of float32 logits). One pass always holds the whole batch for one variant: a
            batch larger than the budget allows is run anyway, with a warning.
        chunk_size: most rows (copies of a sample) in one stacked forward, instead of the budget's
            (``max_batch_rows``, its old name, is deprecated).
        cells: run only these ``(circuit, layer, head)`` cells, each frozen alone as in the whole sweep (the
            circuits among ``circuits``); every other cell stays NaN. The attribution sweep verifies its top
            cells this way. (A NOISE cell then draws other noise than in the whole sweep: the stacked passes differ.)
        progress: a tqdm progress bar.
        world: ``None`` (default): this process runs every variant, whatever process group exists.
            ``distributed.current_world()``, passed on every rank of a process group: the (layer, stacked pass) items
            are shared out and every rank gets the whole result (docs/spec.md "Distributed runs").
    """
    world = resolve_world(world)
    chunk_size = renamed_argument("max_batch_rows", "chunk_size", max_batch_rows, chunk_size, default=None,
                                  note="most rows in one stacked forward")
    spec = model_spec(model)
    check_tokens(spec, tokens)
    selection = resolve_selection(spec, layers, heads)
    if metric is not None and loss_mask is not None:
        raise ValueError("loss_mask says what the default metric scores; a metric of your own gets the logits only "
                         "and would ignore it: score the predictions you want inside your metric, or drop the metric")
    mask = None if attention_mask is None else check_mask(tokens, attention_mask, "tokens")
    scored = prepare_loss(tokens, check_mask(tokens, attention_mask, "tokens"), loss_mask, None, "tokens")
    swept: list[Circuit] = [parse_option(Circuit, c, "circuit") for c in circuits]
    if not swept:
        raise ValueError("circuits is empty: name at least one of 'qk', 'ov', 'both'")
    replacement = parse_option(Replacement, replacement, "replacement")
    for circuit in swept:
        check_replacement_fits(replacement, circuit)
        check_qk_freezable(spec, circuit)
    check_noise_scale(noise_scale)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1 (rows of one stacked forward), got {chunk_size!r}")
    if not memory_budget_gb > 0:
        raise ValueError(f"memory_budget_gb must be positive (GB the call may allocate), got {memory_budget_gb!r}")
    draw_references = _draw_references(replacement, reference, n_draws)
    reference_mask = check_resample_masks(tokens, mask, draw_references, reference_attention_mask, replacement)
    check_padded_qk(spec, mask, swept, replacement)
    first_seed = seed
    if seed is None and replacement == Replacement.NOISE:  # fresh entropy, drawn on rank 0 and shared; recorded
        first_seed = agreed_int(torch.Generator().seed() % 2**62, world)
    seeds = [None if first_seed is None else first_seed + d for d in range(len(draw_references))]
    metric_name = getattr(metric, "__name__", "metric") if metric is not None else "loss"
    loss_settings = scored.describe() if metric is None else {"scored": f"metric {metric_name}"}
    if metric is None:
        metric = default_metric(tokens, per_sample, mask, scored.loss_mask)

    batch, n_pos = tokens.shape
    max_rows = chunk_size or memory.rows_for_budget(memory.forward_row_bytes(spec, n_pos), memory_budget_gb)
    if chunk_size is None and max_rows < batch:
        warnings.warn(f"a stacked pass holds the whole batch ({batch} samples) for one variant: about "
                      f"{batch * memory.forward_row_bytes(spec, n_pos) / GB:.3g} GB, above memory_budget_gb="
                      f"{memory_budget_gb:g}; run the sweep on fewer samples at a time to stay within it",
                      UserWarning, stacklevel=2)
    per_pass = max(1, min(len(swept) * len(selection.heads), max_rows // batch))
    chosen = None if cells is None else _check_cells(spec, swept, cells)
    passes = _layer_passes(spec, swept, selection, None if chosen is None else set(chosen), per_pass)
    draws_frozen = []
    with torch.no_grad():
        clean_logits, run_layer, route = clean_run(model, spec, tokens, mask)
        clean_value = evaluate_metric(metric, clean_logits, per_sample)  # type: ignore[arg-type]
        del clean_logits
        n_items = sum(len(layer_passes) for layer_passes in passes)  # (layer, stacked pass) items, dealt over ranks
        n_mine = SweepShare(n_items, world).n_mine
        with tqdm(total=len(seeds) * n_mine, desc="freeze sweep", disable=not progress) as bar:
            for draw_seed, draw_reference in zip(seeds, draw_references):
                draw = _draw_settings(model, spec, swept, replacement, draw_reference, noise_scale, draw_seed,
                                      reference_mask, selection)
                share = SweepShare(n_items, world)
                draws_frozen.append(share.merge(sweep_draw(model, spec, batch, run_layer, metric, passes, draw,
                                                           per_sample, bar, share, selection.layers)))
    settings = dict(circuits=[c.value for c in swept], noise_scale=noise_scale, seed=seed,
                    batch=batch, n_pos=n_pos, rows_per_pass=per_pass * batch, restart=route, per_sample=per_sample,
                    n_draws=len(seeds), draw_seeds=seeds if replacement == Replacement.NOISE else None,
                    attention_mask=mask is not None, loss=loss_settings,
                    cells=None if chosen is None else [[c.value, l, h] for c, l, h in chosen],
                    **({} if layers is None and heads is None else {"selection": selection.to_dict()}))
    combine = _combine_per_sample if per_sample else _combine_batch_means
    return combine(clean_value, draws_frozen, replacement.value, metric_name, settings)


def _check_cells(spec, swept: list[Circuit], cells) -> list[tuple[Circuit, int, int]]:
    """``cells`` as sorted, de-duplicated (circuit, layer, head) triples of swept circuits (errors name the cell)."""
    out = set()
    for cell in cells:
        if not isinstance(cell, (tuple, list)) or len(cell) != 3:
            raise ValueError(f"each cell must be a (circuit, layer, head) triple, got {cell!r}")
        circuit = parse_option(Circuit, cell[0], "circuit")
        if circuit not in swept:
            raise ValueError(f"cell {tuple(cell)!r} names circuit {circuit.value!r}, which is not among the swept "
                             f"circuits {[c.value for c in swept]}")
        spec.check_layer_head(cell[1], cell[2])
        out.add((circuit, cell[1], cell[2]))
    if not out:
        raise ValueError("cells is empty: name at least one (circuit, layer, head) cell, or pass cells=None")
    return sorted(out, key=lambda cell: (cell[1], swept.index(cell[0]), cell[2]))


def _layer_passes(spec, swept: list[Circuit], selection: Selection, cells,
                  per_pass: int) -> list[list[list[tuple[Circuit, int]]]]:
    """Per layer, its (circuit, head) copies in passes of ``per_pass``: the selected heads of a selected layer (none
    elsewhere), or among them the layer's ``cells``."""
    passes = []
    for layer in range(spec.n_layers):
        copies = [(circuit, head) for circuit in swept for head in selection.heads
                  if layer in selection.layers and (cells is None or (circuit, layer, head) in cells)]
        passes.append([copies[i:i + per_pass] for i in range(0, len(copies), per_pass)])
    return passes


def default_metric(tokens: Tensor, per_sample: bool, mask: Optional[Tensor] = None,
                   loss_mask: Optional[Tensor] = None) -> Callable[[Tensor], Tensor]:
    """The sweep's default metric: TransformerLens's next-token loss of every position, or, with a padding or
    loss mask, the per-sample loss of docs/spec.md §2.1 (the batch metric: the mean of the per-sample means)."""
    if mask is None and loss_mask is None:
        if per_sample:  # each sample's mean over its pos - 1 next-token predictions
            return lambda logits: lm_cross_entropy_loss(logits, tokens, per_token=True).mean(-1)
        return lambda logits: lm_cross_entropy_loss(logits, tokens)
    full = torch.ones_like(tokens) if mask is None else mask

    def losses(logits: Tensor) -> Tensor:
        device = logits.device
        return next_token_losses(logits, tokens.to(device), full.to(device),
                                 None if loss_mask is None else loss_mask.to(device))

    return losses if per_sample else (lambda logits: losses(logits).mean())


def _draw_references(replacement: Replacement, reference, n_draws: Optional[int]) -> list:
    """One reference per draw: a RESAMPLE list as given, else ``reference`` repeated ``n_draws`` times."""
    if n_draws is not None and (isinstance(n_draws, bool) or not isinstance(n_draws, int) or n_draws < 1):
        raise ValueError(f"n_draws must be an integer >= 1, got {n_draws!r}")
    if isinstance(reference, (list, tuple)):
        if replacement != Replacement.RESAMPLE:
            raise ValueError(f"a list of references gives one draw per reference, for RESAMPLE only; "
                             f"got replacement={replacement.value!r}")
        if not reference:
            raise ValueError("the list of RESAMPLE references is empty")
        if n_draws is not None and n_draws != len(reference):
            raise ValueError(f"n_draws={n_draws} disagrees with the {len(reference)} RESAMPLE references")
        return list(reference)
    if n_draws is not None and n_draws > 1 and replacement != Replacement.NOISE:
        raise ValueError(f"n_draws > 1 repeats a random replacement: it needs replacement='noise' (got "
                         f"{replacement.value!r}); for RESAMPLE pass a list of reference batches")
    return [reference] * (n_draws or 1)


def _draw_settings(model, spec, swept, replacement, reference, noise_scale, seed, reference_mask,
                   selection: Selection) -> DrawSettings:
    references = {}
    for circuit in swept:  # references of the selected cells only
        fspec = FreezeSpec(tuple((l, h) for l in selection.layers for h in selection.heads), circuit,
                           replacement, GradientMode.STOPGRAD, float(noise_scale), seed)
        references[circuit] = prepare_reference(model, spec, fspec, reference, selection.layers,
                                                reference_mask if isinstance(reference, Tensor) else None)
    noise_seed = seed if replacement == Replacement.NOISE else None
    return DrawSettings(replacement, references, float(noise_scale), noise_seed)


def _combine_batch_means(clean: Tensor, draws: list[dict[str, Tensor]], replacement: str, metric_name: str,
                         settings: dict) -> SweepResult:
    clean_f = float(clean)
    frozen = {c: torch.stack([d[c] for d in draws]).mean(0).float() for c in draws[0]}
    per_draw = {c: torch.stack([d[c] for d in draws]) - clean_f for c in draws[0]}
    return SweepResult(clean=clean_f, frozen=frozen, replacement=replacement, metric_name=metric_name,
                       settings=settings, per_draw_effect=per_draw)


def _combine_per_sample(clean: Tensor, draws: list[dict[str, Tensor]], replacement: str, metric_name: str,
                        settings: dict) -> SweepResult:
    n_missing = int((~torch.isfinite(clean)).sum())
    if n_missing:
        warnings.warn(f"{n_missing} of {clean.shape[0]} samples have a NaN (non-finite) clean metric, e.g. no "
                      "scored positions: their per-sample effects are NaN and they are left out of the means and "
                      "of test()", RuntimeWarning, stacklevel=3)
    clean = torch.where(torch.isfinite(clean), clean, float("nan"))
    clean_mean = float(clean.nanmean())
    effects = {c: torch.stack([d[c] for d in draws]) - clean[None, :, None, None] for c in draws[0]}  # [k, N, L, H]
    per_sample = {c: e.mean(0) for c, e in effects.items()}
    per_draw = {c: e.nanmean(1) for c, e in effects.items()}
    frozen = {c: (clean_mean + e.nanmean(0)).float() for c, e in per_sample.items()}
    return SweepResult(clean=clean_mean, frozen=frozen, replacement=replacement, metric_name=metric_name,
                       settings=settings, clean_per_sample=clean, per_sample_effect=per_sample,
                       per_draw_effect=per_draw)
