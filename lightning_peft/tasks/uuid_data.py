"""UUID key -> value memorisation data (MoRA paper, section 3 / 5.1).

Each example is a pair of random version-4 UUIDs. Training text is ``key:value`` (36 + 1 + 36 = 73 characters);
the model is trained with the loss over the whole sequence (``labels = input_ids``, like the paper's script) and
evaluated by greedy generation of the value from the prompt ``key:``. The evaluation pairs are the training pairs
(the task measures memorisation, not generalisation).

Differences from the paper, on purpose: a character-level tokenizer with a 21-token vocabulary (instead of the
LLaMA tokenizer) so that a tiny model built from a config can learn the task on a CPU in minutes, and an EOS token
at the end of each training sequence. The pairs are generated from a seeded ``random.Random`` (not ``uuid.uuid4``)
so that every run and every process sees the same data.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from ._common import make_loader, pad_batch

__all__ = ["UUID_LENGTH", "CharTokenizer", "UUIDMemorization", "make_uuid_pairs"]

UUID_LENGTH = 36
"""Characters in a canonical UUID string (32 hex digits and 4 hyphens)."""


class CharTokenizer:
    """Character-level tokenizer for UUID text.

    The vocabulary is fixed: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, then the 16 lowercase hex digits,
    ``-`` and ``:`` (21 tokens in total).
    """

    special_tokens: tuple[str, ...] = ("<pad>", "<bos>", "<eos>")
    characters: str = "0123456789abcdef-:"
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __init__(self) -> None:
        self._char_to_id = {c: i + len(self.special_tokens) for i, c in enumerate(self.characters)}
        self._id_to_char = {i: c for c, i in self._char_to_id.items()}

    @property
    def vocab_size(self) -> int:
        """Number of token ids (special tokens included)."""
        return len(self.special_tokens) + len(self.characters)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Encode ``text`` into token ids.

        Args:
            text: String made of lowercase hex digits, ``-`` and ``:``.
            add_bos: Prepend the ``<bos>`` id.
            add_eos: Append the ``<eos>`` id.

        Raises:
            ValueError: A character is not in the vocabulary.
        """
        try:
            ids = [self._char_to_id[c] for c in text]
        except KeyError as err:
            raise ValueError(
                f"CharTokenizer cannot encode {err.args[0]!r} in {text!r}; vocabulary: {self.characters!r}"
            ) from None
        if add_bos:
            ids.insert(0, self.bos_token_id)
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor, placeholder: str | None = None) -> str:
        """Decode token ids into a string.

        Args:
            ids: Token ids (a list or a 1-D tensor).
            placeholder: ``None`` drops special and unknown ids; a string replaces each of them, which keeps the
                output aligned with the ids position by position (used for character accuracy).
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            c = self._id_to_char.get(int(i))
            if c is not None:
                out.append(c)
            elif placeholder is not None:
                out.append(placeholder)
        return "".join(out)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def make_uuid_pairs(num_pairs: int, seed: int = 0) -> list[tuple[str, str]]:
    """Deterministic random UUID4 ``(key, value)`` pairs.

    Args:
        num_pairs: Number of pairs.
        seed: Seed of the ``random.Random`` generator; the same seed always gives the same pairs.
    """
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1:
        raise ValueError(f"make_uuid_pairs: num_pairs must be a positive integer, got {num_pairs!r}")
    rng = random.Random(seed)

    def draw() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    pairs = [(draw(), draw()) for _ in range(num_pairs)]
    if len({k for k, _ in pairs}) != num_pairs:  # 2**-122 collision odds; checked anyway
        raise RuntimeError("duplicate UUID keys generated")
    return pairs


class _TrainSet(Dataset):
    def __init__(self, pairs: Sequence[tuple[str, str]], tokenizer: CharTokenizer) -> None:
        self.items = [tokenizer.encode(f"{k}:{v}", add_bos=True, add_eos=True) for k, v in pairs]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> list[int]:
        return self.items[index]


class _EvalSet(Dataset):
    def __init__(self, pairs: Sequence[tuple[str, str]], tokenizer: CharTokenizer) -> None:
        self.pairs = list(pairs)
        self.full = [tokenizer.encode(f"{k}:{v}", add_bos=True, add_eos=True) for k, v in self.pairs]
        self.prompts = [tokenizer.encode(f"{k}:", add_bos=True) for k, _ in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        key, value = self.pairs[index]
        return {"ids": self.full[index], "prompt": self.prompts[index], "key": key, "value": value}


def _lm_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    input_ids, attention_mask = pad_batch(seqs, pad_id)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class _TrainCollate:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[list[int]]) -> dict[str, torch.Tensor]:
        return _lm_batch(items, self.pad_id)


class _EvalCollate:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = _lm_batch([it["ids"] for it in items], self.pad_id)
        prompts = [it["prompt"] for it in items]
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("UUID prompts must all have the same length")
        batch["prompt_ids"] = torch.tensor(prompts, dtype=torch.long)
        batch["keys"] = [it["key"] for it in items]
        batch["values"] = [it["value"] for it in items]
        return batch


class UUIDMemorization(LightningDataModule):
    """Random UUID key -> value memorisation (the MoRA paper's task), character-level.

    Train batches are dicts with ``input_ids``, ``attention_mask`` and ``labels`` (``labels`` equal the input ids,
    padding masked with -100). Validation, test and predict batches use the same pairs (or the first
    ``eval_pairs`` of them) and add ``prompt_ids`` (``<bos>key:``, all of equal length), ``keys`` and ``values``
    (the strings to be generated).

    Args:
        num_pairs: Number of key -> value pairs to memorise.
        seed: Seed for the pairs and for the training shuffle order.
        batch_size: Batch size of every data loader.
        num_workers: Data loader worker processes.
        eval_pairs: How many of the training pairs to evaluate generation on (the first ones); ``None`` = all.
        shuffle: Shuffle the training pairs each epoch (the order of epoch k is drawn from ``seed + k``).
    """

    def __init__(
        self,
        num_pairs: int = 256,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        eval_pairs: int | None = None,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        if num_pairs < 1:
            raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if eval_pairs is not None and not 1 <= eval_pairs <= num_pairs:
            raise ValueError(f"eval_pairs must be in [1, num_pairs={num_pairs}] or None, got {eval_pairs}")
        self.save_hyperparameters()
        self.tokenizer = CharTokenizer()
        self._pairs: list[tuple[str, str]] | None = None
        self._train: _TrainSet | None = None
        self._eval: _EvalSet | None = None

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of :attr:`tokenizer` (link this to the model's ``vocab_size``)."""
        return self.tokenizer.vocab_size

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """All ``(key, value)`` pairs, deterministic in ``seed``."""
        if self._pairs is None:
            self._pairs = make_uuid_pairs(self.hparams.num_pairs, self.hparams.seed)
        return self._pairs

    def setup(self, stage: str | None = None) -> None:
        if self._train is None:
            self._train = _TrainSet(self.pairs, self.tokenizer)
            n_eval = self.hparams.num_pairs if self.hparams.eval_pairs is None else self.hparams.eval_pairs
            self._eval = _EvalSet(self.pairs[:n_eval], self.tokenizer)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        collate = _TrainCollate(self.tokenizer.pad_token_id)
        return make_loader(self, self._train, collate, shuffle=self.hparams.shuffle)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return make_loader(self, self._eval, _EvalCollate(self.tokenizer.pad_token_id))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
