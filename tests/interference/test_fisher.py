"""Diagonal Fisher estimators (tl_circuits.interference.fisher) against closed forms and recomputation."""

from __future__ import annotations

import pytest
import torch

from tests.reference import ema_closed_form
from tl_circuits.interference.fisher import (
    DiagonalFisher,
    EMAFisher,
    FisherAccumulator,
    contributions,
    damped,
    damping_lambda,
    fisher_from_gradients,
    leave_one_out,
    pooled,
)
from tl_circuits.interference.gradients import PerSampleGradients
from tl_circuits.models.spec import BLOCKS, ModelSpec

SPEC = ModelSpec(n_layers=2, n_heads=4, n_kv_heads=2, d_model=3, d_head=2, d_vocab=10, n_ctx=8,
                 grouped=True, rotary=True)


def fake_grads(n: int, seed: int = 0, scale: float = 1.0) -> PerSampleGradients:
    """Random per-head rows with the GQA layout of SPEC (K/V over 2 KV heads)."""
    gen = torch.Generator().manual_seed(seed)
    per_block = {b: scale * torch.randn(n, SPEC.n_layers, SPEC.n_block_heads(b), SPEC.n_params_per_head(b),
                                        generator=gen) for b in BLOCKS}
    return PerSampleGradients(per_block, SPEC)


def test_batch_mean_of_squares():
    g = fake_grads(5)
    f = fisher_from_gradients(g, source="a")
    assert f.n_samples == 5 and f.source == "a"
    for b in BLOCKS:
        assert f.per_block[b].dtype == torch.float64
        expect = sum(g.per_block[b][i].double() ** 2 for i in range(5)) / 5
        torch.testing.assert_close(f.per_block[b], expect, rtol=1e-12, atol=0)
        assert torch.equal(contributions(g)[b], g.per_block[b] ** 2)


def test_accumulator_is_chunking_invariant():
    g = fake_grads(7)
    acc = FisherAccumulator()
    for sl in (slice(0, 2), slice(2, 3), slice(3, 7)):
        acc.add(g.select(sl))
    chunked, whole = acc.result(), fisher_from_gradients(g)
    assert chunked.n_samples == 7
    for b in BLOCKS:
        torch.testing.assert_close(chunked.per_block[b], whole.per_block[b], rtol=1e-12, atol=0)


def test_pooled_is_the_fisher_of_the_union():
    a, b_ = fake_grads(3, seed=1), fake_grads(5, seed=2, scale=3.0)
    union = fisher_from_gradients(PerSampleGradients.cat([a, b_]))
    pool = pooled(fisher_from_gradients(a), fisher_from_gradients(b_))
    assert pool.n_samples == 8 and pool.source == "pooled"
    for b in BLOCKS:
        torch.testing.assert_close(pool.per_block[b], union.per_block[b], rtol=1e-12, atol=0)
    # not the unweighted mean of the two Fishers (that would be wrong for unequal sizes)
    naive = (fisher_from_gradients(a).per_block["Q"] + fisher_from_gradients(b_).per_block["Q"]) / 2
    assert not torch.allclose(pool.per_block["Q"], naive)


def test_fisher_keeps_tiny_values():
    """The original stored fp16 Fisher and underflowed: squares of 1e-5 gradients must survive."""
    g = fake_grads(4, scale=1e-5)
    f = fisher_from_gradients(g)
    assert bool((f.per_block["Q"] > 0).all())
    torch.testing.assert_close(f.per_block["Q"], (g.per_block["Q"].double() ** 2).mean(0), rtol=1e-12, atol=0)


# ----- EMA ---------------------------------------------------------------------------------------------

def test_ema_matches_closed_form_on_a_known_stream():
    gen = torch.Generator().manual_seed(0)
    stream = torch.rand(9, 6, generator=gen) * torch.arange(1, 10)[:, None]  # non-stationary on purpose
    ema = EMAFisher(beta=0.8)
    for sl in (slice(0, 1), slice(1, 4), slice(4, 5), slice(5, 9)):  # uneven chunks
        ema.update({"Q": stream[sl]})
        est = ema.estimate()
        assert est.n_samples == sl.stop
        torch.testing.assert_close(est.per_block["Q"], ema_closed_form(stream[: sl.stop], 0.8), rtol=1e-12, atol=0)


def test_ema_recursion_step_by_step():
    """F_t = β F_{t-1} + (1-β) c_t from F_0 = 0, read out as F_t / (1 - β^t)."""
    stream = torch.tensor([[4.0], [1.0], [9.0]])
    beta, f = 0.5, 0.0
    ema = EMAFisher(beta)
    for t, c in enumerate(stream, start=1):
        f = beta * f + (1 - beta) * float(c)
        ema.update({"Q": c[None]})
        assert float(ema.estimate().per_block["Q"]) == pytest.approx(f / (1 - beta**t), rel=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.99])
def test_ema_of_a_constant_stream_is_that_constant(beta):
    """Bias correction: no 1/(1-β) inflation (the original's bug) at any t."""
    ema = EMAFisher(beta)
    for _ in range(4):
        ema.update({"K": torch.full((2, 3), 2.5)})
        torch.testing.assert_close(ema.estimate().per_block["K"], torch.full((3,), 2.5, dtype=torch.float64))


