"""FSDP2 (Lightning's `ModelParallelStrategy`, `fully_shard`) on CPU with gloo and 2 processes.

The sharded fits run in a subprocess (`tests/scripts/fsdp2_fit.py`): Lightning re-launches
the running script for rank 1. Each policy's adapters after a few steps must equal a
single-process run over the same global batches.
"""

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "fsdp2_fit.py"
sys.path.insert(0, str(SCRIPT.parent))

import fsdp2_fit  # noqa: E402

from lightning_peft import AdapterCallback, adapter_state_dict  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    names = json.dumps(list(fsdp2_fit.POLICIES))
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), names], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def single_process_adapters(name: str) -> dict[str, torch.Tensor]:
    L.seed_everything(1)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=fsdp2_fit.STEPS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[AdapterCallback(fsdp2_fit.POLICIES[name], verbose=False)],
    )
    model = fsdp2_fit.TinyLM()
    trainer.fit(model)  # TinyLM.train_dataloader: one shard of world size 1, the whole global batch
    return adapter_state_dict(model)


@pytest.mark.parametrize("name", list(fsdp2_fit.POLICIES))
def test_fsdp2_adapters_equal_single_process(fsdp2_run, name):
    sharded = torch.load(fsdp2_run / f"{name}.pt", weights_only=True)
    single = single_process_adapters(name)
    assert sharded.keys() == single.keys() and sharded
    for key, value in single.items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert any(v.abs().sum() > 0 for k, v in single.items() if "lora_B" in k or "mora_M" in k)  # it trained
