"""The planted-conflict model: its task generator, the head-masked training, and the shipped model, whose
conflicting heads are known by construction and found by the conflict test."""

from __future__ import annotations

import dataclasses
import doctest

import pytest
import torch

import tl_circuits as tlc
from tl_circuits.bundled import planted
from tl_circuits.bundled.planted import known_heads_by_construction, mask_head_gradients, masked_backward
from tl_circuits.bundled.tasks import BOS, skip_induction_batch
from tl_circuits.bundled.training import BUNDLED_CONFIGS, training_parts

NAME = "planted-conflict-2l"
PER_HEAD = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")


# ----- the skip-induction task ---------------------------------------------------------------------

def test_skip_induction_scores_exactly_the_positions_predictable_by_skipping():
    """Reference: a scored position p holds a token seen before at j, and the next token is the one at j + 2."""
    batch = skip_induction_batch(50, seq_len=20, d_vocab=40, seed=3, period=(13, 17))
    for row, scored, k in zip(batch.tokens.tolist(), batch.scored, batch.info["period"].tolist()):
        assert row[0] == BOS and len(set(row[1:k + 1])) == k  # a pattern of k distinct tokens
        expected = []
        for p in range(1, len(row) - 1):
            earlier = [j for j in range(1, p) if row[j] == row[p]]
            if earlier and earlier[0] + 2 <= k and row[p + 1] == row[earlier[0] + 2]:
                expected.append(p)
        assert scored.nonzero().flatten().tolist() == expected
        assert expected == list(range(k + 1, len(row) - 1))


def test_skip_induction_arguments_are_checked():
    with pytest.raises(ValueError, match="does not fit"):
        skip_induction_batch(2, seq_len=33, d_vocab=64, period=10)  # second part would run past the pattern
    with pytest.raises(ValueError, match="does not fit"):
        skip_induction_batch(2, seq_len=33, d_vocab=64, period=31)  # no second part to score


# ----- head-masked training ------------------------------------------------------------------------

def test_known_heads_by_construction():
    roles = BUNDLED_CONFIGS[NAME].head_roles
    assert known_heads_by_construction(roles, n_layers=2, n_heads=2) == {
        "shared": [(0, 0)], "task A only": [(1, 0)], "task B only": [(1, 1)], "untrained": [(0, 1)]}
    with pytest.raises(ValueError, match="not in a model"):
        known_heads_by_construction({"a": [(2, 0)], "b": []}, n_layers=2, n_heads=2)


@pytest.mark.needs_hooked_transformer  # masked training of a HookedTransformer, W_Q[h] sliced by hand
def test_masked_backward_equals_separate_backward_passes_sliced_by_hand():
    """Independent reference: each task's loss backpropagated on its own (plain .backward()), the head slices
    picked by indexing W_Q[h] etc. directly, summed as the construction says."""
    config = dataclasses.replace(BUNDLED_CONFIGS[NAME], batch_size=8)
    from tl_circuits.bundled.training import _new_model

    model = _new_model(config)
    parts = training_parts(config, step=0)
    roles = planted.head_roles(config)
    per_task = {}
    for task, tokens in parts.items():
        model.zero_grad(set_to_none=True)
        (model(tokens, return_type="loss") / len(parts)).backward()
        per_task[task] = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    masked_backward(model, parts, roles)
    for name, param in model.named_parameters():
        short = name.split(".")[-1]
        if short not in PER_HEAD:  # embeddings, LayerNorms, unembedding, b_O: both tasks
            torch.testing.assert_close(param.grad, sum(g[name] for g in per_task.values()), rtol=0, atol=0)
            continue
        layer = int(name.split(".")[1])
        for head in range(config.model["n_heads"]):
            expected = sum((g[name][head] for task, g in per_task.items() if (layer, head) in roles[task]),
                           torch.zeros_like(param.grad[head]))
            torch.testing.assert_close(param.grad[head], expected, rtol=0, atol=0, msg=f"{name}[{head}]")


@pytest.mark.needs_hooked_transformer  # the bundled training builds and trains HookedTransformers
def test_untrained_heads_stay_zero_and_masks_refuse_grouped_models():
    from tests import builders
    from tl_circuits.bundled.training import train_model

    model = train_model(BUNDLED_CONFIGS[NAME], steps=3)
    for name in PER_HEAD:
        assert not model.blocks[0].attn.get_parameter(name)[1].any(), name  # (0, 1) is in no task's set
        assert model.blocks[0].attn.get_parameter(name)[0].any(), name
    grads = {n: torch.ones_like(p) for n, p in builders.gqa().named_parameters()}
    with pytest.raises(ValueError, match="without grouped K/V"):
        mask_head_gradients(builders.gqa(), grads, set())


# ----- the shipped model ---------------------------------------------------------------------------

def test_planted_model_metadata_lists_its_heads_by_construction():
    info = tlc.bundled_model_info(NAME)
    assert info.tasks == ("induction", "skip_induction") and info.trained_on == info.tasks
    assert info.known_heads == {"shared": [(0, 0)], "task A only": [(1, 0)], "task B only": [(1, 1)],
                                "untrained": [(0, 1)]}
    assert info.metadata["head_selection"]["by_construction"] == {
        "induction": [[0, 0], [1, 0]], "skip_induction": [[0, 0], [1, 1]]}
    assert info.weights_path.stat().st_size < 200_000


