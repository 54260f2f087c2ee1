"""Reading, checking, encoding and packing a user's own files for :class:`~lightning_peft.tasks.LocalData`.

Files are read and mapped by Hugging Face ``datasets`` (its formats, its cache): JSON Lines, JSON, CSV, Parquet,
plain text, or a folder written by ``Dataset.save_to_disk``. Two kinds of data:

- **instruction**: records with ``prompt`` and ``completion`` fields, or chat ``messages`` rendered with the
  tokenizer's chat template. The loss is on the completion / assistant tokens only (``train_on_prompt`` trains
  on everything). Examples longer than ``max_length`` are cut (and counted); one per batch row, right-padded.
- **text** (continued pretraining): documents (a record's ``text`` field, or a plain-text file's paragraphs)
  tokenized, each followed by EOS, concatenated and cut into windows of ``max_length`` tokens (no padding).

Every record is checked while it is encoded, in ``setup``, i.e. before the model sees a batch: a broken one
stops the run with a :class:`~lightning_peft.tasks.records.DataError` naming the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.nn.utils.rnn import pad_sequence

from ._common import resolve_pretrained_path, set_offline
from .records import (
    IGNORE_INDEX,
    DataError,
    FieldNames,
    check_messages,
    check_pair,
    check_text,
    encode_chat,
    encode_pair,
    encode_text,
)

__all__ = ["DataKind", "Source", "collate_examples", "detect_kind", "load_tokenizer", "pack_windows", "read_file"]

DataKind = Literal["auto", "instruction", "text"]

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".md": "text"}
"""File suffix -> the ``datasets`` builder that reads it."""


def load_tokenizer(path: str) -> Any:
    """The fast tokenizer of a local model folder (offsets are needed to mask the prompt)."""
    set_offline()
    from transformers import AutoTokenizer

    folder = resolve_pretrained_path(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if not tokenizer.is_fast:
        raise DataError(f"the tokenizer in {folder} is not a fast tokenizer; prompt masking needs offset mappings")
    return tokenizer


# -- reading ------------------------------------------------------------------------------------------------


def _jsonl_line_numbers(path: Path) -> list[int] | None:
    """1-based line numbers of the non-blank lines of a JSON Lines file (record i is on line ``numbers[i]``);
    ``None`` for a JSON document (a top-level array)."""
    with path.open(encoding="utf-8") as f:
        lines = f.readlines()
    first = next((line.lstrip() for line in lines if line.strip()), "")
    if first.startswith("["):
        return None
    return [i + 1 for i, line in enumerate(lines) if line.strip()]


def _bad_json_line(path: Path) -> str | None:
    """Where ``path`` stops being JSON (Lines), as ``line N: reason``; ``None`` if it parses."""
    text = path.read_text(encoding="utf-8")
    try:
        json.loads(text)
        return None
    except json.JSONDecodeError as err:
        whole = err
    if text.lstrip().startswith("["):
        return f"line {whole.lineno}: bad JSON ({whole.msg})"
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {number}: bad JSON ({err.msg} at column {err.colno})"
        if not isinstance(record, dict):
            return f"line {number}: a JSON Lines record must be an object, got {type(record).__name__}"
    return None


@dataclass
class Source:
    """A loaded file: its rows and how to name row ``i`` in an error message."""

    path: Path
    rows: Any  # datasets.Dataset
    line_numbers: list[int] | None = None
    unit: str = "record"

    def where(self, index: int) -> str:
        if self.line_numbers is not None:
            return f"{self.path} line {self.line_numbers[index]}"
        return f"{self.path} {self.unit} {index + 1}"


def read_file(path: str | Path) -> Source:
    """Load a file (or ``save_to_disk`` folder) with ``datasets``; unreadable input is a :class:`DataError`."""
    import datasets

    path = Path(path).expanduser()
    if path.is_dir():
        try:
            rows = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({err})") from err
        if isinstance(rows, datasets.DatasetDict):
            if "train" not in rows:
                raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {sorted(rows)})")
            rows = rows["train"]
        return Source(path, rows, unit="row")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use one of {sorted(BUILDERS)} or a folder")
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        rows = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as err:  # datasets wraps the reader's error; name the line where we can
        bad = _bad_json_line(path) if builder == "json" else None
        raise DataError(f"{path} {bad}" if bad else f"{path}: cannot be read as {builder}: {err}") from err
    if builder == "json":
        return Source(path, rows, _jsonl_line_numbers(path))
    return Source(path, rows, unit={"csv": "data row", "text": "paragraph"}.get(builder, "row"))


def detect_kind(source: Source, kind: DataKind, fields: FieldNames) -> Literal["instruction", "text"]:
    """``auto``: plain-text files and records with only a text field are text; prompt/messages are instruction."""
    if kind != "auto":
        return kind
    columns = set(source.rows.column_names)
    if {fields.messages, fields.prompt, fields.completion} & columns:
        return "instruction"
    if fields.text in columns:
        return "text"
    raise DataError(
        f"{source.path}: cannot tell instruction from text data: columns {sorted(columns)} hold none of "
        f"{fields.prompt!r}/{fields.completion!r}, {fields.messages!r} or {fields.text!r} (set the *_field names)"
    )


# -- encoding -----------------------------------------------------------------------------------------------


def instruction_encoder(
    tokenizer: Any, fields: FieldNames, source: Source, max_length: int, train_on_prompt: bool
) -> Callable[[dict[str, Any], int], dict[str, Any]]:
    """The per-record ``datasets.map`` function: check the record, then encode it as a chat or a pair."""

    def encode(record: dict[str, Any], index: int) -> dict[str, Any]:
        where = source.where(index)
        if record.get(fields.messages) is not None:
            messages = check_messages(record[fields.messages], fields.messages, where)
            if tokenizer.chat_template is None:
                raise DataError(f"{where}: a chat record, but the tokenizer has no chat template")
            return encode_chat(tokenizer, messages, max_length, where, train_on_prompt).as_row()
        prompt, completion = check_pair(record, fields, where)
        return encode_pair(tokenizer, prompt, completion, max_length, train_on_prompt).as_row()

    return encode


def text_encoder(tokenizer: Any, fields: FieldNames, source: Source) -> Callable[[dict[str, Any], int], dict]:
    def encode(record: dict[str, Any], index: int) -> dict[str, Any]:
        return {"input_ids": encode_text(tokenizer, check_text(record, fields.text, source.where(index)))}

    return encode


def pack_windows(batch: dict[str, list[list[int]]], length: int) -> dict[str, list[list[int]]]:
    """``datasets.map(batched=True)``: concatenate a batch of documents and cut ``length``-token windows
    (the batch's tail shorter than a window is dropped, as in transformers' ``run_clm`` example)."""
    stream = [token for ids in batch["input_ids"] for token in ids]
    n = len(stream) // length
    windows = [stream[i * length : (i + 1) * length] for i in range(n)]
    return {"input_ids": windows, "labels": windows}


def split_rows(rows: Any, val_fraction: float, seed: int, path: Path) -> tuple[Any, Any]:
    """Seeded train/validation split of encoded rows (at least one row on each side)."""
    if len(rows) < 2:
        raise DataError(f"{path}: {len(rows)} usable example(s); need at least 2 to hold out a validation split")
    n_val = min(len(rows) - 1, max(1, round(val_fraction * len(rows))))
    parts = rows.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


# -- collation ----------------------------------------------------------------------------------------------


def collate_examples(pad_id: int) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Right-pad ``input_ids`` with ``pad_id`` and ``labels`` with the ignore index; mask the padding."""

    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [torch.as_tensor(item["input_ids"], dtype=torch.long) for item in items]
        labels = [torch.as_tensor(item["labels"], dtype=torch.long) for item in items]
        return {
            "input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_id),
            "attention_mask": pad_sequence([torch.ones_like(t) for t in ids], batch_first=True, padding_value=0),
            "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
        }

    return collate
