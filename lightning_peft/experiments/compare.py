"""`lightning-peft compare`: one base config, several variants, each its own fit, side by side.

    run_comparison("configs/uuid_continual.yaml", [
        Variant("lora_r8", {"adapters.policy": "lora_all"}),
        Variant("dora_r8", {"adapters.policy": "dora_all", "model.init_args.lr": 1e-3}),
    ], out_dir="comparisons/uuid")

Every variant is the base config plus dotted overrides (`--key=value` on the project's
`lightning-peft fit` command line), run in this process through the same LightningCLI, one
after the other, with the same data and seed. Before anything trains, every variant is
parsed against the config schema, so an unknown key, a bad value or a missing policy file is
a `CompareError` naming the variant. Each run logs to `<out_dir>/<name>/` (TensorBoard and
CSV loggers, diagnostics, `forgetting.csv`, checkpoints) and leaves a `record.json`; the
records are gathered in `<out_dir>/comparison.csv` (the interchange format, see
`read_comparison`), per-depth diagnostics in `comparison_depth.csv`, per-validation curves in
`curves.csv`, plus a rich table and figures (`lightning_peft.experiments.figures`).

A re-run skips variants whose `record.json` says `ok` for the same base config, overrides and
seed, and the same contents of every file or preset they name (`experiments.fingerprint`); a
variant that fails is recorded with its error and the others still run.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_peft.core.io import atomic_write, check_replaceable
from lightning_peft.diagnostics import UpdateDiagnostics
from lightning_peft.diagnostics.report import last_step, read_table
from lightning_peft.experiments.errors import CompareError
from lightning_peft.experiments.figures import comparison_table, draw_comparison
from lightning_peft.experiments.fingerprint import fingerprint as config_fingerprint
from lightning_peft.experiments.names import check_variant_names
from lightning_peft.experiments.peft_cli import PeftCLI
from lightning_peft.experiments.records import (
    COMPARISON_FILE,
    COMPARISON_MARKER,
    CURVES_FILE,
    DEPTH_FILE,
    RECORD_FILE,
    Variant,
    VariantRecord,
    load_record,
    read_comparison,
    read_csv,
    read_curves,
    write_comparison,
    write_csv,
)
from lightning_peft.policy import LayerPolicy, PolicyError

__all__ = [
    "CompareError",
    "Variant",
    "VariantRecord",
    "VariantRecorder",
    "parse_variants",
    "read_comparison",
    "read_curves",
    "run_comparison",
    "validate_variants",
]

SHORTHANDS = {"policy": "adapters.policy", "lr": "model.init_args.lr", "seed": "seed_everything"}
VARIANT_KEYS = ("name", "overrides", "rank", *SHORTHANDS)


# -- variants ------------------------------------------------------------------------------------


def _variant_from_mapping(entry: Mapping[str, Any], index: int) -> Variant:
    """`{name, policy?, lr?, seed?, rank?, overrides?}` -> `Variant` (shorthands become dotted keys)."""
    label = f"variant {index} ({entry.get('name', '?')!r})"
    unknown = sorted(set(entry) - set(VARIANT_KEYS))
    if unknown:
        raise CompareError(f"{label}: unknown key(s) {unknown}; a variant takes {list(VARIANT_KEYS)}")
    if "name" not in entry:
        raise CompareError(f"variant {index}: needs a `name`")
    overrides = dict(entry.get("overrides") or {})
    if not isinstance(entry.get("overrides") or {}, Mapping):
        raise CompareError(f"{label}: `overrides` must be a mapping of dotted keys to values")
    for short, key in SHORTHANDS.items():
        if short in entry:
            if key in overrides:
                raise CompareError(f"{label}: `{short}` and overrides[{key!r}] both set")
            overrides[key] = entry[short]
    if "rank" in entry:
        overrides["__rank__"] = entry["rank"]
    return Variant(str(entry["name"]), overrides)


def parse_variants(entries: Sequence[Variant | Mapping[str, Any]]) -> list[Variant]:
    """Check names and overrides of a list of variants (mappings or `Variant`s); no config is read.

    Raises:
        CompareError: no variants, an unknown variant key, a missing/bad/duplicate name, or a
            variant that changes nothing (no policy and no override).
    """
    if isinstance(entries, (str, bytes, Mapping)) or not entries:
        raise CompareError("a comparison needs a non-empty list of variants")
    variants = [v if isinstance(v, Variant) else _variant_from_mapping(v, i) for i, v in enumerate(entries)]
    check_variant_names([v.name for v in variants])
    for variant in variants:
        if not isinstance(variant.overrides, Mapping) or not variant.overrides:
            raise CompareError(f"variant {variant.name!r}: names no policy and no override; it would be the base run")
        bad = [k for k in variant.overrides if not isinstance(k, str) or not k or k.startswith("-")]
        if bad:
            raise CompareError(
                f"variant {variant.name!r}: override keys must be dotted names such as 'model.lr': {bad}"
            )
    return variants


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    """`{"model.lr": 0.001}` -> `["--model.lr=0.001"]` (non-strings as JSON, which jsonargparse reads)."""
    args = []
    for key, value in overrides.items():
        args.append(f"--{key}={value if isinstance(value, str) else json.dumps(value)}")
    return args


def _with_rank(policy: Any, rank: int, name: str) -> dict[str, Any]:
    """The policy with `r` set in every rule that has one, keeping each rule's `alpha / r`."""

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise CompareError(f"variant {name!r}: rank must be a positive integer, got {rank!r}")
    try:
        data = LayerPolicy.load(policy).to_dict()
    except PolicyError as err:
        raise CompareError(f"variant {name!r}: {err}") from None
    changed = 0
    for rule in data["rules"]:
        hp = rule.get("hparams") or {}
        if "r" in hp:
            if "alpha" in hp:
                hp["alpha"] = hp["alpha"] * rank / hp["r"]
            hp["r"], changed = rank, changed + 1
    if not changed:
        raise CompareError(f"variant {name!r}: `rank` given but no rule of its policy has an `r`")
    return data


