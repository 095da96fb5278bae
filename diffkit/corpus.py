"""The null split: generic English text that shows what the difference looks like off-trigger.

With a network, the null texts stream from FineWeb (`HuggingFaceFW/fineweb`, sample-10BT).
Offline, which is the default, they come from a corpus shipped with diffkit: about 0.9 M words
of freely licensed English prose (game narrative, encyclopedic histories, manuals, folklore and
scripture) taken from Debian packages; see diffkit/data/NULL_CORPUS.md.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

from diffkit.errors import DiffkitError
from diffkit.prompts import FLAG_NAMES, Record

DATA_DIR = Path(__file__).with_name("data")
LOCAL_CORPUS = DATA_DIR / "null_corpus.jsonl.gz"
FINEWEB = ("HuggingFaceFW/fineweb", "sample-10BT")
NULL_FIRST_ID = 2_000_000  # null record ids start here, clear of train and heldout prompt ids
SOURCES = ("auto", "local", "fineweb")


def _resolve_source(source: str) -> str:
    if source not in SOURCES:
        raise DiffkitError(f"unknown null-text source '{source}'; use one of: {', '.join(SOURCES)}")
    if source == "auto":
        source = os.environ.get("DIFFKIT_NULL_SOURCE", "local").strip().lower() or "local"
        if source not in ("local", "fineweb"):
            raise DiffkitError(f"DIFFKIT_NULL_SOURCE='{source}' is not a source; set it to 'local' or 'fineweb'")
    return source


def null_texts(n_docs: int | None = None, seed: int = 0, source: str = "auto") -> list[str]:
    """Up to n_docs generic English documents, in an order fixed by seed.

    "auto" uses the shipped corpus unless DIFFKIT_NULL_SOURCE=fineweb, so a default run never
    waits on a network. The local corpus holds ~3,800 documents; asking for more returns all.
    """
    source = _resolve_source(source)
    if n_docs is not None and n_docs < 0:
        raise DiffkitError(f"n_docs must be >= 0, got {n_docs}")
    if source == "fineweb":
        return _fineweb_texts(10_000 if n_docs is None else n_docs, seed)
    with gzip.open(LOCAL_CORPUS, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    random.Random(seed).shuffle(texts)
    return texts if n_docs is None else texts[:n_docs]


def _fineweb_texts(n_docs: int, seed: int) -> list[str]:
    from datasets import load_dataset

    try:
        stream = load_dataset(FINEWEB[0], name=FINEWEB[1], split="train", streaming=True)
        stream = stream.shuffle(seed=seed, buffer_size=10_000)
        return [row["text"] for row, _ in zip(stream, range(n_docs))]
    except Exception as e:  # offline, gated or renamed: say how to fall back
        raise DiffkitError(f"cannot stream {FINEWEB[0]} ({type(e).__name__}: {e}); "
                           f"unset DIFFKIT_NULL_SOURCE or pass source='local' to use the shipped corpus") from None


def provenance() -> dict:
    """Where the shipped corpus comes from: sources, Debian packages, licences, sizes, trigger-word counts."""
    return json.loads((DATA_DIR / "null_corpus.json").read_text())


def encode_null(texts: list[str], tokenizer, max_len: int = 128, first_record_id: int = NULL_FIRST_ID,
                min_tokens: int = 8, windows_per_text: int | None = None) -> list[Record]:
    """Cut each text into consecutive windows of at most max_len tokens, each its own record.

    A text gives several records unless windows_per_text=1 (then each text is one record, cut at
    max_len, and records line up with texts). Every window starts with <bos> when the tokenizer
    adds one, like a prompt does, so the null split sees the same position-0 token as the others.
    Windows shorter than min_tokens (a document's tail) are dropped. Null records carry no flags
    (all False), pair_id -1, and count every token as prompt (n_prompt_tokens = length).
    """
    bos = tokenizer.bos_token_id
    probe = tokenizer("a")["input_ids"]
    prefix = [bos] if bos is not None and probe and probe[0] == bos else []
    width = max_len - len(prefix)
    if width < 1:
        raise DiffkitError(f"max_len={max_len} leaves no room for text after <bos>")
    records, record_id = [], first_record_id
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        for start in range(0, max(len(ids), 1), width)[:windows_per_text]:  # an empty text still gets one
            window = prefix + ids[start:start + width]
            if len(window) < min_tokens and windows_per_text != 1:
                continue
            n = len(window)
            records.append(Record(record_id, window, "null", -1, {f: [False] * n for f in FLAG_NAMES}, n))
            record_id += 1
    return records
