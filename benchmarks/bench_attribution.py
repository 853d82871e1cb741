"""Attribution-sweep benchmark: first-order estimates of every head's QK and OV freeze effect beside the exact sweep.

Model: GPT-2-small shape (12 layers x 12 heads, d_model 768, d_mlp 3072, vocabulary 50257), random weights; a batch
of 16 x 64 tokens, RESAMPLE from another random batch (one clean/corrupted pair per sample). Goals (issue #23):

- the attribution sweep of QK + OV over all 144 heads (one clean, one reference forward, one backward) is >= 20x
  faster than the exact sweep (:func:`tl_circuits.freeze_sweep`);
- with the top 10% of each circuit verified exactly (``verify=0.1``), >= 5x faster end to end.

The exact sweep takes many minutes at this shape, so by default it is timed on ``--exact-layers`` layers only (each
layer's stacked passes restart at that layer: their cost falls linearly with depth) and the whole sweep's time is the
sum of a straight line fitted to those layers' times, over all layers; ``--exact-layers all`` times it whole. The
missed-effect bound (AtP* subset sampling at 95%, 4 groups a round) is timed separately. A HookedTransformer on the
TransformerLens 3 leg, a GPT-2 TransformerBridge on 4.x. Timings alternate nothing: run on a quiet machine.

    python benchmarks/bench_attribution.py            # full size (tens of minutes on a CPU)
    python benchmarks/bench_attribution.py --smoke    # tiny model, seconds (CI); its ratios mean nothing
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from tl_circuits import attribution_sweep, freeze_sweep
from tl_circuits.models import model_spec


def build(smoke: bool, vocab: int):
    shape = (dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=16, d_vocab=50) if smoke else
             dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=64, d_vocab=vocab))
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:  # TransformerLens 4: the same shape as a GPT-2 bridge
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

        torch.manual_seed(0)
        config = GPT2Config(vocab_size=shape["d_vocab"], n_positions=shape["n_ctx"], n_embd=shape["d_model"],
                            n_layer=shape["n_layers"], n_head=shape["n_heads"], n_inner=shape["d_mlp"],
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        config._attn_implementation = "eager"
        hf = GPT2LMHeadModel(config).eval()
        return build_bridge_from_module(hf, architecture="GPT2LMHeadModel", hf_config=hf.config).eval()
    return HookedTransformer(HookedTransformerConfig(act_fn="gelu_new", normalization_type="LN", seed=0,
                                                     device="cpu", **shape)).eval()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def exact_seconds(model, tokens, reference, layers: list[int]) -> tuple[float, str]:
    """The exact QK + OV sweep's wall time: measured whole, or fitted over ``layers`` and summed over all layers."""
    spec = model_spec(model)
    if len(layers) == spec.n_layers:
        seconds, _ = timed(lambda: freeze_sweep(model, tokens, replacement="resample", reference=reference,
                                                progress=False))
        return seconds, "measured whole"
    per_layer = []
    for layer in layers:
        cells = [(c, layer, h) for c in ("qk", "ov") for h in range(spec.n_heads)]
        seconds, _ = timed(lambda: freeze_sweep(model, tokens, replacement="resample", reference=reference,
                                                cells=cells, progress=False))
        per_layer.append(seconds)
        print(f"exact sweep, layer {layer} alone: {seconds:.2f} s", flush=True)
    clean, _ = timed(lambda: model(tokens))  # every call above also ran one clean forward: counted once
    depth = torch.tensor([float(spec.n_layers - layer) for layer in layers])
    times = torch.tensor(per_layer) - clean
    slope, intercept = (torch.linalg.lstsq(torch.stack([depth, torch.ones_like(depth)], 1), times[:, None])
                        .solution.flatten().tolist()) if len(layers) > 1 else (float(times[0] / depth[0]), 0.0)
    total = clean + sum(max(0.0, intercept + slope * (spec.n_layers - layer)) for layer in range(spec.n_layers))
    return total, f"fitted on layers {layers} (restart cost linear in depth), summed over {spec.n_layers} layers"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, for CI")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--exact-layers", default="0,5,11",
                        help="comma-separated layers to time the exact sweep on, or 'all'")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build(args.smoke, args.vocab)
    spec = model_spec(model)
    batch, n_pos = (args.batch or 4, 8) if args.smoke else (args.batch or 16, 64)
    tokens = torch.randint(0, spec.d_vocab, (batch, n_pos))
    reference = torch.randint(0, spec.d_vocab, (batch, n_pos))
    layers = list(range(spec.n_layers)) if args.smoke or args.exact_layers == "all" else \
        [int(x) for x in args.exact_layers.split(",")]
    print(f"model: {type(model).__name__} {spec.n_layers} layers x {spec.n_heads} heads, d_model {spec.d_model}, "
          f"d_vocab {spec.d_vocab}; batch {batch} x {n_pos} tokens; RESAMPLE; torch threads {torch.get_num_threads()}")

    def estimate(**kwargs):
        return attribution_sweep(model, tokens, replacement="resample", reference=reference, progress=False, **kwargs)

    estimate()  # warm-up
    attribution_s, _ = timed(estimate)
    print(f"attribution QK+OV: {attribution_s:.2f} s", flush=True)
    verified_s, verified = timed(lambda: estimate(verify=0.1))
    print(f"attribution + verify 10%: {verified_s:.2f} s", flush=True)
    bound_s, _ = timed(lambda: verified.bound_missed(model, tokens, reference=reference, confidence=0.95,
                                                     progress=False))
    print(f"missed-effect bound: {bound_s:.2f} s", flush=True)
    exact_s, how = exact_seconds(model, tokens, reference, layers)
    n_verify = math.ceil(0.1 * spec.n_layers * spec.n_heads)
    print(f"[exact sweep QK+OV]          {exact_s:9.2f} s ({how})")
    print(f"[attribution QK+OV]          {attribution_s:9.2f} s | {exact_s / attribution_s:7.1f}x faster (goal >= 20x)")
    print(f"[attribution + verify 10%]   {verified_s:9.2f} s | {exact_s / verified_s:7.1f}x faster (goal >= 5x; "
          f"{n_verify} cells a circuit run exactly)")
    print(f"[missed-effect bound, 95%]   {bound_s:9.2f} s (extra, after verify)")


if __name__ == "__main__":
    main()