# -- validation: every variant parsed against the config schema before anything trains ------------


class SharedParser:
    """Builds the `lightning-peft` parser once for every parse and run of one comparison.

    Building LightningCLI's parser (the signatures of trainer, model, data and callbacks) is
    most of a CLI's start-up cost, about 1 s of CPU, against some 0.4 s to parse a config
    with it. The parser depends on the CLI class only, never on a config, so one parser
    serves the validation and the run of every variant. Variants run with `run=False`
    (LightningCLI's public mode without subcommands: one parser, `cli.parser`), and compare
    calls `trainer.fit` itself.
    """

    def __init__(self) -> None:
        self._parser: Any = None

    def cli(self, base: type) -> type:
        """`base` (a `PeftCLI` subclass) with `setup_parser` served from this cache."""
        shared = self

        class SharedParserCLI(base):  # type: ignore[misc,valid-type]
            def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
                if shared._parser is None:
                    super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
                    shared._parser = self.parser
                else:
                    self.parser = shared._parser

        return SharedParserCLI


class ParseOnlyCLI(PeftCLI):
    """Parses and validates a `fit` config exactly as `fit` would (with `run=False`), but builds nothing."""

    def instantiate_classes(self) -> None:
        return None

    def after_instantiate_classes(self) -> None:
        return None


def _parse(config: str | Path, overrides: Mapping[str, Any], name: str, shared: SharedParser | None = None) -> Any:
    """The parsed config namespace of one variant; a `CompareError` naming it on any schema error."""
    from jsonargparse import ArgumentError

    args = ["--config", str(config), *override_args(overrides)]
    cli_class = ParseOnlyCLI if shared is None else shared.cli(ParseOnlyCLI)
    try:
        cli = cli_class(args=args, run=False, parser_kwargs={"exit_on_error": False})
    except (ArgumentError, ValueError, TypeError, OSError) as err:
        raise CompareError(f"variant {name!r}: {err}") from None
    return cli.config


def _policy_value(config: Any) -> Any:
    """The parsed `adapters.policy` as a path or a plain mapping (jsonargparse's `__path__` notes dropped)."""
    value = config.get("adapters.policy") if hasattr(config, "get") else None
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, Mapping):
        value = {k: v for k, v in value.items() if not str(k).startswith("__")}
    return value


