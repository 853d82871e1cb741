"""Per-sample freeze-sweep benchmark: ``freeze_sweep(..., per_sample=True)`` beside the batch-mean sweep.

Both run the same stacked, layer-restarting forward passes; ``per_sample=True`` only keeps one metric value
per sample. Goal: per-sample / batch-mean <= 1.10x. Also times :meth:`SweepResult.test` on the result
(sign flips, bootstrap, q-values), which is extra work done once after the sweep.

Model: GPT-2-small shape (12 layers, 12 heads, d_model 768, d_mlp 3072, seq 64), random weights; ZERO
freezes of QK and OV. Timings alternate the two calls so that drift in machine load hits both alike; take
them on an otherwise idle machine.

    python benchmarks/bench_sweep.py            # full size
    python benchmarks/bench_sweep.py --smoke    # tiny model, seconds (CI)
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from bench_freeze import build, timed_pair

from tl_circuits import freeze_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, for CI")
    parser.add_argument("--batch", type=int, default=None, help="samples in the swept batch")
    parser.add_argument("--vocab", type=int, default=50257, help="d_vocab of the full-size model")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build(args.smoke, args.vocab)
    cfg = model.cfg
    n_pos = 8 if args.smoke else 64
    batch = args.batch or (8 if args.smoke else 16)
    repeats = args.repeats or (2 if args.smoke else 5)
    tokens = torch.randint(0, cfg.d_vocab, (batch, n_pos))
    print(f"model: {cfg.n_layers} layers x {cfg.n_heads} heads, d_model {cfg.d_model}, d_vocab {cfg.d_vocab}; "
          f"batch {batch}, seq {n_pos}; torch threads {torch.get_num_threads()}")

    def batch_mean():
        return freeze_sweep(model, tokens, progress=False)

    def per_sample():
        return freeze_sweep(model, tokens, per_sample=True, progress=False)

    with torch.no_grad():
        plain, ours, plain_cpu, ours_cpu = timed_pair(batch_mean, per_sample, repeats)
    print(f"[sweep QK+OV, ZERO] batch-mean {plain:8.2f} s | per_sample=True {ours:8.2f} s | "
          f"ratio {ours / plain:.3f}x (goal <= 1.10x) | CPU-time ratio {ours_cpu / plain_cpu:.3f}x")

    a, b = batch_mean(), per_sample()
    diff = max(float((a.effect[c] - b.effect[c]).abs().max()) for c in a.effect)
    print(f"max |batch-mean effect - mean per-sample effect| {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit(f"the per-sample sweep's mean effect disagrees with the batch-mean sweep by {diff}")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # floor warnings with few samples
        tested = b.test()
    print(f"[test()] {time.perf_counter() - start:8.2f} s for {sum(g.numel() for g in tested.p_value.values())} "
          f"cells, {tested.n_permutations} sign patterns ({'exact' if tested.exact else 'Monte Carlo'}), "
          f"{tested.n_bootstrap} bootstrap resamples")


if __name__ == "__main__":
    main()