def test_ema_tends_to_the_batch_mean_as_beta_tends_to_one():
    g = fake_grads(20, seed=4)
    batch = fisher_from_gradients(g)
    ema = EMAFisher(beta=1 - 1e-9)
    ema.update(g.select(slice(0, 7)))
    ema.update(g.select(slice(7, 20)))
    for b in BLOCKS:
        torch.testing.assert_close(ema.estimate().per_block[b], batch.per_block[b], rtol=1e-6, atol=0)
    # and a short memory does not (it weights recent samples)
    short = EMAFisher(beta=0.5)
    short.update(g)
    assert not torch.allclose(short.estimate().per_block["Q"], batch.per_block["Q"], rtol=1e-2)


def test_ema_errors():
    with pytest.raises(ValueError, match="beta"):
        EMAFisher(beta=1.0)
    with pytest.raises(ValueError, match="no updates"):
        EMAFisher(0.9).estimate()


# ----- leave-one-out -------------------------------------------------------------------------------------

def test_leave_one_out_equals_recomputation_without_the_sample():
    g = fake_grads(6, seed=5)
    f = fisher_from_gradients(g)
    loo = leave_one_out(f, g)
    for i in range(6):
        rest = fisher_from_gradients(g.select([k for k in range(6) if k != i]))
        for b in BLOCKS:
            torch.testing.assert_close(loo[b][i], rest.per_block[b], rtol=1e-9, atol=1e-15)


def test_leave_one_out_needs_two_samples():
    g = fake_grads(1)
    with pytest.raises(ValueError, match="at least 2 samples"):
        leave_one_out(fisher_from_gradients(g), g)


def test_leave_one_out_of_a_dominant_sample():
    """(N·F − C_i) cancels: accurate thanks to float64 when sample i dominates by 1e8, and never < 0."""
    g = fake_grads(3)
    g.per_block["Q"][0] *= 1e4
    loo = leave_one_out(fisher_from_gradients(g), g)
    expect = (g.per_block["Q"][1:].double() ** 2).mean(0)
    torch.testing.assert_close(loo["Q"][0], expect, rtol=1e-5, atol=0)
    g.per_block["Q"][0] *= 1e4  # beyond float64's reach: clamped at 0, not negative
    assert bool((leave_one_out(fisher_from_gradients(g), g)["Q"] >= 0).all())


def test_empty_sets_are_errors():
    with pytest.raises(ValueError, match="empty"):
        FisherAccumulator().result()
    with pytest.raises(ValueError, match="empty"):
        fisher_from_gradients(fake_grads(3).select(slice(0, 0)))


# ----- damping -------------------------------------------------------------------------------------------

def test_damping_is_per_head_slice_and_relative():
    f = fisher_from_gradients(fake_grads(4, seed=6))
    out = damped(f, damping_abs=1e-3, damping_rel=0.1)
    for b in BLOCKS:
        fb = f.per_block[b]
        for layer in range(SPEC.n_layers):
            for head in range(SPEC.n_block_heads(b)):
                lam = max(1e-3, 0.1 * float(fb[layer, head].mean()))
                torch.testing.assert_close(out[b][layer, head], fb[layer, head] + lam, rtol=1e-12, atol=0)


def test_relative_damping_does_not_swamp_small_fisher():
    """A head whose Fisher is ~1e-12 gets λ ~1e-15, not an absolute 1e-8 (the original's bug)."""
    fb = torch.full((1, 1, 4), 1e-12, dtype=torch.float64)
    fb[0, 0, 0] = 3e-12
    f = DiagonalFisher({"Q": fb}, 10)
    out = damped(f)  # defaults
    ratio = (out["Q"] / fb).max()
    assert float(ratio) < 1.01
    assert float(damping_lambda(fb).squeeze()) == pytest.approx(1e-3 * 1.5e-12)


def test_absolute_floor_where_a_head_has_no_fisher():
    fb = torch.zeros(1, 2, 3, dtype=torch.float64)
    fb[0, 0] = 1.0
    out = damped({"V": fb}, damping_abs=1e-30, damping_rel=1e-3)["V"]
    assert bool((out[0, 1] == 1e-30).all())
    assert bool((out[0, 0] == 1.0 + 1e-3).all())


def test_damped_fisher_scales_with_gradients_squared():
    g = fake_grads(4, seed=7)
    f1 = damped(fisher_from_gradients(g), damping_abs=0.0, damping_rel=0.05)
    f2 = damped(fisher_from_gradients(g.scaled(-3.0)), damping_abs=0.0, damping_rel=0.05)
    for b in BLOCKS:
        torch.testing.assert_close(f2[b], 9.0 * f1[b], rtol=1e-6, atol=0)


def test_negative_damping_is_an_error():
    with pytest.raises(ValueError, match="non-negative"):
        damped(fisher_from_gradients(fake_grads(2)), damping_abs=-1.0)
