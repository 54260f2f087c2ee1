"""Forgetting: how much of what the base model knew survives fine-tuning.

`ForgettingMonitor` is an ordinary Lightning callback. At fit start, before the first
optimizer step, it measures a *prior-knowledge probe* on the model as it was given (the
baseline: adapters are identity at initialisation, so this is the base model's function);
at the end of every validation it measures the probe again and logs, for every metric
`m` of the probe,

    forget/<m>          the metric now
    forget/<m>_change   the metric now minus its baseline (negative = knowledge lost)

through `LightningModule.log` (so every logger and `trainer.callback_metrics` see them) and
appends the same numbers to `forgetting.csv` in the run's log directory, with a step-0 row
holding the baseline. The baseline and the probe's reference state are callback state, so
a run resumed from a checkpoint compares against the untouched model, not the resumed one.

Probes (`PriorKnowledge` subclasses) are small objects with a `measure(pl_module)` method
that take what they measure as arguments; the generic ones live in the library:

- `ReferenceLoss` (`lightning_peft.callbacks.reference_probe`): the model's loss on reference text the
  user names (files, a `datasets` folder, texts or token ids).
- `EmbeddingDrift`: how far an encoder's sentence embeddings of given texts moved from the
  original model's (Spearman correlation of pairwise cosine similarities, mean cosine
  between each text's original and current embedding).

Probes of built-in data sit with their tasks (`lightning_peft.tasks`: `UUIDRecall`,
`HeldOutProse`, `HeldOutDocDrift`). See docs/forgetting.md.
"""

from __future__ import annotations

import contextlib
import csv
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

__all__ = [
    "FORGET_PREFIX",
    "EmbeddingDrift",
    "ForgettingMonitor",
    "PriorKnowledge",
    "drift_metrics",
]

FORGET_PREFIX = "forget"
FORGET_FILE = "forgetting.csv"
FORGET_COLUMNS = ("step", "metric", "value", "baseline", "change")


