"""Per-sample sweeps, their test and the pattern pictures on a TransformerBridge (both TransformerLens legs)."""

import warnings

import numpy as np
import pytest
import scipy.stats as st
import torch

try:  # TransformerLens >= 3
    from transformer_lens.utilities.lm_utils import lm_cross_entropy_loss
except ImportError:  # pragma: no cover - TransformerLens 2.x
    from transformer_lens.utils import lm_cross_entropy_loss

from tests import builders
from tl_circuits import freeze, freeze_sweep


@pytest.fixture(scope="module")
def bridge():
    return builders.llama_bridge(0)


def _hook_counts(model):
    return {name: (len(hp.fwd_hooks), len(hp._forward_hooks)) for name, hp in model.hook_dict.items()}


def _per_sample_loss(model, tokens):
    with torch.no_grad():
        return lm_cross_entropy_loss(model(tokens), tokens, per_token=True).mean(-1).double()


def test_per_sample_sweep_on_a_bridge_equals_single_freezes(bridge):
    tokens = builders.random_tokens(6, 10, seed=51)
    before = _hook_counts(bridge)
    result = freeze_sweep(bridge, tokens, per_sample=True, progress=False)
    clean = _per_sample_loss(bridge, tokens)
    torch.testing.assert_close(result.clean_per_sample, clean, rtol=1e-5, atol=1e-6)
    for circuit in ("qk", "ov"):
        for layer, head in [(0, 1), (1, 2)]:
            with freeze(bridge, [(layer, head)], circuit, "zero"):
                frozen = _per_sample_loss(bridge, tokens)
            torch.testing.assert_close(result.per_sample_effect[circuit][:, layer, head], frozen - clean,
                                       rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 6 samples: BH cannot flag a lone cell
        tested = result.test(n_bootstrap=0)
    x = result.per_sample_effect["ov"][:, 1, 2].numpy()
    ref = st.permutation_test((x,), lambda v, axis: np.mean(v, axis=axis), permutation_type="samples",
                              vectorized=True)
    assert tested.p_value["ov"][1, 2].item() == pytest.approx(ref.pvalue, rel=1e-12)
    figure = result.plot_patterns(bridge, tokens, heads=[(1, 2)])
    _, cache = bridge.run_with_cache(tokens)
    clean_ax = [ax for ax in figure.axes if ax.images][0]
    np.testing.assert_allclose(clean_ax.images[0].get_array(),
                               cache["blocks.1.attn.hook_pattern"][0, 2].detach().numpy(), rtol=1e-5, atol=1e-6)
    assert _hook_counts(bridge) == before
