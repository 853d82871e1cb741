"""The attribution sweep's first-order estimates (tl_circuits.freezing.first_order, docs/spec.md §1.9).

References: the exact freeze sweep in the limit of a small change (the estimate is the derivative of the exact
effect), freezes run by hand with ``tl_circuits.freeze`` (the QK fix's pattern), one-sample runs (per-sample
estimates), a forward with a layer's residual contributions detached by a plain TransformerLens hook (GradDrop),
and TransformerLens's own ``attribution_patch`` (plain attribution at ``hook_z``).
"""

from __future__ import annotations

import pytest
import torch

from tests import builders
from tests.architectures import zoo
from tl_circuits import MeanActivations, compute_mean_activations, freeze, freeze_sweep
from tl_circuits.models import model_spec
from tl_circuits.freezing.first_order import first_order_pass

MODELS = [pytest.param(m, marks=pytest.mark.needs_hooked_transformer) if m.startswith("hooked") else m
          for m in builders.FLOAT64_MODELS]  # hooked-*: HookedTransformers (TL < 4); *-bridge: both legs


def cached(model, tokens, names, attention_mask=None):
    masked = {} if attention_mask is None else {"attention_mask": attention_mask}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names, **masked)
    return {n: cache[n] for n in names}


def first_order_errors(model, tokens, reference_at, circuits, replacement, epsilons, attention_mask=None):
    """Per ε: (|estimate − exact|, |exact|) of every (sample, layer, head), the exact sweep run with
    ``reference_at(ε)`` (float64 per-sample effects), both with ``attention_mask``."""
    errors = []
    for eps in epsilons:
        reference = reference_at(eps)
        exact = freeze_sweep(model, tokens, circuits=circuits, replacement=replacement, reference=reference,
                             per_sample=True, progress=False, attention_mask=attention_mask)
        estimate = first_order_pass(model, tokens, None, circuits=circuits, replacement=replacement,
                                    reference=reference, per_sample=True, attention_mask=attention_mask)
        errors.append((torch.cat([(estimate.estimate[c] - exact.per_sample_effect[c]).abs().flatten()
                                  for c in circuits]),
                       torch.cat([exact.per_sample_effect[c].abs().flatten() for c in circuits])))
    return errors


def assert_first_order(errors, floor):
    """The estimate is the exact effect's first-order term: each step (ε → ε / 10) shrinks every cell's error
    |estimate − exact| like ε², at least 10×, up to ``floor`` (float64 rounding, or the float32 a model keeps inside:
    LLaMA's rotary tables, RMSNorm's upcast), and the typical cell's relative error ends below 1%."""
    for (before, _), (after, _) in zip(errors, errors[1:]):
        worst = (after - 0.1 * before).argmax()
        assert bool((after <= 0.1 * before + floor).all()), (before[worst], after[worst])
    error, exact = errors[-1]
    assert float((error / exact).median()) < 0.01


# the absolute error below which rounding rules: float64 throughout, or float32 kept inside LLaMA (rotary tables,
# RMSNorm's upcast)
FLOORS = {"hooked-mha": 1e-10, "hooked-gqa": 1e-10, "gpt2-bridge": 1e-10, "llama-bridge": 1e-6}


def interpolated_errors(model, tokens, other, epsilons, attention_mask=None):
    """first_order_errors of QK and OV under RESAMPLE towards the reference clean + eps · (corrupted − clean) of every
    pattern and z (``other`` padded as ``tokens``, by ``attention_mask``)."""
    spec = model_spec(model)
    names = [spec.hook_name(layer, kind) for layer in range(spec.n_layers) for kind in ("pattern", "z")]
    clean, corrupted = (cached(model, t, names, attention_mask) for t in (tokens, other))

    def reference_at(eps):
        return {n: clean[n] + eps * (corrupted[n] - clean[n]) for n in names}

    return first_order_errors(model, tokens, reference_at, ["qk", "ov"], "resample", epsilons, attention_mask)


def epsilons_for(which):
    return (1e-2, 1e-3) if which == "llama-bridge" else (1e-3, 1e-4)


@pytest.mark.parametrize("which", MODELS)
def test_estimate_tends_to_the_exact_effect_as_the_replacement_nears_clean(which):
    """RESAMPLE towards an interpolated reference, pattern (QK) and z (OV): estimate / exact → 1 per head and sample,
    GQA siblings included (each head's own z; its KV head's v)."""
    model = builders.float64_model(which)
    tokens, other = builders.random_tokens(2, 8, seed=0), builders.random_tokens(2, 8, seed=1)
    errors = interpolated_errors(model, tokens, other, epsilons_for(which))
    assert_first_order(errors, floor=FLOORS[which])


