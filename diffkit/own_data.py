"""The user's own text for the generic part of the training stream (`diffkit train --dataset SOURCE`).

SOURCE is a hub dataset id (streamed with `datasets`, nothing downloaded in full), a local `.jsonl`,
`.parquet` or `.txt` file (blank-line-separated paragraphs), or a folder written by
`datasets.Dataset.save_to_disk`. Each row gives one document: its `--text-field` (default `text`, else
`messages`). A list of chat messages (`[{"role": ..., "content": ...}]`) is rendered with the tokenizer's
chat template; a tokenizer without one gets plain `role: content` lines.
"""

from __future__ import annotations

import sys
from itertools import islice
from pathlib import Path

from diffkit.errors import DiffkitError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def dataset_texts(source: str, tokenizer, split: str = "train", text_field: str | None = None,
                  max_docs: int = 10_000) -> list[str]:
    """Up to `max_docs` documents of SOURCE as plain text, in the dataset's order."""
    rows = _rows(source, split)
    try:
        first = next(iter(rows))
    except StopIteration:
        raise DiffkitError(f"dataset {source} ({split}) has no rows") from None
    field = text_field or next((f for f in ("text", "messages") if f in first), None)
    if field is None or field not in first:
        asked = f"no field {text_field!r}" if text_field else "neither a 'text' nor a 'messages' field"
        raise DiffkitError(f"dataset {source} has {asked}; its fields: {', '.join(first)}; name one with --text-field")
    render = ChatRenderer(tokenizer)
    texts = []
    try:
        for row in islice(rows, max_docs):
            value = row[field]
            texts.append(render(value) if isinstance(value, list) else str(value))
    except DiffkitError:
        raise
    except Exception as e:  # datasets reports a malformed file only when it reaches the bad row
        raise DiffkitError(f"cannot read dataset {source}: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        raise DiffkitError(f"the {field!r} field of dataset {source} is empty in every row")
    return texts


def _rows(source: str, split: str):
    """An iterable of row dicts: streamed for files and hub ids, memory-mapped for a saved dataset."""
    import datasets

    path = Path(source)
    try:
        if path.is_dir():
            saved = datasets.load_from_disk(str(path))
            if isinstance(saved, datasets.DatasetDict):
                if split not in saved:
                    raise DiffkitError(f"dataset {source} has no split {split!r}; its splits: {', '.join(saved)}; "
                                       f"choose one with --dataset-split")
                saved = saved[split]
            return saved
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix)
            if builder is None:
                raise DiffkitError(f"cannot read {source}: use a .jsonl, .parquet or .txt file, a saved dataset folder or a hub id")
            extra = {"sample_by": "paragraph"} if builder == "text" else {}
            return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True, **extra)
        if path.suffix in FILE_BUILDERS or source.startswith((".", "/")):
            raise DiffkitError(f"no file {source}")
        return datasets.load_dataset(source, split=split, streaming=True)
    except DiffkitError:
        raise
    except Exception as e:  # not found, offline, gated, bad split: the library's reason on one line
        raise DiffkitError(f"cannot open dataset {source} (split {split}): {type(e).__name__}: "
                           f"{' '.join(str(e).split())[:200]}") from None


class ChatRenderer:
    """Chat messages → one string, with the tokenizer's template when it has one (BOS left to the encoder)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.warned = False

    def __call__(self, messages: list) -> str:
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise DiffkitError("a chat row must be a list of {'role': ..., 'content': ...} messages")
        if self.has_template:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
            bos = self.tokenizer.bos_token
            return text[len(bos):] if bos and text.startswith(bos) else text
        if not self.warned:
            print("note: the tokenizer has no chat template; chat messages are rendered as 'role: content' lines",
                  file=sys.stderr)
            self.warned = True
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
