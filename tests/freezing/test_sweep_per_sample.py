"""Per-sample freeze effects and draws (NOISE seeds, RESAMPLE references), against one frozen forward per head,
TransformerLens patching and separate sweeps averaged by hand."""

import warnings

import pytest
import torch
from transformer_lens import patching

from tests import builders
from tl_circuits import TaskBatch, freeze, freeze_sweep, model_spec, scored_loss



def _hook_counts(model):
    return {name: (len(hp.fwd_hooks), len(hp._forward_hooks)) for name, hp in model.hook_dict.items()}


@pytest.mark.parametrize("replacement", ["zero", "mean"])
def test_per_sample_effect_equals_one_frozen_forward_per_head(model, replacement):
    spec = model_spec(model)
    tokens = builders.random_tokens(4, 10, seed=1)
    reference = builders.random_tokens(6, 10, seed=3) if replacement == "mean" else None
    result = freeze_sweep(model, tokens, replacement=replacement, reference=reference, per_sample=True,
                          chunk_size=8, progress=False)
    with torch.no_grad():
        clean = model(tokens, return_type="loss", loss_per_token=True).mean(-1)        # [N]
    torch.testing.assert_close(result.clean_per_sample, clean.double(), rtol=1e-5, atol=1e-6)
    for circuit in ("qk", "ov"):
        assert result.per_sample_effect[circuit].shape == (4, spec.n_layers, spec.n_heads)
        for layer in range(spec.n_layers):
            for head in range(spec.n_heads):
                with torch.no_grad(), freeze(model, [(layer, head)], circuit, replacement, reference=reference):
                    frozen = model(tokens, return_type="loss", loss_per_token=True).mean(-1)
                torch.testing.assert_close(result.per_sample_effect[circuit][:, layer, head],
                                           (frozen - clean).double(), rtol=1e-4, atol=1e-5)


