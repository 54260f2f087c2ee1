"""The `lightning-peft` command, run in-process: plan, fit, print_config, errors, report, seeds."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from helpers import short_run_trainer

from lightning_peft.cli.main import main
from lightning_peft.policy import list_presets, preset_text

REPO = Path(__file__).resolve().parent.parent
# sft_* configs train a user's model folder (tests/test_local_data.py runs them on a tiny one it builds);
# testbed_* pretrains a base first (tests/test_testbed.py runs it with a tiny one).
CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith(("sft_", "testbed_")))
UUID_CONFIGS = [c for c in CONFIGS if c.startswith("uuid_")]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # configs name policies by repo-relative paths, as in the README
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _short_run(tmp_path: Path, steps: int = 4) -> Path:
    """An override config: few steps, logs and checkpoints under tmp_path."""
    override = {
        "trainer": short_run_trainer(tmp_path, steps, every_n_train_steps=2),
        "diagnostics": {"every_n_steps": 2},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


@pytest.mark.parametrize("preset", list_presets())
def test_plan_prints_the_table_for_every_preset(preset, capsys):
    main(["plan", "--config", "configs/uuid_hybrid.yaml", "--adapters.policy", preset])
    out = capsys.readouterr().out
    assert "lightning-peft plan" in out and "total trainable" in out
    methods = {r["method"] for r in yaml.safe_load(preset_text(preset))["rules"]}
    for method in methods:
        assert f"total {method}" in out


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_fit_writes_checkpoints_diagnostics_and_figures(config, tmp_path):
    main(["fit", "--config", f"configs/{config}", "--config", str(_short_run(tmp_path))])
    run = tmp_path / "run" / "version_0"
    assert (tmp_path / "ckpts" / "last.ckpt").is_file()
    ckpt = torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=False)
    assert "lightning_peft" in ckpt and ckpt["global_step"] == 4
    with open(run / "update_diagnostics.csv") as f:
        rows = list(csv.DictReader(f))
    modules = {r["module"] for r in rows}
    assert modules and len(rows) == len(modules) * len({r["step"] for r in rows})
    pngs = list(run.glob("*.png"))
    assert pngs and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert (run / "config.yaml").is_file()


def test_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/uuid_hybrid.yaml", "--print_config"])
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["adapters"]["policy"] == "mora_outer_dora_inner"  # a preset name
    with pytest.raises(SystemExit):
        policy = "policies/mora_outer_dora_inner.yaml"
        main(["fit", "--config", "configs/uuid_hybrid.yaml", "--adapters.policy", policy, "--print_config"])
    printed = capsys.readouterr().out
    first = yaml.safe_load(printed)
    # a policy file stays a path (jsonargparse's dataclass parsing would read `"2:4"` as YAML 1.1);
    # every checkpoint stores the resolved plan and the policy itself
    assert first["adapters"]["policy"] == policy
    assert first["model"]["class_path"] == "lightning_peft.tasks.CausalLM"
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(path), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == first


def test_dotted_override_changes_the_policy(capsys):
    main(["plan", "--config", "configs/uuid_hybrid.yaml", "--adapters.policy", "dora_all"])
    out = capsys.readouterr().out
    assert "total dora" in out and "total mora" not in out


def test_a_policy_mapping_on_the_command_line_replaces_the_configs(tmp_path, capsys):
    """jsonargparse would merge the two mappings field by field; the policy named last is the policy."""
    config_policy = {"rules": [{"name": "mlp", "method": "mora", "modules": ["mlp.*"], "hparams": {"r": 4}}]}
    override = tmp_path / "policy_in_config.yaml"
    override.write_text(yaml.safe_dump({"adapters": {"policy": config_policy}}))
    cli_policy = "{rules: [{name: attn, method: lora, modules: [q_proj, v_proj]}]}"
    args = ["plan", "--config", "configs/uuid_hybrid.yaml", "--config", str(override)]
    main([*args, "--adapters.policy", cli_policy])
    out = capsys.readouterr().out
    assert "total lora" in out and "total mora" not in out and "mlp" not in out
    main([*args, f"--adapters.policy={cli_policy}"])
    assert "total mora" not in capsys.readouterr().out
    main(args)  # the config's own policy when the command line names none
    assert "total mora" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"model": {"init_args": {"hiden_size": 64}}}, "hiden_size"),  # a typo in a YAML key
        ({"model": {"init_args": {"lr": "fast"}}}, "lr"),  # a bad value
        ({"adapters": {"policie": "lora_all"}}, "policie"),
        ({"diagnostics": {"every_n_steps": "often"}}, "every_n_steps"),
    ],
)
def test_bad_config_fails_before_training(patch, message, tmp_path, capsys):
    cfg = yaml.safe_load((REPO / "configs" / "uuid_lora.yaml").read_text())
    for section, values in patch.items():
        if "init_args" in values:
            cfg[section]["init_args"].update(values["init_args"])
        else:
            cfg[section].update(values)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--trainer.logger", "false"])
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "error:" in err and message in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_bad_policy_fails_before_training(tmp_path, capsys):
    bad = tmp_path / "policy.yaml"
    bad.write_text("rules:\n  - method: lora\n    modules: [q_proj]\n    hparams: {rnak: 8}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/uuid_lora.yaml", "--adapters.policy", str(bad), "--trainer.logger", "false"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "rnak" in err and "rule 0" in err


def test_policy_yaml_syntax_error_names_the_file(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("rules:\n  - method: lora\n    modules: [q_proj\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--config", "configs/uuid_lora.yaml", "--adapters.policy", str(bad)])
    assert exit_info.value.code != 0
    assert "broken.yaml" in capsys.readouterr().err


@pytest.mark.slow
def test_seed_everything_reproduces_metrics(tmp_path):
    results = []
    for name in ("a", "b"):
        out = tmp_path / name
        main(["fit", "--config", "configs/uuid_hybrid.yaml", "--config", str(_short_run(out, steps=6))])
        state = torch.load(out / "ckpts" / "last.ckpt", weights_only=False)["state_dict"]
        with open(out / "run" / "version_0" / "update_diagnostics.csv") as f:
            table = [(r["step"], r["module"], r["rel_norm"]) for r in csv.DictReader(f)]
        results.append((state, table))
    (state_a, table_a), (state_b, table_b) = results
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert table_a == table_b


@pytest.mark.slow
def test_validate_on_a_fresh_module_from_the_fit_checkpoint(tmp_path, capsys):
    main(["fit", "--config", "configs/uuid_hybrid.yaml", "--config", str(_short_run(tmp_path))])
    capsys.readouterr()
    ckpt = str(tmp_path / "ckpts" / "last.ckpt")
    main(
        [
            "validate",
            "--config",
            "configs/uuid_hybrid.yaml",
            "--ckpt_path",
            ckpt,
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert "val_char_acc" in out and "val_loss" in out


@pytest.mark.slow
def test_report_re_renders_a_finished_run(tmp_path, capsys):
    main(["fit", "--config", "configs/uuid_mora.yaml", "--config", str(_short_run(tmp_path))])
    run = tmp_path / "run" / "version_0"
    assert f"run folder: {run}" in capsys.readouterr().out  # fit ends by saying where it wrote
    for png in run.glob("*.png"):
        png.unlink()
    main(["report", str(run)])
    out = capsys.readouterr().out
    assert "mora" in out and "rel. norm" in out
    assert list(run.glob("*.png"))
    assert f"figures written to {run}:" in " ".join(out.split()) and "replacing" not in out
    main(["report", str(run)])
    assert "replacing the" in capsys.readouterr().out  # the second time it says it redrew them


def test_report_on_a_missing_dir_fails_clearly(tmp_path):
    with pytest.raises((SystemExit, FileNotFoundError, ValueError)):
        main(["report", str(tmp_path / "nope")])


@pytest.mark.slow
def test_automatic_optimizer_holds_the_adapters(tmp_path):
    """`optimizer:` in a config: our CLI injects before LightningCLI builds it, so it trains the adapters."""
    main(
        ["fit", "--config", "configs/uuid_lora.yaml", "--config", str(_short_run(tmp_path))]
        + ["--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.5"]
    )
    state = torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=False)["state_dict"]
    lora_b = [v for k, v in state.items() if k.endswith("lora_B")]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it moved


def test_plain_lightning_cli_automatic_optimizer_is_caught(tmp_path):
    """A stock LightningCLI builds `optimizer:` before any callback runs: fit must stop, not train nothing."""
    from lightning.pytorch.cli import LightningCLI

    args = [
        "fit",
        "--model=lightning_peft.tasks.CausalLM",
        "--data=lightning_peft.tasks.UUIDMemorization",
        "--optimizer=torch.optim.SGD",
        "--optimizer.lr=0.1",
        "--trainer.max_steps=2",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=lightning_peft.AdapterCallback",
        "--trainer.callbacks.policy=lora_all",
    ]
    with pytest.raises(RuntimeError, match="no optimizer param group"):
        LightningCLI(args=args, save_config_kwargs={"overwrite": True})


def test_cli_writes_checkpoints_through_the_atomic_plugin_it_shows(capsys):
    """The crash-safe writer is the CLI's visible default for `trainer.plugins`, not a silent swap."""
    from lightning.pytorch.callbacks import Callback

    from lightning_peft import AtomicCheckpointIO
    from lightning_peft.experiments.peft_cli import PeftCLI

    cli = PeftCLI(args=["--config", "configs/uuid_lora.yaml", "--trainer.logger", "false"], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/uuid_lora.yaml", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["plugins"] == {
        "class_path": "lightning_peft.AtomicCheckpointIO"
    }
    replaced = PeftCLI(
        args=["--config", "configs/uuid_lora.yaml", "--trainer.plugins", "null", "--trainer.logger", "false"], run=False
    )
    assert not isinstance(replaced.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    # Callers that add their own trainer defaults (compare adds its recorder) keep the atomic writer.
    with_callbacks = PeftCLI(
        args=["--config", "configs/uuid_lora.yaml", "--trainer.logger", "false"],
        trainer_defaults={"callbacks": [Callback()]},
        run=False,
    )
    assert isinstance(with_callbacks.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_without_a_logger_every_file_lands_under_default_root_dir(tmp_path, monkeypatch, capsys):
    """`--trainer.logger false`: CSV, figures, config.yaml and checkpoints go to the config's
    `default_root_dir`, nothing into the current folder; the run says where; a second run that
    replaces the first one's diagnostics says so."""
    monkeypatch.chdir(tmp_path)
    args = (
        ["fit", "--config", str(REPO / "configs" / "uuid_lora.yaml"), "--adapters.policy", "lora_all"]
        + ["--trainer.logger", "false", "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"]
        + ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "1"]
    )
    main(args)
    assert "run folder: runs/uuid_lora" in capsys.readouterr().out
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    root = "runs/uuid_lora/"
    assert {root + "config.yaml", root + "update_diagnostics.csv", root + "updates_heatmap.png"} <= written
    assert any(p.startswith(root + "checkpoints/") and p.endswith(".ckpt") for p in written)
    assert all(p.startswith(root) for p in written), sorted(written)
    with pytest.warns(UserWarning, match="holds the diagnostics of an earlier run"):
        main(args)