def _check_policy(config: Any, name: str) -> None:

    try:
        LayerPolicy.load(_policy_value(config))
    except PolicyError as err:
        raise CompareError(f"variant {name!r}: {err}") from None


def _check_shared_paths(config: Any, name: str) -> None:
    """Checkpoint folders fixed in the base config would be shared (and overwritten) by every variant."""
    for cb in config.get("trainer.callbacks") or []:
        init = cb.get("init_args") if hasattr(cb, "get") else None
        dirpath = init.get("dirpath") if init is not None and hasattr(init, "get") else None
        if dirpath:
            raise CompareError(
                f"variant {name!r}: {cb.get('class_path')} writes to the fixed dirpath {dirpath!r}, which every "
                "variant would share; leave dirpath unset (compare gives each variant its own folder)"
            )


def validate_variants(
    config: str | Path, variants: Sequence[Variant], shared: SharedParser | None = None
) -> list[Variant]:
    """Parse every variant (base config + overrides) against the CLI's schema; build nothing.

    `rank` shorthands are expanded here into a full `adapters.policy` mapping. Returns the
    variants as they will run. `shared`: a parser cache to reuse across calls.

    Raises:
        CompareError: naming the variant, for an unknown key, a bad value, or an unusable policy.
    """
    if not Path(config).is_file():
        raise CompareError(f"base config {str(config)!r} does not exist")
    ready = []
    for variant in parse_variants(variants):
        overrides = dict(variant.overrides)
        rank = overrides.pop("__rank__", None)
        parsed = _parse(config, overrides, variant.name, shared)
        if rank is not None:
            overrides["adapters.policy"] = _with_rank(_policy_value(parsed), rank, variant.name)
            parsed = _parse(config, overrides, variant.name, shared)
        _check_policy(parsed, variant.name)
        _check_shared_paths(parsed, variant.name)
        ready.append(Variant(variant.name, overrides))
    return ready


# -- recording one run -----------------------------------------------------------------------------


