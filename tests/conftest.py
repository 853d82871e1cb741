import pytest
import torch

from tests import builders

torch.set_num_threads(2)

NEEDS_HOOKED_TRANSFORMER = "needs_hooked_transformer"
SKIP_REASON = "needs transformer_lens.HookedTransformer (TransformerLens < 4)"


def pytest_collection_modifyitems(config, items):
    """Under TransformerLens 4.x (no HookedTransformer; the CI leg where every bridged architecture is tested) the
    tests marked ``needs_hooked_transformer`` (whole modules by ``pytestmark``, or single tests) are skipped;
    everything else runs, the bridge and architecture tests (tests/architectures) included."""
    if builders.HAS_HOOKED_TRANSFORMER:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if item.get_closest_marker(NEEDS_HOOKED_TRANSFORMER) is not None:
            item.add_marker(skip)


def pytest_report_header(config):
    if not builders.HAS_HOOKED_TRANSFORMER:
        return (f"TransformerLens without HookedTransformer: tests marked {NEEDS_HOOKED_TRANSFORMER} are skipped "
                "(the bridge tests and the model-free ones run)")
    return None


@pytest.fixture(scope="session")
def mha_model():
    return builders.mha()


@pytest.fixture(scope="session")
def gqa_model():
    return builders.gqa()


@pytest.fixture(scope="session")
def attn_only_model():
    return builders.attn_only()


@pytest.fixture(scope="session")
def nobias_model():
    return builders.mha(biases=False)


@pytest.fixture(params=["mha", "gqa"])
def model(request):
    """MHA (LayerNorm, learned positions) and GQA (rotary, RMSNorm): fresh per test."""
    return builders.mha() if request.param == "mha" else builders.gqa()


@pytest.fixture(scope="session")
def hf_gpt2():
    return builders.hf_gpt2()


@pytest.fixture(scope="session")
def hf_llama():
    return builders.hf_llama()


@pytest.fixture
def tokens():
    return builders.random_tokens()
