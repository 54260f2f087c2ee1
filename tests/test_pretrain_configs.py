"""configs/pretrain: every config parses and trains through the CLI; the adapter budgets match."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from lightning_peft.cli.main import main
from lightning_peft.policy import LayerPolicy
from lightning_peft.tasks import CausalLM

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = sorted(p.name for p in (REPO / "configs" / "pretrain").glob("*.yaml"))


def _load(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / "pretrain" / name).read_text())


def _restart_callbacks(cfg: dict) -> list[dict]:
    return [c for c in cfg["trainer"].get("callbacks", []) if c["class_path"] == "lightning_peft.MergeRestart"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.chdir(REPO)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_six_variants_are_there():
    assert [f"{v}.yaml" for v in sorted(("full", "lora", "relora", "mora", "remora", "hybrid"))] == PRETRAIN
    for name in PRETRAIN:
        cfg = _load(name)
        restarts = _restart_callbacks(cfg)
        assert len(restarts) == (1 if name.startswith("re") else 0), name
        model = cfg["model"]["init_args"]
        assert model["lr_schedule"] == "cosine_restarts"
        if restarts:  # the jagged schedule re-warms on the merge period
            assert model["restart_every"] == restarts[0]["init_args"]["every"]


def test_adapter_budgets_are_equal_and_full_trains_everything():
    counts = {}
    for name in PRETRAIN:
        cfg = _load(name)
        model = CausalLM(**cfg["model"]["init_args"])
        plan = LayerPolicy.from_dict(cfg["adapters"]["policy"]).resolve(model)
        counts[name.removesuffix(".yaml")] = plan.trainable_params
        if name == "full.yaml":
            assert plan.trainable_params == sum(p.numel() for p in model.parameters())
    lora = counts["lora"]
    assert counts["relora"] == lora and counts["remora"] == counts["mora"]
    for name in ("mora", "hybrid"):  # MoRA's square M rounds to LoRA r's count; DoRA adds a magnitude per row
        assert abs(counts[name] - lora) / lora < 0.02, counts
    assert counts["full"] > 3 * lora


@pytest.mark.parametrize("config", PRETRAIN)
def test_config_fits_through_the_cli(config, tmp_path, capsys):
    """Three steps of each config, validating at step 2; restart configs merge every step (T=1)."""
    cfg = _load(config)
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(tmp_path / "ck")}}
    ]
    override: dict = {
        "trainer": {
            "max_steps": 3,
            "val_check_interval": 2,
            "limit_val_batches": 2,
            "enable_progress_bar": False,
            "logger": False,
            "default_root_dir": str(tmp_path),
            "callbacks": callbacks,
        },
        "diagnostics": {"every_n_steps": 1, "plots": False},
        # a 100-step warm-up in a 3-step run is refused (the cosine would never start): none here
        "model": {"init_args": {"warmup_steps": 0}},
    }
    if _restart_callbacks(cfg):
        callbacks.append({"class_path": "lightning_peft.MergeRestart", "init_args": {"every": 1}})
        override["model"]["init_args"].update(restart_every=1, restart_warmup_steps=0)
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    main(["fit", "--config", f"configs/pretrain/{config}", "--config", str(path)])
    ckpt = torch.load(next((tmp_path / "ck").glob("*.ckpt")), weights_only=False)
    assert ckpt["global_step"] == 3
    restart_state = [v for k, v in ckpt["callbacks"].items() if k.startswith("MergeRestart")]
    assert [s["restarts"] for s in restart_state] == ([2] if _restart_callbacks(cfg) else [])
    assert (tmp_path / "update_diagnostics.csv").is_file()
    final = {line.split()[1]: line.split()[3] for line in capsys.readouterr().out.splitlines() if "_loss" in line}
    assert math.isfinite(float(final["val_loss"])) and float(final["val_loss"]) < math.log(256) + 0.5, final
