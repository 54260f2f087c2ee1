"""Merge-and-restart (ReLoRA / ReMoRA): function kept across restarts, rank growth, type cycling,
resume equality, optimizer reset, the jagged schedule, checkpoints and bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import HYBRID, POLICIES, CausalLMModule, tiny_gpt2, tiny_llama, token_loader, tokens, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_peft import (
    ADAPTERS,
    AdapterCallback,
    AdapterLinear,
    AdapterStateError,
    ExportError,
    JaggedCosineLR,
    MergeRestart,
    RestartError,
    UpdateDiagnostics,
    adapter_state_dict,
    export_peft,
    find_adapters,
    inject_adapters,
    merge_adapters,
    restore_from_checkpoint,
    save_adapters,
)
from lightning_peft.adapters.base import AdapterMethod, get_adapter_class, register_adapter
from lightning_peft.adapters.mora import VARIANTS, restart_cycle
from lightning_peft.callbacks.restart import jagged_cosine_lambda, reset_optimizer_state, restart_adapters
from lightning_peft.diagnostics import read_table

LORA_R2 = {"rules": [{"method": "lora", "modules": ["*"], "depth": {"fraction": [0.0, 1.0]}, "hparams": {"r": 2}}]}

CASES = [
    ("lora", {"r": 2}),
    ("lora", {"r": 2, "use_rslora": True, "dropout": 0.1}),
    ("dora", {"r": 2}),
    ("dora", {"r": 2, "dropout": 0.1}),
    ("hira", {"r": 2}),
    *[("mora", {"r": 2, "mora_type": v}) for v in VARIANTS],
    ("mora", {"r": 2, "mora_type": "sharing", "remora_types": 2}),
]


def _ids(case):
    method, hp = case
    return method + "-" + "-".join(f"{k}={v}" for k, v in hp.items())


def randomise(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def outputs(model, ids=None):
    with torch.no_grad():
        return model(input_ids=tokens(4, seed=7) if ids is None else ids).logits


# -- the restart rule of every method keeps the function ------------------------------------


def test_every_registered_method_has_a_restart_rule():
    assert {name for name, cls in ADAPTERS.items() if cls.can_restart()} == set(ADAPTERS)


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("layer_type", ["linear", "conv1d"])
def test_restart_keeps_the_output_and_zeroes_the_update(case, layer_type):
    """Three merge-and-restart cycles: the layer's output is unchanged by each (fp32 rounding), the
    new cycle's update is exactly zero, and the base holds every cycle."""
    from transformers.pytorch_utils import Conv1D

    method, hp = case
    torch.manual_seed(0)
    base = nn.Linear(40, 36) if layer_type == "linear" else Conv1D(36, 40)
    layer = AdapterLinear(base, get_adapter_class(method)(40, 36, **hp)).eval()  # eval: dropout off
    x = torch.randn(6, 40)
    for cycle in (1, 2, 3):
        randomise(layer.adapter, seed=cycle)
        before = layer(x)
        layer.merge_and_restart(cycle, torch.Generator().manual_seed(cycle))
        torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
        assert layer.delta_weight().abs().max() < 1e-5
        assert layer.restarts == cycle


def test_hybrid_model_output_unchanged_by_restart_adapters():
    model = tiny_llama()
    inject_adapters(model, HYBRID)
    randomise(nn.ModuleList(layer.adapter for _, layer in find_adapters(model)), seed=3)
    before = outputs(model)
    params = restart_adapters(model, cycle=1, seed=0)
    torch.testing.assert_close(outputs(model), before, rtol=1e-5, atol=1e-5)
    assert {id(p) for p in params} == {id(p) for _, la in find_adapters(model) for p in la.adapter.parameters()}


