"""Bad loss masks and loss functions that break the per-sample contract are clear errors (docs/spec.md §2.1), and
the checkpoint key follows the loss (a resumed run never reuses another loss's shards)."""

from __future__ import annotations

import functools

import pytest
import torch

from tests import builders
from tl_circuits import GradientConfig, InterferenceConfig, compute_interference, per_sample_gradients
from tl_circuits.interference.checkpoint import callable_fingerprint

QUIET = dict(progress=False)


def nll(logits, tokens, *, loss_mask):
    """A correct masked loss_fn (the token-mean cross-entropy over the counted predictions)."""
    logp = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
    counted = loss_mask[:, :-1].float()
    return -(logp * counted).sum(-1) / counted.sum(-1)


def run(model, tokens, **kwargs):
    return per_sample_gradients(model, tokens, config=GradientConfig(**QUIET), **kwargs)


# ----- loss masks ---------------------------------------------------------------------------------------------------

def test_samples_with_no_counted_prediction_are_named(mha_model):
    tokens = builders.random_tokens(4, 8)
    mask = torch.ones_like(tokens)
    mask[2, 4:] = 0  # right-padded from position 4: position 4 predicts padding
    loss_mask = torch.zeros_like(tokens)
    loss_mask[:, 4] = 1
    loss_mask[3] = 0
    with pytest.raises(ValueError, match=r"samples \[2, 3\] of tokens have no counted prediction"):
        run(mha_model, tokens, attention_mask=mask, loss_mask=loss_mask)


@pytest.mark.parametrize("bad,error,message", [
    (torch.ones(4, 7, dtype=torch.long), ValueError, r"loss mask of tokens has shape \(4, 7\), but tokens has shape"),
    (torch.full((4, 8), 2), ValueError, "only 0 and 1.*loss_mask_from_labels"),
    ([[1] * 8] * 4, TypeError, "must be a torch.Tensor, got list"),
])
def test_bad_loss_masks_are_named(mha_model, bad, error, message):
    with pytest.raises(error, match=message):
        run(mha_model, builders.random_tokens(4, 8), loss_mask=bad)


def test_the_last_position_of_a_loss_mask_is_refused(mha_model):
    """Position p counts the prediction of token p + 1: a mask aligned with the target tokens (off by one) sets
    the last column, which predicts nothing."""
    tokens = builders.random_tokens(3, 8)
    targets = torch.zeros_like(tokens)
    targets[:, 5:] = 1  # the completion's tokens, not their predictions
    with pytest.raises(ValueError, match=r"samples \[0, 1, 2\] of tokens set the last position.*shift"):
        run(mha_model, tokens, loss_mask=targets)


def test_bool_masks_are_accepted(mha_model):
    tokens = builders.random_tokens(2, 8)
    loss_mask = torch.zeros(2, 8, dtype=torch.bool)
    loss_mask[:, 2:5] = True
    grads = run(mha_model, tokens, loss_mask=loss_mask)
    assert torch.equal(run(mha_model, tokens, loss_mask=loss_mask.long()).per_block["Q"], grads.per_block["Q"])


def test_the_engine_names_the_task(mha_model):
    tokens = builders.random_tokens(3, 8)
    with pytest.raises(ValueError, match=r"samples \[0, 1, 2\] of tokens_b have no counted prediction"):
        compute_interference(mha_model, tokens, tokens, loss_mask_b=torch.zeros_like(tokens),
                             config=InterferenceConfig(gradients=GradientConfig(**QUIET)))


# ----- the loss_fn contract -------------------------------------------------------------------------------------------

def per_token(logits, tokens):
    return logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]


@pytest.mark.parametrize("loss_fn,error,message", [
    (lambda logits, tokens: per_token(logits, tokens).mean(), ValueError,
     r"one value per sample, shape \(2,\); it returned shape \(\) \(a batch mean\?\)"),
    (lambda logits, tokens: per_token(logits, tokens), ValueError, r"shape \(2,\); it returned shape \(2, 7\)"),
    (lambda logits, tokens: per_token(logits, tokens).mean(1).long(), TypeError, "floating-point values"),
    (lambda logits, tokens: [0.0] * 4, TypeError, "must return a torch.Tensor"),
    (lambda logits, tokens: per_token(logits, tokens).mean(1).detach(), ValueError, "do not depend on the logits"),
    (lambda logits, tokens: logits.argmax(-1).float().mean(1), ValueError, "do not depend on the logits"),
    (lambda logits, tokens: per_token(logits, tokens).mean(1) - per_token(logits, tokens).mean(), ValueError,
     "not per sample: a sample's value changes when another sample's logits change"),
    (lambda logits, tokens: per_token(logits, tokens).mean(1) / logits.shape[0], ValueError,
     "not per sample: a sample's value changes when it is called on a subset"),
    ("not a function", TypeError, "loss_fn of tokens must be callable"),
])
def test_loss_fns_that_break_the_contract_are_refused(mha_model, loss_fn, error, message):
    with pytest.raises(error, match=message):
        run(mha_model, builders.random_tokens(4, 8), loss_fn=loss_fn)


