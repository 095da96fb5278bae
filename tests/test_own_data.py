"""`diffkit train --dataset`: the user's own text (local jsonl / parquet / txt, a saved `datasets` dataset)
replaces the generic null text in the stream and the held-out metrics; bad datasets fail before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from diffkit.cli import main
from diffkit.errors import DiffkitError
from diffkit.models import load_pair
from diffkit.own_data import dataset_texts
from diffkit.stream import RecordStream, null_records

TOPICS = ["lighthouse", "marmalade", "glacier", "violin", "orchard", "comet"]


def chat_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Tell me about the {TOPICS[i % 6]} number {i}."},
                          {"role": "assistant", "content": f"The {TOPICS[i % 6]} {i} is quiet today."}]}
            for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer(toy_organism):
    return load_pair(str(toy_organism / "base"), str(toy_organism / "finetuned")).tokenizer


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_messages_render_without_a_chat_template(tokenizer, tmp_path, capsys):
    assert not tokenizer.chat_template  # the toy tokenizer has none: plain role-prefixed lines
    texts = dataset_texts(str(write_jsonl(tmp_path / "chat.jsonl", chat_rows(30))), tokenizer)
    assert len(texts) == 30
    assert texts[3] == "user: Tell me about the violin number 3.\nassistant: The violin 3 is quiet today."
    assert "no chat template" in capsys.readouterr().err


def test_chat_template_is_used_when_the_tokenizer_has_one(tokenizer, tmp_path):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    texts = dataset_texts(str(write_jsonl(tmp_path / "chat.jsonl", chat_rows(2))), tokenizer)
    assert texts[0] == "<user>Tell me about the lighthouse number 0.<assistant>The lighthouse 0 is quiet today."


def test_parquet_txt_and_saved_dataset(tokenizer, tmp_path):
    import datasets

    docs = [f"Document {i} speaks of the {TOPICS[i % 6]}." for i in range(25)]
    pd.DataFrame({"body": docs, "n": range(25)}).to_parquet(tmp_path / "docs.parquet")
    assert dataset_texts(str(tmp_path / "docs.parquet"), tokenizer, text_field="body") == docs
    (tmp_path / "docs.txt").write_text("\n\n".join(docs) + "\n")
    assert dataset_texts(str(tmp_path / "docs.txt"), tokenizer) == docs
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs}),
                          "test": datasets.Dataset.from_dict({"text": docs[:3]})}).save_to_disk(str(tmp_path / "saved"))
    assert dataset_texts(str(tmp_path / "saved"), tokenizer) == docs
    assert dataset_texts(str(tmp_path / "saved"), tokenizer, split="test") == docs[:3]
    assert dataset_texts(str(tmp_path / "saved"), tokenizer, max_docs=4) == docs[:4]


@pytest.mark.parametrize("args, message", [
    (["--text-field", "body"], "has no field 'body'; its fields: messages; name one with --text-field"),
    (["--dataset-split", "validation"], "no split 'validation'"),
])
def test_bad_datasets_fail_in_one_line(tokenizer, tmp_path, args, message):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(chat_rows(30))}).save_to_disk(str(tmp_path / "saved"))
    split = args[1] if args[0] == "--dataset-split" else "train"
    field = args[1] if args[0] == "--text-field" else None
    with pytest.raises(DiffkitError, match=message):
        dataset_texts(str(tmp_path / "saved"), tokenizer, split=split, text_field=field)


def test_stream_null_text_is_the_dataset(tokenizer, tmp_path):
    from diffkit.specs import load_spec

    texts = dataset_texts(str(write_jsonl(tmp_path / "chat.jsonl", chat_rows(40))), tokenizer)
    stream = RecordStream(load_spec("toy"), tokenizer, seed=0, max_len=64, null_fraction=0.5, answered=[],
                          prompts_per_condition=4, own_texts=texts)
    null = [r for r in stream.epoch_records(0) if r.condition == "null"]
    assert null and all(any(t in tokenizer.decode(r.input_ids) for t in TOPICS) for r in null)
    assert not any("number 0." in tokenizer.decode(r.input_ids) for r in null)  # held out
    heldout = {tokenizer.decode(r.input_ids, skip_special_tokens=True) for r in null_records(tokenizer, 64, "heldout", texts)}
    assert heldout == {texts[0].lower(), texts[20].lower()}  # every 20th document (the toy tokenizer lowercases)


@pytest.mark.slow
def test_train_on_own_chat_data(toy_organism, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(60))
    args = ["train", "--dataset", str(data), "--layers", "2", "--k", "8", "--expansion", "4", "--tokens", "4096",
            "--batch-size", "512", "--buffer-tokens", "4096", "--trace-batch", "16", "--eval-tokens", "2048",
            "--answered-prompts", "0", "--out", str(tmp_path / "runs"), "--json"]
    assert main(args) == 0
    record = json.loads((tmp_path / "runs" / "toy" / "run.json").read_text())
    assert record["config"]["dataset"] == str(data)
    assert 0 < record["metrics"]["layer_2"]["fve"] <= 1


def test_train_with_a_bad_dataset_writes_nothing(toy_organism, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(30))
    for extra in (["--dataset", str(data), "--text-field", "prompt"], ["--dataset", str(tmp_path / "none.jsonl")],
                  ["--dataset", str(data), "--null-fraction", "0"]):
        assert main(["train", *extra, "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.startswith("error: ") for line in err] == [True] * 3, err
    assert not (tmp_path / "runs").exists()