def test_restart_redraws_are_seeded_per_layer_and_cycle():
    a, b = tiny_llama(), tiny_llama()
    for model in (a, b):
        inject_adapters(model, LORA_R2)
    torch.manual_seed(123)  # the global RNG plays no part
    restart_adapters(a, cycle=2, seed=5)
    torch.manual_seed(456)
    restart_adapters(b, cycle=2, seed=5)
    sa, sb = adapter_state_dict(a), adapter_state_dict(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    a_keys = [k for k in sa if k.endswith("lora_A")]
    assert not torch.equal(sa[a_keys[0]], sa[a_keys[1]])  # layers draw differently
    restart_adapters(b, cycle=3, seed=5)
    assert not torch.equal(adapter_state_dict(b)[a_keys[0]], sa[a_keys[0]])  # and so do cycles


def test_failed_merge_leaves_every_layer_as_it_was():
    model = tiny_llama()
    inject_adapters(model, LORA_R2)
    layers = find_adapters(model)
    randomise(layers[0][1].adapter, seed=1)
    with torch.no_grad():
        layers[-1][1].adapter.lora_B.fill_(float("inf"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterStateError, match=r"Restart 1 at 'model.layers.5.mlp.down_proj'.*no layer was merged"):
        restart_adapters(model, cycle=1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(layer.restarts == 0 for _, layer in layers)


# -- ReMoRA type cycling ----------------------------------------------------------------------


def test_mora_type_cycling_follows_the_reference():
    assert restart_cycle("sharing", 4) == ("sharing", "type2", "type3", "type4")  # 1 -> 2 -> 3 -> 4 -> 1
    assert restart_cycle("type3", 4) == ("type3", "type4", "sharing", "type2")
    assert restart_cycle("sharing", 2) == ("sharing", "type2")  # the paper's App. B: 1 <-> 2
    assert restart_cycle("type2", 2) == ("type2", "sharing")
    assert restart_cycle("rope", 4) == ("rope", "decouple")  # the reference has no rule (KeyError)
    assert restart_cycle("truncation", 4) == ("truncation",)
    assert restart_cycle("decouple", 4) == ("decouple",)
    with pytest.raises(ValueError, match="remora_types=2.*'type3' is not in that cycle"):
        restart_cycle("type3", 2)
    with pytest.raises(ValueError, match="`remora_types` must be one of"):
        get_adapter_class("mora")(16, 16, r=2, remora_types=3)

    layer = AdapterLinear(nn.Linear(48, 40), get_adapter_class("mora")(48, 40, r=2, mora_type=1))
    seen = [layer.adapter.variant]
    for cycle in range(1, 6):
        layer.merge_and_restart(cycle, torch.Generator())
        seen.append(layer.adapter.variant)
    assert seen == ["sharing", "type2", "type3", "type4", "sharing", "type2"]


# -- rank growth --------------------------------------------------------------------------------


def test_lora_r2_cumulative_update_rank_grows_past_r(tmp_path):
    """A real fit: 3 restarts of r=2 LoRA give a cumulative update of rank 8 > 2 (exact SVD), and the
    diagnostics' cumulative columns equal brute-force SVD of `W_eff - W_orig`."""
    module = CausalLMModule(lr=3e-2)
    original = {k: v.clone() for k, v in module.state_dict().items()}
    diag = UpdateDiagnostics(every_n_steps=1, log_dir=str(tmp_path / "diag"), plots=True)
    tr = trainer(tmp_path, max_steps=8, callbacks=[AdapterCallback(LORA_R2, verbose=False), MergeRestart(2), diag])
    tr.fit(module, train_dataloaders=token_loader())
    rows = {r["module"]: r for r in read_table(tmp_path / "diag") if r["step"] == 8}
    for raw, layer in find_adapters(module):
        total = layer.base.weight.detach() + layer.delta_weight() - original[f"{raw}.weight"]
        rank = int(torch.linalg.matrix_rank(total))  # fp32 tolerance: the merges round in fp32
        assert rank == 8 > 2, raw  # 3 merged cycles + the live one, each rank 2
        assert layer.restarts == 3
    row = next(r for name, r in rows.items() if name.endswith("layers.0.self_attn.q_proj"))
    raw, layer = next((n, la) for n, la in find_adapters(module) if n.endswith("layers.0.self_attn.q_proj"))
    total = (layer.base.weight.detach() + layer.delta_weight() - original[f"{raw}.weight"]).double()
    s = torch.linalg.svdvals(total)
    s = s[s > s[0] * torch.finfo(torch.float32).eps * 32]  # the metric's noise floor (fp32 merges)
    p = s / s.sum()
    assert row["restarts"] == 3 and row["cum_rank"] == 8
    assert row["cum_effective_rank"] == pytest.approx(math.exp(-(p * p.clamp_min(1e-300).log()).sum()), rel=1e-4)
    assert row["cum_rel_norm"] == pytest.approx(float(total.norm() / original[f"{raw}.weight"].norm()), rel=1e-4)
    assert row["effective_rank"] <= 2 + 1e-6  # the current cycle alone is rank 2
    assert (tmp_path / "diag" / "updates_cumulative.png").is_file()


# -- optimizer state and the schedule -------------------------------------------------------------


def _adam_with_state(model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model(input_ids=tokens(2)).logits.sum().backward()
    opt.step()
    return opt


@pytest.mark.parametrize("mode", ["reset", "prune"])
def test_optimizer_state_of_reinitialised_tensors_is_reset_or_pruned(mode):
    model = tiny_llama()
    policy = {"rules": [*LORA_R2["rules"], {"method": "full", "modules": ["lm_head"]}]}
    inject_adapters(model, policy)
    opt = _adam_with_state(model)
    head = model.lm_head.weight
    head_state = {k: v.clone() for k, v in opt.state[head].items()}
    params = restart_adapters(model, cycle=1)
    reset_optimizer_state([opt], params, mode, prune_ratio=0.75)
    for p in params:
        if mode == "reset":
            assert p not in opt.state
        else:
            for key in ("exp_avg", "exp_avg_sq"):
                zeros = int((opt.state[p][key] == 0).sum())
                assert zeros >= int(0.75 * p.numel()), key
            assert float(opt.state[p]["step"]) == 1.0
    assert all(torch.equal(opt.state[head][k], v) for k, v in head_state.items())  # `full` weights untouched
    opt.step()  # the optimizer rebuilds what was reset


def test_jagged_cosine_schedule_values():
    kw = {
        "total_steps": 1000,
        "warmup_steps": 100,
        "restart_every": 300,
        "restart_warmup_steps": 50,
        "min_lr_ratio": 0.1,
    }
    lam = lambda s: jagged_cosine_lambda(s, **kw)  # noqa: E731

    def cosine(s):
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 100) / 900))

    assert lam(0) == 0 and lam(50) == pytest.approx(0.5)
    assert lam(100) == pytest.approx(1.0) and lam(299) == pytest.approx(cosine(299))
    assert lam(300) == 0.0  # restart: back to zero
    assert lam(325) == pytest.approx(0.5 * cosine(350))  # half-way up to where the cosine has got to
    assert lam(350) == pytest.approx(cosine(350))
    assert lam(600) == 0.0 and lam(999) == pytest.approx(cosine(999))
    assert jagged_cosine_lambda(300, **{**kw, "restart_every": None}) == pytest.approx(cosine(300))
    with pytest.raises(RestartError, match="restart_warmup_steps .50. must be shorter than restart_every .50."):
        JaggedCosineLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), 100, 0, 50, 50)


