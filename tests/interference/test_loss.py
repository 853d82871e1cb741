"""The loss is the task's (docs/spec.md §2.1): a loss mask and a custom per-sample loss_fn, against a plain
per-sample ``loss.backward()`` loop on the same loss written here by hand (Python loops over the counted
positions of each sample trimmed to its tokens), through the gradients, the Fisher and the scores.

The model fixtures are a HookedTransformer (MHA and GQA) on TransformerLens 3.x and the GPT-2 / LLaMA (GQA) bridges
on 4.x; a fused rotary family (GPT-NeoX) is compared with its Hugging Face model, rows sliced by hand.
"""

from __future__ import annotations

import pytest
import torch

from tests import builders
from tests.architectures import references as arch_references
from tests.architectures import zoo
from tests.reference import (
    D_HEAD,
    DAMP,
    assert_rows_match,
    assert_scores_close,
    brute_force,
    gpt2_rows,
    hand_masked_nll,
    hand_rows,
    loop_reference,
)
from tl_circuits import (
    GradientConfig,
    InterferenceConfig,
    compute_interference,
    interference_conflict_test,
    interference_permutation_test,
    loss_mask_from_labels,
    per_sample_gradients,
)
from tl_circuits.interference import fisher_from_gradients
from tl_circuits.interference.engine import pooled_scores
from tl_circuits.interference.gradients import iter_per_sample_gradients
from tl_circuits.models.spec import BLOCKS, model_spec

QUIET = dict(progress=False)
FOILS = torch.tensor([3, 7, 11, 2, 5, 9])  # each sample's wrong answer, for the logit difference


def padded_task(n: int = 5, pos: int = 10, seed: int = 3):
    """Tokens, an attention mask (left and right padding) and a loss mask that also marks padded positions and
    positions whose target is padding (which must not count)."""
    tokens, mask = builders.padded_tokens(n, pos, seed, right_from=6)
    loss_mask = torch.zeros_like(tokens)
    loss_mask[:, 4:7] = 1
    loss_mask[0, 1] = 1
    loss_mask[1, 0:2] = 1  # padding: ignored
    loss_mask[2, 5] = 1  # its target (6) is padding: ignored
    loss_mask[3, 8] = 1
    return tokens, mask, loss_mask


# ----- the losses by hand: Python loops over a trimmed sample's positions ------------------------------------

def hand_logit_difference(loss_mask):
    """Sample i's mean over its counted positions j of logit(wrong answer FOILS[i]) − logit(right next token)."""
    def loss_of(logits, sample, i, kept):
        terms = [logits[j, FOILS[i]] - logits[j, sample[j + 1]] for j in range(len(sample) - 1)
                 if loss_mask is None or loss_mask[i, int(kept[j])]]
        return torch.stack(terms).float().mean()
    return loss_of


