"""NOISE sweeps draw each (layer, stacked pass) item's noise from its own generator (docs/spec.md §1.7): a fresh
seed is recorded and reproduces the sweep, and an item's noise is that of its own seed (checked against the
freeze it stands for, run with the item's generator by hand)."""

from __future__ import annotations

import pytest
import torch

from tests.architectures import zoo
from tl_circuits import freeze, freeze_sweep
from tl_circuits.freezing.stacked import item_noise_seed

pytest.importorskip("transformer_lens.model_bridge")


@pytest.fixture(scope="module")
def model():
    return zoo.bridge("GPT2LMHeadModel")


def test_a_fresh_noise_seed_is_recorded_and_reproduces_the_sweep(model):
    tokens = zoo.tokens(3, 8, seed=21)
    fresh = freeze_sweep(model, tokens, replacement="noise", seed=None, n_draws=2, progress=False)
    first, second = fresh.settings["draw_seeds"]
    assert isinstance(first, int) and second == first + 1 and fresh.settings["seed"] is None
    again = freeze_sweep(model, tokens, replacement="noise", seed=first, n_draws=2, progress=False)
    for circuit in ("qk", "ov"):
        assert torch.equal(fresh.frozen[circuit], again.frozen[circuit])
        assert not torch.equal(fresh.per_draw_effect[circuit][0], fresh.per_draw_effect[circuit][1])


def test_one_item_draws_from_the_generator_of_its_own_seed(model, monkeypatch):
    """With one head per pass, item (layer, pass) is that head's freeze; its noise is seeded by item_noise_seed."""
    from tl_circuits.freezing import hooks

    tokens = zoo.tokens(2, 8, seed=22)
    sweep = freeze_sweep(model, tokens, circuits=("ov",), replacement="noise", seed=5, chunk_size=2,
                         progress=False)  # one (circuit, head) copy per pass: pass index = head
    layer, head = 1, 2
    seen = []
    real = hooks.freeze_generator
    def item_generator(m, seed):  # the freeze's own generator, reseeded as the sweep seeds this item
        seen.append(seed)
        return real(m, item_noise_seed(5, layer, head))

    monkeypatch.setattr(hooks, "freeze_generator", item_generator)

    with torch.no_grad(), freeze(model, [(layer, head)], "ov", "noise", seed=5):
        loss = model(tokens, return_type="loss")
    assert seen == [5]
    torch.testing.assert_close(sweep.frozen["ov"][layer, head], loss, rtol=1e-5, atol=1e-6)
