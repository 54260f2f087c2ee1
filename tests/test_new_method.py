"""A new method is one file: a toy method registered here alone goes through every feature.

Plan, fit, diagnostics, report, a budgeted suggestion (the search space sizes it for a budget),
checkpoints and export (refused by name, since it declares no peft mapping): nothing in the package
knows this method, so each step passing shows that the package asks the method rather than naming it.
"""

import math

import pytest
import torch
from helpers import CausalLMModule, model_out, tiny_llama, token_loader, tokens, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_peft import AdapterCallback, LayerPolicy, UpdateDiagnostics, restore_from_checkpoint
from lightning_peft.adapters.base import AdapterMethod, register_adapter
from lightning_peft.core.inject import find_adapters
from lightning_peft.diagnostics import read_table, render_report
from lightning_peft.experiments.policy_search import SearchSettings, build_space, uniform_baselines
from lightning_peft.interop.export import ExportError, export_peft

TOY = "toy_rowmix"


@pytest.fixture
def toy():
    """`y = W0 x + U (V x)` with `U` zero at init (an additive low-rank update), under a name no module knows."""

    @register_adapter  # conftest's fixture restores the registry after the test
    class RowMix(AdapterMethod):
        method = TOY
        parameter_roles = {"down": "A", "up": "B"}

        def __init__(self, in_features: int, out_features: int, *, r: int = 2) -> None:
            super().__init__(in_features, out_features)
            self.down = nn.Parameter(torch.randn(r, in_features) / math.sqrt(in_features))
            self.up = nn.Parameter(torch.zeros(out_features, r))

        def forward(self, x, base_out, layer):
            return base_out + (x.to(self.down.dtype) @ self.down.T @ self.up.T).to(base_out.dtype)

        def delta_weight(self, weight):
            return (self.up @ self.down).to(weight.dtype)

    return RowMix


POLICY = {"rules": [{"method": TOY, "modules": ["q_proj", "v_proj"], "depth": {"first": 2}, "hparams": {"r": 3}}]}


def test_plan_counts_the_toy_method(toy):
    plan = LayerPolicy.from_dict(POLICY).resolve(tiny_llama())
    assert {r.method for r in plan.rows} == {TOY} and len(plan.rows) == 4
    # q_proj 32 -> 32, v_proj 32 -> 16 (2 KV heads of 8): r * (in + out) each, per block
    assert plan.trainable_params == 2 * (3 * (32 + 32) + 3 * (32 + 16))
    assert plan.params_by_method() == {TOY: plan.trainable_params}


def test_fit_diagnostics_report_and_checkpoint_of_the_toy_method(toy, tmp_path):
    module = CausalLMModule(lr=5e-2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    logger = CSVLogger(tmp_path, name="run")
    fit = trainer(
        tmp_path,
        max_steps=6,
        logger=logger,
        enable_checkpointing=True,
        callbacks=[AdapterCallback(POLICY, verbose=False), UpdateDiagnostics(every_n_steps=3, plots=False), checkpoint],
    )
    fit.fit(module, train_dataloaders=token_loader())
    assert module.train_losses[-1] < module.train_losses[0]

    rows = [r for r in read_table(logger.log_dir) if r["step"] == 6]
    adapters = dict(find_adapters(module))
    assert {r["method"] for r in rows} == {TOY} and len(rows) == 4
    for row in rows:  # the default (dense) diagnostics route, against a direct computation
        layer = adapters[row["module"]]
        delta = layer.adapter.up.detach().double() @ layer.adapter.down.detach().double()
        expected = torch.linalg.norm(delta) / torch.linalg.norm(layer.base.weight.detach().double())
        assert row["rel_norm"] == pytest.approx(float(expected), rel=1e-6)
        assert row["rel_norm"] > 0
    table = render_report(logger.log_dir, plots=True, out_dir=tmp_path / "report")
    assert table.row_count > 0 and (tmp_path / "report" / "updates_heatmap.png").is_file()

    fresh = CausalLMModule()
    restore_from_checkpoint(fresh, tmp_path / "ckpt" / "last.ckpt")
    ids = tokens()
    assert torch.equal(model_out(fresh.model, ids), model_out(module.model, ids))


def test_a_budgeted_search_space_sizes_the_toy_method(toy):
    model = tiny_llama()
    budget = 20_000
    space = build_space(model, SearchSettings(methods=[TOY, "lora"], outer_blocks=1), budget)
    assert all(TOY in options for options in space.options.values())
    (uniform,) = [b for b in uniform_baselines(space) if TOY in b.label]
    plan = LayerPolicy.from_dict(uniform.policy).resolve(model)
    assert {r.method for r in plan.rows} == {TOY}
    assert budget / 2 < plan.trainable_params <= budget  # the largest rank that fits, sized by the method itself


def test_export_names_the_toy_method_as_unsupported_by_peft(toy, tmp_path):
    model = tiny_llama()
    from lightning_peft import inject_adapters

    inject_adapters(model, POLICY)
    out = tmp_path / "export"
    with pytest.raises(ExportError, match=TOY):
        export_peft(model, out)
    assert not out.exists()
