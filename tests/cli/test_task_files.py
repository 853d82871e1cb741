"""Prompt -> completion task files: every format gives the same samples, the loss mask counts exactly the completion's
tokens (hand-computed, and TRL's rule where the prompt is a prefix), BOS and ids follow the text-file rules, a token
spanning the prompt/completion boundary is counted from the first token that differs, and every bad record is a
one-line error naming the file and line (or row)."""

from __future__ import annotations

import csv
import json
import re

import pytest

from tests import builders
from tests.cli.helpers import bpe_tokenizer, word_tokenizer
from tl_circuits.cli.loading import load_model
from tl_circuits.cli.prompt_completion import RecordFields
from tl_circuits.cli.task_files import TaskInputError, read_task_file

# word tokenizer: <bos> 0, <pad> 1, <unk> 2, the 3 cat 4 dog 5 sat 6 on 7 mat 8 ran 9 far 10 a 11 big 12 small 13
# red 14 blue 15 bird 16 sang 17
RECORDS = [{"prompt": "the cat sat on the", "completion": " mat"},
           {"prompt": "a big", "completion": " red bird sang"},
           {"prompt": "the dog", "completion": " ran"}]
TOKENS = [[0, 3, 4, 6, 7, 3, 8], [0, 11, 12, 14, 16, 17, 1], [0, 3, 5, 9, 1, 1, 1]]  # padded with <pad> = 1
LOSS_MASK = [[0, 0, 0, 0, 0, 1, 0],  # predicts "mat" (position 6) from position 5
             [0, 0, 1, 1, 1, 0, 0],  # "red bird sang"
             [0, 0, 1, 0, 0, 0, 0]]  # "ran"
PROMPT_TOKENS = [6, 3, 3]


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    """A local HF GPT-2 directory with the word tokenizer, loaded as the command loads it (a HookedTransformer on
    TransformerLens 3 where it converts, else a bridge)."""
    tokenizer, _ = word_tokenizer()
    directory = tmp_path_factory.mktemp("word") / "gpt2"
    builders.save_hf_directory(directory, "gpt2", tokenizer, seed=1)
    return load_model(str(directory), "cpu").model


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    tokenizer = bpe_tokenizer()
    directory = tmp_path_factory.mktemp("bpe") / "llama"
    builders.save_hf_directory(directory, "llama", tokenizer, seed=2, n_ctx=32)
    return load_model(str(directory), "cpu").model, tokenizer


def write_jsonl(path, records, blank_after=None):
    lines = [json.dumps(r) for r in records]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_csv(path, records):
    names = list(dict.fromkeys(k for r in records for k in r))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        writer.writerows(records)
    return path


def test_completion_mask_equals_the_hand_computed_one(word_model, tmp_path):
    task = read_task_file(write_jsonl(tmp_path / "a.jsonl", RECORDS), word_model)
    assert task.tokens.tolist() == TOKENS
    assert task.attention_mask.tolist() == [[1] * 7, [1] * 6 + [0], [1] * 4 + [0] * 3]
    assert task.loss_mask.int().tolist() == LOSS_MASK
    assert task.prompt_lengths.tolist() == PROMPT_TOKENS and task.completion_lengths.tolist() == [1, 3, 1]
    assert task.n_counted.tolist() == [1, 3, 1] and task.corrupted is None and task.notes == []
    summary = task.scoring_summary()
    assert summary["n_prompt_tokens"] == PROMPT_TOKENS and summary["n_completion_tokens"] == [1, 3, 1]
    assert summary["n_counted"] == [1, 3, 1] and "completion" in summary["counted"]
    assert task.previews[0] == "the cat sat on the → mat"


def test_every_format_gives_the_same_samples(word_model, tmp_path):
    import datasets

    write_jsonl(tmp_path / "a.jsonl", RECORDS, blank_after=1)  # the blank line is counted: ids a:1, a:3, a:4
    write_csv(tmp_path / "a.csv", RECORDS)
    datasets.Dataset.from_list(RECORDS).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "a"))
    expected_ids = {"a.jsonl": ["a:1", "a:3", "a:4"], "a.csv": ["a:1", "a:2", "a:3"],
                    "a.parquet": ["a:1", "a:2", "a:3"], "a": ["a:1", "a:2", "a:3"]}
    for name, ids in expected_ids.items():
        task = read_task_file(tmp_path / name, word_model)
        assert task.tokens.tolist() == TOKENS and task.loss_mask.int().tolist() == LOSS_MASK, name
        assert task.ids == ids and task.name == "a", name
    assert read_task_file(tmp_path / "a.csv", word_model, max_samples=2).n_samples == 2


def test_csv_values_are_read_as_written(bpe_model, tmp_path):
    """A CSV completion of digits with a leading space or zero stays that text (a type-guessing reader would read
    " 04" as the number 4); an empty id cell falls back to the row."""
    model, tokenizer = bpe_model
    path = tmp_path / "n.csv"
    path.write_text('prompt,completion,id\nthe answer is, 04,first\n"the capital, is",7,\n')
    task = read_task_file(path, model)
    assert task.ids == ["first", "n:2"]
    for row, text in enumerate(["the answer is 04", "the capital, is7"]):
        expected = tokenizer(text)["input_ids"]
        assert task.tokens[row, :len(expected)].tolist() == expected and task.attention_mask[row].sum() == len(expected)


