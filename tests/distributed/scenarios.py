"""The heavy calls of the distributed tests, each a function of nothing: the torchrun worker runs every one under
a 2-rank gloo group, the parent test runs the same ones in a single process, and the results are compared.

Sample counts are odd on purpose (5, 3, 7 pooled): not divisible by the world size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Callable, Iterator

import torch

from tests import builders

QUIET = dict(progress=False)
RANKS_ONLY = ("permutation_fresh_seed",)  # compared between the ranks only
N_PERMUTATIONS = 199


def tasks(n_a: int = 5, n_b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, builders.D_VOCAB, (n_a, 12), generator=gen),
            torch.randint(0, builders.D_VOCAB, (n_b, 10), generator=gen))


def config(**changes):
    """No progress bars, shards of 2 samples; gradient settings (e.g. include_biases) nested."""
    from tests.reference import quiet_config

    return quiet_config(**{"chunk_size": 2, **changes})


@contextlib.contextmanager
def small_tiles() -> Iterator[None]:
    """One layer per contraction and 2 × 1 sample tiles (the engine's tiled path on a tiny model)."""
    from tl_circuits.interference import memory

    real = memory.plan_run

    def plan(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), layer_group=1, tile_left=2, tile_right=1)

    memory.plan_run = plan  # type: ignore[assignment]
    try:
        yield
    finally:
        memory.plan_run = real  # type: ignore[assignment]


def gradients() -> dict:
    from tl_circuits import GradientConfig, per_sample_gradients

    a, _ = tasks(n_a=5)
    g = per_sample_gradients(builders.gqa_under_test(), a, config=GradientConfig(chunk_size=2, **QUIET))
    return {f"grad.{b}": t for b, t in g.per_block.items()} | {"losses": g.losses, "n_targets": g.n_targets}


def _interference(variant: str, source: str, loo: bool = False, tiled: bool = False, **changes) -> dict:
    from tl_circuits import compute_interference

    a, b = tasks()
    with small_tiles() if tiled else contextlib.nullcontext():
        r = compute_interference(builders.gqa_under_test(), a, b, config=config(variant=variant, fisher_source=source,
                                                                     leave_one_out=loo, **changes))
    out = {f"scores.{b}": s for b, s in r.scores.items()}
    assert r.fisher is not None
    return out | {f"fisher.{b}": f for b, f in r.fisher.per_block.items()}


def interference_signed_a() -> dict:
    return _interference("signed", "a")


def interference_unsigned_b_tiled() -> dict:
    return _interference("unsigned", "b", tiled=True)


def interference_symmetric_loo_tiled() -> dict:
    return _interference("symmetric", "pooled", loo=True, tiled=True)


def interference_hybrid_loo_tiled() -> dict:
    """A non-default Fisher normalisation (docs/spec.md §3.4) with leave-one-out, tiled."""
    return _interference("signed", "pooled", loo=True, tiled=True, normalization="hybrid")


def pooled_head() -> dict:
    """The statistics' pooled matrix under the head normalisation."""
    from tl_circuits.interference.engine import pooled_scores

    a, b = tasks(n_a=4, n_b=3)
    pooled = pooled_scores(builders.gqa_under_test(), a, b, config=config(normalization="head"))
    scores, settings = pooled.scores, pooled.settings
    assert settings["normalization"] == "head"
    return {f"scores.{k}": s for k, s in scores.items()}


def interference_external_fisher() -> dict:
    """An external Fisher (itself from split per-sample gradients of task B), unsigned, mean reduction."""
    from tl_circuits import GradientConfig, compute_interference, fisher_from_gradients, per_sample_gradients

    model, (a, b) = builders.gqa_under_test(), tasks()
    fisher = fisher_from_gradients(per_sample_gradients(model, b, config=GradientConfig(chunk_size=2, **QUIET)))
    r = compute_interference(model, a, b, config=config(variant="unsigned", reduction="mean"), fisher=fisher)
    return {f"scores.{k}": s for k, s in r.scores.items()}


def interference_single_sample_a() -> dict:
    """Task A of one sample: rank 1 has no chunk of A and no band of tiles, and still takes part (Fisher of B)."""
    from tl_circuits import compute_interference

    a, b = tasks(n_a=1, n_b=3)
    r = compute_interference(builders.mha_under_test(), a, b, config=config(fisher_source="pooled"))
    return {f"scores.{k}": s for k, s in r.scores.items()}


def interference_three_layers_spilled() -> dict:
    """3 layers over 2 ranks (rank 0 holds layers 0-1, rank 1 layer 2), the factors spilled to disk (received
    chunks go to the memory map), pooled Fisher."""
    from tl_circuits import compute_interference

    a, b = tasks()
    r = compute_interference(builders.mha_under_test(n_layers=3), a, b,
                             config=config(fisher_source="pooled", max_held_samples=1))
    assert r.settings["plan"]["spill"]
    assert r.fisher is not None
    return {f"scores.{k}": s for k, s in r.scores.items()} | {f"fisher.{k}": f for k, f in r.fisher.per_block.items()}


