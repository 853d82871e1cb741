import pytest
import torch

from tests import builders

torch.set_num_threads(2)


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