# -- resume, checkpoints, inference ---------------------------------------------------------------


def _restart_run(root, policy=HYBRID, max_steps=8, ckpt_path=None, **restart_kw):
    module = CausalLMModule()
    ckpt = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    callbacks = [AdapterCallback(policy, verbose=False), MergeRestart(3, **restart_kw), ckpt]
    tr = trainer(root, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=True)
    tr.fit(module, train_dataloaders=token_loader(), ckpt_path=ckpt_path)
    return module, tr


@pytest.fixture(scope="module")
def restart_run(tmp_path_factory):
    """8 steps of the hybrid (MoRA outer, DoRA inner) with a restart every 3 steps (at 3 and 6)."""
    root = tmp_path_factory.mktemp("restart")
    module, tr = _restart_run(root)
    return module, tr, root


@pytest.mark.parametrize("step", [4, 6], ids=["mid-cycle", "at-a-restart"])
def test_resume_equals_the_uninterrupted_run(restart_run, tmp_path, step):
    ref, ref_tr, root = restart_run
    module, tr = _restart_run(tmp_path, ckpt_path=root / f"step={step}.ckpt")
    assert module.train_losses == ref.train_losses[step:]
    ref_state, state = ref.state_dict(), module.state_dict()
    assert all(torch.equal(ref_state[k], state[k]) for k in ref_state)  # adapters and merged bases
    sa, sb = ref_tr.optimizers[0].state_dict()["state"], tr.optimizers[0].state_dict()["state"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    variants = [getattr(la.adapter, "variant", None) for _, la in find_adapters(module)]
    assert variants == [getattr(la.adapter, "variant", None) for _, la in find_adapters(ref)]


def test_checkpoint_carries_merged_bases_and_cycle(restart_run):
    ref, _, root = restart_run
    before = torch.load(root / "step=2.ckpt", weights_only=True)
    after = torch.load(root / "step=4.ckpt", weights_only=True)
    assert before["lightning_peft"]["restarts"] == 0 and after["lightning_peft"]["restarts"] == 1
    bases = {f"{n}.base.weight" for n, _ in find_adapters(ref)}
    assert not bases & set(before["state_dict"])  # adapter-only: no base before the first restart
    assert bases <= set(after["state_dict"])
    assert after["callbacks"]["MergeRestart"] == {"every": 3, "seed": 0, "restarts": 1}


def test_restore_from_checkpoint_reproduces_the_restarted_model(restart_run):
    ref, _, root = restart_run
    fresh = CausalLMModule()
    restore_from_checkpoint(fresh, root / "step=8.ckpt")
    assert [la.restarts for _, la in find_adapters(fresh)] == [2] * len(find_adapters(fresh))
    torch.testing.assert_close(outputs(fresh.model), outputs(ref.model), rtol=0, atol=0)


def test_checkpoint_missing_merged_bases_is_refused(restart_run, tmp_path):
    _, _, root = restart_run
    ckpt = torch.load(root / "step=4.ckpt", weights_only=True)
    name = next(k for k in ckpt["state_dict"] if k.endswith(".base.weight"))
    del ckpt["state_dict"][name]
    with pytest.raises(AdapterStateError, match=rf"missing \[.*{name}"):
        restore_from_checkpoint(CausalLMModule(), ckpt)


def test_adapter_files_and_peft_export_refuse_a_restarted_model(restart_run, tmp_path):
    ref, _, _ = restart_run
    with pytest.raises(AdapterStateError, match="2 merged restart cycle"):
        save_adapters(ref, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(ExportError, match="save_base=True"):
        export_peft(ref, tmp_path / "p", submodule="model")


# -- bad input: named errors before training ------------------------------------------------------


@pytest.mark.parametrize("every", [0, -2, 1.5, True, "3"])
def test_bad_period_is_refused_at_construction(every):
    with pytest.raises(RestartError, match=r"MergeRestart\(every=...\) must be a positive integer"):
        MergeRestart(every)


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"optimizer_reset": "zero"}, "optimizer_reset"), ({"prune_ratio": 1.0}, "prune_ratio"), ({"seed": 1.0}, "seed")],
)
def test_bad_options_are_refused_at_construction(kw, match):
    with pytest.raises(RestartError, match=match):
        MergeRestart(3, **kw)


