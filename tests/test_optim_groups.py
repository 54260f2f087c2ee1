"""Per-rule optimizer settings: they reach the param groups of the user's own optimizer and survive resume."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import CausalLMModule, token_loader, trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_peft import AdapterCallback, LayerPolicy, Plan, PolicyError, find_adapters
from lightning_peft.callbacks.optim_groups import GROUP_TAG, OptimizerRegroupError

BASE_LR = 1e-2
POLICY = {
    "rules": [
        {"name": "mora-outer", "method": "mora", "depth": {"outer": 1}, "hparams": {"r": 4}, "optim": {"lr_scale": 4}},
        {
            "name": "lora-inner",
            "method": "lora",
            "depth": {"inner": 1},
            "hparams": {"r": 4},
            "optim": {"weight_decay": 0.0, "lora_plus_ratio": 16},
        },
    ]
}


def group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def expected_rates(module) -> dict[int, tuple[float, float]]:
    """id(param) -> (lr, weight_decay) the policy asks for (AdamW's default weight decay is 0.01)."""
    out = {}
    for name, layer in find_adapters(module):
        block = int(name.split(".layers.")[1].split(".")[0])
        for pname, p in layer.adapter.named_parameters():
            if block in (0, 5):
                out[id(p)] = (4 * BASE_LR, 0.01)
            else:
                out[id(p)] = (16 * BASE_LR if pname == "lora_B" else BASE_LR, 0.0)
    return out


def test_rule_rates_reach_the_param_groups(tmp_path):
    module = CausalLMModule(lr=BASE_LR)
    tr = trainer(tmp_path, max_steps=2, callbacks=[AdapterCallback(POLICY, verbose=False)])
    tr.fit(module, train_dataloaders=token_loader())
    optimizer = tr.optimizers[0]
    groups = group_of(optimizer)
    want = expected_rates(module)
    assert len(want) == sum(len(g["params"]) for g in optimizer.param_groups) == 2 * 7 * 1 + 4 * 7 * 2
    for pid, (lr, wd) in want.items():
        assert (groups[pid]["lr"], groups[pid]["weight_decay"]) == pytest.approx((lr, wd))
    # every adapter moved out of the user's single group, which is dropped once empty
    assert [g.get(GROUP_TAG) for g in optimizer.param_groups] == ["mora-outer", "lora-inner/A", "lora-inner/B"]


def test_rule_rates_drive_the_update_size(tmp_path):
    """One SGD step: a parameter's change is its group's lr times its gradient."""

    class SGDModule(CausalLMModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    module = SGDModule(lr=BASE_LR)
    tr = trainer(tmp_path, max_steps=1, callbacks=[AdapterCallback(POLICY, verbose=False)])
    snapshots = {}

    class Snapshot(Callback):
        def on_before_optimizer_step(self, trainer_, pl_module, optimizer):
            for _, lay in find_adapters(pl_module):
                for p in lay.adapter.parameters():
                    snapshots[id(p)] = (p.detach().clone(), p.grad.detach().clone())

    tr.callbacks.append(Snapshot())
    tr.fit(module, train_dataloaders=token_loader())
    assert snapshots
    want = expected_rates(module)
    for _, lay in find_adapters(module):
        for p in lay.adapter.parameters():
            before, grad = snapshots[id(p)]
            torch.testing.assert_close(p.detach(), before - want[id(p)][0] * grad, rtol=1e-5, atol=1e-7)


class WarmupModule(CausalLMModule):
    """AdamW plus a linear warm-up: the split groups must keep the schedule's shape."""

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 4))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_schedule_keeps_its_shape_per_rule(tmp_path):
    module = WarmupModule(lr=BASE_LR)
    tr = trainer(tmp_path, max_steps=2, callbacks=[AdapterCallback(POLICY, verbose=False)])
    tr.fit(module, train_dataloaders=token_loader())
    optimizer = tr.optimizers[0]
    scheduler = tr.lr_scheduler_configs[0].scheduler
    assert len(scheduler.base_lrs) == len(scheduler.lr_lambdas) == len(optimizer.param_groups) == 3
    groups = group_of(optimizer)
    for pid, (lr, _) in expected_rates(module).items():
        assert groups[pid]["initial_lr"] == pytest.approx(lr)
        assert groups[pid]["lr"] == pytest.approx(lr * 3 / 4)  # after 2 steps: factor (2 + 1) / 4


