"""Benchmark: the score pass (``pairwise_scores``, the engine's ``score_pass`` on rows in memory) per Fisher
normalisation mode (docs/spec.md §3.4), with and without leave-one-out.

Rows: random float32 per-sample gradient rows at GPT-2-small widths (12 heads, d_model 768, d_head 64) over
``--layers`` layers, ``--n`` × ``--n`` samples, the signed variant on task A's Fisher, the default budget. Prints the
best of ``--repeat`` wall times per setting. Run it on an older commit too to compare (settings that commit does
not know, such as ``normalization``, are skipped there). No assertions on time.

    python benchmarks/bench_score_pass.py            # 2 layers, 64 x 64 samples (about a minute on 2 CPU cores)
    python benchmarks/bench_score_pass.py --smoke    # tiny widths, seconds
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import time

import torch


def rows(n: int, n_layers: int, d_model: int, n_heads: int, seed: int):
    from tl_circuits.interference.factors import PerSampleGradients
    from tl_circuits.models.spec import ModelSpec

    d_head = d_model // n_heads
    spec = ModelSpec(n_layers, n_heads, n_heads, d_model, d_head, 1000, 64, False, False)
    gen = torch.Generator().manual_seed(seed)
    per_block = {b: torch.randn(n, n_layers, n_heads, d_model * d_head, generator=gen) for b in "QKVO"}
    return PerSampleGradients(per_block, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny widths, seconds")
    parser.add_argument("--n", type=int, default=None, help="samples per side (default 64; smoke 8)")
    parser.add_argument("--layers", type=int, default=2, help="layers (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per setting, best reported (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from tl_circuits.interference.fisher import fisher_from_gradients
    from tl_circuits.interference.scoring import pairwise_scores

    d_model, n_heads = (32, 4) if args.smoke else (768, 12)
    n = args.n or (8 if args.smoke else 64)
    ga, gb = rows(n, args.layers, d_model, n_heads, 0), rows(n, args.layers, d_model, n_heads, 1)
    fisher = fisher_from_gradients(ga)
    modes = ("diagonal", "head", "hybrid") if "normalization" in inspect.signature(pairwise_scores).parameters \
        else ("diagonal",)
    print(f"score pass: {args.layers} layers x {n_heads} heads, d_model {d_model}, {n} x {n} samples; torch "
          f"{torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, load average "
          f"{os.getloadavg()[0]:.2f}")
    for loo in (False, True):
        for mode in modes:
            kwargs = {"normalization": mode} if mode != "diagonal" else {}
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                pairwise_scores(ga, gb, fisher, "signed", leave_one_out=loo, **kwargs)
                times.append(time.perf_counter() - start)
            print(f"   leave_one_out={str(loo):5}  {mode:8}  best {min(times):7.3f} s  (of {args.repeat})")


if __name__ == "__main__":
    main()
