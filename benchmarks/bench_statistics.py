"""Benchmark: permutation test of interference maps vs scipy.stats.permutation_test.

Full run (the issue's setting): 1000 permutations, 4 blocks x 12 layers x 12 heads, 200 pooled samples
(n_A = n_B = 100). scipy is timed on a few cells (vectorised statistic over index samples, one call per cell,
all 1000 resamples in one batch) and scaled linearly to all cells: scipy has no way to share one permutation
across cells, so its cost is per cell. No assertions on time: this prints figures for the README.

    python benchmarks/bench_statistics.py            # full
    python benchmarks/bench_statistics.py --smoke    # tiny, a few seconds (CI)
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import scipy
import scipy.stats as st
import torch

import tl_circuits.stats as S
from tl_circuits import conflict_test, defaults


def synthetic_scores(n, n_layers, n_heads, blocks, seed=0, d=4):
    """Pooled unsigned scores M_ij = Σ_p g_i[p]² / F[p] · |g_j[p]| from iid per-sample vectors (float32)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for block in blocks:
        g = torch.randn(n, n_layers, n_heads, d, generator=gen)
        fisher = torch.rand(n_layers, n_heads, d, generator=gen) + 0.5
        out[block] = torch.einsum("ilhp,jlhp->ijlh", g.square() / fisher, g.abs())
    return out


def timed(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--scipy-cells", type=int, default=None, help="cells timed with scipy")
    args = parser.parse_args()

    if args.smoke:
        n, n_layers, n_heads, blocks, n_perm, n_boot = 24, 2, 3, ("Q", "K"), 50, 100
        repeats, scipy_cells = args.repeats or 1, args.scipy_cells or 1
    else:
        n, n_layers, n_heads, blocks, n_perm, n_boot = 200, 12, 12, ("Q", "K", "V", "O"), 1000, 2000
        repeats, scipy_cells = args.repeats or 3, args.scipy_cells or 4
    n_a = n // 2
    n_cells = len(blocks) * n_layers * n_heads
    scores = synthetic_scores(n, n_layers, n_heads, blocks)

    print(f"tl_circuits.stats benchmark{' (smoke)' if args.smoke else ''}")
    print(f"  {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, scipy {scipy.__version__}")
    print(f"  {len(blocks)} blocks x {n_layers} layers x {n_heads} heads = {n_cells} cells, N = {n} pooled "
          f"(n_A = n_B = {n_a}), {n_perm} permutations")

    rows = []
    for dtype in (torch.float64, torch.float32):
        res, times = timed(lambda: S.permutation_test(scores, n_a, n_permutations=n_perm, n_bootstrap=0,
                                                      alternative="greater", dtype=dtype, progress=False), repeats)
        rows.append((f"permutation_test ({str(dtype).split('.')[-1]}; null + BH/BY + max-T + cluster)", times))
        if dtype == torch.float64:
            ours = res
    _, times = timed(lambda: S.bootstrap_ci(scores, n_a, n_resamples=n_boot, method="bca", progress=False),
                     max(1, repeats - 1))
    rows.append((f"bootstrap_ci (BCa, {n_boot} resamples, float64)", times))
    # the default of every entry point: enough permutations for BH to flag a single cell of the grid
    n_default = defaults.default_n_permutations(n_cells, defaults.ALPHA)
    _, times = timed(lambda: S.permutation_test(scores, n_a, n_bootstrap=0, dtype=torch.float32, progress=False),
                     max(1, repeats - 2))
    rows.append((f"permutation_test default (n_permutations=None -> {n_default}; float32, BH-resolvable)", times))
    default_best = min(times)
    cross = {block: s[:n_a, n_a:] for block, s in scores.items()}
    _, times = timed(lambda: conflict_test(cross), repeats)
    rows.append(("conflict_test (A x B block, t-test of E[score] >= 0, BH/BY, intervals)", times))
    conflict_best = min(times)
    for name, times in rows:
        print(f"  {name:<72s} best {min(times):7.3f} s   (runs: {', '.join(f'{t:.2f}' for t in times)})")

    # scipy on a subset of cells, scaled to all cells
    ia, ib = np.arange(n_a), np.arange(n_a, n)
    picks = [(blocks[c % len(blocks)], (c * 5) % n_layers, (c * 7) % n_heads) for c in range(scipy_cells)]
    start = time.perf_counter()
    scipy_p = []
    for block, layer, head in picks:
        m = scores[block][:, :, layer, head].double().numpy()

        def statistic(x, y, axis=-1, m=m):
            x, y = np.broadcast_arrays(x[..., :, None], y[..., None, :])
            return m[x, y].mean(axis=(-2, -1))

        ref = st.permutation_test((ia, ib), statistic, permutation_type="independent", vectorized=True,
                                  n_resamples=n_perm, alternative="greater", rng=np.random.default_rng(0))
        scipy_p.append(ref.pvalue)
    scipy_subset = time.perf_counter() - start
    scipy_all = scipy_subset / len(picks) * n_cells
    ours_best = min(rows[0][1])
    print(f"  scipy.stats.permutation_test: {scipy_subset:.3f} s for {len(picks)} cells -> x {n_cells}/{len(picks)} "
          f"= {scipy_all:.1f} s for all cells (linear scaling, one call per cell)")
    print(f"  speed-up of permutation_test (float64) over scaled scipy: {scipy_all / ours_best:.1f}x")
    ours_p = [ours.p_value[b][l, h].item() for b, l, h in picks]
    print(f"  same cells, different random permutations: ours p = {np.round(ours_p, 3).tolist()}, "
          f"scipy p = {np.round(scipy_p, 3).tolist()} (agree within Monte Carlo error)")
    if not args.smoke:
        print(f"  goal: <= 5 s for the {n_perm}-permutation test -> {'met' if ours_best <= 5 else 'NOT met'}; "
              f"<= 5 s for the default BH-resolvable test -> {'met' if default_best <= 5 else 'NOT met'}; "
              f"<= 1 s for conflict_test -> {'met' if conflict_best <= 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
