"""Circuit claims as regression tests, with tl_circuits' pytest plugin (docs/testing.md).

Installing tl_circuits registers the plugin: ``pytest test_my_circuit.py`` is all it takes.
"""

import pytest

from tl_circuits.testing import assert_conflict, assert_freeze_effect, assert_model_unchanged, assert_no_conflict

INDUCTION_HEADS = [(1, 0), (1, 1), (1, 2), (1, 3)]  # bundled_model_info("induction-2l").known_heads["induction"]


# ----- claims about a bundled model ----------------------------------------------------------------------

@pytest.mark.tlc_bundled("induction-2l")
def test_freezing_the_induction_heads_qk_breaks_induction(tlc_bundled_model, tlc_task_batch):
    batch = tlc_task_batch("induction", 16)  # 16 distinct rows, seeded by --tlc-seed
    assert_freeze_effect(tlc_bundled_model, INDUCTION_HEADS, batch, circuit="qk", at_least=1.0)


@pytest.mark.tlc_bundled("induction-2l")
def test_an_unrelated_head_barely_matters(tlc_bundled_model, tlc_bundled_info, tlc_task_batch):
    head = tlc_bundled_info.control_heads[0]  # L0H1
    assert_freeze_effect(tlc_bundled_model, [head], tlc_task_batch("induction", 16), at_least=-0.5, at_most=0.5)


@pytest.fixture(scope="module")
def planted_scores():
    """Signed task A x task B interference of the model trained with a conflict planted in L0H0, computed once."""
    import tl_circuits as tlc
    from tl_circuits.testing import conflict_scores

    model = tlc.load_bundled_model("planted-conflict-2l")
    make_a, make_b = tlc.bundled_tasks("planted-conflict-2l").values()
    quiet = tlc.InterferenceConfig(tlc.GradientConfig(progress=False))
    return conflict_scores(model, make_a(512, seed=0), make_b(512, seed=0), config=quiet)


def test_the_tasks_fight_over_the_shared_head(planted_scores):
    assert_conflict(planted_scores, [(0, 0)], blocks="QK", require="all")


def test_each_tasks_own_head_is_free_of_conflict(planted_scores):
    assert_no_conflict(planted_scores, [(1, 0), (1, 1)])


# ----- claims about your own model, from your own fixture --------------------------------------------------

@pytest.fixture
def my_model(tmp_path):
    """Stands for your model loaded from disk: here a tiny random GPT-2 written to a local Hugging Face folder."""
    from transformer_lens.model_bridge import TransformerBridge

    from tl_circuits.testing import tiny_hf_dir

    return TransformerBridge.boot_transformers(str(tiny_hf_dir("GPT2LMHeadModel", tmp_path)))


def my_analysis(model, tokens):
    """Your code: whatever it does to the model, it must leave it as it found it."""
    import tl_circuits as tlc

    return tlc.freeze_sweep(model, tokens, progress=False)


def test_my_analysis_leaves_my_model_unchanged(my_model, tlc_task_batch):
    tokens = tlc_task_batch("random", 8, d_vocab=50, seq_len=12).tokens
    with assert_model_unchanged(my_model, tokens):
        my_analysis(my_model, tokens)


def test_layer_1_qk_barely_matters_in_my_model(my_model, tlc_task_batch):
    batch = tlc_task_batch("induction", 16, d_vocab=50, seq_len=12)
    assert_freeze_effect(my_model, [(1, h) for h in range(4)], batch, circuit="qk", at_least=-0.5, at_most=0.5)