def logit_difference(logits, tokens, *, loss_mask, samples):
    """The library's loss_fn for :func:`hand_logit_difference`: batched, per-sample foils by sample index."""
    right = logits[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    foil = FOILS.to(samples.device)[samples]
    wrong = logits[:, :-1].gather(-1, foil[:, None, None].expand(-1, logits.shape[1] - 1, 1))[..., 0]
    counted = loss_mask[:, :-1].float()
    return ((wrong - right) * counted).sum(-1) / counted.sum(-1)


def last_token_nll(logits, tokens):
    """−log p(last token): a two-argument loss_fn (no padding, so the last column is real)."""
    return -logits[:, -2].log_softmax(-1).gather(-1, tokens[:, -1:])[:, 0]


def hand_last_token_nll(logits, sample, i, kept):
    return -torch.log_softmax(logits[-2], -1)[sample[-1]]


# ----- per-sample gradients -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", builders.METHODS)
def test_masked_gradients_equal_the_backward_loop(model, method):
    """Both engines, MHA and GQA, left and right padding, a loss mask that also marks padding, chunks of 2."""
    tokens, mask, loss_mask = padded_task()
    grads = per_sample_gradients(model, tokens, mask, GradientConfig(chunk_size=2, method=method, **QUIET),
                                 loss_mask=loss_mask)
    assert_rows_match(grads, loop_reference(model, tokens, mask, loss_of=hand_masked_nll(loss_mask)))
    assert grads.n_targets.tolist() == [4, 3, 1, 4, 3]
    with torch.no_grad():
        expected = [hand_masked_nll(loss_mask)(model(tokens[i][mask[i].bool()][None])[0], tokens[i][mask[i].bool()],
                                               i, mask[i].nonzero().flatten()) for i in range(5)]
    torch.testing.assert_close(grads.losses, torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_a_wrong_shift_of_the_mask_fails(mha_model):
    """The comparison can fail: the same mask read one position off (the target's column instead of the
    prediction's) gives other gradients."""
    tokens, mask, loss_mask = padded_task()
    grads = per_sample_gradients(mha_model, tokens, mask, GradientConfig(**QUIET), loss_mask=loss_mask)
    with pytest.raises(AssertionError):
        assert_rows_match(grads, loop_reference(mha_model, tokens, mask, loss_of=hand_masked_nll(loss_mask, shift=1)))


@pytest.mark.parametrize("method", builders.METHODS)
def test_custom_loss_fn_with_a_mask_equals_the_backward_loop(model, method):
    """A logit difference against each sample's own foil (looked up by ``samples``), on the counted predictions,
    padded samples trimmed on a bridge: positions shift, the masks and sample indices follow."""
    tokens, mask, loss_mask = padded_task()
    grads = per_sample_gradients(model, tokens, mask, GradientConfig(chunk_size=3, method=method, **QUIET),
                                 loss_mask=loss_mask, loss_fn=logit_difference)
    assert_rows_match(grads, loop_reference(model, tokens, mask, loss_of=hand_logit_difference(loss_mask)))


def test_custom_loss_fn_without_a_mask_sees_every_valid_target(model):
    tokens, mask, _ = padded_task()
    grads = per_sample_gradients(model, tokens, mask, GradientConfig(chunk_size=2, **QUIET), loss_fn=logit_difference)
    assert_rows_match(grads, loop_reference(model, tokens, mask, loss_of=hand_logit_difference(None)))
    assert grads.n_targets.tolist() == [9, 6, 5, 9, 9]


def test_two_argument_loss_fn(model):
    tokens = builders.random_tokens(4, 8, seed=2)
    grads = per_sample_gradients(model, tokens, config=GradientConfig(chunk_size=3, **QUIET), loss_fn=last_token_nll)
    assert_rows_match(grads, loop_reference(model, tokens, loss_of=hand_last_token_nll))


def test_iterated_gradients_take_the_loss_too(mha_model):
    tokens, mask, loss_mask = padded_task()
    whole = per_sample_gradients(mha_model, tokens, mask, GradientConfig(**QUIET), loss_mask=loss_mask)
    for sl, part in iter_per_sample_gradients(mha_model, tokens, mask, GradientConfig(chunk_size=2, **QUIET),
                                              loss_mask=loss_mask):
        for block in BLOCKS:
            torch.testing.assert_close(part.per_block[block], whole.per_block[block][sl], rtol=1e-4, atol=2e-6)


def test_no_mask_is_todays_loss_exactly(mha_model):
    """``loss_mask=None`` is every valid target: the same numbers as a mask of every position but the last."""
    tokens, mask, _ = padded_task()
    every = torch.ones_like(tokens)
    every[:, -1] = 0
    plain = per_sample_gradients(mha_model, tokens, mask, GradientConfig(**QUIET))
    masked = per_sample_gradients(mha_model, tokens, mask, GradientConfig(**QUIET), loss_mask=every)
    for block in BLOCKS:
        assert torch.equal(plain.per_block[block], masked.per_block[block])


def test_hugging_face_labels_give_hf_own_loss():
    """``loss_mask_from_labels`` against Hugging Face's own loss with ``labels`` (−100 = ignored, shifted inside):
    per-sample HF gradients on the GPT-2 model, rows sliced by hand, equal ours on its bridge."""
    hf, model = builders.hf_gpt2_model(0), builders.gpt2_bridge(0)
    tokens = builders.random_tokens(3, 9, seed=5)
    labels = tokens.clone()
    labels[:, :5] = -100  # a prompt of 5 tokens, the completion scored
    labels[1, 7] = -100
    params = dict(hf.named_parameters())
    raw: dict[str, list] = {}
    for i in range(3):
        hf.zero_grad(set_to_none=True)
        hf(tokens[i:i + 1], labels=labels[i:i + 1]).loss.backward()
        for name, p in params.items():
            if p.grad is not None:
                raw.setdefault(name, []).append(p.grad.clone())
    expected = gpt2_rows({k: torch.stack(v) for k, v in raw.items()}, 2, 4, D_HEAD)
    ours = per_sample_gradients(model, tokens, config=GradientConfig(include_biases=True, **QUIET),
                                loss_mask=loss_mask_from_labels(labels, tokens))
    for block in BLOCKS:
        torch.testing.assert_close(ours.per_block[block], expected[block], rtol=1e-4, atol=1e-6)
    assert ours.n_targets.tolist() == [4, 3, 4]


def test_labels_that_are_not_the_input_ids_are_refused():
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    with pytest.raises(ValueError, match=r"samples \[1\].*differ from the input ids"):
        loss_mask_from_labels(torch.tensor([[-100, 2, 3, 4], [-100, -100, 9, 8]]), tokens)
    with pytest.raises(ValueError, match="integer tensor"):
        loss_mask_from_labels(torch.ones(2, 4))


# ----- a fused rotary family, against its Hugging Face model -----------------------------------------------------

@pytest.mark.parametrize("name", ["GPTNeoXForCausalLM", "Phi3ForCausalLM"])
def test_fused_rotary_family_equals_a_loop_on_the_hf_model(name):
    """GPT-NeoX (per-head interleaved query_key_value, partial rotary) and Phi-3 (fused [Q|K|V], GQA): masked and
    custom losses on padded samples equal per-sample backward passes of the HF model, rows sliced by hand."""
    model, hf = zoo.bridge(name), zoo.build(name)
    tokens = zoo.tokens(4, 9, seed=4)
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0
    mask[2, -3:] = 0
    loss_mask = torch.zeros_like(tokens)
    loss_mask[:, 3:7] = 1
    samples = [tokens[i][mask[i].bool()] for i in range(4)]
    kept = [mask[i].nonzero().flatten() for i in range(4)]
    biases = arch_references.has_qkv_biases(name, hf)
    cfg = GradientConfig(include_biases=biases, chunk_size=3, **QUIET)
    for loss_fn, hand in ((None, hand_masked_nll(loss_mask)), (logit_difference, hand_logit_difference(loss_mask))):
        ours = per_sample_gradients(model, tokens, mask, cfg, loss_mask=loss_mask, loss_fn=loss_fn)
        expected = arch_references.gradient_loop(name, hf, samples, biases,
                                                 loss_of=lambda lg, s, i, hand=hand: hand(lg, s, i, kept[i]))
        for block in BLOCKS:
            torch.testing.assert_close(ours.per_block[block], expected[block], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{name} {block} ({loss_fn}): {m}")


# ----- the Fisher and the scores --------------------------------------------------------------------------------

def two_tasks():
    tokens_a, mask_a, loss_mask_a = padded_task(4, 10, seed=3)
    tokens_b = builders.random_tokens(3, 8, seed=8)
    mask_b = torch.ones_like(tokens_b)
    mask_b[0, :2] = 0
    return tokens_a, mask_a, loss_mask_a, tokens_b, mask_b


@pytest.mark.parametrize("variant,source,loo", [("signed", "a", False), ("signed", "pooled", True),
                                                ("unsigned", "pooled", False), ("symmetric", "pooled", False)])
def test_interference_with_a_masked_task_and_a_custom_task_equals_brute_force(model, variant, source, loo):
    """Task A masked, task B a logit difference: the scores and the engine's own Fisher equal brute force over the
    backward loop's gradients, and the settings say what each task scored."""
    tokens_a, mask_a, loss_mask_a, tokens_b, mask_b = two_tasks()
    cfg = InterferenceConfig(gradients=GradientConfig(chunk_size=2, **QUIET), variant=variant, fisher_source=source,
                             leave_one_out=loo, **DAMP)
    result = compute_interference(model, tokens_a, tokens_b, attention_mask_a=mask_a, attention_mask_b=mask_b,
                                  loss_mask_a=loss_mask_a, loss_fn_b=logit_difference, config=cfg)
    raw_a = loop_reference(model, tokens_a, mask_a, loss_of=hand_masked_nll(loss_mask_a))
    raw_b = loop_reference(model, tokens_b, mask_b, loss_of=hand_logit_difference(None))
    spec = model_spec(model)
    assert_scores_close(result.scores, brute_force(spec, raw_a, raw_b, variant, "sum", source, loo, **DAMP))
    members = [raw_a] if source == "a" else [raw_a, raw_b]
    for block in BLOCKS:
        for layer in range(spec.n_layers):
            for head in range(spec.n_block_heads(block)):
                rows = torch.cat([hand_rows(spec, raw, block, layer, head).double() for raw in members])
                torch.testing.assert_close(result.fisher.per_block[block][layer, head], (rows ** 2).mean(0),
                                           rtol=1e-4, atol=1e-12)
    loss = result.settings["loss"]
    assert loss["a"]["scored"] == "loss mask" and loss["a"]["counted_predictions"] == {
        "min": 1, "median": 3.5, "max": 4, "total": 12}
    assert loss["b"] == {"scored": "custom loss_fn", "loss_fn": f"{__name__}.logit_difference", "loss_mask": False,
                         "counted_predictions": {"min": 5, "median": 7, "max": 7, "total": 19}}


def test_batch_fisher_of_masked_gradients_equals_the_engines(mha_model):
    tokens_a, mask_a, loss_mask_a, tokens_b, _ = two_tasks()
    grads = per_sample_gradients(mha_model, tokens_a, mask_a, GradientConfig(**QUIET), loss_mask=loss_mask_a)
    result = compute_interference(mha_model, tokens_a, tokens_b, attention_mask_a=mask_a, loss_mask_a=loss_mask_a,
                                  config=InterferenceConfig(gradients=GradientConfig(**QUIET)))
    for block in BLOCKS:
        torch.testing.assert_close(result.fisher.per_block[block], fisher_from_gradients(grads).per_block[block],
                                   rtol=1e-5, atol=1e-12)


@pytest.mark.filterwarnings("ignore:.*p-values at their floor")
def test_pooled_matrix_and_tests_take_the_loss(mha_model):
    """The pooled (A ∪ B)² matrix with a masked A and a custom B equals brute force with the Fisher of A ∪ B; the
    permutation and conflict tests are computed on it and say what was scored."""
    tokens_a, mask_a, loss_mask_a, tokens_b, mask_b = two_tasks()
    cfg = InterferenceConfig(gradients=GradientConfig(chunk_size=2, **QUIET), **DAMP)
    tasks = dict(attention_mask_a=mask_a, attention_mask_b=mask_b, loss_mask_a=loss_mask_a, loss_fn_b=logit_difference)
    pooled = pooled_scores(mha_model, tokens_a, tokens_b, config=cfg, **tasks)
    scores, settings = pooled.scores, pooled.settings
    raw_a = loop_reference(mha_model, tokens_a, mask_a, loss_of=hand_masked_nll(loss_mask_a))
    raw_b = loop_reference(mha_model, tokens_b, mask_b, loss_of=hand_logit_difference(None))
    both = {k: torch.cat([raw_a[k], raw_b[k]]) for k in raw_a}
    assert_scores_close(scores, brute_force(model_spec(mha_model), both, both, "signed", "sum", "a", False, **DAMP))
    assert settings["loss"]["b"]["scored"] == "custom loss_fn"
    test = interference_permutation_test(mha_model, tokens_a, tokens_b, config=cfg, n_permutations=99,
                                         n_bootstrap=0, seed=0, **tasks)
    for block in BLOCKS:
        torch.testing.assert_close(test.observed[block].double(), scores[block][:4, 4:].double().mean((0, 1)),
                                   rtol=1e-5, atol=1e-9)
    assert test.loss == settings["loss"] and test.settings["loss"] == settings["loss"]
    conflict = interference_conflict_test(mha_model, tokens_a, tokens_b, config=cfg, **tasks)
    pooled_cross = brute_force(model_spec(mha_model), raw_a, raw_b, "signed", "sum", "pooled", False, **DAMP)
    for block in BLOCKS:
        want = pooled_cross[block].mean((0, 1))  # to float32 operands' rounding, relative to the block (§3.3)
        torch.testing.assert_close(conflict.estimate[block], want, rtol=2e-4, atol=1e-6 * float(want.abs().max()))
    assert conflict.loss == settings["loss"]
