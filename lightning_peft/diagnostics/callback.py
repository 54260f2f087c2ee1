"""`UpdateDiagnostics`: per-layer update norms and spectra during `Trainer.fit`.

What each metric means and where the files go: docs/diagnostics.md. Hooks stay thin:

- `on_train_start` (after any checkpoint restore): find the adapted modules, resolve the log
  dir (`trainer.log_dir`, a collective, so on every rank; `default_root_dir` without a
  logger), measure once: the first row is all zeros.
- `on_train_batch_end`, every `every_n_steps` global steps, rank zero only: measure under
  `no_grad` in fp32/fp64, one host transfer, one `logger.log_metrics` call per logger
  (never `self.log` per key), and append the rows to `update_diagnostics.csv`.
- `on_before_optimizer_step` (only with `track_grad_norm`, only before a logged step): the
  gradient norm of each module's trained tensors.
- `on_train_end`: measure the final step, draw the figures (PNG, and `add_figure` on
  TensorBoard loggers), print the rich summary.

Logged keys: `updates/<block>/<kind>/<metric>` (`block` is `none` outside the repeated blocks)
plus `updates/mean/<method>/<metric>` for rel_norm and effective_rank, and `updates/max/rel_norm`.
A failure inside a measurement never stops training: it warns once (naming the module and
the stage) and leaves those cells empty.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_peft.adapters.base import AdapterLinear, is_supported_layer
from lightning_peft.core.inject import get_plan
from lightning_peft.core.sharding import is_sharded, squared_norm, unsharded
from lightning_peft.policy import normalise_name, pattern_matches

from .metrics import acc_dtype
from .report import METRICS, TABLE_FILE, Row, append_rows, draw_figures, read_table, summary_table
from .spectra import UpdateProbe

SUMMARY_METRICS = ("rel_norm", "effective_rank")


def _full_targets(name: str, kind: str, module: nn.Module) -> list[tuple[str, str, nn.Module, bool]]:
    """The weight-owning leaves under a `full` module: (name, kind, owner, stored transposed)."""
    out = []
    for sub_name, sub in module.named_modules():
        weight = sub._parameters.get("weight")
        if weight is None or not weight.requires_grad or weight.ndim not in (1, 2):
            continue
        suffix = f".{normalise_name(sub_name)}" if sub_name else ""
        transpose = is_supported_layer(sub) and not isinstance(sub, nn.Linear)  # Conv1D is (in, out)
        out.append((name + suffix, kind + suffix, sub, transpose))
    return out


def build_probes(model: nn.Module, patterns: list[str] | None = None, snapshot: bool = True) -> list[UpdateProbe]:
    """One `UpdateProbe` per adapted module of `model` (every injected plan found in it).

    `full` modules are expanded into their weight-owning leaves; only those are copied.

    Args:
        model: a model with injected adapters (the plan may sit on any submodule).
        patterns: keep modules whose name matches a glob / `re:` pattern (as in policies).
        snapshot: copy the starting weights of `full` modules (needed to measure them).
    """
    probes: list[UpdateProbe] = []
    roots = [(n, m) for n, m in model.named_modules() if get_plan(m) is not None]
    roots = [(n, m) for n, m in roots if not any(n.startswith(o + ".") for o, _ in roots if o and o != n)]
    seen: set[int] = set()
    for _, root in roots:
        plan = get_plan(root)
        assert plan is not None
        modules = {normalise_name(n): m for n, m in root.named_modules() if n}
        for row in plan.rows:
            module = modules.get(row.name)
            if module is None:
                continue
            if row.method == "full":
                targets = _full_targets(row.name, row.kind, module)
            else:
                targets = [(row.name, row.kind, module, False)] if isinstance(module, AdapterLinear) else []
            for name, kind, owner, transpose in targets:
                if patterns and not any(pattern_matches(p, name) for p in patterns):
                    continue
                seen.add(id(owner))
                probes.append(UpdateProbe(name, row.block, kind, row.method, owner, transpose, snapshot))
    for raw, layer in model.named_modules():  # adapters injected without a plan
        if isinstance(layer, AdapterLinear) and id(layer) not in seen:
            name = normalise_name(raw)
            if not patterns or any(pattern_matches(p, name) for p in patterns):
                probes.append(UpdateProbe(name, None, name, layer.method, layer))
    return probes


class UpdateDiagnostics(Callback):
    """Per-layer update-norm diagnostics of the adapted modules.

    Args:
        every_n_steps: measure every this many optimizer steps (plus at train start and end).
        modules: only modules whose name matches one of these globs (or `re:` patterns),
            matched against every dotted suffix of the name like policy rules; all when `None`.
        log_dir: where the CSV and figures go; defaults to `trainer.log_dir`.
        plots: draw the figures at the end of fit.
        track_grad_norm: also record each module's adapter gradient norm at logged steps.
        logged_metrics: the metrics sent to the loggers per module (all of them when `None`;
            the CSV always holds every metric).

    Raises:
        ValueError: for a bad argument; at train start, when `modules` matches no adapted module.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        modules: list[str] | None = None,
        log_dir: str | None = None,
        plots: bool = True,
        track_grad_norm: bool = False,
        logged_metrics: list[str] | None = None,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be a positive integer, got {every_n_steps!r}")
        if isinstance(modules, str):
            modules = [modules]
        if modules is not None and (not modules or not all(isinstance(m, str) and m for m in modules)):
            raise ValueError(f"`modules` must be a non-empty list of name patterns or None, got {modules!r}")
        unknown = sorted(set(logged_metrics or ()) - set(METRICS))
        if unknown:
            raise ValueError(f"`logged_metrics` has unknown names {unknown}; choose from {list(METRICS)}")
        self.every_n_steps = every_n_steps
        self.modules = list(modules) if modules is not None else None
        self.log_dir = log_dir
        self.plots = bool(plots)
        self.track_grad_norm = bool(track_grad_norm)
        self.logged_metrics = tuple(logged_metrics) if logged_metrics is not None else METRICS
        self.rows: list[Row] = []
        self._probes: list[UpdateProbe] = []
        self._dir: Path | None = None
        self._last_step: int | None = None
        self._grad: tuple[int, list[Tensor | None]] | None = None
        self._warned: set[tuple[str, str]] = set()

    @property
    def table_path(self) -> Path | None:
        """The CSV of the current or last fit (`None` before training starts)."""
        return None if self._dir is None else self._dir / TABLE_FILE

    # -- hooks -----------------------------------------------------------------------------

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = self.log_dir if self.log_dir is not None else trainer.log_dir  # a collective: every rank
        with unsharded(pl_module):  # FSDP2: whole weights on every rank while probes copy and measure
            probes = build_probes(pl_module, self.modules, snapshot=trainer.is_global_zero)  # copies on rank 0
            if self.modules is not None and not probes:
                raise ValueError(f"UpdateDiagnostics: `modules` {self.modules} matches no adapted module")
            if not probes:
                rank_zero_warn("UpdateDiagnostics: the model carries no adapters (inject_adapters was not applied)")
            unlisted = sorted({f"{p.method}: {n}" for p in probes for n in p.extra_names if n not in METRICS})
            if unlisted:  # a method registered after this module was imported: its extras have no column
                rank_zero_warn(
                    f"UpdateDiagnostics: extra diagnostics without a table column are not logged: {unlisted}"
                )
            # Every rank keeps the probes: under FSDP2 each must join the gathers; rank zero measures.
            self._probes, self._last_step, self._grad = probes, None, None
            if not trainer.is_global_zero:
                self._last_step = trainer.global_step
                return
            self._dir = Path(log_dir or trainer.default_root_dir)
            self.rows = []
            try:
                self._resume_table(trainer.global_step)
            except OSError as err:
                self._warn_once(str(self._dir), "existing table", err)
            self._record(trainer, trainer.global_step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._probes and step % self.every_n_steps == 0 and step != self._last_step:
            self._record_everywhere(trainer, pl_module, step)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step + 1  # the step this optimizer update completes
        if not (self.track_grad_norm and self._probes):
            return
        if not trainer.is_global_zero and not is_sharded(pl_module):  # DDP: only rank zero measures
            return
        if step % self.every_n_steps and step != trainer.max_steps:
            return
        norms: list[Tensor | None] = []
        with torch.no_grad():  # every rank: a sharded gradient's norm is a sum over ranks
            for probe in self._probes:
                try:
                    sq = [squared_norm(p.grad.detach()) for p in probe.parameters() if p.grad is not None]
                    norms.append(torch.stack([g.to(sq[0].device) for g in sq]).sum().sqrt() if sq else None)
                except Exception as err:  # never stop training
                    self._warn_once(probe.name, "gradient norm", err)
                    norms.append(None)
        self._grad = (step, norms)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._probes:
            return
        if trainer.global_step != self._last_step:
            self._record_everywhere(trainer, pl_module, trainer.global_step)
        if trainer.is_global_zero:
            self._report(trainer)

    # -- work ------------------------------------------------------------------------------

    def _warn_once(self, module: str, what: str, err: BaseException) -> None:
        if (module, what) not in self._warned:
            self._warned.add((module, what))
            rank_zero_warn(
                f"UpdateDiagnostics: the {what} failed for {module!r} ({type(err).__name__}: {err}); "
                "its values are left empty and training continues (warned once)"
            )

    def measure(self, step: int) -> list[Row]:
        """Measure every tracked module now: one row per module (one host transfer)."""
        grads = self._grad[1] if self._grad is not None and self._grad[0] == step else None
        vectors = []
        device = self._probes[0].device if self._probes else torch.device("cpu")
        dtype = acc_dtype(device)
        nan = torch.tensor(math.nan, dtype=dtype, device=device)
        for i, probe in enumerate(self._probes):
            values = probe.measure(lambda stage, err, name=probe.name: self._warn_once(name, stage, err))
            if grads is not None and grads[i] is not None:
                values["grad_norm"] = grads[i]
            vectors.append(torch.stack([values.get(m, nan).to(device, dtype) for m in METRICS]))
        table = torch.stack(vectors).tolist() if vectors else []  # the one host transfer
        rows = []
        for probe, values in zip(self._probes, table, strict=True):
            row: Row = {"step": step, "module": probe.name, "block": probe.block, "kind": probe.kind}
            row["method"] = probe.method
            row.update(zip(METRICS, values, strict=True))
            rows.append(row)
        return rows

    def _record_everywhere(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Every rank gathers sharded weights (FSDP2; nothing otherwise); rank zero measures and writes."""
        self._last_step = step
        with unsharded(pl_module):
            if trainer.is_global_zero:
                self._record(trainer, step)

    def _record(self, trainer: pl.Trainer, step: int) -> None:
        self._last_step = step
        try:
            rows = self.measure(step)
        except Exception as err:  # e.g. a device error outside any one module
            self._warn_once("all modules", "diagnostics", err)
            return
        self.rows.extend(rows)
        try:
            self._log(trainer, rows, step)
        except Exception as err:
            self._warn_once("all modules", "logger call", err)
        try:
            assert self._dir is not None
            append_rows(self._dir / TABLE_FILE, rows)
        except OSError as err:
            self._warn_once(str(self._dir), "table write", err)

    @staticmethod
    def metrics_dict(rows: list[Row], metrics: tuple[str, ...] = METRICS) -> dict[str, float]:
        """The scalars sent to the loggers for one step's rows (finite values only)."""
        out: dict[str, float] = {}
        for r in rows:
            block = "none" if r["block"] is None else str(r["block"])
            for m in metrics:
                v = r.get(m)
                if isinstance(v, float) and not math.isnan(v):
                    out[f"updates/{block}/{r['kind']}/{m}"] = v
        for method in sorted({r["method"] for r in rows}):
            for m in SUMMARY_METRICS:
                vals = [r[m] for r in rows if r["method"] == method and math.isfinite(r[m])]
                if vals:
                    out[f"updates/mean/{method}/{m}"] = sum(vals) / len(vals)
        finite = [r["rel_norm"] for r in rows if math.isfinite(r["rel_norm"])]
        if finite:
            out["updates/max/rel_norm"] = max(finite)
        return out

    def _log(self, trainer: pl.Trainer, rows: list[Row], step: int) -> None:
        if not trainer.loggers:
            return
        metrics = self.metrics_dict(rows, self.logged_metrics)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _resume_table(self, step: int) -> None:
        """Keep an existing table's rows before `step` (a resumed run logging into the same dir)."""
        assert self._dir is not None
        path = self._dir / TABLE_FILE
        if not path.exists():
            return
        try:
            previous = read_table(path)
        except (OSError, ValueError) as err:
            self._warn_once(str(path), "existing table read", err)
            previous = []
        kept = [r for r in previous if r["step"] < step]
        if len(kept) < len(previous):  # e.g. two runs without a logger share `default_root_dir`
            rank_zero_warn(
                f"UpdateDiagnostics: {self._dir} holds the diagnostics of an earlier run (steps >= {step}); "
                f"this run replaces its {TABLE_FILE} and figures. Keep them with a logger (each run gets its "
                "own version folder) or another `trainer.default_root_dir`."
            )
        path.unlink()
        if kept:
            append_rows(path, kept)
        self.rows = kept

    def _report(self, trainer: pl.Trainer) -> None:
        assert self._dir is not None
        if self.plots and self.rows:
            try:
                images = draw_figures(self.rows, self._dir)
                step = trainer.global_step
                for logger in trainer.loggers:
                    if isinstance(logger, TensorBoardLogger):  # what add_figure sends, without rendering twice
                        for name, image in images.items():
                            logger.experiment.add_image(f"updates/{name}", image, step, dataformats="HWC")
            except Exception as err:
                self._warn_once(str(self._dir), "figures", err)
        try:
            from rich import get_console

            get_console().print(summary_table(self.rows))
        except Exception as err:
            self._warn_once("summary", "rich table", err)
