"""The bundled models on their *shipped* weights (never retrained here), the task generators and the
training code.

The known-circuit tests are the first results that show tl_circuits finds a known circuit: the
heads recorded as induction heads (and as the previous-token head) are such by TransformerLens's own
head_detector; freezing the induction heads' QK or OV circuit (ZERO, or RESAMPLE from non-repeating
tokens) destroys in-context copying — together, as these heads back each other up — and so does
freezing the previous-token head alone, while freezing an unrelated head barely changes it.
"""

from __future__ import annotations

import dataclasses
import doctest
import json
import math
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.builders import HAS_HOOKED_TRANSFORMER, HookedTransformer

import tl_circuits as tlc
from tl_circuits.bundled import models as bundled, task_metrics, tasks, training
from tl_circuits.bundled.tasks import BOS, counting_batch, induction_batch, random_batch, scored_loss
from tl_circuits.bundled.training import BUNDLED_CONFIGS, train_model, training_batch

ROOT = Path(__file__).resolve().parents[2]
MODEL_NAMES = ["induction-2l", "induction-counting-2l"]  # circuits found after training (head_detector, freezes)
ALL_MODELS = [*MODEL_NAMES, "planted-conflict-2l"]  # + heads known by construction (tests/bundled/test_planted.py)
TEST_SEED = 123  # held out: not the seed the recorded analysis used (0), not a training seed (>= 1e9)
N_ROWS = 64

# Thresholds. Guessing among the 63 ordinary tokens costs ln 63 = 4.14 nats.
SOLVED_LOSS = 0.1        # nats on scored positions: the task is solved ...
SOLVED_ACCURACY = 0.99   # ... and the top prediction is right almost everywhere
DESTROYED_RISE = 2.0     # freezing the circuit raises the in-context loss by at least this (nats) ...
DESTROYED_ACCURACY = 0.5  # ... and accuracy falls below this
UNRELATED_RISE = 0.25    # freezing an unrelated head changes the in-context loss by less than this (nats) ...
UNRELATED_ACCURACY = 0.9  # ... and accuracy stays above this
DETECTED = 0.3           # head_detector score (BOS excluded) of a named head ...
NOT_DETECTED = 0.1       # ... and the most any head outside that role scores


_models: dict = {}


def model_named(name: str):
    """Each bundled model loaded once per test session (the tests never change weights): a HookedTransformer,
    or under TransformerLens 4.x (no HookedTransformer) the same weights as a native TransformerBridge."""
    if name not in _models:
        _models[name] = tlc.load_bundled_model(name)
    return _models[name]


def task_batch(name: str, task: str, n: int = N_ROWS, seed: int = TEST_SEED) -> tasks.TaskBatch:
    return tlc.bundled.bundled_tasks(name)[task](n, seed=seed)


def loss_and_accuracy(model, batch) -> tuple[float, float]:
    return float(tlc.bundled.in_context_loss(model, batch)), tlc.bundled.in_context_accuracy(model, batch)


# ----- the loader ---------------------------------------------------------------------------------

def test_list_bundled_models_describes_every_model():
    infos = tlc.bundled.list_bundled_models()
    assert [info.name for info in infos] == ALL_MODELS
    assert tlc.bundled.DEFAULT_BUNDLED_MODEL == "induction-counting-2l"
    for info in infos[:len(MODEL_NAMES)]:
        assert info.description and "\n" not in info.description
        assert info.summary().startswith(info.name)
        assert info.known_heads["previous_token"] and info.known_heads["induction"] and info.control_heads
        assert all(layer == 0 for layer, _ in info.known_heads["previous_token"])
        assert all(layer == 1 for layer, _ in info.known_heads["induction"])
        assert info.tasks[0] == "induction" and set(info.metrics) == set(info.tasks)
        assert info.weights_path.is_file()
        assert info.weights_path.stat().st_size < 400_000  # small enough to ship in the package
    assert tlc.bundled.bundled_model_info("induction-counting-2l").tasks == ("induction", "counting")
    assert tlc.bundled.bundled_model_info("induction-counting-2l").trained_on == ("induction", "counting")


def test_unknown_name_is_a_clear_error_listing_the_models():
    for call in (tlc.load_bundled_model, tlc.bundled.bundled_model_info, tlc.bundled.bundled_tasks):
        with pytest.raises(ValueError, match=r"unknown bundled model 'gpt-5'.*induction-2l, induction-counting-2l"):
            call("gpt-5")


