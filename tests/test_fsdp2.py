"""FSDP2 (Lightning's `ModelParallelStrategy`, `fully_shard`) on CPU with gloo and 2 processes.

The sharded fits run in one subprocess (`tests/scripts/fsdp2_fit.py`): Lightning re-launches
the running script for rank 1. Each policy's adapters after a few steps must equal a
single-process run over the same global batches; the hybrid policy also checkpoints (a
gathered adapter-only file, and a full sharded checkpoint), resumes, and logs diagnostics.
"""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

SCRIPT = Path(__file__).parent / "scripts" / "fsdp2_fit.py"
sys.path.insert(0, str(SCRIPT.parent))

import fsdp2_fit  # noqa: E402

from lightning_peft import AdapterCallback, adapter_state_dict, restore_from_checkpoint  # noqa: E402
from lightning_peft.callbacks.adapter import check_checkpoint_strategy  # noqa: E402
from lightning_peft.core.inject import AdapterStateError  # noqa: E402
from lightning_peft.diagnostics import UpdateDiagnostics  # noqa: E402

pytestmark = pytest.mark.slow
RUNS = [*fsdp2_fit.POLICIES, "resume_full", "resume_sharded"]


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), json.dumps(RUNS)], capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def single_process(
    name: str, steps: int, callbacks: tuple = (), ckpt_path: Path | None = None
) -> tuple[L.LightningModule, L.Trainer]:
    """The same fit in one process: one shard holding each whole global batch."""
    L.seed_everything(1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[AdapterCallback(fsdp2_fit.POLICIES[name], verbose=False), *callbacks],
    )
    model = fsdp2_fit.TinyLM()
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, trainer


def single_process_resumed(tmp_path: Path) -> dict[str, torch.Tensor]:
    """STEPS steps, a checkpoint, a resumed run to 2 * STEPS, all in one process (Lightning's own resume)."""
    _, trainer = single_process("hybrid", fsdp2_fit.STEPS)
    trainer.save_checkpoint(tmp_path / "single.ckpt")
    model, _ = single_process("hybrid", 2 * fsdp2_fit.STEPS, ckpt_path=tmp_path / "single.ckpt")
    return adapter_state_dict(model)


def assert_same_adapters(sharded: dict, single: dict) -> None:
    assert sharded.keys() == single.keys() and sharded
    for key, value in single.items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", list(fsdp2_fit.POLICIES))
def test_adapters_equal_single_process(fsdp2_run, name):
    single = adapter_state_dict(single_process(name, fsdp2_fit.STEPS)[0])
    assert_same_adapters(torch.load(fsdp2_run / f"{name}.pt", weights_only=True), single)
    assert any(v.abs().sum() > 0 for k, v in single.items() if "lora_B" in k or "mora_M" in k)  # it trained


@pytest.mark.parametrize("tag", ["full", "sharded"])
def test_resume_under_fsdp2_equals_single_process_resume(fsdp2_run, tag, tmp_path):
    # Lightning's resume replays its loop state (the checkpoint ends an epoch: the resumed run
    # counts one more epoch than an uninterrupted one), so the reference is a resume in one process.
    resumed = torch.load(fsdp2_run / f"{tag}_resumed.pt", weights_only=True)
    assert_same_adapters(resumed, single_process_resumed(tmp_path))
    at_checkpoint = torch.load(fsdp2_run / f"{tag}_step{fsdp2_fit.STEPS}.pt", weights_only=True)
    assert any(not torch.equal(resumed[k], at_checkpoint[k]) for k in resumed)  # it trained on


def test_fsdp2_checkpoint_restores_in_one_process(fsdp2_run):
    model = fsdp2_fit.TinyLM()
    restore_from_checkpoint(model, fsdp2_run / "full.ckpt")  # the gathered adapter-only file
    saved = torch.load(fsdp2_run / f"full_step{fsdp2_fit.STEPS}.pt", weights_only=True)
    assert_same_adapters(saved, adapter_state_dict(model))


def read_rows(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open() as f:
        return {(r["step"], r["module"]): r for r in csv.DictReader(f)}


def test_diagnostics_under_fsdp2_written_once_and_equal_single_process(fsdp2_run, tmp_path):
    tables = list((fsdp2_run / "full").rglob("update_diagnostics.csv"))
    assert len(tables) == 1
    sharded = read_rows(tables[0])
    diagnostics = UpdateDiagnostics(every_n_steps=1, plots=False, track_grad_norm=True, log_dir=str(tmp_path))
    single_process("hybrid", fsdp2_fit.STEPS, (diagnostics,))
    single = read_rows(tmp_path / "update_diagnostics.csv")
    assert sharded.keys() == single.keys() and len(single) == (fsdp2_fit.STEPS + 1) * 28  # steps 0..3 x 28 modules
    compared = 0
    for key, row in single.items():
        for metric, value in row.items():
            try:
                expected, got = float(value), float(sharded[key][metric])
            except ValueError:
                assert sharded[key][metric] == value, (key, metric)
                continue
            if math.isnan(expected):
                assert math.isnan(got), (key, metric)
                continue
            assert got == pytest.approx(expected, rel=1e-3, abs=1e-6), (key, metric)
            compared += 1
    assert compared > 1000
    assert any(float(r["grad_norm"]) > 0 for r in sharded.values() if r["grad_norm"] not in ("", "nan"))


def test_adapter_only_sharded_checkpoint_refused_before_training():
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)  # sharded checkpoints by default
    with pytest.raises(AdapterStateError, match="save_distributed_checkpoint=False"):
        check_checkpoint_strategy(strategy, adapter_only=True)
    check_checkpoint_strategy(strategy, adapter_only=False)
    gathered = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
    check_checkpoint_strategy(gathered, adapter_only=True)
