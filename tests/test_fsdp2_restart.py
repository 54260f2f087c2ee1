"""MergeRestart under FSDP2 (`ModelParallelStrategy`, `fully_shard`) on CPU with gloo and 2 processes.

The sharded fits run in one subprocess (`tests/scripts/fsdp2_restart_fit.py`). Each rank merges
its own rows of every base weight; the gathered adapters, merged bases and per-step losses must
equal a single-process run over the same global batches, for every method (LoRA, DoRA, HiRA,
MoRA's `rope` and `sharing` cycles) and uneven row blocks, with the optimizer state reset or
pruned per shard; and a run resumed from a sharded checkpoint inside a cycle must equal the
uninterrupted run.
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

SCRIPT = Path(__file__).parent / "scripts" / "fsdp2_restart_fit.py"
sys.path.insert(0, str(SCRIPT.parent))

import fsdp2_restart_fit as fit  # noqa: E402

from lightning_peft import find_adapters  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2_restart")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), json.dumps(["whole", "resumed", "prune"])],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def single_process(reset: str, diagnostics_dir: Path | None = None) -> dict:
    """The same fit in one process: one shard holding each whole global batch."""
    L.seed_everything(1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=fit.STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=fit.callbacks(reset, diagnostics_dir),
    )
    model = fit.RestartLM()
    trainer.fit(model)
    return fit.record(model, trainer)


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_same_state(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys() and expected
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("reset", ["reset", "prune"])
def test_sharded_restarts_equal_single_process(sharded, reset, tmp_path):
    got = load(sharded / ("whole.pt" if reset == "reset" else "prune.pt"))
    expected = single_process(reset, tmp_path if reset == "reset" else None)
    assert_same_state(got["state"], expected["state"])  # adapters and merged bases
    torch.testing.assert_close(got["losses"], expected["losses"], rtol=1e-5, atol=1e-6)
    assert len(got["losses"]) == fit.STEPS
    assert set(got["restarts"].values()) == {2} and got["restarts"] == expected["restarts"]
    original = fit.RestartLM().state_dict()
    bases = [k for k in got["state"] if k.endswith(".base.weight")]
    assert len(bases) == 28  # 4 blocks x 7 Linear layers, each merged twice
    for key in bases:
        assert not torch.equal(got["state"][key], original[key.replace(".base.weight", ".weight")]), key
    if reset == "reset":
        assert_same_diagnostics(sharded / "diagnostics" / "update_diagnostics.csv", tmp_path / "update_diagnostics.csv")


def assert_same_diagnostics(sharded_csv: Path, single_csv: Path) -> None:
    """The cumulative metrics (over all cycles, from the original weights each rank gathered) match too."""

    def rows(path: Path) -> dict:
        with path.open() as f:
            return {(r["step"], r["module"]): r for r in csv.DictReader(f)}

    got, expected = rows(sharded_csv), rows(single_csv)
    assert got.keys() == expected.keys() and len(expected) == (fit.STEPS + 1) * 28
    for key, row in expected.items():
        for metric in ("restarts", "cum_rel_norm", "cum_rank", "rel_norm"):
            want, have = float(row[metric]), float(got[key][metric])
            assert math.isnan(want) == math.isnan(have) and (
                math.isnan(want) or have == pytest.approx(want, 1e-3, 1e-6)
            )
    lora = [r for r in got.values() if r["method"] == "lora"]
    assert lora and max(float(r["cum_rank"]) for r in lora) > 3  # past one cycle's rank (r=3): the restarts add up


def test_resume_from_sharded_checkpoint_mid_cycle_equals_uninterrupted_run(sharded):
    whole, mid, resumed = (load(sharded / f"{name}.pt") for name in ("whole", "mid", "resumed"))
    assert set(mid["restarts"].values()) == {1}  # the checkpoint lies inside the second cycle
    assert (sharded / "mid.ckpt").is_dir()  # a distributed (sharded) checkpoint
    assert_same_state(resumed["state"], whole["state"])
    torch.testing.assert_close(resumed["losses"], whole["losses"][fit.MID :], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mid["losses"], whole["losses"][: fit.MID], rtol=1e-5, atol=1e-6)
    assert resumed["restarts"] == whole["restarts"]


def test_merge_rows_equals_merge_weight_for_every_method():
    """Each method's row-wise rule on any block of rows equals the rows of its whole-weight merge."""
    L.seed_everything(3)
    model = fit.RestartLM()
    from lightning_peft import inject_adapters

    inject_adapters(model, fit.POLICY)
    methods = set()
    for _, layer in find_adapters(model):
        with torch.no_grad():
            for p in layer.adapter.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        w0 = layer.base_weight().detach()
        whole = layer.adapter.merge_weight(w0.clone())
        for rows in (slice(0, 5), slice(5, w0.shape[0]), slice(7, 7)):
            torch.testing.assert_close(layer.adapter.merge_rows(w0[rows].clone(), rows), whole[rows])
        methods.add(layer.method)
    assert methods == {"lora", "dora", "hira", "mora"}


def test_restart_of_gpt2_conv1d_bases_sharded_by_input_rows(tmp_path):
    """GPT-2's `Conv1D` stores `(in, out)`: FSDP2's rows are inputs, so its base is gathered, merged
    and written back to its shard. One process (a 1-rank gloo group) suffices to take that path."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_peft import inject_adapters
    from lightning_peft.callbacks.restart import restart_adapters
    from lightning_peft.core.sharding import full_state_dict

    policy = {"rules": [{"method": m, "modules": [f"h.{i}.*"], "hparams": {"r": 2}} for i, m in enumerate(METHODS)]}
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
        inject_adapters(model, policy)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".adapter." in name:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        models.append(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for block in models[1].transformer.h:
            fully_shard(block, mesh=init_device_mesh("cpu", (1,)))
        restart_adapters(models[0], cycle=1, seed=3)
        restart_adapters(models[1], cycle=1, seed=3)
        sharded = full_state_dict(models[1])
    finally:
        dist.destroy_process_group()
    for key, value in models[0].state_dict().items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-6, atol=1e-7, msg=key)
    assert {layer.method for _, layer in find_adapters(models[0])} == set(METHODS)


METHODS = ("lora", "dora", "hira", "mora")
