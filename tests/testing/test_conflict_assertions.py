"""assert_conflict / assert_no_conflict: the chosen cells are the full conflict test's cells (GQA's K/V read through
the query head's KV head), their q-values statsmodels' BH over those cells only, the verdicts and messages on scores
with a planted conflict, and conflict_scores end to end against interference_conflict_test."""

from __future__ import annotations

import pytest
import torch

from tests import builders
from tests.reference import multipletests
from tl_circuits import GradientConfig, InterferenceConfig, conflict_test, distinct_batch, interference_conflict_test
from tl_circuits.interference.result import InterferenceResult
from tl_circuits.models.spec import model_spec
from tl_circuits.stats.conflict import conflict_config
from tl_circuits.testing import ConflictScores, assert_conflict, assert_no_conflict, conflict_scores
from tl_circuits.testing.conflict_assertions import _chosen_cells

N_A, N_B, DIM = 24, 30, 6
QUIET = InterferenceConfig(GradientConfig(progress=False))


def _synthetic(spec, conflict_cell=None, constant_cell=None, seed=0) -> ConflictScores:
    """Signed scores s_ij = <a_i, b_j> per cell from random gradient-like rows; a planted conflict opposes the
    task means in one (block, layer, column) cell; a constant cell has all scores 0 (nothing to test)."""
    gen = torch.Generator().manual_seed(seed)
    scores = {}
    for block in "QKVO":
        columns = spec.n_kv_heads if block in "KV" else spec.n_heads
        a = torch.randn(N_A, spec.n_layers, columns, DIM, generator=gen)
        b = torch.randn(N_B, spec.n_layers, columns, DIM, generator=gen)
        if conflict_cell is not None and conflict_cell[0] == block:
            _, layer, column = conflict_cell
            a[:, layer, column, 0] += 1.5
            b[:, layer, column, 0] -= 1.5
        s = torch.einsum("ilhd,jlhd->ijlh", a, b).double()
        if constant_cell is not None and constant_cell[0] == block:
            s[:, :, constant_cell[1], constant_cell[2]] = 0.0
        scores[block] = s
    result = InterferenceResult(scores=scores, ids_a=list(range(N_A)), ids_b=list(range(N_B)),
                                config=conflict_config())
    return ConflictScores(result, spec)


@pytest.fixture(scope="module")
def gqa_spec():
    return model_spec(builders.gqa_under_test())  # 2 layers, 4 query heads over 2 KV heads


def test_chosen_cells_are_the_full_tests_and_q_is_bh_over_them(gqa_spec):
    scores = _synthetic(gqa_spec, conflict_cell=("Q", 0, 2))
    heads = [(0, 2), (0, 3), (1, 0)]
    chosen, labels = _chosen_cells(scores, heads, "QKVO")
    # query heads 2 and 3 read KV head 1 (4 over 2): one K/V cell each for layer 0, and KV head 0 for layer 1
    assert labels["K"] == ["K L0KV1", "K L1KV0"] and labels["Q"] == ["Q L0H2", "Q L0H3", "Q L1H0"]
    full = conflict_test(scores.result)
    part = conflict_test(chosen)
    cells = {"Q": [(0, 2), (0, 3), (1, 0)], "O": [(0, 2), (0, 3), (1, 0)], "K": [(0, 1), (1, 0)],
             "V": [(0, 1), (1, 0)]}
    for block, where in cells.items():
        for k, (layer, column) in enumerate(where):
            for field in ("estimate", "std_error", "p_value", "ci_low", "ci_high"):
                assert getattr(part, field)[block][0, k] == getattr(full, field)[block][layer, column], (block, field)
    p = torch.cat([part.p_value[b].flatten() for b in "QKVO"])
    q = torch.cat([part.q_value_bh[b].flatten() for b in "QKVO"])
    torch.testing.assert_close(q, torch.from_numpy(multipletests(p.numpy(), "fdr_bh")[1]))


def test_verdicts_and_messages_on_a_planted_conflict(gqa_spec):
    scores = _synthetic(gqa_spec, conflict_cell=("Q", 0, 1))
    flagged = assert_conflict(scores, [(0, 1)], blocks="Q")
    assert bool(flagged.significant["Q"][0, 0]) and float(flagged.estimate["Q"][0, 0]) < 0
    assert_no_conflict(scores, [(1, 0), (1, 1)])
    with pytest.raises(AssertionError) as failed:
        assert_no_conflict(scores)
    lines = str(failed.value).splitlines()
    assert lines[0] == "no-conflict claim failed: the conflict test flags 1 of 24 chosen cells"
    assert lines[1].startswith("  (per cell, H0: E[s_ij] >= 0") and "BH q <= 0.05 over the 24 chosen cells" in lines[1]
    assert "24 task-A x 30 task-B samples" in lines[1]
    assert lines[2].startswith("  Q L0H1: estimate -") and "95% interval [" in lines[2] and ", q_bh = " in lines[2]
    with pytest.raises(AssertionError, match=r"(?s)conflict claim failed \(any of the chosen cells\): the conflict "
                                             r"test flags 0 of 6 chosen cells.*not flagged:\n  [QKVO] L1"):
        assert_conflict(scores, [(1, 0), (1, 1)])
    with pytest.raises(AssertionError, match=r"conflict claim failed \(all of the chosen cells\): .* flags 1 of 4"):
        assert_conflict(scores, [(0, 1)], require="all")


def test_cells_that_cannot_be_tested(gqa_spec):
    scores = _synthetic(gqa_spec, constant_cell=("O", 1, 3))
    with pytest.warns(RuntimeWarning, match="no spread"), pytest.raises(ValueError, match="no chosen cell"):
        assert_no_conflict(scores, [(1, 3)], blocks="O")
    with pytest.warns(RuntimeWarning, match="no spread"):
        test = assert_no_conflict(scores, [(1, 2), (1, 3)], blocks="O")
    assert torch.isnan(test.p_value["O"][0, 1]) and not bool(test.significant["O"][0, 1])
    with pytest.raises(ValueError, match="no scores for block 'X'"):
        assert_no_conflict(scores, blocks="X")
    with pytest.raises(TypeError, match="conflict_scores"):
        assert_no_conflict(scores.result)


def test_conflict_scores_are_those_of_interference_conflict_test(mha_model):
    """Counting rows of varied length: the TaskBatch's attention mask goes along."""
    a = distinct_batch("counting", 6, seq_len=10, d_vocab=50, min_len=6, seed=1)
    b = distinct_batch("induction", 5, seq_len=10, d_vocab=50, seed=2)
    assert a.attention_mask is not None
    scores = conflict_scores(mha_model, a, b, config=QUIET)
    ours = conflict_test(_chosen_cells(scores, None, "QKVO")[0])
    reference = interference_conflict_test(mha_model, a.tokens, b.tokens, attention_mask_a=a.attention_mask,
                                           config=QUIET)
    for block in "QKVO":
        for field in ("estimate", "p_value", "q_value_bh"):
            torch.testing.assert_close(getattr(ours, field)[block].flatten(),
                                       getattr(reference, field)[block].flatten(), equal_nan=True)