@pytest.mark.needs_hooked_transformer  # the shipped HookedTransformer weights and config
@pytest.mark.parametrize("name", ALL_MODELS)
def test_loaded_model_is_the_shipped_weights_and_config(name):
    model = model_named(name)
    info = tlc.bundled.bundled_model_info(name)
    assert isinstance(model, HookedTransformer) and not model.training
    for key, value in info.config.items():
        assert getattr(model.cfg, key) == value, key
    shipped = load_file(str(info.weights_path))
    parameters = dict(model.named_parameters())
    assert set(shipped) == set(parameters)
    assert all(torch.equal(parameters[k], shipped[k]) for k in shipped)


def test_default_model_loads_without_arguments():
    model = tlc.load_bundled_model()
    assert model.cfg.d_vocab == tlc.bundled.bundled_model_info().config["d_vocab"]
    assert list(tlc.bundled.bundled_tasks()) == ["induction", "counting"]


def test_package_data_ships_the_weights():
    """pyproject's package-data patterns cover every file in tl_circuits/bundled/data (non-editable installs)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["tl_circuits"]
    data_dir = ROOT / "tl_circuits" / "bundled" / "data"
    files = [p.relative_to(ROOT / "tl_circuits").as_posix() for p in data_dir.iterdir()]
    assert sorted(files) == sorted(f"bundled/data/{n}.{ext}" for n in ALL_MODELS for ext in ("json", "safetensors"))
    for name in ALL_MODELS:
        for ext in ("json", "safetensors"):
            assert any(fnmatch(f"bundled/data/{name}.{ext}", p) for p in patterns)


def test_tokenizer_spells_tokens_as_numbers():
    model = model_named("induction-2l")
    assert model.to_tokens("5 6 7").tolist() == [[BOS, 5, 6, 7]]
    assert model.to_str_tokens(torch.tensor([BOS, 12, 63])) == ["<bos>", "12", "63"]


# ----- each model solves its tasks ----------------------------------------------------------------

@pytest.mark.parametrize("name,task", [("induction-2l", "induction"), ("induction-counting-2l", "induction"),
                                       ("induction-counting-2l", "counting")])
def test_model_solves_its_task(name, task):
    model = model_named(name)
    loss, accuracy = loss_and_accuracy(model, task_batch(name, task))
    assert loss < SOLVED_LOSS and accuracy > SOLVED_ACCURACY, (loss, accuracy)
    # ... by using the task's structure: on non-repeating tokens nothing can be predicted
    control = random_batch(N_ROWS, seq_len=33, d_vocab=model.cfg.d_vocab, seed=TEST_SEED)
    with torch.no_grad():
        control_loss = float(torch.nn.functional.cross_entropy(
            model(control.tokens)[:, 1:-1].flatten(0, 1), control.tokens[:, 2:].flatten()))
    assert control_loss > math.log(model.cfg.d_vocab - 1) - 0.5


# ----- TransformerLens's head_detector agrees with the recorded heads -----------------------------

@pytest.mark.parametrize("name", MODEL_NAMES)
def test_named_heads_have_high_head_detector_scores(name):
    """TransformerLens's own detect_head, BOS excluded (these models park attention on BOS, which says
    nothing about what a head reads): the named heads score high, every other head low."""
    model = model_named(name)
    batch = task_batch(name, "induction", n=8)
    info = tlc.bundled.bundled_model_info(name)
    for kind, role in (("induction_head", "induction"), ("previous_token_head", "previous_token")):
        scores = tlc.bundled.head_detector_scores(model, batch, kind, exclude_bos=True)
        named = torch.zeros_like(scores, dtype=torch.bool)
        for layer, head in info.known_heads[role]:
            named[layer, head] = True
        assert (scores[named] > DETECTED).all(), (kind, scores)
        if role == "induction":
            assert (scores[~named] < NOT_DETECTED).all(), (kind, scores)
        else:  # other layer-0 heads attend to the previous token partly too (most in the two-task model)
            assert scores[named].min() == scores[0].max() and (scores[1] < NOT_DETECTED).all(), (kind, scores)


def test_head_detector_without_a_tokenizer_is_a_clear_error():
    model = tlc.load_bundled_model("induction-2l", tokenizer=False)
    with pytest.raises(ValueError, match="tokenizer"):
        tlc.bundled.head_detector_scores(model, task_batch("induction-2l", "induction", n=2))


# ----- freezing the known circuit destroys in-context copying; an unrelated head does not --------

def _frozen_loss_and_accuracy(model, batch, heads, circuit, replacement):
    reference = None
    if replacement == "resample":  # the corrupted run: same shape, nothing repeats
        reference = random_batch(len(batch), seq_len=batch.tokens.shape[1], d_vocab=model.cfg.d_vocab, seed=1).tokens
    with tlc.freeze(model, heads, circuit, replacement, reference=reference):
        return loss_and_accuracy(model, batch)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("circuit", ["qk", "ov"])
@pytest.mark.parametrize("replacement", ["zero", "resample"])
def test_freezing_the_induction_heads_destroys_in_context_copying(name, circuit, replacement):
    """The named induction heads, frozen together (they back each other up: see the notebook), destroy
    copying; freezing any unrelated head alone barely changes it."""
    model = model_named(name)
    batch = task_batch(name, "induction")
    clean_loss, _ = loss_and_accuracy(model, batch)
    info = tlc.bundled.bundled_model_info(name)

    loss, accuracy = _frozen_loss_and_accuracy(model, batch, info.known_heads["induction"], circuit, replacement)
    assert loss > clean_loss + DESTROYED_RISE and accuracy < DESTROYED_ACCURACY, (loss, accuracy)

    for control in info.control_heads:
        loss, accuracy = _frozen_loss_and_accuracy(model, batch, [control], circuit, replacement)
        assert abs(loss - clean_loss) < UNRELATED_RISE and accuracy > UNRELATED_ACCURACY, (control, loss, accuracy)


@pytest.mark.parametrize("circuit,replacement", [("qk", "zero"), ("ov", "zero"), ("ov", "resample")])
def test_freezing_the_previous_token_head_destroys_in_context_copying(circuit, replacement):
    """One head: the previous-token head of induction-2l is the only one of its kind, and copying needs it."""
    name = "induction-2l"
    model = model_named(name)
    batch = task_batch(name, "induction")
    clean_loss, _ = loss_and_accuracy(model, batch)
    heads = tlc.bundled.bundled_model_info(name).known_heads["previous_token"]
    assert len(heads) == 1
    loss, accuracy = _frozen_loss_and_accuracy(model, batch, heads, circuit, replacement)
    assert loss > clean_loss + DESTROYED_RISE and accuracy < DESTROYED_ACCURACY, (loss, accuracy)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_previous_token_pattern_is_positional(name):
    """QK-RESAMPLE of the previous-token head from unrelated tokens changes nothing: its pattern does not
    depend on the tokens (so a RESAMPLE freeze is not destructive by construction)."""
    model = model_named(name)
    batch = task_batch(name, "induction")
    clean_loss, _ = loss_and_accuracy(model, batch)
    heads = tlc.bundled.bundled_model_info(name).known_heads["previous_token"]
    loss, _ = _frozen_loss_and_accuracy(model, batch, heads, "qk", "resample")
    assert abs(loss - clean_loss) < 0.05


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_the_sweep_singles_out_the_recorded_circuit(name):
    """freeze_sweep on the in-context loss: patching in patterns from a corrupted run (RESAMPLE) hurts
    most at a recorded induction head; in induction-2l, ZERO hurts most at its previous-token head."""
    model = model_named(name)
    batch = task_batch(name, "induction")
    info = tlc.bundled.bundled_model_info(name)
    metric = tlc.bundled.scored_loss_metric(batch)
    corrupted = random_batch(len(batch), seq_len=33, d_vocab=model.cfg.d_vocab, seed=1).tokens
    resample = tlc.freeze_sweep(model, batch.tokens, metric, replacement="resample", reference=corrupted,
                                progress=False)
    (layer, head, effect), = resample.top_heads(1, "qk")
    assert (layer, head) in info.known_heads["induction"] and effect > 0.4
    if name == "induction-2l":
        zero = tlc.freeze_sweep(model, batch.tokens, metric, replacement="zero", progress=False)
        for circuit in ("qk", "ov"):
            assert [(l, h) for l, h, _ in zero.top_heads(1, circuit)] == info.known_heads["previous_token"]


def test_two_task_model_control_head_is_a_counting_head():
    """The two-task model's control head is unrelated to induction (above) but not idle: counting uses it."""
    name = "induction-counting-2l"
    model = model_named(name)
    batch = task_batch(name, "counting")
    clean_loss, _ = loss_and_accuracy(model, batch)
    for control in tlc.bundled.bundled_model_info(name).control_heads:
        for circuit in ("qk", "ov"):
            loss, _ = _frozen_loss_and_accuracy(model, batch, [control], circuit, "zero")
            assert loss > clean_loss + 0.2, (control, circuit, loss, clean_loss)


