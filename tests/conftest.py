import pytest
import torch

from tests import builders

torch.set_num_threads(2)

NEEDS_HOOKED_TRANSFORMER = "needs_hooked_transformer"
SKIP_REASON = "needs transformer_lens.HookedTransformer (TransformerLens < 4)"


def pytest_collection_modifyitems(config, items):
    """Under TransformerLens 4.x (no HookedTransformer; the CI leg where every bridged architecture is tested) the
    tests marked ``needs_hooked_transformer`` (whole modules by ``pytestmark``, or single tests) are skipped;
    everything else runs, the bridge and architecture tests (tests/architectures) included.

    The rule for the marker: a test keeps it only when it is *about* HookedTransformer (its weight conversion,
    ``method="direct"``, ``start_at_layer``, HookedTransformer-only config such as ``use_attn_result``,
    shortformer or ALiBi models, comparisons with a HookedTransformer twin, the bundled HookedTransformer
    weights, HookedTransformer checkpoints), with a comment saying why. A test that only needs *a model to run
    on* uses the model-under-test fixtures below (``mha_model``, ``gqa_model``, ``model``; built by
    ``builders.mha_under_test`` / ``gqa_under_test``): a HookedTransformer on TL < 4 and the equivalent
    TransformerBridge around a tiny HF GPT-2 / LLaMA on TL 4, so it runs on both legs."""
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


# The models under test come from tl_circuits' own pytest plugin (pytest_tl_circuits, loaded by the root conftest
# or its entry point): its tlc_make_tiny_model builds tl_circuits.testing's tiny GPT-2 / LLaMA.

@pytest.fixture(scope="session")
def mha_model(tlc_make_tiny_model):
    """The MHA model under test: HookedTransformer on TL < 4, GPT-2 bridge on TL 4 (builders.mha_under_test)."""
    return tlc_make_tiny_model("GPT2LMHeadModel", 0, kind=builders.UNDER_TEST_KIND)


@pytest.fixture(scope="session")
def gqa_model(tlc_make_tiny_model):
    """The GQA model under test: HookedTransformer on TL < 4, LLaMA bridge on TL 4 (builders.gqa_under_test)."""
    return tlc_make_tiny_model("LlamaForCausalLM", 0, kind=builders.UNDER_TEST_KIND)


@pytest.fixture(scope="session")
def attn_only_model():  # HookedTransformer only: TL 4 bridges no attention-only HF model
    return builders.attn_only()


@pytest.fixture(scope="session")
def nobias_model():  # HookedTransformer only
    return builders.mha(biases=False)


@pytest.fixture(params=["GPT2LMHeadModel", "LlamaForCausalLM"], ids=["mha", "gqa"])
def model(request, tlc_make_tiny_model):
    """The models under test, MHA (LayerNorm, learned positions) and GQA (rotary, RMSNorm), fresh per test:
    HookedTransformers on TL < 4, GPT-2 / LLaMA bridges on TL 4 (builders.under_test)."""
    return tlc_make_tiny_model(request.param, 0, kind=builders.UNDER_TEST_KIND)


@pytest.fixture(scope="session")
def hf_gpt2():
    return builders.hf_gpt2()


@pytest.fixture(scope="session")
def hf_llama():
    return builders.hf_llama()


@pytest.fixture
def tokens():
    return builders.random_tokens()
