"""AdapterCallback with a real Lightning Trainer on an unmodified LightningModule (CPU)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import yaml
from helpers import (
    HYBRID,
    POLICIES,
    CausalLMModule,
    EarlyOptimizerModule,
    LateLayersModule,
    token_loader,
    tokens,
    trainer,
)
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft import (
    AdapterCallback,
    AdapterLinear,
    AdapterStateError,
    Plan,
    PolicyError,
    adapter_state_dict,
    find_adapters,
    get_plan,
    load_adapters,
    restore_from_checkpoint,
    unmerge_adapters,
)


def callback(policy=HYBRID, **kw) -> AdapterCallback:
    return AdapterCallback(policy, verbose=False, **kw)


def adapter_ids(module) -> set[int]:
    return {id(p) for _, layer in find_adapters(module) for p in layer.adapter.parameters()}


def optimizer_ids(trainer_) -> set[int]:
    return {id(p) for opt in trainer_.optimizers for group in opt.param_groups for p in group["params"]}


def outputs(module) -> torch.Tensor:
    with torch.no_grad():
        return module(tokens(4, seed=7))


def assert_same_adapters(a, b, atol: float = 0.0) -> None:
    sa, sb = adapter_state_dict(a), adapter_state_dict(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=atol, msg=k)


def assert_same_optimizer_state(opt_a, opt_b) -> None:
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        assert set(sa[i]) == {"step", "exp_avg", "exp_avg_sq"}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][key], sb[i][key]), (i, key)


@pytest.fixture(scope="module")
def run6(tmp_path_factory):
    """Uninterrupted 6-step runs, checkpoints every 3 steps, adapter-only and full."""
    runs = {}
    for adapter_only in (True, False):
        root = tmp_path_factory.mktemp(f"run6_{adapter_only}")
        module = CausalLMModule()
        base = {k: v.clone() for k, v in module.state_dict().items()}
        ckpt = ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1, filename="{step}")
        tr = trainer(
            root,
            max_steps=6,
            callbacks=[callback(adapter_only_checkpoint=adapter_only), ckpt],
            enable_checkpointing=True,
        )
        tr.fit(module, train_dataloaders=token_loader())
        runs[adapter_only] = {"module": module, "trainer": tr, "root": root, "base": base}
    return runs


# -- training --------------------------------------------------------------------------------


def test_fit_trains_only_adapters_and_loss_decreases(tmp_path):
    module = CausalLMModule()
    base = {k: v.clone() for k, v in module.model.state_dict().items()}
    cb = callback()
    tr = trainer(tmp_path, max_steps=20, callbacks=[cb])
    tr.fit(module, train_dataloaders=token_loader())
    losses = module.train_losses
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < 0.9 * losses[0], losses
    # the optimizer holds exactly the trainable tensors, and those are exactly the adapters
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert optimizer_ids(tr) == trainable == adapter_ids(module)
    assert len(trainable) == 14 * 1 + 28 * 3  # MoRA: M; DoRA: A, B, magnitude
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == cb.plan.trainable_params == 25648
    # the frozen base did not move; every adapter did
    for name, layer in find_adapters(module):
        assert torch.equal(layer.base.weight, base[name.removeprefix("model.") + ".weight"])
    assert all(p.abs().sum() > 0 for n, p in module.named_parameters() if n.endswith(("mora_M", "lora_B")))
    assert get_plan(module) is cb.plan


def test_optimizer_built_in_init_is_rejected(tmp_path):
    module = EarlyOptimizerModule()
    tr = trainer(tmp_path, callbacks=[callback()])
    with pytest.raises(RuntimeError, match="98 trainable parameter.*no optimizer param group"):
        tr.fit(module, train_dataloaders=token_loader())
    assert module.train_losses == []


def test_layers_built_in_configure_model_get_injected(tmp_path):
    module = LateLayersModule()
    assert module.model is None  # nothing to target at Callback.setup
    tr = trainer(tmp_path, max_steps=2, callbacks=[callback()])  # depth rules need the blocks too
    tr.fit(module, train_dataloaders=token_loader())
    plan = get_plan(module)
    assert plan is not None and len(plan.rows) == 42
    assert {r.block for r in plan.rows if r.method == "mora"} == {0, 5}
    assert optimizer_ids(tr) == adapter_ids(module) == {id(p) for p in module.parameters() if p.requires_grad}
    assert len(module.train_losses) == 2


def test_callback_leaves_the_module_and_checkpoint_io_alone(tmp_path):
    """No user method is rebound, the strategy keeps its own checkpoint writer, the load guard goes at teardown."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    module = LateLayersModule()
    tr = trainer(tmp_path, max_steps=1, callbacks=[callback()])
    tr.fit(module, train_dataloaders=token_loader())
    assert get_plan(module) is not None
    assert not {"configure_model", "on_load_checkpoint", "configure_optimizers"} & set(vars(module))
    assert type(tr.strategy.checkpoint_io) is TorchCheckpointIO
    module.load_state_dict({}, strict=False)  # the pre-load guard is gone after fit: no AdapterStateError


