"""A layer subset's backward stops at its lowest selected layer (issue #25 §1, docs/spec.md §0.7), observed from
outside the engine, with PyTorch's own instruments:

- the autograd graph the task's loss is computed on (walked from the logits the ``loss_fn`` receives) reaches no
  parameter of a layer below the lowest selected one, nor the embedding;
- no tensor is saved for the backward while a block below it runs (``torch.autograd.graph.saved_tensors_hooks``,
  counted per block by forward hooks on ``model.blocks``), so nothing below it is kept;

while the full run reaches and saves in every block, and the selected cells equal the full run's bit for bit.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import pytest
import torch

from tests.builders import embedding_weight, gpt2_bridge, llama_bridge, mha, random_tokens
from tl_circuits.interference.config import GradientConfig, InterferenceConfig
from tl_circuits.interference.engine import compute_interference

MODELS = {"hooked_mha": lambda: mha(0, n_layers=3), "gpt2_bridge": lambda: gpt2_bridge(0, n_layers=3),
          "llama_bridge": lambda: llama_bridge(0)}
NAMES = [pytest.param("hooked_mha", marks=pytest.mark.needs_hooked_transformer), "gpt2_bridge", "llama_bridge"]


def _reachable_parameters(root) -> set[int]:
    """ids of the leaf tensors (parameters) whose gradients a backward from ``root`` (a grad_fn) would accumulate."""
    seen, leaves, stack = set(), set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf that requires grad
            leaves.add(id(node.variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


@contextmanager
def _watched(model):
    """Count the tensors autograd saves while each block runs (``saved[i]``; outside every block: ``saved[None]``);
    the hooks on ``model.blocks`` are removed on exit."""
    saved: Counter = Counter()
    running: list = [None]

    def pack(tensor):
        saved[running[-1]] += 1
        return tensor

    def enter(index: int):
        return lambda module, args: running.append(index)  # returns None: the inputs are unchanged

    def leave(module, args, output) -> None:
        running.pop()

    handles = []
    for index, block in enumerate(model.blocks):
        handles += [block.register_forward_pre_hook(enter(index)), block.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield saved
    finally:
        for handle in handles:
            handle.remove()


def _tied(model) -> bool:
    """The token embedding is also the unembedding (a Hugging Face model that ties them, as GPT-2 does; a
    HookedTransformer keeps them apart)."""
    hf = getattr(model, "original_model", None)
    return hf is not None and hf.get_output_embeddings().weight is embedding_weight(model)


def _run(model, tokens_a, tokens_b, layers):
    """compute_interference with a task loss (each sample's mean next-token cross-entropy) that records which
    parameters the graph of its logits reaches; returns ``(result, reached parameter ids, saved tensors per
    block)``."""
    reached: list[set[int]] = []

    def cross_entropy(logits, tokens):
        if logits.grad_fn is not None:  # the engine's forward (not the contract's probe on plain tensors)
            reached.append(_reachable_parameters(logits.grad_fn))
        logp = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        return -logp.mean(-1)

    config = InterferenceConfig(gradients=GradientConfig(progress=False))
    with _watched(model) as saved:
        result = compute_interference(model, tokens_a, tokens_b, loss_fn_a=cross_entropy, loss_fn_b=cross_entropy,
                                      layers=layers, config=config)
    assert reached, "the loss never saw the forward's logits"
    return result, set().union(*reached), saved


@pytest.mark.parametrize("name", NAMES)
def test_the_backward_stops_at_the_lowest_selected_layer(name):
    model = MODELS[name]()
    n_layers = len(model.blocks)
    layers = list(range(1, n_layers))  # every layer but the first: the lowest selected is 1
    lowest = layers[0]
    tokens_a, tokens_b = random_tokens(3, 8, seed=7), random_tokens(2, 8, seed=8)
    full, full_reached, full_saved = _run(model, tokens_a, tokens_b, None)
    sub, sub_reached, sub_saved = _run(model, tokens_a, tokens_b, layers)

    def params_of(layer: int) -> set[int]:
        return {id(p) for p in model.blocks[layer].parameters()}

    # the instrument sees every layer when it is differentiated (a bridge also lists weights its forward never uses)
    assert all(params_of(layer) & full_reached for layer in range(n_layers))
    below = set().union(*(params_of(layer) for layer in range(lowest)))
    assert not below & sub_reached  # ... and a subset's graph holds nothing below its lowest layer
    # the token embedding only where it is also the unembedding (GPT-2 ties them), never through the residual
    assert id(embedding_weight(model)) in full_reached
    assert (id(embedding_weight(model)) in sub_reached) == _tied(model)
    assert all(params_of(layer) & sub_reached for layer in layers)
    assert all(full_saved[layer] > 0 for layer in range(n_layers)), full_saved
    assert all(sub_saved[layer] == 0 for layer in range(lowest)), sub_saved  # nothing kept below the cut
    assert all(sub_saved[layer] > 0 for layer in layers), sub_saved
    for block in "QKVO":
        assert torch.equal(sub.scores[block][:, :, layers], full.scores[block][:, :, layers]), block
        assert sub.scores[block][:, :, :lowest].isnan().all()