def interference_one_layer() -> dict:
    """A 1-layer model over 2 ranks: rank 1 holds and scores no layer, and still sends its chunks and gets the
    result."""
    from tl_circuits import compute_interference

    a, b = tasks()
    r = compute_interference(builders.mha_under_test(n_layers=1), a, b, config=config(variant="symmetric"))
    assert r.fisher is not None
    return {f"scores.{k}": s for k, s in r.scores.items()} | {f"fisher.{k}": f for k, f in r.fisher.per_block.items()}


def loss_tasks() -> tuple[torch.Tensor, ...]:
    """Task A padded (left and right) with a loss mask, task B unpadded: (a, b, attention mask of a, loss mask of a)."""
    a, b = tasks()
    mask_a = torch.ones_like(a)
    mask_a[1, :3] = 0
    mask_a[3, 9:] = 0
    loss_mask_a = torch.zeros_like(a)
    loss_mask_a[:, 4:9] = 1
    loss_mask_a[0, 2] = 1
    return a, b, mask_a, loss_mask_a


def last_token_margin(logits, tokens, *, samples):
    """A custom per-sample loss: the last token's logit minus the logit of token ``samples % 7`` there."""
    last = logits[:, -2].gather(-1, tokens[:, -1:])[:, 0]
    other = logits[:, -2].gather(-1, (samples % 7)[:, None])[:, 0]
    return other - last


def gradients_loss_mask() -> dict:
    from tl_circuits import GradientConfig, per_sample_gradients

    a, _, mask_a, loss_mask_a = loss_tasks()
    g = per_sample_gradients(builders.gqa_under_test(), a, mask_a, GradientConfig(chunk_size=2, **QUIET),
                             loss_mask=loss_mask_a)
    return {f"grad.{b}": t for b, t in g.per_block.items()} | {"losses": g.losses, "n_targets": g.n_targets}


def interference_loss_mask() -> dict:
    """A masked, padded task A and a custom-loss task B, pooled Fisher, tiled."""
    from tl_circuits import compute_interference

    a, b, mask_a, loss_mask_a = loss_tasks()
    with small_tiles():
        r = compute_interference(builders.gqa_under_test(), a, b, attention_mask_a=mask_a, loss_mask_a=loss_mask_a,
                                 loss_fn_b=last_token_margin, config=config(fisher_source="pooled"))
    assert r.fisher is not None
    return {f"scores.{k}": s for k, s in r.scores.items()} | {f"fisher.{k}": f for k, f in r.fisher.per_block.items()}


def pooled_loss_mask() -> dict:
    from tl_circuits.interference.engine import pooled_scores

    a, b, mask_a, loss_mask_a = loss_tasks()
    pooled = pooled_scores(builders.mha_under_test(), a, b, attention_mask_a=mask_a, loss_mask_a=loss_mask_a,
                           loss_fn_b=last_token_margin, config=config())
    scores, fisher = pooled.scores, pooled.fisher
    return {f"scores.{k}": s for k, s in scores.items()} | {f"fisher.{k}": f for k, f in fisher.per_block.items()}


CHECKPOINT_DIR: list[str] = []  # the ranks' shard folder: set by the worker, and by the parent test to read it


def checkpointed() -> dict:
    """Ranks keep their shards; a single process started on that folder afterwards computes none."""
    return _interference("signed", "pooled", checkpoint_dir=CHECKPOINT_DIR[0])


def pooled() -> dict:
    from tl_circuits.interference.engine import pooled_scores

    a, b = tasks(n_a=4, n_b=3)
    pooled = pooled_scores(builders.mha_under_test(), a, b, config=config())
    return {f"scores.{k}": s for k, s in pooled.scores.items()} | {f"fisher.{k}": f
                                                                   for k, f in pooled.fisher.per_block.items()}


def _test_fields(res) -> dict:
    names = ("observed", "null_std", "z", "p_value", "q_value_bh", "p_value_maxstat", "p_value_cluster")
    out = {f"{name}.{b}": t for name in names for b, t in getattr(res, name).items()}
    if res.ci_low is not None:
        out |= {f"ci_low.{b}": t for b, t in res.ci_low.items()} | {f"ci_high.{b}": t for b, t in res.ci_high.items()}
    return out | {"permutations": res.permutations}


def permutation_synthetic() -> dict:
    """The permutation test of a fixed matrix (bit-identical input on every rank): p-values must be equal."""
    from tl_circuits import permutation_test

    gen = torch.Generator().manual_seed(5)
    m = {"Q": torch.randn(9, 9, 2, 3, generator=gen), "O": torch.randn(9, 9, 2, 2, generator=gen)}
    m["Q"][:4, 4:, 0, 0] -= 1.0
    from tl_circuits.interference import memory

    cap, memory.STATS_SCRATCH_CAP_GB = memory.STATS_SCRATCH_CAP_GB, 1e-5  # tiny chunk scratch: many null chunks
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = permutation_test(m, 4, n_permutations=N_PERMUTATIONS, n_bootstrap=60, seed=11, progress=False,
                                   alternative="less")
    finally:
        memory.STATS_SCRATCH_CAP_GB = cap
    return _test_fields(res)


