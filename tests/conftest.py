import pytest
import torch

from tests import builders

torch.set_num_threads(2)

# Under TransformerLens 4.x (no HookedTransformer; the second CI leg) only these modules can run: the bridge
# tests (whose HookedTransformer parity tests skip themselves) and the model-free ones. The rest build
# HookedTransformers at import or in fixtures, so they are left out of collection rather than erroring.
RUNS_WITHOUT_HOOKED_TRANSFORMER = {"test_bridge.py", "test_fisher.py", "test_bundled.py",
                                   "test_bundled_bridge.py", "test_bridge_cli.py", "test_analysis_config.py", "test_layout.py",
                                   # tests/stats/
                                   "test_permutation.py", "test_corrections.py", "test_bootstrap.py",
                                   "test_calibration.py", "test_result.py"}


def pytest_ignore_collect(collection_path, config):
    if builders.HAS_HOOKED_TRANSFORMER or collection_path.suffix != ".py":
        return None
    if collection_path.name.startswith("test_") and collection_path.name not in RUNS_WITHOUT_HOOKED_TRANSFORMER:
        return True
    return None


def pytest_report_header(config):
    if not builders.HAS_HOOKED_TRANSFORMER:
        return (f"TransformerLens without HookedTransformer: only {sorted(RUNS_WITHOUT_HOOKED_TRANSFORMER)} "
                "are collected")
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