# ----- task generators ----------------------------------------------------------------------------

def _copyable(row: list[int], p: int) -> bool:
    """Whether the next token at position p can be copied from context: an earlier occurrence of
    row[p] was followed by row[p + 1]."""
    return any(row[j] == row[p] and row[j + 1] == row[p + 1] for j in range(1, p))


@pytest.mark.parametrize("period", [None, 5, (3, 12)])
def test_induction_batch_scores_exactly_the_copyable_positions(period):
    batch = induction_batch(32, seq_len=25, d_vocab=40, seed=5, period=period)
    assert batch.tokens.dtype == torch.int64 and batch.tokens.shape == (32, 25) and batch.name == "induction"
    assert (batch.tokens[:, 0] == BOS).all() and (batch.tokens[:, 1:] >= 1).all() and (batch.tokens < 40).all()
    for row, scored, p_len in zip(batch.tokens.tolist(), batch.scored.tolist(), batch.info["period"].tolist()):
        assert len(set(row[1:1 + p_len])) == p_len  # the pattern's tokens are distinct
        assert row[1 + p_len:] == (row[1:1 + p_len] * 25)[:25 - 1 - p_len]  # then it repeats
        assert scored == [0 < p < 24 and _copyable(row, p) for p in range(25)]
    if isinstance(period, tuple):
        assert len(set(batch.info["period"].tolist())) > 3  # varied
        assert batch.info["period"].min() >= 3 and batch.info["period"].max() <= 12


