"""SweepResult.plot_patterns: the plotted arrays are the cached clean patterns and the closed-form frozen ones."""

import numpy as np
import pytest
import torch

from tests import builders
from tl_circuits import freeze_sweep
from tl_circuits.bundled import task_tokenizer
from tl_circuits.models import model_spec



def _hook_counts(model):
    return {name: (len(hp.fwd_hooks), len(hp._forward_hooks)) for name, hp in model.hook_dict.items()}


def _images(figure):
    return [ax for ax in figure.axes if ax.images]


def test_zero_patterns_are_clean_cache_and_uniform_causal(mha_model):
    tokens = builders.random_tokens(3, 8, seed=41)
    result = freeze_sweep(mha_model, tokens, progress=False)
    before = _hook_counts(mha_model)
    figure = result.plot_patterns(mha_model, tokens, k=2, sample=1)
    assert _hook_counts(mha_model) == before
    top = [(layer, head) for layer, head, _ in result.top_heads(2, "qk")]
    _, cache = mha_model.run_with_cache(tokens)
    n_pos = tokens.shape[1]
    uniform = torch.tril(torch.ones(n_pos, n_pos)) / torch.arange(1, n_pos + 1)[:, None]
    axes = _images(figure)
    assert len(axes) == 4
    for i, (layer, head) in enumerate(top):
        clean_ax, frozen_ax = axes[2 * i], axes[2 * i + 1]
        assert clean_ax.get_title() == f"L{layer}H{head} clean" and f"L{layer}H{head} frozen" in frozen_ax.get_title()
        np.testing.assert_allclose(clean_ax.images[0].get_array(),
                                   cache[f"blocks.{layer}.attn.hook_pattern"][1, head].detach().numpy(), rtol=1e-6)
        np.testing.assert_allclose(frozen_ax.images[0].get_array(), uniform.numpy(), rtol=1e-6, atol=1e-7)
        assert [t.get_text() for t in clean_ax.get_xticklabels()] == [str(p) for p in range(n_pos)]


def test_resample_patterns_are_the_reference_patterns_and_tokens_label_positions(mha_model):
    tokens, reference = builders.random_tokens(2, 6, seed=42), builders.random_tokens(2, 6, seed=43)
    result = freeze_sweep(mha_model, tokens, replacement="resample", reference=reference, progress=False)
    _, ref_cache = mha_model.run_with_cache(reference)
    tokenizer = task_tokenizer(builders.D_VOCAB)
    figure = result.plot_patterns(mha_model, tokens, heads=[(1, 2)], reference=reference, tokenizer=tokenizer)
    clean_ax, frozen_ax = _images(figure)
    np.testing.assert_allclose(frozen_ax.images[0].get_array(),
                               ref_cache["blocks.1.attn.hook_pattern"][0, 2].detach().numpy(), rtol=1e-6)
    listed = result.plot_patterns(mha_model, tokens, heads=[(1, 2)], reference=[reference, tokens])
    np.testing.assert_array_equal(_images(listed)[1].images[0].get_array(), frozen_ax.images[0].get_array())
    labels = [t.get_text() for t in clean_ax.get_yticklabels()]
    assert labels == [f"{p}: {tokenizer.decode([int(t)])}" for p, t in enumerate(tokens[0].tolist())]


def test_bad_pattern_requests_are_named_and_leave_no_hooks(mha_model):
    tokens = builders.random_tokens(2, 6, seed=44)
    before = _hook_counts(mha_model)
    ov_only = freeze_sweep(mha_model, tokens, circuits=("ov",), progress=False)
    with pytest.raises(ValueError, match="no 'qk' circuit"):
        ov_only.plot_patterns(mha_model, tokens)
    mean = freeze_sweep(mha_model, tokens, replacement="mean", reference=tokens, progress=False)
    with pytest.raises(ValueError, match="pass the same reference="):
        mean.plot_patterns(mha_model, tokens)
    spec = model_spec(mha_model)
    with pytest.raises(IndexError, match="out of range"):
        mean.plot_patterns(mha_model, tokens, heads=[(spec.n_layers, 0)], reference=tokens)
    with pytest.raises(ValueError, match="sample must index"):
        mean.plot_patterns(mha_model, tokens, reference=tokens, sample=5)
    with pytest.raises(TypeError):  # a RESAMPLE reference that is not tokens or a cache fails inside freeze
        freeze_sweep(mha_model, tokens, replacement="resample", reference=tokens, progress=False).plot_patterns(
            mha_model, tokens, reference=3.0)
    assert _hook_counts(mha_model) == before


def test_model_tokenizer_labels_the_bundled_model_positions():
    import tl_circuits as tlc

    model = tlc.load_bundled_model("induction-2l")            # carries task_tokenizer: "<bos>", "1", "2", ...
    batch = tlc.bundled.bundled_tasks("induction-2l")["induction"](2, seed=0)
    tokens = batch.tokens[:, :8]
    result = freeze_sweep(model, tokens, circuits=("qk",), progress=False)
    figure = result.plot_patterns(model, tokens, k=1)
    labels = [t.get_text() for t in _images(figure)[0].get_xticklabels()]
    assert labels[0] == "0: <bos>"
    assert labels == [f"{p}: {model.tokenizer.decode([int(t)])}" for p, t in enumerate(tokens[0].tolist())]