class PriorKnowledge(ABC):
    """A probe of what the base model knows: some data and a metric over the whole module.

    `capture(pl_module)` is called once on the untouched model (before `measure` computes the
    baseline) so a probe can keep a reference, e.g. the original embeddings; that reference
    must round-trip through `state_dict` / `load_state_dict` for resumed runs.
    """

    @abstractmethod
    def measure(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """Metric name -> value (higher = the prior knowledge is better kept)."""

    def capture(self, pl_module: pl.LightningModule) -> None:
        """Remember whatever the probe compares against (called once, on the untouched model)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


@contextlib.contextmanager
def _eval_mode(pl_module: pl.LightningModule) -> Iterator[None]:
    """No dropout, no autograd; the module's train/eval mode is restored afterwards."""
    was_training = pl_module.training
    pl_module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        pl_module.train(was_training)


def _evaluate(probe: PriorKnowledge, pl_module: pl.LightningModule) -> dict[str, float]:
    with _eval_mode(pl_module):
        values = probe.measure(pl_module)
    bad = {k: v for k, v in values.items() if not isinstance(v, float) or "/" in k}
    if bad:
        raise ValueError(f"{type(probe).__name__}.measure must return float values under names without '/': {bad}")
    return values


class ForgettingMonitor(Callback):
    """Measure a prior-knowledge probe before training and at every validation (`forget/...`).

    Args:
        prior: the probe (`UUIDRecall`, `EmbeddingDrift` or your own `PriorKnowledge`).
        prefix: namespace of the logged keys.
        log_dir: where `forgetting.csv` goes; defaults to `trainer.log_dir`.
        prog_bar: also show `forget/<m>` on the progress bar.
    """

    def __init__(
        self, prior: PriorKnowledge, prefix: str = FORGET_PREFIX, log_dir: str | None = None, prog_bar: bool = False
    ) -> None:
        if not isinstance(prior, PriorKnowledge):
            raise TypeError(f"ForgettingMonitor: `prior` must be a PriorKnowledge, got {type(prior).__name__}")
        if not prefix or "/" in prefix:
            raise ValueError(f"ForgettingMonitor: `prefix` must be a non-empty name without '/', got {prefix!r}")
        self.prior = prior
        self.prefix = prefix
        self.log_dir = log_dir
        self.prog_bar = prog_bar
        self.baseline: dict[str, float] | None = None
        self.history: list[dict[str, Any]] = []
        self._path: Path | None = None

    @property
    def csv_path(self) -> Path | None:
        """`forgetting.csv` of the current or last fit (`None` before fit starts)."""
        return self._path

    def changes(self, values: dict[str, float]) -> dict[str, float]:
        """`{prefix/m: value, prefix/m_change: value - baseline}` for every metric of the probe."""
        if self.baseline is None:
            raise RuntimeError("ForgettingMonitor: no baseline yet (fit has not started)")
        out: dict[str, float] = {}
        for name, value in values.items():
            out[f"{self.prefix}/{name}"] = value
            out[f"{self.prefix}/{name}_change"] = value - self.baseline[name]
        return out

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = self.log_dir if self.log_dir is not None else trainer.log_dir  # a collective: every rank
        self._path = Path(log_dir or ".") / FORGET_FILE
        if self.baseline is not None:  # resumed: baseline and reference came with the checkpoint
            return
        with _eval_mode(pl_module):
            self.prior.capture(pl_module)
        self.baseline = _evaluate(self.prior, pl_module)
        self._record(trainer, step=trainer.global_step, values=self.baseline)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.baseline is None:
            return
        values = _evaluate(self.prior, pl_module)
        for key, value in self.changes(values).items():
            pl_module.log(key, value, prog_bar=self.prog_bar and not key.endswith("_change"), sync_dist=False)
        self._record(trainer, step=trainer.global_step, values=values)

    def _record(self, trainer: pl.Trainer, step: int, values: dict[str, float]) -> None:
        assert self.baseline is not None
        rows = [
            {"step": step, "metric": m, "value": v, "baseline": self.baseline[m], "change": v - self.baseline[m]}
            for m, v in values.items()
        ]
        self.history.extend(rows)
        if trainer.is_global_zero and self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            new = not self._path.exists() or self._path.stat().st_size == 0
            with self._path.open("a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=FORGET_COLUMNS)
                if new:
                    writer.writeheader()
                writer.writerows(rows)

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "prior": self.prior.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baseline = state_dict.get("baseline")
        self.prior.load_state_dict(state_dict.get("prior", {}))


# -- embedding drift ----------------------------------------------------------------------------


MIN_PROBE_TEXTS = 3  # a rank correlation of pairwise similarities needs at least three texts


def check_probe_texts(texts: Any) -> None:
    """Refuse probe texts that cannot measure drift: fewer than three, empty, or repeated.

    A repeated text has a similarity of exactly 1 to its copy under every model, and identical
    texts leave the rank correlation undefined (a meaningless baseline); each text must differ.
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ValueError(f"EmbeddingDrift: texts must be a list of strings, got {type(texts).__name__}")
    if len(texts) < MIN_PROBE_TEXTS:
        raise ValueError(f"EmbeddingDrift: need at least {MIN_PROBE_TEXTS} texts, got {len(texts)}")
    seen: dict[str, int] = {}
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"EmbeddingDrift: text {i} must be a non-empty string, got {text!r}")
        key = " ".join(text.split())
        if key in seen:
            raise ValueError(
                f"EmbeddingDrift: texts {seen[key]} and {i} are the same text ({text[:40]!r}); each must differ"
            )
        seen[key] = i


def drift_metrics(reference: Tensor, current: Tensor) -> dict[str, float]:
    """How far `current` embeddings (n, d) moved from `reference` ones (same texts, same order).

    - `embed_spearman`: Spearman correlation between the two models' pairwise cosine
      similarities (upper triangle): 1 = the geometry of the text set is unchanged in rank order.
    - `embed_cosine`: mean cosine between each text's reference and current embedding:
      1 = every embedding points where it did.
    """
    from torchmetrics.functional import cosine_similarity, pairwise_cosine_similarity, spearman_corrcoef

    if reference.shape != current.shape or reference.ndim != 2 or reference.shape[0] < 3:
        raise ValueError(f"need two (n >= 3, d) embeddings of one shape, got {reference.shape}, {current.shape}")
    ref, cur = reference.double(), current.double()
    rows, cols = torch.triu_indices(ref.shape[0], ref.shape[0], offset=1)
    sim_ref = pairwise_cosine_similarity(ref)[rows, cols]
    if bool((sim_ref == sim_ref[0]).all()):
        raise ValueError(
            "the reference embeddings' pairwise similarities are all equal (the texts embed identically: the same "
            "text, or texts cut to the same tokens by max_length); their rank correlation is undefined"
        )
    sim_cur = pairwise_cosine_similarity(cur)[rows, cols]
    return {
        "embed_spearman": float(spearman_corrcoef(sim_cur, sim_ref)),
        "embed_cosine": float(cosine_similarity(cur, ref, reduction="mean")),
    }


class EmbeddingDrift(PriorKnowledge):
    """Drift of an encoder's sentence embeddings of held-out text from the original model's.

    The module must have `embed(input_ids, attention_mask, token_type_ids) -> (batch, dim)`
    (as `lightning_peft.tasks.SequenceClassification` does).

    Args:
        texts: the held-out texts (at least 3; `lightning_peft.tasks.HeldOutDocDrift` brings built-in ones).
        tokenizer_path: a local tokenizer folder (`None`: the datamodule's `tokenizer`).
        max_length: tokens per text.
        batch_size: texts per forward pass.
    """

    def __init__(
        self, texts: Sequence[str], tokenizer_path: str | None = None, max_length: int = 128, batch_size: int = 32
    ) -> None:
        check_probe_texts(texts)
        for name, value in (("max_length", max_length), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EmbeddingDrift: {name} must be a positive integer, got {value!r}")
        self.texts = list(texts)
        self.tokenizer_path = tokenizer_path
        self.max_length = max_length
        self.batch_size = batch_size
        self.reference: Tensor | None = None

    def _tokenizer(self, pl_module: pl.LightningModule) -> Any:
        if self.tokenizer_path is not None:
            from transformers import AutoTokenizer

            if not Path(self.tokenizer_path).expanduser().is_dir():
                raise FileNotFoundError(f"EmbeddingDrift: tokenizer_path {self.tokenizer_path!r} is not a local folder")
            return AutoTokenizer.from_pretrained(str(Path(self.tokenizer_path).expanduser()), local_files_only=True)
        tokenizer = getattr(getattr(pl_module.trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is None:
            raise ValueError("EmbeddingDrift: no tokenizer_path and the datamodule has no `tokenizer`")
        return tokenizer

    def embeddings(self, pl_module: pl.LightningModule) -> Tensor:
        """`(len(texts), dim)` embeddings of the texts by the module as it is now (fp32, CPU)."""
        if not callable(getattr(pl_module, "embed", None)):
            raise TypeError(f"EmbeddingDrift: {type(pl_module).__name__} has no `embed(input_ids, attention_mask)`")
        tokenizer = self._tokenizer(pl_module)
        out = []
        for start in range(0, len(self.texts), self.batch_size):
            batch = tokenizer(
                self.texts[start : start + self.batch_size],
                truncation=True,
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            ).to(pl_module.device)
            out.append(pl_module.embed(**batch).float().cpu())
        return torch.cat(out)

    def capture(self, pl_module: pl.LightningModule) -> None:
        self.reference = self.embeddings(pl_module)

    def measure(self, pl_module: pl.LightningModule) -> dict[str, float]:
        if self.reference is None:
            raise RuntimeError("EmbeddingDrift: no reference embeddings (capture was not called)")
        return drift_metrics(self.reference, self.embeddings(pl_module))

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference = state.get("reference")


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))


def forgetting_keys(metrics: Sequence[str], prefix: str = FORGET_PREFIX) -> list[str]:
    """The `<prefix>/<m>_change` keys among `metrics` (sorted)."""
    return sorted(k for k in metrics if k.startswith(f"{prefix}/") and k.endswith("_change"))
