"""String metrics for generation tasks (torchmetrics, distributed-safe)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchmetrics import Metric

__all__ = ["CharAccuracy", "ExactMatch", "Perplexity", "char_matches"]


def char_matches(pred: str, target: str) -> int:
    """Number of positions where ``pred`` has the same character as ``target``.

    Positions are compared one by one over ``len(target)``; a prediction that is too short counts the missing
    characters as wrong, extra characters are ignored.
    """
    return sum(p == t for p, t in zip(pred, target, strict=False))


def _check(preds: Sequence[str], targets: Sequence[str]) -> None:
    if isinstance(preds, str) or isinstance(targets, str):
        raise TypeError("preds and targets must be sequences of strings, not a single string")
    if len(preds) != len(targets):
        raise ValueError(f"got {len(preds)} predictions for {len(targets)} targets")


class _StringRatio(Metric):
    """Summed per-sample scores over summed per-sample weights (both reduced by sum across ranks)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    _score: Callable[[str, str], int]  # per-sample score, set by subclasses
    _weight: Callable[[str], int]  # per-sample weight, set by subclasses

    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:
        _check(preds, targets)
        self.correct += sum(self._score(p, t) for p, t in zip(preds, targets, strict=True))
        self.total += sum(self._weight(t) for t in targets)

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1).float()


class CharAccuracy(_StringRatio):
    """Character-level accuracy: correct characters / target characters, over all samples.

    Every target character counts (hyphens of a UUID included). With equal-length targets this equals the mean
    per-sample fraction of correct characters.
    """

    _score = staticmethod(char_matches)
    _weight = staticmethod(len)


class ExactMatch(_StringRatio):
    """Fraction of predictions equal to their target string."""

    @staticmethod
    def _score(pred: str, target: str) -> int:
        return int(pred == target)

    @staticmethod
    def _weight(target: str) -> int:
        return 1


class Perplexity(Metric):
    """``exp`` of the mean next-token loss per trained token, over the whole epoch (and all ranks).

    ``update(loss, tokens)`` takes a batch's mean loss and the number of tokens it averages over, so batches
    with more trained tokens weigh more: the epoch value is the perplexity of the data, not a mean of batch
    perplexities.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nll", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, loss: torch.Tensor, tokens: torch.Tensor | int) -> None:
        tokens = torch.as_tensor(tokens, device=self.tokens.device)
        self.nll += loss.detach().float() * tokens
        self.tokens += tokens

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll / self.tokens.clamp_min(1))