def _fit_refused(tmp_path, callbacks, match, module=None, max_steps=6):
    module = module or CausalLMModule()
    tr = trainer(tmp_path, max_steps=max_steps, callbacks=callbacks)
    with pytest.raises(RestartError, match=match):
        tr.fit(module, train_dataloaders=token_loader())
    assert module.train_losses == []  # nothing trained
    return module


@pytest.mark.parametrize("every", [6, 7])
def test_period_not_shorter_than_the_run_is_refused(tmp_path, every):
    _fit_refused(tmp_path, [AdapterCallback(LORA_R2, verbose=False), MergeRestart(every)], r"never restarts")


def test_merge_at_end_and_export_dir_are_refused(tmp_path):
    _fit_refused(
        tmp_path, [AdapterCallback(LORA_R2, verbose=False, merge_at_end=True), MergeRestart(2)], "merge_at_end"
    )
    _fit_refused(
        tmp_path,
        [AdapterCallback(LORA_R2, verbose=False, export_dir=str(tmp_path / "x")), MergeRestart(2)],
        "export_dir",
    )


def test_restarting_a_model_merged_at_the_end_is_refused(tmp_path):
    module = CausalLMModule()
    inject_adapters(module, LORA_R2)
    merge_adapters(module)
    _fit_refused(tmp_path, [MergeRestart(2)], r"merged \(e.g. 'model.model.layers.0", module=module)