def test_a_mask_with_a_loss_fn_that_cannot_take_it_is_refused(mha_model):
    tokens = builders.random_tokens(3, 8)
    with pytest.raises(ValueError, match="takes no loss_mask= argument: the mask would be ignored"):
        run(mha_model, tokens, loss_mask=torch.ones_like(tokens) * (torch.arange(8) < 7),
            loss_fn=lambda logits, tokens: per_token(logits, tokens).mean(1))


def test_a_loss_fn_taking_kwargs_gets_every_argument(mha_model):
    seen = {}

    def loss_fn(logits, tokens, **kwargs):
        seen.update({k: (tuple(v.shape), v.dtype) for k, v in kwargs.items()})
        return -per_token(logits, tokens).mean(1)

    run(mha_model, builders.random_tokens(3, 8), loss_fn=loss_fn)
    assert seen == {"attention_mask": ((3, 8), torch.int64), "loss_mask": ((3, 8), torch.bool),
                    "samples": ((3,), torch.int64)}


def test_a_correct_loss_fn_equals_the_built_in_loss(model):
    """The built-in masked cross-entropy written as a loss_fn gives the same gradients (chunks, padding)."""
    tokens = builders.random_tokens(5, 9, seed=4)
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    mask[3, 6:] = 0
    loss_mask = (torch.arange(9) >= 3).long().expand(5, 9).clone()
    loss_mask[:, -1] = 0
    cfg = GradientConfig(chunk_size=2, **QUIET)
    built_in = per_sample_gradients(model, tokens, mask, cfg, loss_mask=loss_mask)
    custom = per_sample_gradients(model, tokens, mask, cfg, loss_mask=loss_mask, loss_fn=nll)
    for block, g in built_in.per_block.items():
        torch.testing.assert_close(custom.per_block[block], g, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(custom.losses, built_in.losses)


# ----- checkpoints --------------------------------------------------------------------------------------------------

def test_the_checkpoint_key_follows_the_loss(mha_model, tmp_path):
    """Same loss: the shards are reused (no new folder, equal scores); another loss mask or loss_fn: new folders,
    and the scores of a fresh run."""
    tokens_a, tokens_b = builders.random_tokens(3, 8, seed=1), builders.random_tokens(2, 8, seed=2)
    first = torch.zeros_like(tokens_a)
    first[:, 2:6] = 1
    second = first.clone()
    second[0, 6] = 1
    cfg = InterferenceConfig(gradients=GradientConfig(**QUIET), checkpoint_dir=str(tmp_path))

    def folders():
        return sorted(p.name for p in tmp_path.iterdir())

    kept = compute_interference(mha_model, tokens_a, tokens_b, loss_mask_a=first, config=cfg)
    assert len(folders()) == 2
    again = compute_interference(mha_model, tokens_a, tokens_b, loss_mask_a=first, config=cfg)
    assert len(folders()) == 2 and torch.equal(again.scores["Q"], kept.scores["Q"])
    other = compute_interference(mha_model, tokens_a, tokens_b, loss_mask_a=second, config=cfg)
    fresh = compute_interference(mha_model, tokens_a, tokens_b, loss_mask_a=second, config=cfg.replace(
        checkpoint_dir=None))
    assert len(folders()) == 3 and torch.equal(other.scores["Q"], fresh.scores["Q"])
    compute_interference(mha_model, tokens_a, tokens_b, loss_mask_a=first, loss_fn_a=nll, config=cfg)
    assert len(folders()) == 4


def test_loss_fn_fingerprints():
    answers = torch.tensor([1, 2])

    def make(values):
        def loss_fn(logits, tokens):
            return logits[:, -1].gather(-1, values[:, None])[:, 0]
        return loss_fn

    assert callable_fingerprint(make(answers)) == callable_fingerprint(make(answers.clone()))
    assert callable_fingerprint(make(answers)) != callable_fingerprint(make(answers + 1))
    assert callable_fingerprint(nll) != callable_fingerprint(make(answers))
    assert callable_fingerprint(functools.partial(nll)) != callable_fingerprint(functools.partial(make(answers)))

    class Scorer:
        def __init__(self, scale):
            self.scale = scale

        def __call__(self, logits, tokens):
            return logits[:, -1, 0] * self.scale

    assert callable_fingerprint(Scorer(1.0)) != callable_fingerprint(Scorer(2.0))
    holder = object()
    with pytest.raises(ValueError, match="holds a object, which the checkpoint key cannot include"):
        callable_fingerprint(lambda logits, tokens: logits[:, 0, 0] * id(holder))