def test_ids_from_records_and_other_field_names(word_model, tmp_path):
    records = [{"question": r["prompt"], "answer": r["completion"], "id": f"q{i}"} for i, r in enumerate(RECORDS)]
    path = write_jsonl(tmp_path / "qa.jsonl", records)
    task = read_task_file(path, word_model, fields=RecordFields(prompt="question", completion="answer"))
    assert task.ids == ["q0", "q1", "q2"] and task.loss_mask.int().tolist() == LOSS_MASK
    with pytest.raises(TaskInputError, match=r"qa\.jsonl:1: no 'prompt' field \(fields: 'question', 'answer', 'id'\)"
                                             r".*--prompt-field"):
        read_task_file(path, word_model)


def test_bos_follows_the_models_default(word_model, tmp_path):
    """As for text lines: BOS is prepended when cfg.default_prepend_bos is True, not otherwise; the counted
    predictions move with it."""
    tokenizer, _ = word_tokenizer()
    path = write_jsonl(tmp_path / "a.jsonl", RECORDS[:1])
    assert read_task_file(path, word_model).tokens[0, 0].item() == tokenizer.bos_token_id
    word_model.cfg.default_prepend_bos = False
    try:
        task = read_task_file(path, word_model)
    finally:
        word_model.cfg.default_prepend_bos = True
    assert task.tokens.tolist() == [tokenizer("the cat sat on the mat", add_special_tokens=False)["input_ids"]]
    assert task.loss_mask.int().tolist() == [[0, 0, 0, 0, 1, 0]] and task.prompt_lengths.tolist() == [5]


def test_corrupted_prompts_give_the_corrupted_twins(word_model, tmp_path):
    records = [{**RECORDS[0], "corrupted_prompt": "the dog ran on the"}, {**RECORDS[2], "corrupted_prompt": "a cat"}]
    task = read_task_file(write_jsonl(tmp_path / "c.jsonl", records), word_model)
    assert task.corrupted.tolist() == [[0, 3, 5, 9, 7, 3, 8], [0, 11, 4, 9, 1, 1, 1]]
    assert task.tokens.tolist() == [TOKENS[0], TOKENS[2][:4] + [1, 1, 1]]
    assert task.scoring_summary()["corrupted_prompts"] is True


def test_a_token_across_the_boundary_is_counted_from_the_first_token_that_differs(bpe_model, tmp_path):
    """Byte-level BPE: "the answer is " + "paris" tokenises to ... " is", " paris" while the prompt alone ends in
    " is", " ": the completion starts at " paris", whose prediction is counted (TRL's cut at the prompt's token
    count would count nothing here). A prompt that is a prefix gets TRL's completion mask exactly."""
    model, tokenizer = bpe_model
    records = [{"prompt": "the capital of france is", "completion": " paris"},
               {"prompt": "the answer is ", "completion": "paris"},
               {"prompt": "the cap", "completion": "ital of france"}]
    path = write_jsonl(tmp_path / "bpe.jsonl", records)
    task = read_task_file(path, model)
    for row, record in enumerate(records):
        full = tokenizer(record["prompt"] + record["completion"])["input_ids"]
        assert task.tokens[row, :len(full)].tolist() == full  # the TRL way: prompt + completion tokenised together
    first_counted = [tokenizer.decode([int(task.tokens[i, p + 1])]) for i, p in
                     enumerate(task.loss_mask.int().argmax(1).tolist())]
    assert first_counted == [" paris", " paris", " capital"]
    assert task.n_counted.tolist() == [1, 1, 3]  # " capital", " of", " france"
    prompt_ids = tokenizer(records[0]["prompt"])["input_ids"]
    full = tokenizer(records[0]["prompt"] + records[0]["completion"])["input_ids"]
    trl_completion_mask = [0] * len(prompt_ids) + [1] * (len(full) - len(prompt_ids))  # TRL's rule
    assert task.loss_mask[0, :len(full) - 1].int().tolist() == trl_completion_mask[1:]
    assert len(task.notes) == 1 and f"{path}:2, {path}:3" in task.notes[0] and "2 record(s)" in task.notes[0]


