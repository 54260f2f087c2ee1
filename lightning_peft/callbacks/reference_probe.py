"""Forgetting on the user's own reference text: the model's loss on held-out text, before and during fine-tuning.

`ReferenceLoss` is a `PriorKnowledge` probe for `ForgettingMonitor`. It turns reference text into a
fixed, seeded sample of token windows once, and measures the model's mean log-likelihood of it
(`ref_logprob`, nats per token or per byte: minus the usual loss, so that higher = better kept
as for every probe). The monitor logs `forget/ref_logprob` and `forget/ref_logprob_change`;
`-forget/ref_logprob_change` is how much the loss on the reference text rose since fit start,
the forgetting measure of "LoRA Learns Less and Forgets Less" (arXiv:2405.09673).

The probe takes what it measures as arguments: `texts`, text `files`, a `datasets` folder
(`save_to_disk`) or ready `token_ids`, and a `tokenize` function (or `"bytes"` for UTF-8
bytes, a tokenizer folder, or `None` for the datamodule's `tokenizer`). Built-in reference
corpora are probes of the tasks that own them (`lightning_peft.tasks`). See docs/forgetting.md.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from .forgetting import PriorKnowledge

__all__ = ["ReferenceError", "ReferenceLoss", "read_reference_texts", "sample_windows", "window_logprob"]

Tokenize = Callable[[str], Sequence[int]]


class ReferenceError(ValueError):
    """Reference text that cannot be measured (missing file, empty or repeated text, nothing to sample)."""


def read_reference_texts(
    texts: Sequence[str] | None = None,
    files: Sequence[str | Path] | None = None,
    dataset: str | Path | None = None,
    text_column: str = "text",
) -> list[str]:
    """The reference texts from exactly one source, checked: none empty, no two identical, at least one."""
    given = [name for name, value in (("texts", texts), ("files", files), ("dataset", dataset)) if value is not None]
    if len(given) != 1:
        raise ReferenceError(f"ReferenceLoss: give exactly one of texts, files, dataset (or token_ids); got {given}")
    if files is not None:
        out, names = [], [str(f) for f in files]
        for name in names:
            path = Path(name).expanduser()
            if not path.is_file():
                raise ReferenceError(f"ReferenceLoss: reference file {name!r} does not exist")
            out.append(path.read_text(encoding="utf-8"))
    elif dataset is not None:
        out, names = _dataset_texts(Path(dataset).expanduser(), text_column)
    else:
        out = list(texts)
        names = [f"texts[{i}]" for i in range(len(out))]
    _check_texts(out, names)
    return out


def _dataset_texts(folder: Path, column: str) -> tuple[list[str], list[str]]:
    if not folder.is_dir():
        raise ReferenceError(f"ReferenceLoss: dataset folder {str(folder)!r} does not exist")
    from datasets import Dataset, DatasetDict, load_from_disk

    data = load_from_disk(str(folder))
    if isinstance(data, DatasetDict):
        if len(data) != 1:
            raise ReferenceError(f"ReferenceLoss: {str(folder)!r} holds splits {sorted(data)}; save one split")
        data = next(iter(data.values()))
    assert isinstance(data, Dataset)
    if column not in data.column_names:
        raise ReferenceError(f"ReferenceLoss: dataset {str(folder)!r} has no column {column!r} ({data.column_names})")
    return list(data[column]), [f"{folder}[{i}].{column}" for i in range(len(data))]


def _check_texts(texts: list[str], names: list[str]) -> None:
    if not texts:
        raise ReferenceError("ReferenceLoss: no reference texts (zero items)")
    seen: dict[str, str] = {}
    for text, name in zip(texts, names, strict=True):
        if not isinstance(text, str) or not text.strip():
            raise ReferenceError(f"ReferenceLoss: reference text {name} is empty")
        if text in seen:
            raise ReferenceError(f"ReferenceLoss: reference texts {seen[text]} and {name} are identical")
        seen[text] = name


def sample_windows(streams: Sequence[Sequence[int]], seq_len: int, num_windows: int, seed: int) -> Tensor:
    """`(n, seq_len)` windows: the streams concatenated, cut into non-overlapping windows, `num_windows` of
    them drawn without replacement by a `torch.Generator` seeded with `seed` (all when there are fewer)."""
    flat = torch.tensor([i for ids in streams for i in ids], dtype=torch.long)
    count = len(flat) // seq_len
    if count == 0:
        raise ReferenceError(f"ReferenceLoss: the reference has {len(flat)} tokens, fewer than one window ({seq_len})")
    windows = flat[: count * seq_len].view(count, seq_len)
    pick = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:num_windows]
    return windows[pick.sort().values]


def _logits(pl_module: pl.LightningModule, input_ids: Tensor) -> Tensor:
    out = pl_module(input_ids=input_ids)
    return out.logits if hasattr(out, "logits") else out


def window_logprob(pl_module: pl.LightningModule, windows: Tensor, batch_size: int) -> tuple[float, int]:
    """(summed log-probability of every next token in `windows`, number of predicted tokens)."""
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size].to(pl_module.device)
        logits = _logits(pl_module, ids)[:, :-1].float()
        total -= float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return total, count


def _tokenize_fn(tokenize: Tokenize | str | None, pl_module: pl.LightningModule) -> Tokenize:
    if callable(tokenize):
        return tokenize
    if tokenize == "bytes":
        return lambda text: list(text.encode("utf-8"))
    if isinstance(tokenize, str):
        if not Path(tokenize).expanduser().is_dir():
            raise ReferenceError(f"ReferenceLoss: tokenize={tokenize!r} is not 'bytes' nor a tokenizer folder")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(Path(tokenize).expanduser()), local_files_only=True)
        return lambda text: tok.encode(text, add_special_tokens=False)
    datamodule = getattr(pl_module.trainer, "datamodule", None)
    tokenizer = getattr(datamodule, "tokenizer", None)
    if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
        raise ReferenceError("ReferenceLoss: no `tokenize` given and the datamodule has no `tokenizer.encode`")
    return tokenizer.encode


class ReferenceLoss(PriorKnowledge):
    """Mean log-likelihood of a fixed, seeded sample of reference text (`ref_logprob` = -loss).

    Args:
        texts / files / dataset: the reference text, one source: strings, UTF-8 text files, or a
            `datasets.save_to_disk` folder with a `text_column`.
        token_ids: instead of text, ready token id sequences (one per document).
        tokenize: text -> token ids; `"bytes"` (UTF-8 bytes), a tokenizer folder, or `None` (the
            datamodule's `tokenizer.encode`, resolved at fit start).
        separator_id: a token appended after every document (e.g. EOS), `None` for none.
        seq_len: tokens per window (the model sees each window on its own).
        num_windows: windows in the sample (a fixed, seeded draw; fewer when the text is short).
        seed: seed of the draw.
        unit: `"token"` (nats per predicted token) or `"byte"` (nats per UTF-8 byte: the token
            log-likelihood times tokens/bytes of the whole reference, bits-per-byte style).
        batch_size: windows per forward pass.
    """

    def __init__(
        self,
        texts: Sequence[str] | None = None,
        files: Sequence[str] | None = None,
        dataset: str | None = None,
        text_column: str = "text",
        token_ids: Sequence[Sequence[int]] | None = None,
        tokenize: Tokenize | str | None = None,
        separator_id: int | None = None,
        seq_len: int = 128,
        num_windows: int = 64,
        seed: int = 0,
        unit: Literal["token", "byte"] = "token",
        batch_size: int = 16,
    ) -> None:
        if seq_len < 2 or num_windows < 1 or batch_size < 1:
            raise ValueError(f"ReferenceLoss: need seq_len >= 2, num_windows >= 1, batch_size >= 1; "
                             f"got {seq_len}, {num_windows}, {batch_size}")  # fmt: skip
        if unit not in ("token", "byte"):
            raise ValueError(f"ReferenceLoss: unit must be 'token' or 'byte', got {unit!r}")
        if token_ids is not None:
            if texts is not None or files is not None or dataset is not None:
                raise ReferenceError("ReferenceLoss: give token_ids or text (texts, files, dataset), not both")
            if unit == "byte":
                raise ValueError("ReferenceLoss: unit='byte' needs text (token_ids have no byte count)")
            self.texts: list[str] | None = None
            self.token_ids: list[list[int]] | None = [list(ids) for ids in token_ids]
            _check_texts([" ".join(map(str, ids)) for ids in self.token_ids],
                         [f"token_ids[{i}]" for i in range(len(self.token_ids))])  # fmt: skip
        else:
            self.texts, self.token_ids = read_reference_texts(texts, files, dataset, text_column), None
        self.tokenize, self.separator_id = tokenize, separator_id
        self.seq_len, self.num_windows, self.seed, self.unit, self.batch_size = (
            seq_len,
            num_windows,
            seed,
            unit,
            batch_size,
        )
        self.windows: Tensor | None = None
        self.tokens_per_byte = 1.0
        self._resumed_fingerprint: str | None = None

    def prepare(self, pl_module: pl.LightningModule) -> Tensor:
        """Tokenize and draw the sample once (kept in `self.windows`)."""
        if self.windows is not None:
            return self.windows
        if self.token_ids is not None:
            streams = self.token_ids
        else:
            tokenize = _tokenize_fn(self.tokenize, pl_module)
            streams = [list(tokenize(text)) for text in self.texts]
            self.tokens_per_byte = sum(map(len, streams)) / sum(len(t.encode("utf-8")) for t in self.texts)
        if self.separator_id is not None:
            streams = [[*ids, self.separator_id] for ids in streams]
        self.windows = sample_windows(streams, self.seq_len, self.num_windows, self.seed)
        if self._resumed_fingerprint not in (None, self.fingerprint()):
            raise ReferenceError("ReferenceLoss: the reference sample differs from the one the checkpoint's baseline "
                                 "was measured on (other text, tokenizer, seq_len, num_windows or seed)")  # fmt: skip
        return self.windows

    def fingerprint(self) -> str:
        """A hash of the sampled windows: a resumed run must measure the very same sample."""
        assert self.windows is not None
        return hashlib.sha256(str(self.windows.tolist()).encode()).hexdigest()[:16]

    def capture(self, pl_module: pl.LightningModule) -> None:
        self.prepare(pl_module)

    def measure(self, pl_module: pl.LightningModule) -> dict[str, float]:
        total, count = window_logprob(pl_module, self.prepare(pl_module), self.batch_size)
        value = total / count * (self.tokens_per_byte if self.unit == "byte" else 1.0)
        if not math.isfinite(value):
            raise FloatingPointError(f"ReferenceLoss: the reference log-likelihood is {value}")
        return {"ref_logprob": value}

    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint() if self.windows is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resumed_fingerprint = state.get("fingerprint")
