"""Byte-level language-modelling text that every Python installation has, no download needed.

Sources:

- ``"topics"``: ``pydoc_data.topics.topics``, the help texts behind ``help("assert")`` etc. (about 80 documents,
  0.47 MB on CPython 3.11), generated from the Language and Library References.
- ``"docstrings"``: the docstrings (``inspect.getdoc``) of a fixed list of standard-library modules and of their
  public classes and functions (about 1,000 documents, 0.3 MB on CPython 3.11).
- ``"both"``: the two together.

Both sources change with the Python version (the topics are regenerated for each release, docstrings are edited),
so perplexities are comparable only between runs on the same Python version. Within one version the corpus is
deterministic: documents are gathered in a fixed order, exact duplicates dropped.

Text is encoded as UTF-8 bytes (vocabulary 256, no unknown token). Documents are split into train and validation
at document level (seeded), each split is concatenated with a NUL byte after every document (the text never
contains one, so it marks the document boundary) and cut into non-overlapping windows of ``seq_len`` bytes; the
tail shorter than a window is dropped.
"""

from __future__ import annotations

import importlib
import inspect
import random
import warnings
from collections.abc import Iterable
from typing import Literal

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from ._common import make_loader

__all__ = ["DOCSTRING_MODULES", "ByteCorpus", "ByteTokenizer", "corpus_documents", "split_documents", "to_windows"]

CorpusSource = Literal["topics", "docstrings", "both"]

DOCSTRING_MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "glob",
    "hashlib", "heapq", "hmac", "html", "http.client", "inspect", "io", "ipaddress", "itertools", "json",
    "logging", "math", "operator", "os", "pathlib", "pickle", "pprint", "random", "re", "shlex", "shutil",
    "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "time", "timeit", "tokenize", "typing", "unittest", "urllib.parse", "uuid", "warnings",
    "weakref", "xml.etree.ElementTree", "zipfile", "zlib",
)  # fmt: skip
"""Standard-library modules whose docstrings form the ``"docstrings"`` source (all present on CPython 3.9+)."""


class ByteTokenizer:
    """UTF-8 bytes as token ids (0-255). The NUL byte (id 0) ends every document and doubles as padding."""

    pad_token_id: int = 0
    eos_token_id: int = 0
    bos_token_id: int = 0

    def __len__(self) -> int:
        return 256

    @property
    def vocab_size(self) -> int:
        """256: one id per byte value."""
        return 256

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int] | torch.Tensor, placeholder: str | None = None) -> str:
        """Bytes back to text; invalid UTF-8 (a window may cut a character) becomes U+FFFD.

        ``placeholder`` is accepted for :class:`~lightning_peft.tasks.CausalLM`'s interface; bytes need none.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


def _topic_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _docstring_documents() -> list[str]:
    """Docstrings of each module in :data:`DOCSTRING_MODULES` and of its public classes and functions, in
    name order (only objects the module itself defines, so re-exports are not counted twice)."""
    docs = []
    for module_name in DOCSTRING_MODULES:
        module = importlib.import_module(module_name)
        objects = [module]
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
                objects.append(obj)
        with warnings.catch_warnings():  # reading a deprecated alias's docstring (typing.io, ...) warns
            warnings.simplefilter("ignore", DeprecationWarning)
            docs.extend(doc for doc in map(inspect.getdoc, objects) if doc)
    return docs


def corpus_documents(source: CorpusSource = "both") -> list[str]:
    """The documents of ``source`` in a fixed order, empty ones and exact duplicates dropped.

    Raises:
        ValueError: ``source`` is not ``"topics"``, ``"docstrings"`` or ``"both"``.
    """
    if source not in ("topics", "docstrings", "both"):
        raise ValueError(f"ByteCorpus source must be 'topics', 'docstrings' or 'both', got {source!r}")
    docs = []
    if source in ("topics", "both"):
        docs += _topic_documents()
    if source in ("docstrings", "both"):
        docs += _docstring_documents()
    return list(dict.fromkeys(d.replace("\x00", "") for d in docs if d.strip()))


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle ``docs`` with ``random.Random(seed)`` and put the first ``round(val_fraction * n)`` (at least one)
    in validation, the rest in training; each list keeps the shuffled order."""
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to split into train and validation, got {len(docs)}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    return [docs[i] for i in order[n_val:]], [docs[i] for i in order[:n_val]]


