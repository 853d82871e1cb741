"""Distinct samples: the bundled task makers never repeat a row, the counts of possible rows are exact, and the
duplicate detector agrees with a brute-force comparison of rows."""

from __future__ import annotations

import doctest
import itertools

import pytest
import torch

import tl_circuits as tlc
from tl_circuits.bundled import samples
from tl_circuits.bundled.samples import distinct_batch, duplicate_groups, n_distinct_rows
from tl_circuits.bundled.tasks import BOS, TASK_GENERATORS, counting_batch, induction_batch
from tl_circuits.cli.loading import CommandError, LoadedModel, load_tasks

BUNDLED = [(info.name, task) for info in tlc.bundled.list_bundled_models() for task in info.tasks]


def real_rows(tokens: torch.Tensor, mask) -> list[tuple]:
    """Each row's real tokens with their positions: the reference notion of 'the same sample'."""
    mask = torch.ones_like(tokens) if mask is None else mask
    return [tuple((p, t) for p, (t, m) in enumerate(zip(row.tolist(), m_row.tolist())) if m)
            for row, m_row in zip(tokens, mask)]


def brute_force_groups(tokens: torch.Tensor, mask) -> list[list[int]]:
    rows = real_rows(tokens, mask)
    groups, taken = [], set()
    for i, j in itertools.combinations(range(len(rows)), 2):
        if i not in taken and rows[i] == rows[j]:
            group = [i] + [k for k in range(i + 1, len(rows)) if rows[k] == rows[i]]
            groups.append(group)
            taken.update(group)
    return groups


# ----- the bundled makers --------------------------------------------------------------------------

@pytest.mark.parametrize("name,task", BUNDLED, ids=[f"{n}-{t}" for n, t in BUNDLED])
def test_bundled_tasks_give_64_distinct_samples_by_default(name, task):
    make = tlc.bundled.bundled_tasks(name)[task]
    for seed in (0, 1, 123):
        batch = make(64, seed=seed)
        rows = real_rows(batch.tokens, batch.attention_mask)
        assert len(batch) == 64 and len(set(rows)) == 64, (seed, len(set(rows)))
        assert duplicate_groups(batch.tokens, batch.attention_mask) == []
        assert (batch.tokens[:, 0] == BOS).all() and batch.scored.any(1).all()


@pytest.mark.parametrize("name,task", BUNDLED, ids=[f"{n}-{t}" for n, t in BUNDLED])
def test_bundled_tasks_are_deterministic_in_the_seed(name, task):
    make = tlc.bundled.bundled_tasks(name)[task]
    state = torch.random.get_rng_state()
    a, b, c = make(64, seed=5), make(64, seed=5), make(64, seed=6)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.scored, b.scored)
    assert (a.attention_mask is None) == (b.attention_mask is None)
    assert a.attention_mask is None or torch.equal(a.attention_mask, b.attention_mask)
    assert not torch.equal(a.tokens, c.tokens)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_asking_for_more_samples_than_exist_is_an_error_naming_how_many():
    settings = tlc.bundled.bundled_model_info("induction-counting-2l").metadata["task_settings"]["counting"]
    available = n_distinct_rows("counting", **settings)
    assert available == 63 * 5  # 63 starts x lengths 29..33
    make = tlc.bundled.bundled_tasks("induction-counting-2l")["counting"]
    assert duplicate_groups(*(lambda b: (b.tokens, b.attention_mask))(make(available, seed=0))) == []
    with pytest.raises(ValueError, match=f"{available + 1} distinct 'counting' samples asked for, but only "
                                         f"{available} exist"):
        make(available + 1)


def test_the_command_draws_the_same_distinct_samples_and_reports_too_many():
    name = "induction-counting-2l"
    makers = tlc.bundled.bundled_tasks(name)
    loaded = LoadedModel(model=None, name=name, source="bundled", bundled_tasks=makers)
    task_a, task_b = load_tasks(loaded, seed=3)
    assert task_a.n_samples == task_b.n_samples == 64
    expected_b = makers["counting"](64, seed=4)
    assert torch.equal(task_b.tokens, expected_b.tokens)
    assert torch.equal(task_b.attention_mask, expected_b.attention_mask)
    assert torch.equal(task_b.loss_mask, expected_b.scored)
    assert duplicate_groups(task_b.tokens, task_b.attention_mask) == []
    assert task_b.previews[0].split()[-1] != "0"  # previews show the real tokens, not the padding
    with pytest.raises(CommandError, match=r"task B \(counting\): 400 distinct .* only 315 exist.*--n-b"):
        load_tasks(loaded, n_b=400)


