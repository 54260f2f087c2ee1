"""``LocalData``: fine-tune on your own files with your own model's tokenizer (docs/your_data.md).

The file formats, the two kinds of data (instruction and plain text), the loss masking and the checks are
described in :mod:`lightning_peft.tasks.user_files` and :mod:`lightning_peft.tasks.records`; this module is the
LightningDataModule around them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from ._common import make_loader
from .records import IGNORE_INDEX, DataError, FieldNames
from .user_files import (
    DataKind,
    Source,
    collate_examples,
    detect_kind,
    instruction_encoder,
    load_tokenizer,
    pack_windows,
    read_file,
    split_rows,
    text_encoder,
)

__all__ = ["DataReport", "LocalData"]


def _size(rows: Any) -> int:
    return 0 if rows is None else len(rows)


@dataclass
class DataReport:
    """What ``setup`` made of the files: counts printed once, kept for tests and callers."""

    kind: str
    train: int
    val: int
    truncated: int = 0
    dropped: int = 0

    def __str__(self) -> str:
        if self.kind == "text":
            return f"LocalData: text packed into {self.train} train / {self.val} validation windows"
        return (
            f"LocalData: {self.train} train / {self.val} validation examples; {self.truncated} truncated to "
            f"max_length, {self.dropped} dropped (nothing left to train on after truncation)"
        )


class LocalData(LightningDataModule):
    """Instruction or plain-text data from local files, tokenized with a local model folder's tokenizer.

    Batches are dicts with ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` where the loss skips), as
    :class:`~lightning_peft.tasks.CausalLM` expects. ``sample_prompt_ids`` holds a few validation prompts that
    ``CausalLM`` continues greedily at every validation, to show what the model says.

    Args:
        train_path: A ``.jsonl``, ``.json``, ``.csv``, ``.parquet``, ``.txt``/``.md`` file, or a folder written by
            ``datasets``' ``save_to_disk`` (its ``train`` split).
        tokenizer_path: The model folder whose tokenizer to use (``AutoTokenizer``, local files only); the same
            folder as ``CausalLM(pretrained_path=...)``.
        val_path: A validation file in the same format; ``None``: hold out ``val_fraction`` of ``train_path``.
        val_fraction: Share of the training records held out (seeded by ``seed``) when there is no ``val_path``;
            0 means no validation.
        kind: ``"instruction"``, ``"text"`` or ``"auto"`` (plain-text files and records with only a text field
            are text; records with prompt/completion or messages are instruction).
        max_length: Longest instruction example (longer ones are cut, and counted); the window of packed text.
        train_on_prompt: Put the loss on every token of instruction data, not just the completion.
        prompt_field: Field of the prompt.
        completion_field: Field of the completion.
        messages_field: Field of a chat (a list of ``{role, content}``), rendered with the chat template.
        text_field: Field of plain text in JSON/CSV/Parquet records.
        batch_size: Batch size of every loader.
        num_workers: Data loader worker processes.
        seed: Seed of the validation split and of the training shuffle.
        num_sample_prompts: Validation prompts exposed as ``sample_prompt_ids`` (0: none).
    """

    def __init__(
        self,
        train_path: str,
        tokenizer_path: str,
        val_path: str | None = None,
        val_fraction: float = 0.1,
        kind: DataKind = "auto",
        max_length: int = 512,
        train_on_prompt: bool = False,
        prompt_field: str = "prompt",
        completion_field: str = "completion",
        messages_field: str = "messages",
        text_field: str = "text",
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        num_sample_prompts: int = 3,
    ) -> None:
        super().__init__()
        if kind not in ("auto", "instruction", "text"):
            raise ValueError(f"LocalData kind must be 'auto', 'instruction' or 'text', got {kind!r}")
        if max_length < 2:
            raise ValueError(f"LocalData max_length must be >= 2 (one next-token target), got {max_length}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"LocalData val_fraction must be in [0, 1), got {val_fraction}")
        if batch_size < 1 or num_sample_prompts < 0:
            raise ValueError(
                f"LocalData needs batch_size >= 1, num_sample_prompts >= 0; got {batch_size}, {num_sample_prompts}"
            )
        self.save_hyperparameters()
        self.fields = FieldNames(prompt_field, completion_field, messages_field, text_field)
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.train_rows: Any = None
        self.val_rows: Any = None
        self.report: DataReport | None = None
        self.sample_prompt_ids: list[list[int]] = []

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad id, else EOS (padding is masked out of attention and loss anyway), else 0."""
        for token_id in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if token_id is not None:
                return token_id
        return 0

    # -- setup ----------------------------------------------------------------------------------------------

    def _encode(self, source: Source, kind: str) -> Any:
        hp = self.hparams
        if kind == "instruction":
            fn = instruction_encoder(self.tokenizer, self.fields, source, hp.max_length, hp.train_on_prompt)
        else:
            fn = text_encoder(self.tokenizer, self.fields, source)
        columns = source.rows.column_names
        return source.rows.map(fn, with_indices=True, remove_columns=columns, desc=f"tokenizing {source.path.name}")

    def _splits(self, source: Source, kind: str) -> tuple[Any, Any]:
        """Encoded train and validation rows (``None``: no validation); the split is made before packing."""
        hp = self.hparams
        rows = self._encode(source, kind)
        if hp.val_path is not None:
            return rows, self._encode(read_file(hp.val_path), kind)
        if hp.val_fraction == 0:
            return rows, None
        return split_rows(rows, hp.val_fraction, hp.seed, source.path)

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows is not None:
            return
        hp = self.hparams
        source = read_file(hp.train_path)
        kind = detect_kind(source, hp.kind, self.fields)
        train, val = self._splits(source, kind)
        if kind == "text":
            train, val = self._pack(train), self._pack(val)
            self.report = DataReport("text", len(train), _size(val))
        else:
            truncated = sum(train["truncated"]) + (sum(val["truncated"]) if val is not None else 0)
            before = len(train) + _size(val)
            train, val = self._keep_trainable(train), self._keep_trainable(val)
            self.report = DataReport("instruction", len(train), _size(val), truncated, before - len(train) - _size(val))
        if len(train) == 0:
            raise DataError(f"{hp.train_path}: no training example left ({self.report})")
        self.train_rows, self.val_rows = train, val
        self.sample_prompt_ids = self._sample_prompts(val if val is not None else train, kind)
        rank_zero_info(str(self.report))

    def _pack(self, rows: Any) -> Any:
        if rows is None:
            return None
        length = self.hparams.max_length
        return rows.map(pack_windows, batched=True, fn_kwargs={"length": length}, remove_columns=rows.column_names)

    @staticmethod
    def _keep_trainable(rows: Any) -> Any:
        """Drop examples whose trained tokens were all cut off (their loss would be 0 / 0)."""
        if rows is None:
            return None
        return rows.filter(lambda labels: any(label != IGNORE_INDEX for label in labels[1:]), input_columns="labels")

    def _sample_prompts(self, rows: Any, kind: str) -> list[list[int]]:
        n = min(self.hparams.num_sample_prompts, len(rows))
        if kind == "text":
            cut = max(1, self.hparams.max_length // 4)
            return [list(rows[i]["input_ids"][:cut]) for i in range(n)]
        return [list(rows[i]["input_ids"][: rows[i]["prompt_length"]]) for i in range(n)]

    # -- loaders --------------------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return make_loader(self, self.train_rows, collate_examples(self.pad_id), shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if self.val_rows is None:
            return []
        return make_loader(self, self.val_rows, collate_examples(self.pad_id))