def _rss_mb() -> float:
    """Resident memory of this process now (MB); NaN where it cannot be read."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return math.nan


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The one-number entries of a `callback_metrics`-like mapping, as floats."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


class VariantRecorder(Callback):
    """What `compare` measures of a run, from Lightning's hooks only.

    Median optimizer-step time (`on_train_batch_start` to `on_train_batch_end`, which spans
    forward, backward and the optimizer step; CUDA synchronised), peak memory (CUDA: peak
    allocated by torch; CPU: the process's peak resident set sampled at every step, so it
    includes Python and data), trainable parameters at train start, and the scalar callback
    metrics after every validation (`curves`), the last ones being the run's final metrics.
    A module that built something once (e.g. a cached base) says so in `one_time_build_s`; that
    time is reported apart (`build_time_s`), not as the variant's cost.
    """

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.peak_memory_mb = math.nan
        self.trainable_params = 0
        self.build_time_s = 0.0
        self.curves: list[dict[str, float]] = []
        self.exception: BaseException | None = None
        self._t0: float | None = None
        self._cuda = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.build_time_s = float(getattr(pl_module, "one_time_build_s", 0.0))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trainable_params = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        self._cuda = pl_module.device.type == "cuda"
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self.peak_memory_mb = _rss_mb() if not self._cuda else 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if self._cuda:
            torch.cuda.synchronize(pl_module.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self._t0 is None:
            return
        if self._cuda:
            torch.cuda.synchronize(pl_module.device)
            self.peak_memory_mb = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        else:
            self.peak_memory_mb = max(self.peak_memory_mb, _rss_mb())
        self.step_times.append(time.perf_counter() - self._t0)
        self._t0 = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.exception = exception  # Lightning turns Ctrl-C into SystemExit(1): keep what really happened

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.curves.append({"step": float(trainer.global_step), **scalar_metrics(trainer.callback_metrics)})

    @property
    def step_time_median_s(self) -> float:
        return statistics.median(self.step_times) if self.step_times else math.nan


def _diagnostics_table(trainer: pl.Trainer) -> Path | None:

    for cb in trainer.callbacks:
        if isinstance(cb, UpdateDiagnostics) and cb.table_path is not None and cb.table_path.is_file():
            return cb.table_path
    return None


def depth_summary(table: str | Path) -> list[dict[str, Any]]:
    """Per (method, block) at the last logged step: module count, mean rel. norm, effective rank, r90."""

    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for row in last_step(read_table(table)):
        groups.setdefault((row["method"], row["block"]), []).append(row)

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        vals = [r[key] for r in rows if math.isfinite(r[key])]
        return sum(vals) / len(vals) if vals else math.nan

    return [
        {"method": method, "block": block, "modules": len(rows), "step": rows[0]["step"],
         "rel_norm": mean(rows, "rel_norm"), "effective_rank": mean(rows, "effective_rank"), "r90": mean(rows, "r90")}
        for (method, block), rows in sorted(groups.items(), key=lambda kv: (kv[0][1] is None, kv[0][1] or 0, kv[0][0]))
    ]  # fmt: skip


CSV_FOLDER = "csv"  # <out_dir>/<name>/csv/metrics.csv


def _fit_args(config: str | Path, variant: Variant, out_dir: Path, seed: int | None) -> list[str]:
    """The `lightning-peft fit` arguments of one variant (after `fit`); its loggers write to `<out_dir>/<name>/`."""
    where = {"save_dir": str(out_dir), "name": variant.name, "version": ""}
    # The CSV logger in its own `csv/` folder: it warns (and deletes) when its folder is not empty, and
    # the run folder already holds compare's marker and the config when the CSV file is first written.
    loggers = [
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": where},
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {**where, "version": CSV_FOLDER}},
    ]
    seed_arg = [f"--seed_everything={seed}"] if seed is not None else []
    return ["--config", str(config), *seed_arg, *override_args(variant.overrides),
            f"--trainer.logger={json.dumps(loggers)}"]  # fmt: skip


def run_variant(
    config: str | Path,
    variant: Variant,
    out_dir: str | Path,
    seed: int | None = None,
    shared: SharedParser | None = None,
    callbacks: Sequence[Callback] = (),
) -> tuple[VariantRecord, list[dict[str, float]], list[dict[str, Any]]]:
    """Fit one variant through the project's LightningCLI in this process.

    Returns the record, the per-validation curves and the per-(method, block) diagnostics
    summary. Any exception of the run (configuration or training) becomes a `failed` record;
    Ctrl-C and SIGTERM stop the comparison (re-raised). `shared`: a parser cache to reuse.
    `callbacks`: more callbacks for this run (the search's pruning callback).
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    out_dir = Path(out_dir)
    recorder = VariantRecorder()
    status, error, metrics, depth = "ok", None, {}, []
    start = time.perf_counter()
    try:
        cli_class = PeftCLI if shared is None else shared.cli(PeftCLI)
        cli = cli_class(
            args=_fit_args(config, variant, out_dir, seed),
            run=False,
            trainer_defaults={"callbacks": [recorder, *callbacks]},
            parser_kwargs={"exit_on_error": False},
        )
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        metrics = scalar_metrics(cli.trainer.callback_metrics)
        table = _diagnostics_table(cli.trainer)
        depth = depth_summary(table) if table is not None else []
    except (Exception, SystemExit) as err:
        if isinstance(recorder.exception, KeyboardInterrupt):
            raise KeyboardInterrupt from err
        if isinstance(err, SIGTERMException) or isinstance(recorder.exception, SIGTERMException):
            raise  # the comparison was asked to stop, not this variant
        err = recorder.exception or err
        status, error = "failed", f"{type(err).__name__}: {err}".strip()
        metrics = dict(recorder.curves[-1]) if recorder.curves else {}
        metrics.pop("step", None)
    record = VariantRecord(
        name=variant.name, status=status, error=error, metrics=metrics,
        trainable_params=recorder.trainable_params, step_time_median_s=recorder.step_time_median_s,
        peak_memory_mb=recorder.peak_memory_mb, run_dir=str(out_dir / variant.name),
        overrides=dict(variant.overrides), wall_time_s=time.perf_counter() - start - recorder.build_time_s,
        build_time_s=recorder.build_time_s,
    )  # fmt: skip
    return record, recorder.curves, depth


# -- the comparison --------------------------------------------------------------------------------


def fingerprint(config: str | Path, variant: Variant, seed: int | None) -> str:
    """Hash of what decides a variant's run: the base config, the overrides, the seed, and every
    file (policy, nested config) or preset they name (`lightning_peft.experiments.fingerprint`)."""
    return config_fingerprint(config, variant.overrides, seed)


def _float(value: float) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _save_run(run_dir: Path, record: VariantRecord, curves: list[dict], depth: list[dict]) -> None:

    run_dir.mkdir(parents=True, exist_ok=True)
    data = asdict(record)
    data.update({k: _float(data[k]) for k in ("step_time_median_s", "peak_memory_mb", "wall_time_s", "build_time_s")})
    write_csv(run_dir / CURVES_FILE, [{"variant": record.name, **c} for c in curves])
    write_csv(run_dir / "depth_summary.csv", [{"variant": record.name, **d} for d in depth])
    text = json.dumps(data, indent=2, default=str)
    atomic_write(run_dir / RECORD_FILE, lambda tmp: Path(tmp).write_text(text))


MARKER_FILE = ".lightning-peft-variant"


def _check_run_dir(run_dir: Path) -> None:
    """A variant's folder is emptied before it runs again: refuse one that compare did not write."""
    if run_dir.exists() and not (run_dir / MARKER_FILE).is_file() and any(run_dir.iterdir()):
        raise CompareError(f"{run_dir} exists and was not written by compare; move it or choose another out_dir")


def _summary_line(index: int, total: int, record: VariantRecord, skipped: bool = False) -> str:
    if skipped:
        return f"[{index}/{total}] {record.name}: finished before, skipped"
    if record.status != "ok":
        return f"[{index}/{total}] {record.name}: [red]failed[/red] after {record.wall_time_s:.0f} s: {record.error}"
    built = f" (+ {record.build_time_s:.0f} s one-time build of a cached base)" if record.build_time_s else ""
    return (f"[{index}/{total}] {record.name}: ok in {record.wall_time_s:.0f} s{built}, "
            f"{record.trainable_params:,} trainable, {record.step_time_median_s * 1e3:.1f} ms/step")  # fmt: skip


def _gather(out_dir: Path, records: Sequence[VariantRecord]) -> None:
    """Write `comparison.csv` and the all-variant `comparison_depth.csv` from the run folders."""
    write_comparison(out_dir, records)
    depth = [row for r in records for row in read_csv(Path(r.run_dir) / "depth_summary.csv")]
    write_csv(out_dir / DEPTH_FILE, depth, ["variant", "method", "block", "modules", "step", "rel_norm",
                                             "effective_rank", "r90"])  # fmt: skip


def _plan_runs(
    config: str | Path, variants: Sequence[Variant], out_dir: Path, seed: int | None, rerun: bool
) -> list[tuple[Variant, str, VariantRecord | None]]:
    """(variant, fingerprint, finished record or None) per variant; refuses folders compare did not write."""
    check_replaceable(out_dir / COMPARISON_FILE, COMPARISON_MARKER)  # before anything trains
    plans = []
    for variant in variants:
        fp = fingerprint(config, variant, seed)
        previous = load_record(out_dir / variant.name)
        done = not rerun and previous is not None and previous.status == "ok" and previous.fingerprint == fp
        if not done:
            _check_run_dir(out_dir / variant.name)
        plans.append((variant, fp, previous if done else None))
    return plans


def _run_and_save(
    config: str | Path, variant: Variant, fp: str, out_dir: Path, seed: int | None, shared: SharedParser
) -> VariantRecord:
    """Run one variant in a fresh folder (marked as compare's) and save its record, curves and depth summary."""
    run_dir = out_dir / variant.name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / MARKER_FILE).write_text(json.dumps(asdict(variant), default=str))
    record, curves, depth = run_variant(config, variant, out_dir, seed, shared)
    record.fingerprint = fp
    _save_run(run_dir, record, curves, depth)
    return record