N_CONFLICT = 512  # per task: the shared head's opposed task means are ~0.5% of a sample's squared norm


def conflict_on_bundled_tasks(seed: int):
    """The conflict test on N_CONFLICT distinct samples per task (task A ``seed``, task B ``seed + 1``)."""
    model = tlc.load_bundled_model(NAME)
    make_a, make_b = tlc.bundled_tasks(NAME).values()
    batch_a, batch_b = make_a(N_CONFLICT, seed=seed), make_b(N_CONFLICT, seed=seed + 1)
    return tlc.interference_conflict_test(model, batch_a.tokens, batch_b.tokens,
                                          config=tlc.InterferenceConfig(gradients=tlc.GradientConfig(progress=False)))


@pytest.fixture
def one_thread():
    """One torch thread for the duration (a tiny model: more threads only contend, 10x slower on a busy CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_conflict_test_finds_the_shared_head_and_not_the_others(one_thread):
    """On held-out distinct samples (task A seed 0, task B seed 1, as the command's --seed 0): the shared head is
    significant in Q, K and O (V is weaker: p ~ 0.07), no cell of a head that one task trains alone is, and the
    untrained head has no gradient (NaN, not 0). Measured margins: shared Q/K/O p <= 0.006; own heads p >= 0.29.
    This exact pattern is for these samples: with other draws a head one task trains alone can be flagged too
    (seed 7: L1H0 Q, p = 0.014), as the training is near, not at, its optimum (see the test below)."""
    result = conflict_on_bundled_tasks(seed=0)
    info = tlc.bundled_model_info(NAME)
    (shared,) = info.known_heads["shared"]
    own = info.known_heads["task A only"] + info.known_heads["task B only"]
    (untrained,) = info.known_heads["untrained"]
    for block in "QKO":
        assert result.significant[block][shared] and result.estimate[block][shared] < 0, block
    for block in "QKVO":
        assert not any(bool(result.significant[block][head]) for head in own), block
        assert torch.isnan(result.p_value[block][untrained]), block
        # the shared head is the most conflicted cell of every block
        p = result.p_value[block].nan_to_num(2.0)
        assert p[shared] == p.min(), block


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 7])
def test_the_shared_head_is_found_with_other_samples(seed, one_thread):
    """With other draws the shared head is still significant in Q and O and is the most conflicted cell of Q and O;
    the heads trained by one task alone may show a weaker residual (not asserted: measured in notes/h-inputs.md)."""
    result = conflict_on_bundled_tasks(seed=seed)
    (shared,) = tlc.bundled_model_info(NAME).known_heads["shared"]
    for block in "QO":
        p = result.p_value[block].nan_to_num(2.0)
        assert result.significant[block][shared] and p[shared] == p.min(), block


def test_planted_model_shows_the_competition_in_its_freeze_effects():
    """Both tasks use the shared head: freezing its QK or OV (ZERO) costs each task over a nat (recorded)."""
    effects = tlc.bundled_model_info(NAME).metadata["freeze_effects"]
    for task in ("induction", "skip_induction"):
        for circuit in ("qk", "ov"):
            assert effects[task]["zero"][circuit][0][0] > 1.0, (task, circuit)
            assert effects[task]["zero"][circuit][0][1] == 0.0  # the untrained head writes nothing


@pytest.mark.slow
@pytest.mark.needs_hooked_transformer  # retrains the shipped HookedTransformer weights
def test_retraining_reproduces_the_planted_model():
    """The full masked training (5000 steps; 2 to 12 minutes on one CPU thread) gives the shipped model.

    Bit for bit where torch and the CPU's vector unit (``torch.backends.cpu.get_cpu_capability()``) are the ones the
    shipped weights were trained with (recorded in the metadata since this test learned it). Elsewhere float
    rounding compounds over 5000 steps, so the retrained weights differ and the test checks what the model is for:
    the same training loss (within 3%), the heads no task trains still exactly zero, and the shared head's QK and OV
    each still worth over a nat to both tasks, as recorded for the shipped model."""
    from safetensors.torch import load_file

    from tl_circuits.bundled.training import bundled_record, train_model

    config = BUNDLED_CONFIGS[NAME]
    info = tlc.bundled_model_info(NAME)
    trained_on = info.metadata["training"]
    log: list = []
    retrained = train_model(config, log=log)
    if (trained_on.get("cpu_capability") == torch.backends.cpu.get_cpu_capability()
            and trained_on["torch"] == torch.__version__):
        shipped = load_file(str(info.weights_path))
        for name, param in retrained.named_parameters():
            assert torch.equal(param, shipped[name]), name
        return
    assert log[-1][1] == pytest.approx(trained_on["loss_log"][-1][1], rel=0.03), (log[-1], trained_on["loss_log"])
    for layer, head in planted.untrained_heads(config):
        for name in ("W_Q", "W_K", "W_V", "W_O"):
            assert not retrained.blocks[layer].attn.get_parameter(name)[head].any(), (layer, head, name)
    effects = bundled_record(retrained, config, {})["freeze_effects"]
    for task in ("induction", "skip_induction"):
        for circuit in ("qk", "ov"):
            assert effects[task]["zero"][circuit][0][0] > 1.0, (task, circuit, effects[task]["zero"][circuit])


def test_docstring_examples_run():
    failures, tried = doctest.testmod(planted, verbose=False)
    assert tried >= 3 and failures == 0