def bad_records(tmp_path) -> dict:
    good = json.dumps(RECORDS[0])
    long_prompt = " ".join(["the cat"] * 10)  # 20 words + BOS > n_ctx = 16
    cases = {
        "bad JSON": ("bad.jsonl", f"{good}\n{{'prompt': 1}}\n", r"bad\.jsonl:2: not valid JSON"),
        "not an object": ("list.jsonl", f"{good}\n\n[1, 2]\n", r"list\.jsonl:3: expected a JSON object"),
        "no completion field": ("nofield.jsonl", f'{good}\n{{"prompt": "the cat"}}\n',
                                r"nofield\.jsonl:2: no 'completion' field"),
        "empty completion": ("empty.jsonl", '{"prompt": "the cat", "completion": ""}\n',
                             r"empty\.jsonl:1: empty completion"),
        "blank completion": ("blank.jsonl", '{"prompt": "the cat", "completion": "  "}\n',
                             r"blank\.jsonl:1: the completion '  ' adds no token"),
        "not text": ("number.jsonl", '{"prompt": "the cat", "completion": 4}\n',
                     r"number\.jsonl:1: field 'completion' must be text, got int"),
        "conversational": ("chat.jsonl", '{"prompt": [{"role": "user", "content": "hi"}], "completion": " a"}\n',
                           r"chat\.jsonl:1: field 'prompt' must be text, got list; conversational"),
        "longer than n_ctx": ("long.jsonl", json.dumps({"prompt": long_prompt, "completion": " sat"}) + "\n",
                              r"long\.jsonl:1: prompt \+ completion are 22 tokens \(1 of them the completion\), more "
                              r"than the model's n_ctx = 16"),
        "unknown word": ("unk.jsonl", f'{good}\n{{"prompt": "the zebra", "completion": " sat"}}\n',
                         r"unk\.jsonl:2: 1 token\(s\) the tokenizer does not know \('zebra'\)"),
        "corrupted of another length": ("twin.jsonl", json.dumps({**RECORDS[0], "corrupted_prompt": "the dog"}) + "\n",
                                        r"twin\.jsonl:1: corrupted_prompt \+ completion are 4 tokens"),
        "corrupted in some records only": (
            "some.jsonl", json.dumps({**RECORDS[0], "corrupted_prompt": "the dog ran on a"}) + "\n" + good + "\n",
            r"some\.jsonl:2: no 'corrupted_prompt', while .*some\.jsonl:1 has one"),
        "duplicate id": ("dup.jsonl", "".join(json.dumps({**r, "id": "x"}) + "\n" for r in RECORDS[:2]),
                         r"dup\.jsonl:2: id 'x' is already the id of .*dup\.jsonl:1"),
        "CSV without the field": ("nofield.csv", "prompt,answer\nthe cat, sat\n",
                                  r"nofield\.csv: row 1: no 'completion' field"),
        "empty CSV completion": ("empty.csv", "prompt,completion\nthe cat, sat\nthe dog,\n",
                                 r"empty\.csv: row 2: empty completion"),
    }
    for path, text, _ in cases.values():
        (tmp_path / path).write_text(text)
    return {case: (tmp_path / path, pattern) for case, (path, text, pattern) in cases.items()}


CASES = ["bad JSON", "not an object", "no completion field", "empty completion", "blank completion", "not text",
         "conversational", "longer than n_ctx", "unknown word", "corrupted of another length",
         "corrupted in some records only", "duplicate id", "CSV without the field", "empty CSV completion"]


@pytest.mark.parametrize("case", CASES)
def test_every_bad_record_is_one_line_naming_the_file_and_line(case, word_model, tmp_path):
    path, pattern = bad_records(tmp_path)[case]
    with pytest.raises(TaskInputError) as caught:
        read_task_file(path, word_model)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path)), message
    assert re.search(pattern, message), message


def test_directories_that_are_not_one_dataset(word_model, tmp_path):
    import datasets

    datasets.DatasetDict(train=datasets.Dataset.from_list(RECORDS), test=datasets.Dataset.from_list(RECORDS)) \
        .save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(TaskInputError, match=r"splits: a DatasetDict with splits \['test', 'train'\]; give one split"):
        read_task_file(tmp_path / "splits", word_model)
    assert read_task_file(tmp_path / "splits" / "train", word_model).tokens.tolist() == TOKENS
    (tmp_path / "folder").mkdir()
    with pytest.raises(TaskInputError, match=r"folder: cannot read as a datasets directory"):
        read_task_file(tmp_path / "folder", word_model)


def test_a_model_without_a_tokenizer_is_told_to_give_ids(tmp_path):
    model = builders.mha_under_test()
    model.tokenizer = None
    with pytest.raises(TaskInputError, match=r"a\.jsonl: is a prompt -> completion task but the model has no "
                                             "tokenizer"):
        read_task_file(write_jsonl(tmp_path / "a.jsonl", RECORDS), model)


def test_a_forced_format_and_the_commands_field_options(word_model, tmp_path):
    from tl_circuits.cli.command import parse_options

    path = write_jsonl(tmp_path / "records.txt", RECORDS)  # JSON Lines under another suffix
    assert read_task_file(path, word_model, fmt="jsonl").loss_mask.int().tolist() == LOSS_MASK
    options = parse_options(["--prompt-field", "question", "--completion-field", "answer", "--dtype", "bfloat16"])
    assert options.record_fields() == RecordFields(prompt="question", completion="answer")
    assert options.dtype == "bfloat16" and parse_options([]).record_fields() == RecordFields()