def to_windows(docs: list[str], seq_len: int, tokenizer: ByteTokenizer) -> torch.Tensor:
    """``(n, seq_len)`` uint8 windows of the documents' bytes, each document followed by the EOS byte."""
    stream = bytearray()
    for doc in docs:
        stream += doc.encode("utf-8")  # = tokenizer.encode(doc), without the list
        stream.append(tokenizer.eos_token_id)
    n = len(stream) // seq_len
    return torch.frombuffer(stream, dtype=torch.uint8)[: n * seq_len].view(n, seq_len).clone()


class _Windows(Dataset):
    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.windows[index]


def _lm_collate(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    input_ids = torch.stack(items).long()
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}


class WindowedBytes(LightningDataModule):
    """Byte-level language-modelling windows; a subclass says which documents train and which validate.

    Shared by :class:`ByteCorpus` and the testbed's source data: the tokenizer, the windows, the
    loaders (batches of ``input_ids``, ``attention_mask``, ``labels``). Subclasses call
    ``save_hyperparameters()`` in their own ``__init__`` (so ``seq_len``, ``batch_size``, ``seed`` and
    ``num_workers`` are theirs) and implement :meth:`split`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer = ByteTokenizer()
        self.train_windows: torch.Tensor | None = None
        self.val_windows: torch.Tensor | None = None

    @property
    def vocab_size(self) -> int:
        """256 (link this to the model's ``vocab_size``)."""
        return self.tokenizer.vocab_size

    def split(self) -> tuple[list[str], list[str]]:
        """The (training, validation) documents."""
        raise NotImplementedError

    def keep(self, train: torch.Tensor, val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows kept of each split (all of them by default)."""
        return train, val

    def setup(self, stage: str | None = None) -> None:
        if self.train_windows is not None:
            return
        train_docs, val_docs = self.split()
        seq_len = self.hparams.seq_len
        train, val = to_windows(train_docs, seq_len, self.tokenizer), to_windows(val_docs, seq_len, self.tokenizer)
        self.train_windows, self.val_windows = self.keep(train, val)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return make_loader(self, _Windows(self.train_windows), _lm_collate, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return make_loader(self, _Windows(self.val_windows), _lm_collate)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class ByteCorpus(WindowedBytes):
    """Byte-level causal language modelling on Python's own documentation (see the module docstring).

    Batches are dicts with ``input_ids``, ``attention_mask`` (all ones: windows are never padded) and ``labels``
    (equal to ``input_ids``; the Hugging Face model shifts them), as
    :class:`~lightning_peft.tasks.CausalLM` expects; give it ``vocab_size=256`` and
    ``max_position_embeddings >= seq_len``. The mean validation loss is in nats per byte, so
    ``exp(val_loss)`` is the per-byte perplexity.

    Args:
        seq_len: Bytes per window.
        batch_size: Batch size of every data loader.
        val_fraction: Share of documents (not bytes) held out for validation and test.
        seed: Seed of the document split and of the training shuffle (epoch k's order is drawn from
            ``seed + k``).
        num_workers: Data loader worker processes.
        max_train_windows: Keep only the first this many training windows (``None``: all).
        source: ``"topics"``, ``"docstrings"`` or ``"both"``.
    """

    def __init__(
        self,
        seq_len: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        max_train_windows: int | None = None,
        source: CorpusSource = "both",
    ) -> None:
        super().__init__()
        if seq_len < 2:
            raise ValueError(f"ByteCorpus seq_len must be >= 2 (one next-byte target), got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"ByteCorpus batch_size must be >= 1, got {batch_size}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"ByteCorpus val_fraction must be in (0, 1), got {val_fraction}")
        if max_train_windows is not None and max_train_windows < 1:
            raise ValueError(f"ByteCorpus max_train_windows must be >= 1 or None, got {max_train_windows}")
        if source not in ("topics", "docstrings", "both"):
            raise ValueError(f"ByteCorpus source must be 'topics', 'docstrings' or 'both', got {source!r}")
        self.save_hyperparameters()

    def split(self) -> tuple[list[str], list[str]]:
        hp = self.hparams
        return split_documents(corpus_documents(hp.source), hp.val_fraction, hp.seed)

    def keep(self, train: torch.Tensor, val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hp = self.hparams
        if len(train) == 0 or len(val) == 0:
            raise ValueError(
                f"ByteCorpus(seq_len={hp.seq_len}, val_fraction={hp.val_fraction}) leaves an empty split "
                f"({len(train)} train, {len(val)} validation windows); lower seq_len or change val_fraction"
            )
        return (train if hp.max_train_windows is None else train[: hp.max_train_windows]), val
