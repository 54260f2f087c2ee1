"""What a comparison leaves on disk and how it is read back: variants, their records, the CSV files.

`comparison.csv` is the interchange format (one row per variant: fixed columns, then one column
per metric); `curves.csv` holds each variant's per-validation metrics. Figures, the rank search
and `suggest` read these files through this module, never through `compare`.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_peft.core.io import write_file_safely
from lightning_peft.experiments.errors import CompareError

COMPARISON_FILE = "comparison.csv"
COMPARISON_MARKER = ".lightning-peft-comparison"  # beside comparison.csv: compare wrote it, may replace it


DEPTH_FILE = "comparison_depth.csv"


CURVES_FILE = "curves.csv"


RECORD_FILE = "record.json"


RECORD_COLUMNS = ("name", "status", "error", "trainable_params", "step_time_median_s", "peak_memory_mb", "run_dir")


@dataclass
class Variant:
    """One run of a comparison: the base config plus dotted overrides (`{"adapters.policy": "lora_all"}`)."""

    name: str
    overrides: dict[str, Any]


@dataclass
class VariantRecord:
    """What one variant's run produced (one row of `comparison.csv`)."""

    name: str
    status: str  # "ok" | "failed"
    error: str | None
    metrics: dict[str, float]  # final callback metrics, forget/* included
    trainable_params: int
    step_time_median_s: float
    peak_memory_mb: float
    run_dir: str
    overrides: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    wall_time_s: float = math.nan  # the variant's own run, one-time builds excluded
    build_time_s: float = 0.0  # one-time builds this run paid for (a cached base built on first use)


def load_record(run_dir: Path) -> VariantRecord | None:
    path = run_dir / RECORD_FILE
    if not path.is_file():
        return None
    try:
        return VariantRecord(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None  # unreadable or from another version: run again


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None or (isinstance(v, float) and math.isnan(v)) else v
                             for k, v in row.items()})  # fmt: skip


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_comparison(out_dir: str | Path, records: Sequence[VariantRecord]) -> Path:
    """`comparison.csv`: one row per variant, fixed columns then one column per metric."""
    metric_names = sorted({k for r in records for k in r.metrics})
    rows = []
    for r in records:
        row = {c: getattr(r, c) for c in RECORD_COLUMNS}
        overrides = json.dumps(r.overrides, sort_keys=True, default=str)
        row.update(wall_time_s=r.wall_time_s, build_time_s=r.build_time_s, overrides=overrides)
        row.update(r.metrics)
        rows.append(row)
    path = Path(out_dir) / COMPARISON_FILE
    columns = [*RECORD_COLUMNS, "wall_time_s", "build_time_s", "overrides", *metric_names]
    write_file_safely(path, lambda tmp: write_csv(Path(tmp), rows, columns), COMPARISON_MARKER)
    return path


def parse_number(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


STATUSES = ("ok", "failed")
REQUIRED_COLUMNS = ("name", "status", "trainable_params", "run_dir")  # the rest may be deleted by hand


def _cell_error(path: Path, line: int, column: str, value: str, want: str) -> CompareError:
    hint = " (write numbers without thousands separators)" if "," in value else ""
    return CompareError(f"{path}, line {line}, column {column!r}: {value!r} is not {want}{hint}")


def _number(path: Path, line: int, column: str, value: str | None) -> float:
    """A cell as a float: empty is NaN (what `write_comparison` writes for no value), text is an error."""
    if value is None or value.strip() == "":
        return math.nan
    try:
        return float(value)
    except ValueError:
        raise _cell_error(path, line, column, value, "a number") from None


def _record_from_row(path: Path, line: int, row: dict[str | None, Any]) -> VariantRecord:
    """One `comparison.csv` row as a record; every bad cell is a `CompareError` naming file, line and column."""
    if None in row:
        raise CompareError(f"{path}, line {line}: {len(row[None])} cell(s) more than the header's columns")
    fixed = {*RECORD_COLUMNS, "wall_time_s", "build_time_s", "overrides"}
    params = (row.get("trainable_params") or "").strip()
    if params and not (params.isdigit() and params.isascii()):
        raise _cell_error(path, line, "trainable_params", params, "a whole number of parameters")
    if row["status"] not in STATUSES:
        raise _cell_error(path, line, "status", row["status"] or "", f"one of {list(STATUSES)}")
    if not row["name"]:
        raise CompareError(f"{path}, line {line}, column 'name': empty; every row names its variant")
    try:
        overrides = json.loads(row.get("overrides") or "{}")
    except ValueError:
        raise _cell_error(path, line, "overrides", str(row.get("overrides")), "a JSON mapping") from None
    if not isinstance(overrides, dict):
        raise _cell_error(path, line, "overrides", str(row.get("overrides")), "a JSON mapping")
    return VariantRecord(
        name=row["name"], status=row["status"], error=row.get("error") or None,
        metrics={k: _number(path, line, k, v) for k, v in row.items() if k not in fixed and v not in (None, "")},
        trainable_params=int(params or 0),
        step_time_median_s=_number(path, line, "step_time_median_s", row.get("step_time_median_s")),
        peak_memory_mb=_number(path, line, "peak_memory_mb", row.get("peak_memory_mb")),
        run_dir=row["run_dir"] or "", overrides=overrides,
        wall_time_s=_number(path, line, "wall_time_s", row.get("wall_time_s")),
        build_time_s=_number(path, line, "build_time_s", row.get("build_time_s") or "0"),
    )  # fmt: skip


def read_comparison(out_dir: str | Path) -> list[VariantRecord]:
    """The records of a comparison from its `comparison.csv` (a folder or the file itself).

    A hand-edited file is read strictly: a missing column, a cell that is not a number where one
    belongs (`4,096`, `n/a`) or an extra cell is a `CompareError` naming the file, line and column.
    An empty cell is a missing value (NaN), as `write_comparison` writes it.
    """
    path = Path(out_dir)
    path = path / COMPARISON_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no {COMPARISON_FILE} at {str(path)!r}; run `lightning-peft compare` first")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # a BOM from a spreadsheet is not part of `name`
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise CompareError(f"{path}: column(s) {missing} missing (header: {reader.fieldnames or []})")
            return [_record_from_row(path, reader.line_num, row) for row in reader]
    except UnicodeDecodeError as err:
        raise CompareError(f"{path}: not UTF-8 text (byte offset {err.start}); save it as UTF-8 CSV") from None
    except csv.Error as err:
        raise CompareError(f"{path}: not a readable CSV file: {err}") from None


def read_curves(out_dir: str | Path, names: Sequence[str] | None = None) -> dict[str, list[dict[str, float]]]:
    """Per-validation metrics of every variant: `{name: [{"step": s, metric: value, ...}, ...]}`."""
    out: dict[str, list[dict[str, float]]] = {}
    for run_dir in sorted(p for p in Path(out_dir).iterdir() if p.is_dir()):
        if names is not None and run_dir.name not in names:
            continue
        rows = read_csv(run_dir / CURVES_FILE)
        if rows:
            out[run_dir.name] = [{k: parse_number(v) for k, v in row.items() if k != "variant"} for row in rows]
    return out