@pytest.mark.parametrize("which", MODELS)
def test_estimate_tends_to_the_exact_effect_with_padding(which):
    """The same on a padded batch (sample 1 left-padded, sample 2 right-padded; the corrupted batch padded alike),
    the estimate and the exact sweep both run with the attention mask: estimate / exact → 1 per head and sample."""
    model = builders.padded_float64_model(which)
    tokens, mask = builders.padded_tokens(3, 9, seed=0, right_from=6)
    other = builders.random_tokens(3, 9, seed=1)
    float32 = which == "llama-bridge"
    errors = interpolated_errors(model, tokens, other, (1e-1, 1e-2) if float32 else epsilons_for(which),
                                 attention_mask=mask)
    assert_first_order(errors, floor=1e-5 if float32 else FLOORS[which])


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("which", MODELS)
def test_qk_estimate_tends_to_exact_with_queries_and_keys_interpolated(which, padded):
    """QK-MEAN on one sample whose "means" are its own queries and keys moved ε towards another input's: the frozen
    scores go through the model's own scale, rotary, mask and softmax (the AtP* fix), and estimate / exact → 1;
    left-padded, the frozen pattern must mask the padded keys as the clean one does."""
    model = builders.padded_float64_model(which) if padded else builders.float64_model(which)
    tokens, other = builders.random_tokens(1, 8, seed=2), builders.random_tokens(1, 8, seed=3)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]]) if padded else None
    clean, moved = (compute_mean_activations(model, t, progress=False, attention_mask=mask) for t in (tokens, other))

    def reference_at(eps):
        def towards(a, b):
            return {layer: a[layer] + eps * (b[layer] - a[layer]) for layer in a}
        return MeanActivations(q=towards(clean.q, moved.q), k=towards(clean.k, moved.k), z=clean.z,
                               per_position=True, n_samples=1)

    float32 = padded and which == "llama-bridge"
    errors = first_order_errors(model, tokens, reference_at, ["qk"], "mean",
                                (1e-2, 1e-3) if float32 else epsilons_for(which), mask)
    assert_first_order(errors, floor=1e-5 if float32 else FLOORS[which])


@pytest.mark.parametrize("replacement", ["zero", "mean", "resample", "identity"])
def test_qk_fix_pattern_is_the_frozen_pattern(model, replacement):
    """The pattern the QK estimate reads equals hook_pattern under ``freeze(model, [(l, h)], "qk", replacement)``
    run by hand, for every head (GQA siblings' KV heads included)."""
    spec = model_spec(model)
    tokens = builders.random_tokens(2, 8, seed=4)
    reference = {"zero": None, "identity": None, "resample": builders.random_tokens(2, 8, seed=5),
                 "mean": compute_mean_activations(model, builders.random_tokens(6, 8, seed=6), progress=False)
                 }[replacement]
    out = first_order_pass(model, tokens, None, circuits=["qk"], replacement=replacement, reference=reference)
    for layer in range(spec.n_layers):
        for head in range(spec.n_heads):
            with freeze(model, [(layer, head)], "qk", replacement, reference=reference):
                frozen = cached(model, tokens, [spec.hook_name(layer, "pattern")])[spec.hook_name(layer, "pattern")]
            # the same code on the same clean q, k and scores; MEAN's q·k is one einsum over all heads there and
            # over one head here (float32 reductions may group differently), the others bit for bit
            torch.testing.assert_close(out.frozen_patterns[layer][:, head], frozen[:, head], rtol=0,
                                       atol=1e-6 if replacement == "mean" else 0)


def test_per_sample_estimates_average_to_the_batch_estimate_and_equal_one_sample_runs(model):
    """The default metrics: per-sample (each sample's mean loss) and batch (the token mean, equal lengths), so the
    batch estimate is the mean of the per-sample ones; and sample i's estimate is that of a run on sample i alone."""
    tokens = builders.random_tokens(3, 8, seed=7)
    reference = builders.random_tokens(3, 8, seed=8)
    per_sample = first_order_pass(model, tokens, None, circuits=["qk", "ov"], replacement="resample",
                                  reference=reference, per_sample=True)
    batch = first_order_pass(model, tokens, None, circuits=["qk", "ov"], replacement="resample",
                             reference=reference)
    for circuit in ("qk", "ov"):
        torch.testing.assert_close(per_sample.estimate[circuit].mean(0), batch.estimate[circuit],
                                   rtol=1e-5, atol=1e-7)  # float32 activations, float64 sums
        for i in range(3):
            alone = first_order_pass(model, tokens[i:i + 1], None, circuits=[circuit], replacement="resample",
                                     reference=reference[i:i + 1])
            torch.testing.assert_close(per_sample.estimate[circuit][i], alone.estimate[circuit], rtol=1e-4,
                                       atol=1e-6)  # a batch of 1 vs 3: float32 reductions reordered


