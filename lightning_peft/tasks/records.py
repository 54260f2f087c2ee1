"""One record of a user's file -> token ids and labels: instruction pairs, chats, plain text.

Loss masking works on characters, not tokens: the text is rendered first (``prompt + completion``, or the chat
through the tokenizer's own chat template), the character spans that are trained are noted, and the fast
tokenizer's offset mapping says which tokens fall inside them. A token is trained when its first character
lies in a trained span. This needs no knowledge of the template: an assistant turn's span is the difference
between the conversation rendered up to that turn with the generation prompt, and rendered through it.

Every check raises :class:`DataError` with the record's location (``file line N``), so a broken file stops a
run before its first step with the line to fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_peft.core.hints import option_hint
from lightning_peft.errors import InputError

__all__ = ["IGNORE_INDEX", "DataError", "Encoded", "FieldNames", "encode_chat", "encode_pair", "encode_text"]

IGNORE_INDEX = -100
"""The label of a token the loss skips (Hugging Face and torch's cross-entropy default)."""


class DataError(InputError):
    """A file or record that cannot be trained on; the message names the file and line (or record)."""


@dataclass(frozen=True)
class FieldNames:
    """The record fields that hold each part (configurable: a user's files name them their own way)."""

    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    text: str = "text"


@dataclass
class Encoded:
    """Token ids, their labels (``IGNORE_INDEX`` where masked), how many tokens the prompt has, and whether the
    example was cut at ``max_length``."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    truncated: bool

    def as_row(self) -> dict[str, Any]:
        return {
            "input_ids": self.input_ids,
            "labels": self.labels,
            "prompt_length": self.prompt_length,
            "truncated": self.truncated,
        }


def _labels_from_spans(
    ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[int]:
    """Each token's id where its first character is inside one of ``spans`` (``[start, end)``), else masked."""
    labels = []
    for token, (start, end) in zip(ids, offsets, strict=True):
        inside = end > start and any(lo <= start < hi for lo, hi in spans)
        labels.append(token if inside else IGNORE_INDEX)
    return labels


def _tokenize(tokenizer: Any, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _finish(ids: list[int], labels: list[int], prompt_length: int, max_length: int) -> Encoded:
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], labels[:max_length], min(prompt_length, max_length), truncated)


def _first_trained(labels: Sequence[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def encode_pair(
    tokenizer: Any, prompt: str, completion: str, max_length: int, train_on_prompt: bool = False
) -> Encoded:
    """``prompt + completion + EOS``; the loss on the completion and EOS only (everything: ``train_on_prompt``)."""
    text = prompt + completion
    ids, offsets = _tokenize(tokenizer, text, add_special_tokens=True)
    labels = _labels_from_spans(ids, offsets, [(len(prompt), len(text))])
    if tokenizer.eos_token_id is not None:
        ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    prompt_length = _first_trained(labels)
    if train_on_prompt:
        labels = list(ids)
    return _finish(ids, labels, prompt_length, max_length)


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn (with the template's own
    end-of-turn marker, so the model learns to stop).

    Raises:
        DataError: the template renders a conversation's start differently once more turns follow (the span
            of a turn would not be well defined).
    """
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:k], add_generation_prompt=True)
        through = _render(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(
                f"{where}: the tokenizer's chat template does not render turn {k} as a prefix of the conversation, "
                "so the assistant tokens cannot be located; set "
                f"{option_hint('train_on_prompt', 'true', True, 'data')} or fix the template"
            )
        spans.append((len(before), len(through)))
    return full, spans


def encode_chat(
    tokenizer: Any, messages: list[dict[str, str]], max_length: int, where: str, train_on_prompt: bool = False
) -> Encoded:
    """A chat rendered with the tokenizer's template; the loss on the assistant turns only (or on everything).

    The rendered text carries the template's own special tokens (BOS included), so none are added again.
    """
    text, spans = assistant_spans(tokenizer, messages, where)
    ids, offsets = _tokenize(tokenizer, text, add_special_tokens=False)
    labels = _labels_from_spans(ids, offsets, spans)
    prompt_length = _first_trained(labels)
    if train_on_prompt:
        labels = list(ids)
    return _finish(ids, labels, prompt_length, max_length)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """A document's ids followed by EOS (the document boundary in a packed stream); no BOS, no truncation."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


# -- checks -------------------------------------------------------------------------------------------------


def check_messages(value: Any, field: str, where: str) -> list[dict[str, str]]:
    """A list of ``{"role", "content"}`` turns with at least one non-empty assistant turn."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of {{role, content}} turns")
    turns = []
    for i, turn in enumerate(value):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("role"), str)
            or not isinstance(turn.get("content"), str)
        ):
            raise DataError(f"{where}: {field}[{i}] must have a string 'role' and a string 'content', got {turn!r}")
        turns.append({"role": turn["role"], "content": turn["content"]})
    answers = [t for t in turns if t["role"] == "assistant"]
    if not answers:
        roles = [t["role"] for t in turns]
        raise DataError(f"{where}: chat without an assistant turn (roles {roles}); nothing to train on")
    if not any(t["content"].strip() for t in answers):
        raise DataError(f"{where}: every assistant turn is empty; nothing to train on")
    return turns


def check_pair(record: dict[str, Any], fields: FieldNames, where: str) -> tuple[str, str]:
    """The record's prompt and completion: both strings, the completion not empty."""
    for name in (fields.prompt, fields.completion):
        if record.get(name) is None:
            present = sorted(k for k, v in record.items() if v is not None)
            raise DataError(
                f"{where}: missing field {name!r} (an instruction record needs {fields.prompt!r} and "
                f"{fields.completion!r}, or {fields.messages!r}; it has {present})"
            )
        if not isinstance(record[name], str):
            raise DataError(f"{where}: field {name!r} must be a string, got {type(record[name]).__name__}")
    if not record[fields.completion].strip():
        raise DataError(f"{where}: empty completion (field {fields.completion!r}); nothing to train on")
    return record[fields.prompt], record[fields.completion]


def check_text(record: dict[str, Any], field: str, where: str) -> str:
    value = record.get(field)
    if value is None:
        present = sorted(k for k, v in record.items() if v is not None)
        raise DataError(f"{where}: missing field {field!r} (plain-text data reads text_field={field!r}; has {present})")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value
