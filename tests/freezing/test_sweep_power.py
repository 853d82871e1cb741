"""Power of SweepResult.test on the bundled models: their known heads are found significant on their tasks."""

import pytest

import tl_circuits as tlc

pytestmark = [pytest.mark.slow, pytest.mark.needs_hooked_transformer]  # the bundled HookedTransformer models


@pytest.mark.parametrize("name", ["induction-2l", "induction-counting-2l"])
def test_known_heads_are_significant_on_the_bundled_tasks(name):
    model = tlc.load_bundled_model(name)
    info = tlc.bundled.bundled_model_info(name)
    batch = tlc.bundled.bundled_tasks(name)["induction"](16, seed=1)

    def in_context_loss(logits):
        return tlc.bundled.scored_loss(logits, batch, per_sample=True)

    result = tlc.freeze_sweep(model, batch.tokens, in_context_loss, circuits=("qk", "ov"), per_sample=True,
                              progress=False)
    tested = result.test(n_bootstrap=999)
    assert tested.exact  # 16 samples: all 2^16 sign patterns
    for role, heads in info.known_heads.items():
        for layer, head in heads:
            # freezing a known head of the circuit raises the in-context loss, with evidence
            assert tested.significant["ov"][layer, head], (role, layer, head)
            assert tested.ci_low["ov"][layer, head] > 0, (role, layer, head)
    layer, head = info.known_heads["previous_token"][0]
    assert tested.significant["qk"][layer, head] and tested.ci_low["qk"][layer, head] > 0