def test_bad_policy_fails_at_construction():
    with pytest.raises(PolicyError, match=r"rule 0 \(x\): unknown rule key 'moduls'"):
        AdapterCallback({"rules": [{"name": "x", "method": "lora", "moduls": ["q_proj"]}]})


def test_policy_that_does_not_fit_fails_before_training(tmp_path):
    module = CausalLMModule()
    tr = trainer(tmp_path, callbacks=[callback({"rules": [{"method": "lora", "modules": ["query"]}]})])
    with pytest.raises(PolicyError, match=r"rule 0 \(lora on \['query'\]\) matches no module"):
        tr.fit(module, train_dataloaders=token_loader())
    assert module.train_losses == []
    assert not find_adapters(module)


# -- resume ----------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter_only", [True, False], ids=["adapter_only", "full"])
def test_resume_matches_uninterrupted_run(run6, tmp_path, adapter_only):
    ref = run6[adapter_only]
    module = CausalLMModule()  # fresh: same base weights (seeded), fresh adapters
    tr = trainer(tmp_path, max_steps=6, callbacks=[callback(adapter_only_checkpoint=adapter_only)])
    tr.fit(module, train_dataloaders=token_loader(), ckpt_path=ref["root"] / "step=3.ckpt")
    assert tr.global_step == 6
    assert len(module.train_losses) == 3
    assert module.train_losses == ref["module"].train_losses[3:]
    assert_same_adapters(module, ref["module"])
    assert_same_optimizer_state(tr.optimizers[0], ref["trainer"].optimizers[0])
    assert optimizer_ids(tr) == adapter_ids(module)


def test_adapter_only_checkpoint_is_smaller_and_holds_adapters(run6):
    small = torch.load(run6[True]["root"] / "step=6.ckpt", weights_only=False)
    full = torch.load(run6[False]["root"] / "step=6.ckpt", weights_only=False)
    keys = set(adapter_state_dict(run6[True]["module"]))
    assert set(small["state_dict"]) == keys
    assert set(full["state_dict"]) == set(run6[False]["module"].state_dict())
    size_small = (run6[True]["root"] / "step=6.ckpt").stat().st_size
    size_full = (run6[False]["root"] / "step=6.ckpt").stat().st_size
    base_bytes = sum(
        v.numel() * v.element_size() for k, v in full["state_dict"].items() if f"{k}" not in small["state_dict"]
    )
    assert size_small < size_full - 0.9 * base_bytes  # the frozen base is what was dropped
    stored = small["lightning_peft"]
    assert stored["adapter_only"] is True and full["lightning_peft"]["adapter_only"] is False
    assert Plan.from_dict(stored["plan"]) == get_plan(run6[True]["module"])


def test_checkpoint_from_other_policy_is_rejected_before_training(run6, tmp_path):
    """Other methods: refused before Lightning copies a single tensor into the model."""
    module = CausalLMModule()
    tr = trainer(tmp_path, max_steps=6, callbacks=[callback(POLICIES / "lora_all.yaml")])
    with pytest.raises(
        AdapterStateError,
        match=r"step=3.ckpt: stored state does not fit the model: "
        r"missing \['model.model.layers.0.mlp.down_proj.adapter.lora_A', "
        r"'model.model.layers.0.mlp.down_proj.adapter.lora_B'",
    ):
        tr.fit(module, train_dataloaders=token_loader(), ckpt_path=run6[True]["root"] / "step=3.ckpt")
    assert module.train_losses == []
    fresh = CausalLMModule()
    callback(POLICIES / "lora_all.yaml").inject(fresh)
    assert_same_adapters(module, fresh)  # nothing was loaded


def test_checkpoint_with_other_hyperparameters_is_rejected_before_training(run6, tmp_path):
    """Same tensors, other hyper-parameters (DoRA alpha): the stored plan is compared before training."""
    policy = yaml.safe_load(HYBRID.read_text())
    policy["rules"][1]["hparams"]["alpha"] = 2 * policy["rules"][1]["hparams"].get("alpha", 8)
    module = CausalLMModule()
    tr = trainer(tmp_path, max_steps=6, callbacks=[callback(policy)])
    with pytest.raises(AdapterStateError, match=r"different adapter plan: model.model.layers.1.mlp.down_proj: "):
        tr.fit(module, train_dataloaders=token_loader(), ckpt_path=run6[True]["root"] / "step=3.ckpt")
    assert module.train_losses == []