def test_resume_rebuilds_the_same_groups_and_state(tmp_path):
    def run(max_steps, ckpt_path=None):
        module = WarmupModule(lr=BASE_LR)
        ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
        tr = trainer(
            tmp_path, max_steps=max_steps, enable_checkpointing=True, callbacks=[AdapterCallback(POLICY), ckpt]
        )
        tr.fit(module, train_dataloaders=token_loader(), ckpt_path=ckpt_path)
        return tr, module

    ref, ref_module = run(4)
    tr, module = run(4, ckpt_path=tmp_path / "step=2.ckpt")
    assert module.train_losses == ref_module.train_losses[2:]
    a, b = tr.optimizers[0], ref.optimizers[0]
    assert [{k: v for k, v in g.items() if k != "params"} for g in a.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in b.param_groups
    ]
    names = {id(p): n for n, p in module.named_parameters()}
    ref_names = {id(p): n for n, p in ref_module.named_parameters()}
    assert [[names[id(p)] for p in g["params"]] for g in a.param_groups] == [
        [ref_names[id(p)] for p in g["params"]] for g in b.param_groups
    ]
    for ga, gb in zip(a.param_groups, b.param_groups, strict=True):
        for pa, pb in zip(ga["params"], gb["params"], strict=True):
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(a.state[pa][key], b.state[pb][key], rtol=0, atol=0)
    assert tr.lr_scheduler_configs[0].scheduler.base_lrs == ref.lr_scheduler_configs[0].scheduler.base_lrs


# -- plan, YAML, errors ------------------------------------------------------------------------


def test_settings_in_plan_table_json_and_yaml(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(POLICY))
    policy = LayerPolicy.from_yaml(path)
    assert policy.rules[1].optim.lora_plus_ratio == 16.0
    assert policy.to_dict()["rules"][0]["optim"] == {"lr_scale": 4.0}
    assert LayerPolicy.from_dict(policy.to_dict()).to_dict() == policy.to_dict()
    plan = policy.resolve(CausalLMModule().model)
    assert {r.rule: r.optim for r in plan.rows} == {
        0: {"lr_scale": 4.0},
        1: {"lora_plus_ratio": 16.0, "weight_decay": 0.0},
    }
    assert Plan.from_dict(json.loads(plan.to_json())).rows == plan.rows
    old = json.loads(plan.to_json())
    for row in old["rows"]:
        del row["optim"]  # a plan written before per-rule settings existed
    assert Plan.from_dict(old).rows[0].optim == {}
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(plan.table())
    text = console.export_text()
    assert "optimizer" in text and "lr x4" in text and "wd 0, B x16" in text


@pytest.mark.parametrize(
    "optim, match",
    [
        ({"lr": 1e-3, "lr_scale": 2}, "both `lr`"),
        ({"lr": -1.0}, "`lr` must be a positive"),
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"lr_scael": 2}, "unknown optim key 'lr_scael' .*did you mean 'lr_scale'"),
    ],
)
def test_bad_settings_name_the_rule(optim, match):
    data = {"rules": [{"name": "mine", "method": "lora", "optim": optim}]}
    with pytest.raises(PolicyError, match=match):
        LayerPolicy.from_dict(data)


def test_settings_that_cannot_apply_are_policy_errors():
    with pytest.raises(PolicyError, match=r"rule 0 \(m\): `lora_plus_ratio` needs a method with a `B` factor"):
        LayerPolicy.from_dict({"rules": [{"name": "m", "method": "mora", "optim": {"lora_plus_ratio": 8}}]})
    with pytest.raises(PolicyError, match="method 'none' trains nothing"):
        LayerPolicy.from_dict({"rules": [{"method": "none", "optim": {"lr": 1.0}}]})
    with pytest.raises(PolicyError, match="unknown optim key"):
        LayerPolicy(rules=[{"method": "lora", "optim": {"rate": 1.0}}])