def test_counting_batch_scores_the_successor_positions():
    batch = counting_batch(32, seq_len=20, d_vocab=16, seed=2)  # wraps: 19 tokens over 15 ids
    tokens = batch.tokens
    assert (tokens[:, 0] == BOS).all()
    successor = tokens[:, 1:-1] % 15 + 1
    assert torch.equal(tokens[:, 2:], successor)
    assert batch.scored[:, 1:-1].all() and not batch.scored[:, 0].any() and not batch.scored[:, -1].any()
    assert (tokens[:, 1] == 15).any()  # the wrap from d_vocab - 1 to 1 occurs


def test_random_batch_has_nothing_to_copy_and_nothing_scored():
    batch = random_batch(16, seq_len=33, d_vocab=64, seed=0)
    assert not batch.scored.any()
    assert all(len(set(row[1:])) == 32 for row in batch.tokens.tolist())
    with pytest.raises(ValueError, match="distinct"):
        random_batch(1, seq_len=40, d_vocab=30)


@pytest.mark.parametrize("make", [
    lambda seed: induction_batch(8, seq_len=17, d_vocab=30, seed=seed, period=(2, 7)),
    lambda seed: counting_batch(8, seq_len=17, d_vocab=30, seed=seed),
    lambda seed: random_batch(8, seq_len=17, d_vocab=30, seed=seed),
])
def test_generators_are_deterministic_in_the_seed(make):
    state = torch.random.get_rng_state()
    a, b, c = make(3), make(3), make(4)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.scored, b.scored)
    assert not torch.equal(a.tokens, c.tokens)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is not used


def test_generator_arguments_are_checked():
    with pytest.raises(ValueError, match="period"):
        induction_batch(2, seq_len=10, d_vocab=30, period=8)  # no room for a repeat
    with pytest.raises(ValueError, match="period"):
        induction_batch(2, seq_len=40, d_vocab=10, period=12)  # not enough distinct tokens
    with pytest.raises(ValueError, match="n must be"):
        counting_batch(0)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make_task_batch("sorting", 2)