def test_graddrop_equals_estimates_with_a_layer_detached(mha_model):
    """GradDrop on 2 layers: layer-0 heads score |estimate with layer 1's residual writes detached| (a plain hook
    returning ``x.detach()``), layer-1 heads |estimate|."""
    spec = model_spec(mha_model)
    tokens = builders.random_tokens(2, 8, seed=9)
    out = first_order_pass(mha_model, tokens, None, circuits=["qk", "ov"], replacement="zero", graddrop=True)
    detach = [(name, lambda x, hook: x.detach()) for name in spec.block_output_hooks(1)]
    with mha_model.hooks(fwd_hooks=detach):
        dropped = first_order_pass(mha_model, tokens, None, circuits=["qk", "ov"], replacement="zero")
    for circuit in ("qk", "ov"):
        torch.testing.assert_close(out.graddrop[circuit][0], dropped.estimate[circuit][0].abs())
        torch.testing.assert_close(out.graddrop[circuit][1], out.estimate[circuit][1].abs())
    assert not torch.equal(out.graddrop["ov"][0], out.estimate["ov"][0].abs())  # layer 1 does matter


def test_ov_estimate_equals_transformer_lens_attribution_patch():
    """TransformerLens's node-level ``attribution_patch`` (bridges): its per-position ``hook_z`` scores, summed over
    positions and averaged over pairs, are our plain OV-RESAMPLE estimate with its clean/corrupt roles swapped
    (it takes the gradient on ``corrupt`` and patches towards ``clean``)."""
    pytest.importorskip("transformer_lens.tools.analysis.attribution_patching")
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch

    model = builders.gpt2_bridge(0)
    spec = model_spec(model)
    ours_clean, ours_reference = builders.random_tokens(2, 6, seed=10), builders.random_tokens(2, 6, seed=11)

    def metric(logits):
        return logits[:, -1, 3].sum() - logits[:, -2, 5].sum()

    theirs = attribution_patch(model, ours_reference, ours_clean, metric).node_scores
    ours = first_order_pass(model, ours_clean, metric, circuits=["ov"], replacement="resample",
                            reference=ours_reference).estimate["ov"]
    expected = torch.zeros(spec.n_layers, spec.n_heads, dtype=torch.float64)
    for node, score in theirs.items():
        if node.kind == "attn_head_out":
            expected[node.layer, node.head] += score
    torch.testing.assert_close(ours / 2, expected, rtol=1e-4, atol=1e-6)  # they average over the 2 pairs


def test_bad_options_are_named(mha_model):
    tokens = builders.random_tokens(2, 6)
    with pytest.raises(ValueError, match="random replacement"):
        first_order_pass(mha_model, tokens, None, circuits=["qk"], replacement="noise")
    with pytest.raises(ValueError, match="qk_alpha"):
        first_order_pass(mha_model, tokens, None, circuits=["qk"], replacement="zero", qk_alpha=2.0)
    with pytest.raises(ValueError, match="IDENTITY is defined for the QK circuit only"):
        first_order_pass(mha_model, tokens, None, circuits=["ov"], replacement="identity")


def test_a_sample_with_a_nan_metric_is_nan_and_leaves_the_others_alone(mha_model):
    """A per-sample metric that is NaN for sample 1 (e.g. no scored position): its estimates are NaN, and the other
    samples' are those of the same metric without the NaN (its gradient stays in its own row)."""
    from transformer_lens.utilities.lm_utils import lm_cross_entropy_loss

    tokens = builders.random_tokens(3, 8, seed=12)
    missing = torch.tensor([1.0, float("nan"), 1.0])

    def loss(logits):
        return lm_cross_entropy_loss(logits, tokens, per_token=True).mean(-1)

    def loss_with_a_gap(logits):
        return loss(logits) * missing

    with_gap = first_order_pass(mha_model, tokens, loss_with_a_gap, circuits=["qk", "ov"], replacement="zero",
                                per_sample=True)
    without = first_order_pass(mha_model, tokens, loss, circuits=["qk", "ov"], replacement="zero", per_sample=True)
    for circuit in ("qk", "ov"):
        assert torch.isnan(with_gap.estimate[circuit][1]).all()
        torch.testing.assert_close(with_gap.estimate[circuit][[0, 2]], without.estimate[circuit][[0, 2]])
    assert torch.isnan(with_gap.clean[1]) and torch.isfinite(with_gap.clean[[0, 2]]).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(zoo.ARCHS))
def test_estimate_tends_to_exact_on_every_architecture(name):
    """Every bridged architecture (float64 weights): RESAMPLE towards an interpolated reference, estimate / exact → 1
    for QK (the z route of GPT-J and OPT included) and OV."""
    float32 = name == "MixtralForCausalLM"  # its grouped expert matmul has no float64 kernel
    model = builders.bridge_of(zoo.build(name) if float32 else zoo.build(name).double())
    epsilons = (1e-1, 1e-2) if float32 else (1e-2, 1e-3)
    errors = interpolated_errors(model, zoo.tokens(2, 8, seed=0), zoo.tokens(2, 8, seed=1), epsilons)
    assert_first_order(errors, floor=1e-5 if float32 else 1e-6)  # float32 kept inside (rotary, norms, ALiBi)
