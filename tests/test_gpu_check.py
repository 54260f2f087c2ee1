"""benchmarks/gpu_check.py without a GPU: a one-line refusal, and every check of a tiny CPU dry run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
METHODS = [
    "floor (frozen base)",
    "peft LoRA",
    "ours LoRA",
    "peft DoRA",
    "ours DoRA",
    "peft HiRA",
    "ours HiRA",
    "ours MoRA sharing",
    "ours MoRA rope",
]


def rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if "---" not in line]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_it_refuses_in_one_line(tmp_path):
    out = tmp_path / "check.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("gpu_check: CUDA is not available") and "\n" not in proc.stderr.strip()
    assert not out.exists()


@pytest.mark.slow
def test_dry_run_on_cpu_runs_every_check(tmp_path):
    out = tmp_path / "check.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("**Dry run") and "error:" not in text
    table = rows(text)
    assert all(len(row) == 9 for row in table)
    for dtype in ("bfloat16", "float16"):
        step = [row for row in table if row[0] == "step" and row[1] == dtype]
        assert [row[2] for row in step] == METHODS
        assert all(float(row[3]) > 0 for row in step)
        assert next(row for row in step if row[2] == "ours DoRA")[6] != "-"  # compared with peft's DoRA
    compiled = [row[2] for row in table if row[0].startswith("torch.compile")]
    assert compiled == ["floor (frozen base)", "ours DoRA"]
    fits = {row[2]: row for row in table if row[0] == "fit, 1 device"}
    assert set(fits) == {"FSDP2, ModelParallelStrategy(1, 1)", "single device, no strategy"}
    assert all(float(row[3]) > 0 for row in fits.values())
    qlora = [row for row in table if row[0] == "QLoRA nf4"]
    assert qlora, "the QLoRA check left no row"
    for row in qlora:  # measured, or skipped with the reason (bitsandbytes missing, or no quantized bases here)
        assert row[3] != "-" or row[8].startswith("skipped:"), row
