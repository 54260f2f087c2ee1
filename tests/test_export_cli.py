"""`lightning-peft export`: one command turns a finished CLI run's checkpoint into a peft or merged folder."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from helpers import short_run_trainer, tiny_llama
from transformers import AutoModelForCausalLM

from lightning_peft import restore_from_checkpoint
from lightning_peft.cli.main import main
from lightning_peft.core.stored import read_checkpoint
from lightning_peft.interop.export import load_peft_export
from lightning_peft.tasks import CausalLM

REPO = Path(__file__).resolve().parent.parent
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "generate_on_eval": False}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 4-step hybrid (MoRA outer, DoRA inner) CLI run on a small Llama, from the shipped config."""
    tmp = tmp_path_factory.mktemp("run")
    override = {
        "trainer": short_run_trainer(tmp, 4),
        "model": {"init_args": TINY},
        "diagnostics": {"every_n_steps": 2, "plots": False},
    }
    (tmp / "override.yaml").write_text(yaml.safe_dump(override))
    torch.set_num_threads(1)
    main(["fit", "--config", str(REPO / "configs" / "uuid_hybrid.yaml"), "--config", str(tmp / "override.yaml")])
    return tmp


def reference_logits(run: Path, ids: torch.Tensor) -> torch.Tensor:
    """The trained model rebuilt in-process (same config, the checkpoint's adapters), in eval mode."""
    module = CausalLM(vocab_size=32, num_attention_heads=4, num_key_value_heads=2, **TINY)
    restore_from_checkpoint(module, read_checkpoint(run / "ckpts" / "last.ckpt"))
    with torch.no_grad():
        return module.model.eval()(input_ids=ids).logits


def export(run: Path, out: Path, *extra: str) -> None:
    config = run / "run" / "version_0" / "config.yaml"  # what LightningCLI saved for the run
    main(
        ["export", "--config", str(config), "--ckpt_path", str(run / "ckpts" / "last.ckpt"), "--out", str(out), *extra]
    )


@pytest.mark.slow
def test_export_a_cli_run_to_peft_and_merged(run, tmp_path):
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = reference_logits(run, ids)
    export(run, tmp_path / "peft", "--routes", "{mora: svd}", "--svd_energy", "1.0", "--save_base", "true")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base")
    with torch.no_grad():
        peft_logits = load_peft_export(base, tmp_path / "peft").eval()(input_ids=ids).logits
    assert float((peft_logits - ours).abs().max() / ours.abs().max()) < 1e-5
    export(run, tmp_path / "merged", "--format", "merged")
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(input_ids=ids).logits
    assert float((merged - ours).abs().max() / ours.abs().max()) < 1e-5


@pytest.mark.slow
def test_export_errors_exit_2_and_write_nothing(run, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        export(run, out)  # MoRA layers without a route
    assert exc.value.code == 2 and "model.model.layers.0.self_attn.q_proj (mora)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export(run, out, "--format", "merged", "--svd_rank", "4")
    assert "apply to peft only" in capsys.readouterr().err
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "evil": torch.nn.Linear(2, 2)}, bad)  # a pickled module: refused unread
    config = run / "run" / "version_0" / "config.yaml"
    with pytest.raises(SystemExit):
        main(["export", "--config", str(config), "--ckpt_path", str(bad), "--out", str(out)])
    assert "weights_only=True" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == [bad]


def test_inspect_reports_per_layer_diagnostics_of_a_peft_adapter(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(0)
    base.save_pretrained(tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    main(["inspect", str(tmp_path / "adapter"), str(tmp_path / "base"), "--out", str(tmp_path / "diag")])
    out = capsys.readouterr().out
    assert "dora" in out and "rel. norm" in out
    rows = list(csv.DictReader((tmp_path / "diag" / "update_diagnostics.csv").open()))
    assert len(rows) == 2 * 6 and {r["method"] for r in rows} == {"dora"}
    layer = peft_model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    w0 = (
        layer.base_layer.weight.double()
    )  # DoRA's update from peft's tensors: (m / ||W0 + s B A||_row) (W0 + s B A) - W0
    v = w0 + layer.get_delta_weight("default").double()
    m = layer.lora_magnitude_vector["default"].weight.double()
    delta = (m / v.norm(dim=1))[:, None] * v - w0
    row = next(r for r in rows if r["module"] == "model.layers.0.self_attn.q_proj")
    assert float(row["rel_norm"]) == pytest.approx(float(delta.norm() / w0.norm()), rel=1e-4)
    assert list((tmp_path / "diag").glob("*.png"))
    with pytest.raises(SystemExit):
        main(["inspect", str(tmp_path / "base"), str(tmp_path / "base"), "--out", str(tmp_path / "x")])
    assert "adapter_config.json is missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # LlamaModel has no `model.` level: the names are off by a prefix
        main(["inspect", str(tmp_path / "adapter"), str(tmp_path / "base"), "--auto_class", "AutoModel"])
    err = capsys.readouterr().err
    assert "extra prefix 'model.'" in err and "auto_class" in err


def test_export_never_writes_over_the_run_it_exports(run, tmp_path, capsys):
    """The run folder holds the checkpoint; an export folder holding the run's config is its source too."""
    import shutil

    def snapshot(folder: Path) -> dict[str, bytes]:
        return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    before = snapshot(run)
    with pytest.raises(SystemExit) as exit_info:
        export(run, run, "--overwrite", "true")
    assert exit_info.value.code == 2 and "last.ckpt" in capsys.readouterr().err
    target = tmp_path / "merged"
    export(run, target, "--format", "merged")
    config = shutil.copy(run / "run" / "version_0" / "config.yaml", target / "config.yaml")
    inside = snapshot(target)
    args = ["--ckpt_path", str(run / "ckpts" / "last.ckpt"), "--out", str(target), "--format", "merged"]
    with pytest.raises(SystemExit):
        main(["export", "--config", str(config), *args, "--overwrite", "true"])
    assert "config.yaml" in capsys.readouterr().err
    assert snapshot(run) == before and snapshot(target) == inside