# -- evaluation stages -----------------------------------------------------------------------


@pytest.mark.parametrize("adapter_only", [True, False], ids=["adapter_only", "full"])
def test_validate_test_predict_from_checkpoint(run6, tmp_path, adapter_only):
    ref = run6[adapter_only]
    ckpt = ref["root"] / "step=6.ckpt"
    expected = trainer(tmp_path).validate(ref["module"], dataloaders=token_loader(), verbose=False)[0]["val_loss"]
    expected_logits = outputs(ref["module"])

    fresh = CausalLMModule()
    val = trainer(tmp_path, callbacks=[callback(adapter_only_checkpoint=adapter_only)]).validate(
        fresh, dataloaders=token_loader(), ckpt_path=ckpt, verbose=False
    )
    assert val[0]["val_loss"] == pytest.approx(expected, abs=1e-6)
    fresh = CausalLMModule()
    test = trainer(tmp_path, callbacks=[callback(adapter_only_checkpoint=adapter_only)]).test(
        fresh, dataloaders=token_loader(), ckpt_path=ckpt, verbose=False
    )
    assert test[0]["test_loss"] == pytest.approx(expected, abs=1e-6)
    fresh = CausalLMModule()
    preds = trainer(tmp_path, callbacks=[callback(adapter_only_checkpoint=adapter_only)]).predict(
        fresh,
        dataloaders=[torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens(4, seed=7)), batch_size=4)],
        ckpt_path=ckpt,
    )
    torch.testing.assert_close(preds[0], expected_logits, rtol=0, atol=1e-5)
    assert expected > 0


def test_fit_then_validate_does_not_reinject(tmp_path):
    module = CausalLMModule()
    tr = trainer(tmp_path, max_steps=2, callbacks=[callback()])
    tr.fit(module, train_dataloaders=token_loader())
    layers = find_adapters(module)
    plan = get_plan(module)
    trained = {k: v.clone() for k, v in adapter_state_dict(module).items()}
    tr.validate(module, dataloaders=token_loader(), verbose=False)
    tr.test(module, dataloaders=token_loader(), verbose=False)
    assert [id(m) for _, m in find_adapters(module)] == [id(m) for _, m in layers]
    assert len(layers) == 42
    assert not any(isinstance(m.base, AdapterLinear) for _, m in find_adapters(module))
    assert not any(isinstance(c, AdapterLinear) for _, m in layers for c in m.modules() if c is not m)
    assert get_plan(module) is plan
    assert all(torch.equal(v, trained[k]) for k, v in adapter_state_dict(module).items())


# -- end of fit ------------------------------------------------------------------------------


def test_merge_at_end(tmp_path):
    module = CausalLMModule()
    tr = trainer(tmp_path, max_steps=4, callbacks=[callback(merge_at_end=True)])
    tr.fit(module, train_dataloaders=token_loader())
    layers = find_adapters(module)
    assert layers and all(layer.merged for _, layer in layers)
    merged = outputs(module)
    unmerge_adapters(module)
    unmerged = outputs(module)
    assert not any(layer.merged for _, layer in layers)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    assert (unmerged - outputs(CausalLMModule())).abs().max() > 1e-4  # training moved the outputs


def test_export_dir(tmp_path):
    module = CausalLMModule()
    export = tmp_path / "export"
    tr = trainer(tmp_path, max_steps=4, callbacks=[callback(export_dir=str(export))])
    tr.fit(module, train_dataloaders=token_loader())
    assert sorted(p.name for p in export.iterdir()) == ["adapters.safetensors", "plan.json"]
    fresh = CausalLMModule()
    plan = load_adapters(fresh, export)
    assert plan == get_plan(module)
    torch.testing.assert_close(outputs(fresh), outputs(module), rtol=0, atol=0)


# -- restore without a Trainer ---------------------------------------------------------------


@pytest.mark.parametrize("adapter_only", [True, False], ids=["adapter_only", "full"])
def test_restore_from_checkpoint(run6, adapter_only):
    ref = run6[adapter_only]
    fresh = CausalLMModule()
    plan = restore_from_checkpoint(fresh, ref["root"] / "step=6.ckpt")
    assert plan == get_plan(ref["module"])
    assert_same_adapters(fresh, ref["module"])
    torch.testing.assert_close(outputs(fresh), outputs(ref["module"]), rtol=0, atol=0)