def test_scored_loss_is_the_mean_over_scored_positions():
    batch = induction_batch(3, seq_len=9, d_vocab=12, seed=0, period=3)
    logits = torch.randn(3, 9, 12, generator=torch.Generator().manual_seed(0))
    nll = -torch.log_softmax(logits, -1)
    expected = [[float(nll[b, p, batch.tokens[b, p + 1]]) for p in range(8) if batch.scored[b, p]] for b in range(3)]
    flat = [x for row in expected for x in row]
    assert float(scored_loss(logits, batch)) == pytest.approx(sum(flat) / len(flat), rel=1e-6)
    per_sample = scored_loss(logits, batch, per_sample=True)
    assert per_sample.tolist() == pytest.approx([sum(r) / len(r) for r in expected], rel=1e-6)
    assert float(tasks.scored_accuracy(logits, batch)) == pytest.approx(
        sum(int(logits[b, p].argmax() == batch.tokens[b, p + 1]) for b in range(3) for p in range(8)
            if batch.scored[b, p]) / len(flat))
    with pytest.raises(ValueError, match="no scored positions"):
        scored_loss(logits, random_batch(3, seq_len=9, d_vocab=12))


def test_task_batch_rows_and_bundled_task_settings():
    batch = task_batch("induction-counting-2l", "induction", n=6)
    assert batch.tokens.shape == (6, 33) and batch.info["period"].tolist() == [16] * 6
    assert torch.equal(batch[2:4].tokens, batch.tokens[2:4]) and len(batch[1]) == 1
    counting = task_batch("induction-counting-2l", "counting", n=6)
    assert counting.name == "counting" and counting.tokens.shape == (6, 33)


# ----- training -----------------------------------------------------------------------------------

@pytest.mark.needs_hooked_transformer  # the bundled training builds and trains HookedTransformers
def test_training_is_deterministic():
    """A few steps twice from the same config give bit-identical weights; another seed does not."""
    config = BUNDLED_CONFIGS["induction-counting-2l"]
    first, second = train_model(config, steps=3), train_model(config, steps=3)
    for (name, a), b in zip(first.named_parameters(), second.parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(first.embed.W_E, model_named("induction-counting-2l").embed.W_E)
    reseeded = train_model(dataclasses.replace(config, seed=1), steps=3)
    assert not torch.equal(first.embed.W_E, reseeded.embed.W_E)
    # the training data is a fixed function of (config, step), and mixes the tasks equally
    assert torch.equal(training_batch(config, 7), training_batch(config, 7))
    assert not torch.equal(training_batch(config, 7), training_batch(config, 8))


def test_recorded_training_settings_match_the_code():
    """The JSON records the settings the training code holds for each model (nothing drifted)."""
    for name in ALL_MODELS:
        meta = tlc.bundled.bundled_model_info(name).metadata
        config = BUNDLED_CONFIGS[name]
        assert meta["config"] == config.model
        assert meta["task_settings"] == json.loads(json.dumps(config.eval_tasks))
        assert meta["training"]["steps"] == config.steps and meta["training"]["seed"] == config.seed


@pytest.mark.slow
@pytest.mark.needs_hooked_transformer  # retrains the shipped HookedTransformer weights
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_retraining_reproduces_the_shipped_model(name):
    """The full training run (minutes) gives the shipped weights: bit for bit on the same torch and CPU
    kind; otherwise the same known heads and nearly the same metrics."""
    from tl_circuits.bundled.training import analyse, select_heads

    retrained = train_model(BUNDLED_CONFIGS[name])
    shipped = model_named(name)
    if all(torch.equal(a, b) for a, b in zip(retrained.parameters(), shipped.parameters())):
        return
    selection = select_heads(analyse(retrained, BUNDLED_CONFIGS[name]))
    info = tlc.bundled.bundled_model_info(name)
    assert {k: [tuple(h) for h in v] for k, v in selection["known_heads"].items()} == info.known_heads
    for task in info.tasks:
        loss, _ = loss_and_accuracy(retrained, task_batch(name, task))
        assert loss == pytest.approx(info.metrics[task]["loss"], abs=0.05)


def test_docstring_examples_run():
    # training's examples train HookedTransformers; bundled's run on whatever load_bundled_model returns
    modules = (tasks, task_metrics, bundled) + ((training,) if HAS_HOOKED_TRANSFORMER else ())
    for module in modules:
        failures, tried = doctest.testmod(module, verbose=False)
        assert tried >= 2 and failures == 0, module.__name__