def test_without_adapters_is_refused(tmp_path):
    _fit_refused(tmp_path, [MergeRestart(2)], "found no adapters: add AdapterCallback")


def test_method_without_a_restart_rule_is_refused(tmp_path, monkeypatch):
    @register_adapter
    class Frozen(AdapterMethod):  # a method that does not define `restart`
        method = "frozen_test"

        def __init__(self, in_features, out_features, *, r: int = 1):
            super().__init__(in_features, out_features)
            self.scale = nn.Parameter(torch.zeros(out_features))

        def forward(self, x, base_out, layer):
            return base_out * (1 + self.scale)

        def delta_weight(self, weight):
            return weight * self.scale[:, None].to(weight.dtype)

    policy = {"rules": [{"method": "frozen_test", "modules": ["q_proj"], "depth": {"first": 1}}, *LORA_R2["rules"]]}
    _fit_refused(  # the registry is restored by conftest's fixture
        tmp_path,
        [AdapterCallback(policy, verbose=False), MergeRestart(2)],
        r"\['frozen_test'\] have no re-initialisation rule.*'model.model.layers.0.self_attn.q_proj'",
    )


def test_schedule_with_another_period_is_refused(tmp_path):
    class Scheduled(CausalLMModule):
        def configure_optimizers(self):
            opt = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)
            sched = JaggedCosineLR(opt, total_steps=6, restart_every=4, restart_warmup_steps=1)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    _fit_refused(
        tmp_path,
        [AdapterCallback(LORA_R2, verbose=False), MergeRestart(2)],
        r"re-warms every 4 steps but MergeRestart\(every=2\)",
        module=Scheduled(),
    )


def test_resume_with_another_period_is_refused(restart_run, tmp_path):
    _, _, root = restart_run
    module = CausalLMModule()
    tr = trainer(tmp_path, max_steps=8, callbacks=[AdapterCallback(HYBRID, verbose=False), MergeRestart(2)])
    with pytest.raises(RestartError, match=r"trained with MergeRestart\(every=3\), this run has every=2"):
        tr.fit(module, train_dataloaders=token_loader(), ckpt_path=root / "step=4.ckpt")
    assert module.train_losses == []


def test_gpt2_conv1d_restart_fit(tmp_path):
    """A GPT-2 (Conv1D layers) fit with LoRA restarts: the bases move and the loss stays finite."""
    module = CausalLMModule(model=tiny_gpt2())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    policy = POLICIES / "lora_all.yaml"
    tr = trainer(tmp_path, max_steps=5, callbacks=[AdapterCallback(policy, verbose=False), MergeRestart(2)])
    tr.fit(module, train_dataloaders=token_loader())
    assert all(math.isfinite(v) for v in module.train_losses)
    moved = [n for n, la in find_adapters(module) if not torch.equal(la.base.weight, before[f"{n}.weight"])]
    assert len(moved) == len(find_adapters(module))


def test_validate_from_a_restarted_checkpoint(restart_run, tmp_path):
    """`validate(ckpt_path=...)` with AdapterCallback alone rebuilds merged bases and MoRA's operator."""
    ref, _, root = restart_run
    expected = trainer(tmp_path).validate(ref, dataloaders=token_loader(), verbose=False)[0]["val_loss"]
    fresh = CausalLMModule()
    got = trainer(tmp_path, callbacks=[AdapterCallback(HYBRID, verbose=False)]).validate(
        fresh, dataloaders=token_loader(), ckpt_path=root / "step=8.ckpt", verbose=False
    )
    assert got[0]["val_loss"] == pytest.approx(expected, abs=1e-6)


def test_restarts_count_optimizer_steps_under_gradient_accumulation(tmp_path):
    module = CausalLMModule()
    restart = MergeRestart(2)
    tr = trainer(
        tmp_path,
        max_steps=5,
        accumulate_grad_batches=2,
        callbacks=[AdapterCallback(LORA_R2, verbose=False), restart],
    )
    tr.fit(module, train_dataloaders=token_loader(n=16, batch_size=4))
    assert tr.global_step == 5 and len(module.train_losses) == 10
    assert restart.restarts == 2  # after optimizer steps 2 and 4, once each
    assert {la.restarts for _, la in find_adapters(module)} == {2}