def test_restore_from_checkpoint_rejects_other_shapes(run6):
    from helpers import tiny_llama

    with pytest.raises(AdapterStateError, match="model.layers.0.mlp.gate_proj"):
        restore_from_checkpoint(
            CausalLMModule(model=tiny_llama(intermediate_size=48)), run6[True]["root"] / "step=6.ckpt"
        )


def test_nan_batch_stops_before_the_weights_change(tmp_path):
    """A NaN in the batch: fit stops naming a module; no step, no checkpoint with NaN weights."""

    class NaNEmbeddings(CausalLMModule):
        def training_step(self, batch, batch_idx):
            (tokens,) = batch
            embeds = self.model.get_input_embeddings()(tokens)
            if self.global_step == 2:
                embeds = embeds.clone()
                embeds[0, 0, 0] = float("nan")
            loss = self.model(inputs_embeds=embeds, labels=tokens).loss
            return loss

    torch.manual_seed(0)
    tokens = torch.randint(0, 32, (32, 8), generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=8)
    model = NaNEmbeddings()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    tr = trainer(tmp_path, max_steps=5, enable_checkpointing=True, callbacks=[callback("lora_all"), ckpt_cb])
    with pytest.raises(FloatingPointError, match=r"Non-finite gradient in model\.model\.layers\.\d+\..*at step 2"):
        tr.fit(model, data)
    assert tr.global_step == 2
    assert all(torch.isfinite(t).all() for t in adapter_state_dict(model).values())
    for path in tmp_path.glob("*.ckpt"):
        state = torch.load(path, weights_only=False)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values()), path


def test_crash_during_checkpoint_save_keeps_the_previous_file(tmp_path, monkeypatch):
    """A save that dies half-way (here: torch.save writes some bytes, then raises) leaves the
    previous checkpoint byte-identical and no partial file under the checkpoint name."""

    from lightning_peft import AtomicCheckpointIO

    model = CausalLMModule()
    tr = trainer(tmp_path / "run", max_steps=2, plugins=[AtomicCheckpointIO()], callbacks=[callback("lora_all")])
    tr.fit(model, token_loader())
    assert isinstance(tr.strategy.checkpoint_io, AtomicCheckpointIO)
    path = tmp_path / "last.ckpt"
    tr.save_checkpoint(path)
    before = path.read_bytes()

    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"torn")  # part of a file, then the process "dies"
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        tr.save_checkpoint(path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["last.ckpt"]


def test_dora_magnitude_follows_weights_loaded_in_setup():
    """Pretrained weights loaded in `LightningModule.setup` (after injection): DoRA's magnitude is
    re-initialised from them at fit start, so the adapted model starts exactly at the loaded model."""
    pretrained = CausalLMModule(seed=123).model.state_dict()

    class LoadsInSetup(CausalLMModule):
        def setup(self, stage):
            inner = {k.replace(".base.", "."): v for k, v in self.model.state_dict().items() if ".adapter." not in k}
            assert inner.keys() == pretrained.keys()
            with torch.no_grad():
                for name, param in self.model.named_parameters():
                    key = name.replace(".base.", ".")
                    if key in pretrained:
                        param.copy_(pretrained[key])

    class CheckStart(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            reference = CausalLMModule(seed=123)
            reference.model.load_state_dict(pretrained)
            ids = tokens(2)
            torch.testing.assert_close(pl_module(ids), reference(ids), rtol=1e-5, atol=1e-5)
            self.checked = True

    check = CheckStart()
    model = LoadsInSetup(seed=0)
    trainer(max_steps=1, callbacks=[callback("dora_all"), check]).fit(model, token_loader())
    assert check.checked


@pytest.mark.parametrize("setting", ["bf16-mixed", "bf16-true", "gradient-checkpointing"])
def test_hybrid_trains_under_bf16_and_gradient_checkpointing(setting):

    from lightning_peft import adapter_state_dict

    model = CausalLMModule()
    if setting == "gradient-checkpointing":
        model.model.gradient_checkpointing_enable()
    precision = "32-true" if setting.startswith("grad") else setting
    tr = trainer(max_steps=4, precision=precision, callbacks=[callback("mora_outer_dora_inner")])
    tr.fit(model, token_loader(n=32))
    assert len(model.train_losses) == 4 and all(math.isfinite(x) for x in model.train_losses)
    moved = [v for k, v in adapter_state_dict(model).items() if k.endswith(("mora_M", "lora_B"))]
    assert moved and all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in moved)