def test_batch_mean_of_per_sample_effect_is_the_effect(mha_model):
    tokens = builders.random_tokens(5, 10, seed=2)
    per_sample = freeze_sweep(mha_model, tokens, per_sample=True, progress=False)
    batch = freeze_sweep(mha_model, tokens, progress=False)
    assert per_sample.clean == pytest.approx(batch.clean, abs=1e-6)   # equal positions per sample
    for circuit in ("qk", "ov"):
        torch.testing.assert_close(per_sample.per_sample_effect[circuit].mean(0).float(), per_sample.effect[circuit],
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(per_sample.effect[circuit], batch.effect[circuit], rtol=0, atol=2e-6)


def test_noise_per_sample_draws_the_same_noise(mha_model):
    """per_sample=True only changes what the metric returns: the forwards (and their noise) are the same."""
    tokens = builders.random_tokens(3, 10, seed=4)
    kwargs = dict(replacement="noise", seed=7, progress=False, metric=None)
    batch = freeze_sweep(mha_model, tokens, **kwargs)
    per_sample = freeze_sweep(mha_model, tokens, per_sample=True, **kwargs)
    for circuit in ("qk", "ov"):
        torch.testing.assert_close(per_sample.effect[circuit], batch.effect[circuit], rtol=0, atol=2e-6)


def test_nan_samples_stay_nan_and_are_left_out(mha_model):
    tokens = builders.random_tokens(4, 10, seed=5)
    scored = torch.zeros_like(tokens, dtype=torch.bool)
    scored[:, 3:7] = True
    scored[2] = False                                                  # sample 2 has nothing scored
    batch = TaskBatch(tokens, scored, "custom")

    def in_context_loss(logits):
        return scored_loss(logits, batch, per_sample=True)

    with pytest.warns(RuntimeWarning, match="1 of 4 samples have a NaN"):
        result = freeze_sweep(mha_model, tokens, in_context_loss, per_sample=True, progress=False)
    assert torch.isnan(result.clean_per_sample[2]) and torch.isnan(result.per_sample_effect["qk"][2]).all()
    assert torch.isfinite(result.per_sample_effect["qk"][[0, 1, 3]]).all()
    kept = result.per_sample_effect["ov"][[0, 1, 3]].mean(0)
    torch.testing.assert_close(result.effect["ov"].double(), kept, rtol=0, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 3 samples cannot resolve BH: expected here
        res = result.test(n_bootstrap=0)
    assert (res.n_samples["qk"] == 3).all()
    torch.testing.assert_close(res.mean_effect["ov"], kept)


def test_bad_metrics_are_named_and_leave_no_hooks(mha_model):
    tokens = builders.random_tokens(3, 10, seed=6)
    before = _hook_counts(mha_model)
    with pytest.raises(ValueError, match=r"one value per sample, shape \(3,\)"):
        freeze_sweep(mha_model, tokens, lambda logits: logits.mean(), per_sample=True, progress=False)
    with pytest.raises(ValueError, match="must return a scalar.*per_sample=True"):
        freeze_sweep(mha_model, tokens, lambda logits: logits.mean((1, 2)), progress=False)
    with pytest.raises(ValueError, match="n_draws must be an integer >= 1"):
        freeze_sweep(mha_model, tokens, replacement="noise", n_draws=0, progress=False)
    with pytest.raises(ValueError, match="needs replacement='noise'"):
        freeze_sweep(mha_model, tokens, n_draws=2, progress=False)
    with pytest.raises(ValueError, match="for RESAMPLE only"):
        freeze_sweep(mha_model, tokens, replacement="mean", reference=[tokens], progress=False)
    with pytest.raises(ValueError, match="disagrees"):
        freeze_sweep(mha_model, tokens, replacement="resample", reference=[tokens], n_draws=2, progress=False)
    with pytest.raises(ValueError, match="is empty"):
        freeze_sweep(mha_model, tokens, replacement="resample", reference=[], progress=False)

    calls = []

    def failing(logits):  # fails inside the sweep, after some frozen forwards
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("metric broke")
        return logits.mean()

    with pytest.raises(RuntimeError, match="metric broke"):
        freeze_sweep(mha_model, tokens, failing, chunk_size=30, progress=False)
    assert _hook_counts(mha_model) == before


def test_noise_draws_average_separate_sweeps(mha_model):
    tokens = builders.random_tokens(3, 10, seed=8)
    draws = freeze_sweep(mha_model, tokens, replacement="noise", seed=11, n_draws=3, per_sample=True,
                         progress=False)
    separate = [freeze_sweep(mha_model, tokens, replacement="noise", seed=11 + d, per_sample=True, progress=False)
                for d in range(3)]
    assert draws.settings["draw_seeds"] == [11, 12, 13]
    for circuit in ("qk", "ov"):
        by_hand = torch.stack([s.per_sample_effect[circuit] for s in separate]).mean(0)
        torch.testing.assert_close(draws.per_sample_effect[circuit], by_hand, rtol=0, atol=1e-12)
        per_draw = torch.stack([s.effect[circuit].double() for s in separate])
        torch.testing.assert_close(draws.per_draw_effect[circuit], per_draw, rtol=0, atol=1e-6)
        torch.testing.assert_close(draws.effect[circuit].double(), per_draw.mean(0), rtol=0, atol=1e-6)
    one = freeze_sweep(mha_model, tokens, replacement="noise", seed=11, n_draws=1, progress=False)
    default = freeze_sweep(mha_model, tokens, replacement="noise", seed=11, progress=False)
    for circuit in ("qk", "ov"):
        assert torch.equal(one.frozen[circuit], default.frozen[circuit])
        assert one.per_draw_effect[circuit].shape == (1, 2, 4)


def test_resample_reference_list_averages_tl_patching(mha_model):
    """RESAMPLE over k reference caches: the mean of TransformerLens's patching results on each."""
    corrupted = builders.random_tokens(3, 10, seed=9)
    caches = [mha_model.run_with_cache(builders.random_tokens(3, 10, seed=20 + d))[1] for d in range(2)]
    metric = lambda logits: logits[:, -1, 5].mean()  # noqa: E731
    result = freeze_sweep(mha_model, corrupted, metric, replacement="resample", reference=caches, progress=False)
    single = freeze_sweep(mha_model, corrupted, metric, replacement="resample", reference=caches[:1],
                          progress=False)
    expected = {"qk": [], "ov": []}
    for cache in caches:
        expected["qk"].append(patching.get_act_patch_attn_head_pattern_all_pos(mha_model, corrupted, cache, metric))
        expected["ov"].append(patching.get_act_patch_attn_head_out_all_pos(mha_model, corrupted, cache, metric))
    for circuit, runs in expected.items():
        torch.testing.assert_close(result.frozen[circuit], torch.stack(runs).mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(single.frozen[circuit], runs[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result.per_draw_effect[circuit].float(),
                                   torch.stack(runs) - result.clean, rtol=1e-5, atol=1e-5)


def test_top_heads_puts_missing_cells_last():
    from tl_circuits import SweepResult

    result = SweepResult(clean=1.0, frozen={"qk": torch.tensor([[float("nan"), 0.5], [3.0, 1.2]])},
                         replacement="zero", metric_name="loss")
    assert [(l, h) for l, h, _ in result.top_heads(3)] == [(1, 0), (0, 1), (1, 1)]
