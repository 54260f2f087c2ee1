"""Crash-safe resume: SIGKILL a CLI `fit` after a checkpoint, resume with `ckpt_path=last`.

The resumed run must end with exactly the adapter weights, optimizer state and logged loss
of an uninterrupted run with the same seed (deterministic CPU).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"
STEPS = 8


def _config(out: Path, hang_marker: Path | None = None) -> Path:
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            # every 2 steps = every epoch (64 pairs, batch 32): resume starts at an epoch boundary
            "init_args": {"dirpath": str(out / "ckpts"), "every_n_train_steps": 2, "save_last": True, "save_top_k": -1},
        }
    ]
    if hang_marker is not None:
        callbacks.append(
            {"class_path": "crash_helpers.HangAfterStep", "init_args": {"step": 5, "marker": str(hang_marker)}}
        )
    cfg = {
        "trainer": {
            "max_steps": STEPS,
            "enable_progress_bar": False,
            "log_every_n_steps": 1,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(out), "name": "logs", "version": 0},
            },
            "callbacks": callbacks,
        },
        "diagnostics": {"every_n_steps": 4, "plots": False},
    }
    path = out / "override.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lightning_peft.cli", "fit", "--config", "configs/uuid_lora.yaml", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=f"{SCRIPTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _last_loss(out: Path) -> float:
    with open(out / "logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train_loss")]
    return float(rows[-1]["train_loss"]), int(rows[-1]["step"])


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    full.mkdir()
    crashed.mkdir()
    done = subprocess.run(_cli("--config", str(_config(full))), cwd=REPO, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    marker = crashed / "hung"
    proc = subprocess.Popen(
        _cli("--config", str(_config(crashed, marker))),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    for _ in range(1500):  # up to ~5 minutes for the run to reach step 5 and hang there
        if marker.exists():
            break
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the run never reached the hang point")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(crashed / "ckpts" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert not list((crashed / "ckpts").glob("*.tmp")) and not list((crashed / "ckpts").glob(".*"))

    resumed = subprocess.run(
        _cli("--config", str(_config(crashed)), "--ckpt_path", "last"),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = torch.load(full / "ckpts" / "last.ckpt", weights_only=False)
    b = torch.load(crashed / "ckpts" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys() and a["state_dict"]
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for sa, sb in zip(
        a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(), strict=True
    ):
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[name], sb[name])
    assert _last_loss(full) == _last_loss(crashed)