def test_single_group_optimizer_is_refused_by_name(tmp_path):
    class LBFGSModule(CausalLMModule):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters(), lr=self.lr)

    module = LBFGSModule()
    tr = trainer(tmp_path, max_steps=1, callbacks=[AdapterCallback(POLICY, verbose=False)])
    with pytest.raises(OptimizerRegroupError, match="optimizer 0 \\(LBFGS\\) supports a single param group"):
        tr.fit(module, train_dataloaders=token_loader())
    assert module.train_losses == []


def test_without_settings_the_optimizer_is_untouched(tmp_path):
    module = CausalLMModule()
    plain = {"rules": [{"method": "lora", "hparams": {"r": 2}}]}
    tr = trainer(tmp_path, max_steps=1, callbacks=[AdapterCallback(plain, verbose=False)])
    tr.fit(module, train_dataloaders=token_loader())
    assert len(tr.optimizers[0].param_groups) == 1
    assert GROUP_TAG not in tr.optimizers[0].param_groups[0]


def test_cli_yaml_settings_reach_the_automatic_optimizer_and_the_checkpoint(tmp_path):
    """From a YAML config through `lightning-peft fit`, LightningCLI's own `optimizer:` included."""
    from test_search_suggest_cli import TINY

    from lightning_peft.cli.main import main

    config = {**TINY, "trainer": {**TINY["trainer"], "enable_checkpointing": True, "default_root_dir": str(tmp_path)}}
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(tmp_path / "ck")}}
    ]
    config["adapters"] = {
        "policy": {
            "rules": [
                {"name": "qv", "method": "lora", "modules": ["q_proj", "v_proj"], "optim": {"lr_scale": 3}},
                {"name": "rest", "method": "lora", "modules": ["*"], "depth": {"fraction": [0.0, 1.0]}},
            ]
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path), "--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.5"])
    (ckpt,) = (tmp_path / "ck").glob("*.ckpt")
    checkpoint = torch.load(ckpt, weights_only=False)
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert [(g.get(GROUP_TAG), g["lr"], len(g["params"])) for g in groups] == [
        (None, 0.5, 2 * 5 * 2),
        ("qv", 1.5, 2 * 2 * 2),
    ]
    rows = checkpoint["lightning_peft"]["plan"]["rows"]
    assert {r["name"].split(".")[-1]: r["optim"] for r in rows}["q_proj"] == {"lr_scale": 3.0}


@pytest.mark.parametrize("kind", ["sequential", "onecycle", "plateau", "cyclic"])
def test_schedulers_keep_the_rule_ratio_after_the_split(kind):
    """Every torch scheduler family: after the split, each rule's lr stays `factor x` the untouched group's."""
    from torch.optim import lr_scheduler as S

    from lightning_peft import get_plan, inject_adapters
    from lightning_peft.callbacks.optim_groups import apply_rule_settings

    model = CausalLMModule().model
    policy = {
        "rules": [
            {"name": "x4", "method": "lora", "modules": ["q_proj"], "optim": {"lr_scale": 4}},
            {"name": "plain", "method": "lora", "modules": ["v_proj"]},
        ]
    }
    inject_adapters(model, policy)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    sched = {
        "sequential": lambda: S.SequentialLR(
            opt, [S.LinearLR(opt, 0.1, total_iters=3), S.CosineAnnealingLR(opt, T_max=5)], milestones=[3]
        ),
        "onecycle": lambda: S.OneCycleLR(opt, max_lr=0.1, total_steps=10),
        "plateau": lambda: S.ReduceLROnPlateau(opt, patience=0, factor=0.5, min_lr=1e-3),
        "cyclic": lambda: S.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=2),
    }[kind]()
    apply_rule_settings([opt], [sched], model, get_plan(model), ["x4", "plain"])
    assert [g.get(GROUP_TAG) for g in opt.param_groups] == [None, "x4"]
    for step in range(6):
        opt.step()
        sched.step(1.0) if kind == "plateau" else sched.step()
        plain, x4 = (g["lr"] for g in opt.param_groups)
        assert x4 == pytest.approx(4 * plain), (kind, step)