# ----- the counts and the generators behind them ---------------------------------------------------

@pytest.mark.parametrize("task,settings", [
    ("counting", dict(seq_len=4, d_vocab=6)),
    ("counting", dict(seq_len=5, d_vocab=6, min_len=3)),
    ("induction", dict(seq_len=6, d_vocab=5, period=(1, 3))),
    ("induction", dict(seq_len=7, d_vocab=6, period=2)),
    ("random", dict(seq_len=4, d_vocab=5)),
])
def test_distinct_row_counts_match_what_the_generator_makes(task, settings):
    """The exact count equals the number of distinct rows in a draw large enough to find them all, and
    distinct_batch can give exactly that many and no more."""
    exact = n_distinct_rows(task, **settings)
    big = TASK_GENERATORS[task](5000, seed=0, **settings)
    assert len(set(real_rows(big.tokens, big.attention_mask))) == exact
    every = distinct_batch(task, exact, seed=1, **settings)
    assert len(set(real_rows(every.tokens, every.attention_mask))) == exact
    with pytest.raises(ValueError, match=f"only {exact} exist"):
        distinct_batch(task, exact + 1, **settings)


def test_a_batch_without_repeats_is_the_generators_own():
    """Round 0 is generator(n, seed): models' recorded analyses of repeat-free batches stay valid."""
    direct = induction_batch(64, seq_len=33, d_vocab=64, seed=0, period=16)
    assert duplicate_groups(direct.tokens) == []
    drawn = distinct_batch("induction", 64, seed=0, seq_len=33, d_vocab=64, period=16)
    assert torch.equal(drawn.tokens, direct.tokens) and torch.equal(drawn.info["period"], direct.info["period"])


def test_repeated_rows_are_replaced_and_info_follows_the_rows():
    plain = counting_batch(40, seq_len=6, d_vocab=10, seed=0)  # 9 possible rows: many repeats
    assert duplicate_groups(plain.tokens)
    batch = distinct_batch("counting", 30, seed=0, seq_len=6, d_vocab=10, min_len=3)
    assert duplicate_groups(batch.tokens, batch.attention_mask) == []
    assert torch.equal(batch.tokens[:, 1], batch.info["start"])
    assert torch.equal(batch.attention_mask.sum(1), batch.info["length"])


def test_varied_length_counting_rows_are_padded_and_scored_only_on_real_targets():
    batch = counting_batch(200, seq_len=12, d_vocab=20, seed=3, min_len=5)
    mask = batch.attention_mask.bool()
    assert set(batch.info["length"].tolist()) == set(range(5, 13))
    assert (batch.tokens[~mask] == BOS).all()
    for row, m, scored in zip(batch.tokens, mask, batch.scored):
        length = int(m.sum())
        assert m[:length].all() and not m[length:].any()
        assert scored.nonzero().flatten().tolist() == list(range(1, length - 1))
        body = row[1:length]
        assert (((body[:-1] % 19) + 1) == body[1:]).all()  # consecutive, wrapping 19 -> 1
    assert len(set(batch.info["start"][:19].tolist())) == 19  # starts never repeat within d_vocab - 1 rows


# ----- the duplicate detector ----------------------------------------------------------------------

def test_duplicate_groups_agree_with_brute_force():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 3, (60, 4), generator=gen)
    assert duplicate_groups(tokens) == brute_force_groups(tokens, None) != []
    mask = (torch.arange(4) < torch.randint(2, 5, (60, 1), generator=gen)).long()
    padded = tokens.masked_fill(mask == 0, 7) + (torch.rand(60, 4, generator=gen) < 0.5) * (mask == 0) * 5
    assert duplicate_groups(padded, mask) == brute_force_groups(padded, mask) != []


def test_duplicate_groups_checks_its_input():
    with pytest.raises(ValueError, match="differ in shape"):
        duplicate_groups(torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[n_samples, pos\]"):
        duplicate_groups(torch.zeros(4, dtype=torch.long))


def test_docstring_examples_run():
    failures, tried = doctest.testmod(samples, verbose=False)
    assert tried >= 6 and failures == 0