def test_cli_lr_scheduler_section_steps_a_jagged_schedule_every_step():
    from lightning_peft.experiments.peft_cli import lazy_configure_optimizers

    module = CausalLMModule()
    inject_adapters(module, LORA_R2)
    scheduler = {"class_path": "lightning_peft.JaggedCosineLR", "init_args": {"total_steps": 10, "restart_every": 5}}
    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.1}}
    out = lazy_configure_optimizers(optimizer, scheduler)(module)
    assert isinstance(out["lr_scheduler"]["scheduler"], JaggedCosineLR)
    assert out["lr_scheduler"]["interval"] == "step"


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_flat_sharded_strategies_are_refused_with_a_reason(strategy):
    from types import SimpleNamespace

    from lightning_peft.callbacks.restart import check_companions

    fake = SimpleNamespace(strategy=type(strategy, (), {})(), callbacks=[])
    with pytest.raises(RestartError, match=f"does not support {strategy}: it shards flattened parameters"):
        check_companions(fake)
    allowed = SimpleNamespace(strategy=type("ModelParallelStrategy", (), {})(), callbacks=[])
    check_companions(allowed)  # FSDP2: tests/test_fsdp2_restart.py


def test_restarts_under_bf16_true(tmp_path):
    """bf16 bases (fp32 adapter masters): merges round to bf16, training goes on with finite losses."""
    module = CausalLMModule()
    tr = trainer(
        tmp_path,
        max_steps=5,
        precision="bf16-true",
        callbacks=[AdapterCallback(HYBRID, verbose=False), MergeRestart(2)],
    )
    tr.fit(module, train_dataloaders=token_loader())
    assert all(math.isfinite(v) for v in module.train_losses) and len(module.train_losses) == 5
    layers = find_adapters(module)
    assert {la.base.weight.dtype for _, la in layers} == {torch.bfloat16}
    assert {la.restarts for _, la in layers} == {2}


def test_resume_equals_uninterrupted_with_pruning_and_full_checkpoints(tmp_path):
    """The other settings: ReLoRA's magnitude pruning of the optimizer state, full (not adapter-only) files."""

    def run(root, ckpt_path=None):
        module = CausalLMModule()
        ckpt = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1, filename="{step}")
        callbacks = [
            AdapterCallback(HYBRID, verbose=False, adapter_only_checkpoint=False),
            MergeRestart(3, optimizer_reset="prune", prune_ratio=0.5),
            ckpt,
        ]
        tr = trainer(root, max_steps=8, callbacks=callbacks, enable_checkpointing=True)
        tr.fit(module, train_dataloaders=token_loader(), ckpt_path=ckpt_path)
        return module, tr

    ref, ref_tr = run(tmp_path / "a")
    module, tr = run(tmp_path / "b", ckpt_path=tmp_path / "a" / "step=4.ckpt")
    assert module.train_losses == ref.train_losses[4:]
    ref_state, state = ref.state_dict(), module.state_dict()
    assert all(torch.equal(ref_state[k], state[k]) for k in ref_state)
    sa, sb = ref_tr.optimizers[0].state_dict()["state"], tr.optimizers[0].state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


@pytest.mark.parametrize("value", [-1, "2", 1.0, True])
def test_bad_restart_count_in_a_checkpoint_is_refused(restart_run, value):
    _, _, root = restart_run
    ckpt = torch.load(root / "step=4.ckpt", weights_only=True)
    ckpt["lightning_peft"]["restarts"] = value
    fresh = CausalLMModule()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(AdapterStateError, match=r"`lightning_peft.restarts` must be a non-negative integer"):
        restore_from_checkpoint(fresh, ckpt)
    assert find_adapters(fresh) == [] and all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    with pytest.raises(RestartError, match="bad restart count"):
        MergeRestart(3).load_state_dict({"every": 3, "seed": 0, "restarts": value if value != 1.0 else "1"})