def permutation_fresh_seed() -> dict:
    """seed=None: fresh entropy, drawn on rank 0 and shared (compared between the ranks, not with one process)."""
    from tl_circuits import permutation_test

    m = {"V": torch.randn(8, 8, 1, 3, generator=torch.Generator().manual_seed(1))}
    res = permutation_test(m, 3, n_permutations=50, n_bootstrap=0, seed=None, progress=False)
    return {"permutations": res.permutations, "p_value.V": res.p_value["V"]}


def interference_permutation() -> dict:
    from tl_circuits import interference_permutation_test

    a, b = tasks(n_a=4, n_b=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = interference_permutation_test(builders.mha_under_test(), a, b, config=config(),
                                            n_permutations=N_PERMUTATIONS, n_bootstrap=40, seed=2, progress=False)
    return _test_fields(res)


def conflict() -> dict:
    from tl_circuits import interference_conflict_test

    a, b = tasks()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = interference_conflict_test(builders.gqa_under_test(), a, b, config=config())
    return {f"{name}.{b}": t for name in ("estimate", "std_error", "pvalue", "ci_low")
            for b, t in getattr(res, name).items()}


def _sweep(replacement: str, seed=3) -> dict:
    from tl_circuits import freeze_sweep

    tokens, _ = tasks(n_a=3)
    model = builders.mha_under_test()
    reference = None
    if replacement == "mean":
        from tl_circuits.freezing.references import compute_mean_activations

        reference = compute_mean_activations(model, tokens, progress=False)
    res = freeze_sweep(model, tokens, replacement=replacement, reference=reference, chunk_size=9, seed=seed,
                       progress=False)  # 3 copies per pass: 3 passes per layer, 6 items over 2 ranks
    out = {f"frozen.{c}": t for c, t in res.frozen.items()} | {"clean": torch.tensor(res.clean)}
    if seed is None and replacement == "noise":  # the seed drawn (on rank 0), to rerun in one process
        out["draw_seed"] = torch.tensor(res.settings["draw_seeds"][0])
    return out


def sweep_zero() -> dict:
    return _sweep("zero")


def sweep_mean() -> dict:
    return _sweep("mean")


def sweep_noise() -> dict:
    return _sweep("noise")


def sweep_noise_fresh_seed() -> dict:
    """seed=None: the NOISE seed is drawn on rank 0 and shared (test_distributed reruns it in one process)."""
    return _sweep("noise", seed=None)


def sweep_per_sample() -> dict:
    """The per-sample sweep over QK, OV and BOTH with its test: the [N, L, H] grids are merged exactly."""
    from tl_circuits import freeze_sweep

    tokens, _ = tasks(n_a=4)
    res = freeze_sweep(builders.mha_under_test(), tokens, circuits=("qk", "ov", "both"), per_sample=True,
                       chunk_size=12, replacement="mean", reference=_mean(tokens), seed=3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tested = res.test(n_bootstrap=50, seed=1)
    return ({f"per_sample.{c}": t for c, t in res.per_sample_effect.items()}
            | {f"p_value.{c}": t for c, t in tested.p_value.items()} | {"clean": res.clean_per_sample})


def _mean(tokens):
    from tl_circuits.freezing.references import compute_mean_activations

    return compute_mean_activations(builders.mha_under_test(), tokens, progress=False)


def permutation_screened() -> dict:
    """The screened default (n_permutations=None) on 192 cells: the screen and its continuation are both split."""
    from tl_circuits import permutation_test

    gen = torch.Generator().manual_seed(8)
    m = {"Q": torch.randn(16, 16, 4, 12, generator=gen), "K": torch.randn(16, 16, 4, 12, generator=gen),
         "V": torch.randn(16, 16, 4, 12, generator=gen), "O": torch.randn(16, 16, 4, 12, generator=gen)}
    m["Q"][:8, 8:, 0, 0] += 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = permutation_test(m, 8, n_bootstrap=0, seed=4, alternative="greater", progress=False)
    return {f"p_value.{b}": t for b, t in res.p_value.items()} | {
        f"used.{b}": t for b, t in res.permutations_used.items()}


SCENARIOS: dict[str, Callable[[], dict]] = {
    f.__name__: f for f in (
        gradients, interference_signed_a, interference_unsigned_b_tiled, interference_symmetric_loo_tiled,
        interference_hybrid_loo_tiled, pooled_head, interference_external_fisher, interference_single_sample_a,
        interference_three_layers_spilled,
        interference_one_layer, checkpointed, pooled, permutation_synthetic,
        permutation_fresh_seed, interference_permutation, conflict, sweep_zero, sweep_mean, sweep_noise,
        sweep_noise_fresh_seed, sweep_per_sample, permutation_screened, gradients_loss_mask,
        interference_loss_mask, pooled_loss_mask)
}