def _run_plans(config: str | Path, plans: list, out_dir: Path, seed: int | None, shared: SharedParser) -> list:
    """Run the planned variants in order (a finished one is taken as recorded); gather after each."""
    from rich import get_console

    console = get_console()
    records: list[VariantRecord] = []
    for index, (variant, fp, previous) in enumerate(plans, 1):
        if previous is not None:
            records.append(previous)
            console.print(_summary_line(index, len(plans), previous, skipped=True))
            continue
        console.rule(f"[{index}/{len(plans)}] {variant.name}")
        records.append(_run_and_save(config, variant, fp, out_dir, seed, shared))
        console.print(_summary_line(index, len(plans), records[-1]))
        _gather(out_dir, records)
    _gather(out_dir, records)
    return records


def run_comparison(
    config: str | Path,
    variants: Sequence[Variant | Mapping[str, Any]],
    out_dir: str | Path,
    *,
    seed: int | None = None,
    rerun: bool = False,
    metric: str | None = None,
    forget_metric: str | None = None,
    figures: bool = True,
    table: bool = True,
) -> list[VariantRecord]:
    """Run every variant as its own fit (sequentially, same data and seed) and record them side by side.

    Args:
        config: the base `lightning-peft fit` config (YAML).
        variants: `Variant`s, or mappings `{name, policy?, lr?, seed?, rank?, overrides?}`
            (`policy` = `adapters.policy`, `lr` = `model.init_args.lr`, `seed` = `seed_everything`,
            `rank` sets `r` in every rule of the variant's policy, keeping `alpha / r`).
        out_dir: where each variant's folder and the comparison files go.
        seed: `seed_everything` for every variant (a variant's own `seed` wins); the config's otherwise.
        rerun: run finished variants again instead of skipping them.
        metric: the learning metric of the table and figures (default: the first `val_*acc*`
            metric, else the first `val_*`).
        forget_metric: the forgetting metric (default: the first `forget/*_change`).
        figures: draw the comparison figures (PNG) into `out_dir`.
        table: print the rich table at the end.

    Returns:
        One record per variant, in order; failed variants have `status == "failed"` and `error`.

    Raises:
        CompareError: before anything runs, for bad variants or a bad base config.
    """
    from rich import get_console

    console = get_console()
    shared = SharedParser()  # one parser for every variant's validation and run
    ready = validate_variants(config, variants, shared)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plans = _plan_runs(config, ready, out_dir, seed, rerun)
    records = _run_plans(config, plans, out_dir, seed, shared)
    if figures:
        draw_comparison(out_dir, records, metric=metric, forget_metric=forget_metric)
    if table:
        console.print(comparison_table(records, metric=metric, forget_metric=forget_metric))
    console.print(
        f"comparison written to {out_dir} ({COMPARISON_FILE}, figures, one folder per variant)", soft_wrap=True
    )
    return records


# -- command line ----------------------------------------------------------------------------------


def compare(
    base: str,
    variants: list[dict[str, Any]],
    out_dir: str = "comparisons",
    seed: int | None = None,
    rerun: bool = False,
    metric: str | None = None,
    forget_metric: str | None = None,
    figures: bool = True,
) -> list[VariantRecord]:
    """Run variants of one config side by side (`lightning-peft compare --config comparison.yaml`).

    Args:
        base: the base `lightning-peft fit` config.
        variants: list of `{name, policy?, lr?, seed?, rank?, overrides?: {dotted.key: value}}`.
        out_dir: folder of the variants' runs, `comparison.csv` and the figures.
        seed: `seed_everything` for every variant (a variant's own `seed` wins).
        rerun: run finished variants again.
        metric: learning metric of the table and figures (default: the first `val_*acc*`).
        forget_metric: forgetting metric (default: the first `forget/*_change`).
        figures: draw the figures.
    """
    return run_comparison(
        base, variants, out_dir, seed=seed, rerun=rerun, metric=metric, forget_metric=forget_metric, figures=figures
    )