def test_cumulative_rank_bounds_documented_in_docs_restart():
    """docs/restart.md: sharing-type ReMoRA on 128x128, r=4 (R=32) reaches 32, then 56, and stays; LoRA grows by r."""

    def ranks(method, **hp):
        torch.manual_seed(0)
        base = nn.Linear(128, 128).double()
        w0 = base.weight.detach().clone()
        layer = AdapterLinear(base, get_adapter_class(method)(128, 128, **hp)).double()
        out = []
        for cycle in range(1, 7):
            randomise(layer.adapter, seed=cycle)
            layer.merge_and_restart(cycle, torch.Generator().manual_seed(cycle))
            out.append(int(torch.linalg.matrix_rank(layer.base.weight.detach() - w0)))
        return out

    assert ranks("mora", r=4, mora_type="sharing") == [32, 56, 56, 56, 56, 56]
    assert ranks("mora", r=4, mora_type="sharing", remora_types=2) == [32, 56, 56, 56, 56, 56]
    assert ranks("lora", r=4) == [4, 8, 12, 16, 20, 24]
    assert ranks("mora", r=4, mora_type="rope") == [128] * 6


def test_each_restart_is_logged(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = CausalLMModule()
    logger = CSVLogger(tmp_path, name="logs", version="")
    tr = trainer(
        tmp_path, max_steps=5, logger=logger, callbacks=[AdapterCallback(LORA_R2, verbose=False), MergeRestart(2)]
    )
    tr.fit(module, train_dataloaders=token_loader())
    import csv

    rows = list(csv.DictReader((tmp_path / "logs" / "metrics.csv").open()))
    assert [(int(r["step"]), float(r["restart/cycle"])) for r in rows if r.get("restart/cycle")] == [(2, 1.0), (4, 2.0)]


def test_export_merged_of_a_restarted_checkpoint_matches_the_trained_model(restart_run, tmp_path):
    """The way out after restarts: a merged transformers folder holds every cycle (bases) plus the live one."""
    from transformers import LlamaForCausalLM

    from lightning_peft import export_merged

    ref, _, root = restart_run
    restored = CausalLMModule()
    restore_from_checkpoint(restored, root / "step=8.ckpt")
    export_merged(restored, tmp_path / "merged", submodule="model")
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(outputs(plain), outputs(ref.model), rtol=1e-5, atol=1e-5)


def test_peft_export_with_the_merged_base_matches_the_trained_model(tmp_path):
    """ReLoRA out to HF peft: the live LoRA cycle as a peft adapter on the merged base (`save_base=True`)."""
    from transformers import LlamaForCausalLM

    from lightning_peft import load_peft_export

    module = CausalLMModule()
    tr = trainer(tmp_path, max_steps=5, callbacks=[AdapterCallback(LORA_R2, verbose=False), MergeRestart(2)])
    tr.fit(module, train_dataloaders=token_loader())
    export_peft(module, tmp_path / "peft", submodule="model", save_base=True)
    base = LlamaForCausalLM.from_pretrained(tmp_path / "peft" / "base").eval()
    peft_model = load_peft_export(base, tmp_path / "peft").eval()
    torch.testing.assert_close(outputs(peft_model), outputs(module.model.eval()), rtol=1e-5, atol=1e-5)


def test_summary_table_with_full_modules_next_to_restarted_adapters(tmp_path):
    """`full` modules have no cumulative columns (NaN): the caption counts the adapters only."""
    from lightning_peft.diagnostics.report import summary_table

    module = CausalLMModule()
    policy = {"rules": [{"method": "full", "modules": ["embed_tokens"]}, *LORA_R2["rules"]]}  # the first row
    diag = UpdateDiagnostics(every_n_steps=2, log_dir=str(tmp_path / "diag"), plots=False)
    tr = trainer(tmp_path, max_steps=5, callbacks=[AdapterCallback(policy, verbose=False), MergeRestart(2), diag])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(module, train_dataloaders=token_loader())
    assert not [w for w in caught if "UpdateDiagnostics" in str(w.message)]  # a failing table would warn
    rows = read_table(tmp_path / "diag")
    assert any(r["method"] == "full" and math.isnan(r["cum_effective_rank"]) for r in rows)
    assert "after 2 restart(s)" in str(summary_table(rows).caption)
