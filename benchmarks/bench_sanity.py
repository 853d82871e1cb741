"""``sanity_check`` benchmark: its time beside one forward + backward pass of the same model on the same tokens.

The issue asks for checks that run "in seconds" on the user's model. ``sanity_check`` runs about 2 + G forward
passes (clean, z zeroed, isolated baseline, one per KV head), one freeze forward, the interference pipeline on its
samples and one backward per sample; this prints its wall time, the baseline's, their ratio, and the checks'
verdict (so a dtype whose tolerance is wrong shows up here too).

Models (TransformerBridges around Hugging Face models built locally, random weights, eager attention): GPT-2
shape (12 layers, d_model 768, 12 heads, fused Conv1D) and a LLaMA shape (8 layers, d_model 1024, 16 query heads
over 4 KV heads, rotary); ``sanity_check``'s defaults (4 samples × 8 positions).

    python benchmarks/bench_sanity.py                       # full size, float32
    python benchmarks/bench_sanity.py --dtype bfloat16      # the half-precision tolerances
    python benchmarks/bench_sanity.py --smoke               # tiny models, seconds (CI)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tl_circuits import sanity_check


def build(kind: str, smoke: bool, dtype: torch.dtype):
    import transformers
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    torch.manual_seed(0)
    if kind == "gpt2":
        sizes = dict(n_embd=32, n_layer=2, n_head=4) if smoke else dict(n_embd=768, n_layer=12, n_head=12)
        config = transformers.GPT2Config(vocab_size=1000, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0, **sizes)
        hf = transformers.GPT2LMHeadModel
    else:
        sizes = (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2) if smoke else
                 dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=4))
        config = transformers.LlamaConfig(vocab_size=1000, max_position_embeddings=64, **sizes)
        hf = transformers.LlamaForCausalLM
    config._attn_implementation = "eager"
    model = hf(config).to(dtype).eval()
    return build_bridge_from_module(model, architecture=hf.__name__, hf_config=model.config).eval()


def forward_backward(model, tokens) -> None:
    model(tokens, return_type="loss").backward()
    model.zero_grad(set_to_none=True)


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models, for CI")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    repeats = args.repeats or (1 if args.smoke else 3)
    print(f"torch threads {torch.get_num_threads()}; dtype {args.dtype}; sanity_check defaults (4 samples x 8 "
          "positions)")
    for kind in ("gpt2", "llama"):
        model = build(kind, args.smoke, dtype)
        tokens = torch.randint(0, 1000, (4, 8), generator=torch.Generator().manual_seed(0))
        result = sanity_check(model)
        check_s = timed(lambda: sanity_check(model), repeats)
        base_s = timed(lambda: forward_backward(model, tokens), repeats)
        cfg = model.cfg
        worst = max((c.max_rel_error / c.tolerance for c in result.checks if c.tolerance > 0), default=0.0)
        print(f"\n[{kind}: {cfg.n_layers} layers, {cfg.n_heads} heads over {cfg.n_key_value_heads or cfg.n_heads} "
              f"KV heads, d_model {cfg.d_model}] sanity_check {check_s:6.2f} s | forward+backward {base_s:6.3f} s | "
              f"ratio {check_s / base_s:5.1f}x | {'passed' if result.passed else 'FAILED: ' + str(result.failed)} "
              f"(worst error {worst:.2g} of its tolerance)")
        if not result.passed:
            print(result.table())


if __name__ == "__main__":
    main()
