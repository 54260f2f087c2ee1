"""Two-process CPU DDP (gloo) with AdapterCallback, MergeRestart and UpdateDiagnostics.

The fit runs in a subprocess (`tests/scripts/ddp_fit.py`) because Lightning's `ddp`
strategy re-launches the running script for the other rank.
"""

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

pytestmark = pytest.mark.slow  # a two-process launch: CI runs it, the fast lane does not

SCRIPT = Path(__file__).parent / "scripts" / "ddp_fit.py"
sys.path.insert(0, str(SCRIPT.parent))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "diagnostics"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout + proc.stderr


def test_adapters_identical_across_ranks_and_trained(ddp_run):
    out, _ = ddp_run
    rank0 = torch.load(out / "adapters_rank0.pt")
    rank1 = torch.load(out / "adapters_rank1.pt")
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    moved = [k for k in rank0 if k.endswith("mora_M") or k.endswith("lora_B")]
    assert moved and all(rank0[k].abs().sum() > 0 for k in moved)  # the adapters really trained


def test_restarts_merge_identically_on_every_rank(ddp_run):
    """The bases hold two merged cycles (they moved from W0), bit-identical on both ranks."""
    from ddp_fit import TinyLM

    out, log = ddp_run
    rank0 = torch.load(out / "adapters_rank0.pt")
    rank1 = torch.load(out / "adapters_rank1.pt")
    original = TinyLM().state_dict()
    bases = [k for k in rank0 if k.endswith(".base.weight")]
    assert len(bases) == 28
    for key in bases:
        assert torch.equal(rank0[key], rank1[key]), key
        assert not torch.equal(rank0[key], original[key.replace(".base.weight", ".weight")]), key
    assert log.count("MergeRestart: merged and restarted 28 modules") == 2  # rank zero logs, twice


def test_plan_and_diagnostics_written_once(ddp_run):
    out, log = ddp_run
    assert log.count("lightning-peft plan") == 1  # the plan table title: printed by rank zero only
    csvs = list(out.rglob("update_diagnostics.csv"))
    assert len(csvs) == 1
    rows = csvs[0].read_text().strip().splitlines()
    steps = {line.split(",")[0] for line in rows[1:]}
    modules = {line.split(",")[1] for line in rows[1:]}
    assert len(modules) == 28  # 4 blocks x 7 Linear layers
    assert len(rows) - 1 == len(steps) * len(modules)  # one row per (step, module): no duplicate rank rows


def test_ddp_checkpoint_resumes_in_one_process(ddp_run):
    from ddp_fit import POLICY, TinyLM

    from lightning_peft import AdapterCallback, adapter_state_dict, restore_from_checkpoint

    out, _ = ddp_run
    ckpt = out / "final.ckpt"
    rank0 = torch.load(out / "adapters_rank0.pt")
    restored = TinyLM()
    restore_from_checkpoint(restored, ckpt)  # adapters, merged bases and MoRA's cycle
    for key, value in adapter_state_dict(restored).items():
        assert torch.equal(value, rank0[key]), key
    state = restored.state_dict()
    for key in [k for k in rank0 if k.endswith(".base.weight")]:
        assert torch.equal(state[key], rank0[key]), key
    tokens = torch.randint(0, 32, (16, 12), generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=8)
    model = TinyLM()
    trainer = L.Trainer(
        max_steps=8,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[AdapterCallback(POLICY, verbose=False)],
    )
    trainer.fit(model, data, ckpt_path=ckpt)
    assert trainer.global_step == 8
    resumed = adapter_state_dict(model)
    assert any(not torch.equal(resumed[k], rank0[k]) for k in rank0)  # it trained on from there
