"""TransformerBridge vs HookedTransformer on the same weights: prints both times and their ratio.

1. the freeze forward overhead: one no-grad forward of N samples with every head's QK and OV frozen (ZERO), and
   the clean forward beside it (the overhead is their ratio, printed per model);
2. per-sample gradients (the factored engine, ``per_sample_gradients``) of N samples;
3. the QK+OV freeze sweep (ZERO) on one batch.

Goal: bridge / HookedTransformer <= 1.5x for both. Models: a Hugging Face GPT-2 (fused Conv1D ``c_attn``) and a
LLaMA (split q/k/v/o, GQA, rotary) built locally with random weights; the HookedTransformer is converted from
the same HF model by TransformerLens's own weight conversion (no weight processing), the bridge wraps it
(TransformerLens 3.x, where both exist). The HookedTransformer's sweep restarts
each layer at the cached ``resid_pre`` (``start_at_layer``), the bridge's by calling its blocks directly
(``tl_circuits.models.bridge_forward``).

    python benchmarks/bench_bridge.py            # 6 layers, d_model 512, 8 heads, seq 64, N 16
    python benchmarks/bench_bridge.py --smoke    # tiny models, seconds (CI)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tl_circuits import GradientConfig, freeze, freeze_sweep, per_sample_gradients


def sizes(smoke: bool) -> dict:
    if smoke:
        return dict(n_layers=2, d_model=32, n_heads=4, d_mlp=64, n_ctx=16, d_vocab=50, n_pos=8, n_samples=4)
    return dict(n_layers=6, d_model=512, n_heads=8, d_mlp=2048, n_ctx=64, d_vocab=5000, n_pos=64, n_samples=16)


def gpt2_pair(s: dict):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_cfg = GPT2Config(vocab_size=s["d_vocab"], n_positions=s["n_ctx"], n_embd=s["d_model"], n_layer=s["n_layers"],
                        n_head=s["n_heads"], n_inner=s["d_mlp"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf_cfg._attn_implementation = "eager"
    hf = GPT2LMHeadModel(hf_cfg).eval()
    cfg = HookedTransformerConfig(n_layers=s["n_layers"], d_model=s["d_model"], n_heads=s["n_heads"],
                                  d_head=s["d_model"] // s["n_heads"], d_mlp=s["d_mlp"], n_ctx=s["n_ctx"],
                                  d_vocab=s["d_vocab"], act_fn="gelu_new", normalization_type="LN",
                                  eps=hf_cfg.layer_norm_epsilon, original_architecture="GPT2LMHeadModel",
                                  device="cpu")
    hooked = HookedTransformer(cfg)
    hooked.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                       center_unembed=False, fold_value_biases=False)
    return hooked.eval(), hf


def llama_pair(s: dict):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    d_head = s["d_model"] // s["n_heads"]
    hf_cfg = LlamaConfig(vocab_size=s["d_vocab"], hidden_size=s["d_model"], intermediate_size=s["d_mlp"],
                         num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"],
                         num_key_value_heads=s["n_heads"] // 2, max_position_embeddings=s["n_ctx"],
                         rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
    hf_cfg._attn_implementation = "eager"
    hf = LlamaForCausalLM(hf_cfg).eval()
    cfg = HookedTransformerConfig(n_layers=s["n_layers"], d_model=s["d_model"], n_heads=s["n_heads"], d_head=d_head,
                                  d_mlp=s["d_mlp"], n_ctx=s["n_ctx"], d_vocab=s["d_vocab"], act_fn="silu",
                                  normalization_type="RMS", eps=1e-6, n_key_value_heads=s["n_heads"] // 2,
                                  positional_embedding_type="rotary", rotary_adjacent_pairs=False, rotary_dim=d_head,
                                  rotary_base=10000, final_rms=True, gated_mlp=True,
                                  original_architecture="LlamaForCausalLM", device="cpu")
    hooked = HookedTransformer(cfg)
    hooked.load_and_process_state_dict(convert_llama_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                       center_unembed=False, fold_value_biases=False)
    return hooked.eval(), hf


def bridge_of(hf):
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    return build_bridge_from_module(hf, architecture=type(hf).__name__, hf_config=hf.config).eval()


def timed_pair(first, second, repeats: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Median wall and CPU (this process) seconds of ``repeats`` calls of each, after one warm-up of each, the
    two alternating so that drift of the machine's speed falls on both alike."""
    first(), second()
    times: list[list[tuple[float, float]]] = [[], []]
    for _ in range(repeats):
        for side, fn in enumerate((first, second)):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[side].append((time.perf_counter() - start, time.process_time() - start_cpu))
    return tuple((statistics.median(w for w, _ in t), statistics.median(c for _, c in t))  # type: ignore[return-value]
                 for t in times)


def clean_forward(model, tokens):
    with torch.no_grad():
        return model(tokens)


def frozen_forward(model, tokens, n_layers: int, n_heads: int):
    heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    with torch.no_grad(), freeze(model, heads, "qk", "zero"), freeze(model, heads, "ov", "zero"):
        return model(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models, for CI (the ratios mean nothing)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    s = sizes(args.smoke)
    repeats = args.repeats or (1 if args.smoke else 3)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, s["d_vocab"], (s["n_samples"], s["n_pos"]), generator=gen)
    sweep_tokens = tokens[:2]
    config = GradientConfig(progress=False)
    print(f"torch threads: {torch.get_num_threads()}; sizes: {s}; repeats: {repeats}")
    columns = ("HookedTransformer", "bridge", "ratio (wall)", "ratio (cpu)")
    print(f"{'model':<8} {'task':<22} {columns[0]:>18} {columns[1]:>10} {columns[2]:>13} {columns[3]:>12}")
    for name, pair in (("gpt2", gpt2_pair), ("llama", llama_pair)):
        hooked, hf = pair(s)
        bridge = bridge_of(hf)
        tasks = {
            "clean forward": lambda m: clean_forward(m, tokens),
            "frozen forward (all)": lambda m: frozen_forward(m, tokens, s["n_layers"], s["n_heads"]),
            "per-sample gradients": lambda m: per_sample_gradients(m, tokens, config=config),
            "sweep (qk+ov, zero)": lambda m: freeze_sweep(m, sweep_tokens, progress=False),
        }
        walls: dict[str, tuple[float, float]] = {}
        for task, fn in tasks.items():
            (hooked_wall, hooked_cpu), (bridge_wall, bridge_cpu) = timed_pair(lambda: fn(hooked), lambda: fn(bridge),
                                                                              repeats)
            walls[task] = (hooked_wall, bridge_wall)
            print(f"{name:<8} {task:<22} {hooked_wall:>17.3f}s {bridge_wall:>9.3f}s "
                  f"{bridge_wall / hooked_wall:>12.2f}x {bridge_cpu / hooked_cpu:>11.2f}x", flush=True)
        overhead = [frozen / clean for clean, frozen in zip(walls["clean forward"], walls["frozen forward (all)"])]
        print(f"{name:<8} freeze forward overhead (frozen / clean): HookedTransformer {overhead[0]:.2f}x, "
              f"bridge {overhead[1]:.2f}x", flush=True)
    print("goal: bridge / HookedTransformer <= 1.5x (full size, quiet machine)")


if __name__ == "__main__":
    main()
