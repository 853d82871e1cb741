"""Circuit-freezing benchmark: prints our times beside the baselines they are compared with.

1. forward with a freeze of 12 heads (BOTH circuits, ZERO, one head per layer) vs the same forward
   with no hooks. Goal <= 1.10x.
2. the full QK+OV sweep (RESAMPLE from a clean cache) vs TransformerLens's own patching loop —
   ``patching.get_act_patch_attn_head_pattern_all_pos`` + ``get_act_patch_attn_head_out_all_pos``,
   one full forward per (layer, head, circuit) — producing the same numbers. Goal >= 1.8x faster.

Model: GPT-2-small shape (12 layers, 12 heads, d_model 768, d_mlp 3072, seq 64), random weights.

    python benchmarks/bench_freeze.py            # full size
    python benchmarks/bench_freeze.py --smoke    # tiny model, seconds (CI)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig, patching

from tl_circuits import freeze, freeze_sweep


def build(smoke: bool, vocab: int) -> HookedTransformer:
    if smoke:
        cfg = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=16, d_vocab=50)
    else:
        cfg = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=64, d_vocab=vocab)
    model = HookedTransformer(
        HookedTransformerConfig(act_fn="gelu_new", normalization_type="LN", seed=0, device="cpu", **cfg)
    )
    return model.eval()


def timed_pair(first, second, repeats: int) -> tuple[float, float, float, float]:
    """Median wall and CPU times of two calls, alternated so that drift in machine load hits both
    alike. CPU time (this process) is printed too: on a shared machine it is the steadier figure."""
    first(), second()
    wall, cpu = ([], []), ([], [])
    for _ in range(repeats):
        for i, fn in enumerate((first, second)):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[i].append(time.perf_counter() - start)
            cpu[i].append(time.process_time() - start_cpu)
    med = statistics.median
    return med(wall[0]), med(wall[1]), med(cpu[0]), med(cpu[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, for CI")
    parser.add_argument("--batch", type=int, default=4, help="batch of the forward-overhead timing")
    parser.add_argument("--sweep-batch", type=int, default=1, help="batch of the sweep comparison")
    parser.add_argument("--vocab", type=int, default=50257, help="d_vocab of the full-size model")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build(args.smoke, args.vocab)
    cfg = model.cfg
    n_pos = 8 if args.smoke else 64
    repeats = args.repeats or (3 if args.smoke else 10)
    clean = torch.randint(0, cfg.d_vocab, (args.batch, n_pos))
    sweep_clean = torch.randint(0, cfg.d_vocab, (args.sweep_batch, n_pos))
    corrupted = torch.randint(0, cfg.d_vocab, (args.sweep_batch, n_pos))
    print(f"model: {cfg.n_layers} layers x {cfg.n_heads} heads, d_model {cfg.d_model}, d_vocab {cfg.d_vocab}; "
          f"seq {n_pos}; torch threads {torch.get_num_threads()}")

    # 1. forward overhead of a 12-head freeze
    heads = [(layer % cfg.n_layers, (3 * layer) % cfg.n_heads) for layer in range(12)]
    def frozen_forward():  # includes registering and removing the hooks
        with freeze(model, heads, "both", "zero"):
            model(clean)

    with torch.no_grad():
        plain, frozen, plain_cpu, frozen_cpu = timed_pair(lambda: model(clean), frozen_forward, repeats)
    print(f"\n[forward, batch {args.batch}] no hooks {plain * 1e3:8.1f} ms | "
          f"12-head freeze (BOTH, ZERO) {frozen * 1e3:8.1f} ms | "
          f"ratio {frozen / plain:.3f}x (goal <= 1.10x) | CPU-time ratio {frozen_cpu / plain_cpu:.3f}x")

    # 2. QK+OV sweep vs TransformerLens's patching loop, same numbers
    metric = lambda logits: logits[:, -1, 0].mean()  # noqa: E731
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(sweep_clean)
        start = time.perf_counter()
        tl_qk = patching.get_act_patch_attn_head_pattern_all_pos(model, corrupted, clean_cache, metric)
        tl_ov = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric)
        baseline = time.perf_counter() - start
        start = time.perf_counter()
        ours = freeze_sweep(model, corrupted, metric, replacement="resample", reference=clean_cache, progress=False)
        sweep = time.perf_counter() - start
    diff = max(float((ours.frozen["qk"] - tl_qk).abs().max()), float((ours.frozen["ov"] - tl_ov).abs().max()))
    n_runs = 2 * cfg.n_layers * cfg.n_heads
    print(f"[sweep, batch {args.sweep_batch}] TL patching loop ({n_runs} full forwards) {baseline:8.2f} s | "
          f"freeze_sweep {sweep:8.2f} s | "
          f"speed-up {baseline / sweep:.2f}x (goal >= 1.8x) | max |difference| {diff:.2e}")
    if diff > 1e-3:
        raise SystemExit(f"sweep and TL patching disagree by {diff}")


if __name__ == "__main__":
    main()
