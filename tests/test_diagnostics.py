"""Per-layer update diagnostics: metrics against brute force, cheap spectra, the callback in a real fit."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft.adapters import AdapterLinear, AdapterMethod, DoRA, LoRA, MoRA
from lightning_peft.core.inject import inject_adapters
from lightning_peft.diagnostics import (
    COLUMNS,
    UpdateDiagnostics,
    UpdateProbe,
    drift_correlation,
    effective_rank,
    energy_rank,
    pearson,
    read_table,
    render_report,
    stable_rank,
)

SPECTRAL = ("fro_norm", "rel_norm", "spectral_ratio", "stable_rank", "effective_rank", "r90")
ALL = (*SPECTRAL, "mag_drift", "dir_drift")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is fastest and stable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- brute force ------------------------------------------------------------------------------


def brute_force(dw: torch.Tensor, w0: torch.Tensor, m_t: torch.Tensor | None = None) -> dict[str, float]:
    """Every metric from the dense update in float64, written independently of the package."""
    if dw.ndim == 1:  # a 1-D weight is the diagonal map diag(w)
        dw, w0 = torch.diag(dw), torch.diag(w0)
    dw, w0 = dw.double(), w0.double()
    s = torch.linalg.svdvals(dw)
    s0 = torch.linalg.svdvals(w0)
    fro = float(dw.norm())
    out = {"fro_norm": fro, "rel_norm": fro / float(w0.norm()), "spectral_ratio": float(s[0] / s0[0])}
    if fro == 0:
        out.update(stable_rank=0.0, effective_rank=0.0, r90=0.0, mag_drift=0.0, dir_drift=0.0)
        return out
    out["stable_rank"] = float((s**2).sum() / s[0] ** 2)
    p = s / s.sum()
    p = p[p > 0]
    out["effective_rank"] = float(torch.exp(-(p * p.log()).sum()))
    energy = torch.cumsum(s**2, 0) / (s**2).sum()
    out["r90"] = float(next(k + 1 for k in range(len(s)) if energy[k] >= 0.9 - 1e-12))
    w_t = w0 + dw
    rows_t = w_t.norm(dim=1) if m_t is None else m_t.double()
    out["mag_drift"] = float((rows_t - w0.norm(dim=1)).abs().mean())
    cos = (w_t * w0).sum(1) / (w_t.norm(dim=1) * w0.norm(dim=1))
    out["dir_drift"] = float((1 - cos).mean())
    return out


def assert_metrics_match(got: dict[str, torch.Tensor], ref: dict[str, float], rtol: float = 1e-4) -> None:
    for name in ALL:
        value = float(got[name])
        assert not math.isnan(value), name
        assert value == pytest.approx(ref[name], rel=rtol, abs=1e-7), f"{name}: {value} vs brute force {ref[name]}"


def adapted(adapter, in_f: int, out_f: int, seed: int = 0) -> AdapterLinear:
    torch.manual_seed(seed)
    return AdapterLinear(nn.Linear(in_f, out_f, bias=False), adapter)


def randomise(layer: AdapterLinear, scale: float = 0.3) -> AdapterLinear:
    with torch.no_grad():
        for p in layer.adapter.parameters():
            p.add_(torch.randn_like(p) * scale)
    return layer


def probe_of(layer: nn.Module, method: str) -> UpdateProbe:
    return UpdateProbe("m", 0, "m", method, layer)


# -- pure metrics -----------------------------------------------------------------------------


def test_metric_functions_on_known_spectra():
    flat = torch.ones(10)
    assert float(stable_rank(flat)) == pytest.approx(10)
    assert float(effective_rank(flat)) == pytest.approx(10)
    assert float(energy_rank(flat)) == 9  # 9 of 10 equal values hold exactly 90% of the energy
    one = torch.tensor([5.0, 0.0, 0.0])
    assert float(stable_rank(one)) == float(effective_rank(one)) == float(energy_rank(one)) == 1
    zero = torch.zeros(4)
    for fn in (stable_rank, effective_rank, energy_rank):
        assert float(fn(zero)) == 0.0  # documented: a zero update has rank 0, not NaN
    assert float(energy_rank(torch.tensor([3.0, 1.0]), tau=0.9)) == 1  # 9 / 10 of the energy
    with pytest.raises(ValueError, match="tau"):
        energy_rank(flat, tau=0)


def test_pearson_and_drift_correlation():
    import numpy as np

    x, y = [1.0, 2.0, 3.0, 5.0], [2.0, 4.0, 6.5, 7.0]
    assert pearson(x, y) == pytest.approx(float(np.corrcoef(x, y)[0, 1]))
    assert math.isnan(pearson([1.0, 1.0], [2.0, 3.0]))  # no spread
    rows = [
        {"step": 0, "method": "lora", "dir_drift": 9.0, "mag_drift": -9.0},  # step 0 is skipped
        *({"step": 5, "method": "lora", "dir_drift": x, "mag_drift": 2 * x} for x in (0.1, 0.2, 0.3)),
        *({"step": 5, "method": "dora", "dir_drift": x, "mag_drift": -x} for x in (0.1, 0.2, 0.3)),
    ]
    assert drift_correlation(rows) == pytest.approx({"dora": -1.0, "lora": 1.0})


# -- every route against the dense brute force ------------------------------------------------


def lora_cases():
    yield "lora", randomise(adapted(LoRA(48, 40, r=8, alpha=16), 48, 40))
    yield "lora r > dims", randomise(adapted(LoRA(6, 5, r=8, alpha=8), 6, 5))
    deficient = randomise(adapted(LoRA(64, 32, r=8, alpha=8), 64, 32))
    with torch.no_grad():
        deficient.adapter.lora_B[:, 3:] = 0  # rank 3 < r
    yield "lora rank-deficient", deficient


def dora_cases():
    layer = randomise(adapted(DoRA(48, 40, r=4, alpha=8), 48, 40), scale=0.1)
    yield "dora", layer
    yield "dora wide", randomise(adapted(DoRA(20, 70, r=4), 20, 70), scale=0.1)


MORA_SHAPES = {  # (in, out, r, variant): covers divisible, wrap padding, truncated and tiled rows
    "sharing divisible": (64, 64, 8, "sharing"),
    "sharing padded": (100, 37, 4, "sharing"),
    "sharing tall": (48, 176, 8, "sharing"),
    "type2 uneven": (100, 37, 4, "type2"),
    "type3 uneven": (60, 90, 4, "type3"),
    "type4 padded": (37, 100, 4, "type4"),
    "rope square": (64, 64, 8, "rope"),
    "rope padded": (176, 64, 8, "rope"),
    "rope tiled": (64, 176, 8, "rope"),
    "rope one chunk": (20, 50, 8, "rope"),
    "decouple padded": (100, 37, 4, "decouple"),
    "truncation": (60, 30, 4, "truncation"),
}


def mora_cases():
    for label, (in_f, out_f, r, variant) in MORA_SHAPES.items():
        yield f"mora {label}", randomise(adapted(MoRA(in_f, out_f, r=r, mora_type=variant), in_f, out_f))


@pytest.mark.parametrize(
    ("label", "layer"), [*lora_cases(), *dora_cases(), *mora_cases()], ids=lambda v: v if isinstance(v, str) else ""
)
def test_adapter_metrics_match_brute_force(label, layer):
    m_t = layer.adapter.magnitude.detach() if layer.method == "dora" else None
    ref = brute_force(layer.delta_weight(), layer.base_weight(), m_t)
    assert_metrics_match(probe_of(layer, layer.method).measure(), ref)


def test_dora_split_parts_match_dense():
    layer = randomise(adapted(DoRA(48, 40, r=4, alpha=8), 48, 40), scale=0.1)
    got = probe_of(layer, "dora").measure()
    ad, w0 = layer.adapter, layer.base_weight().detach().double()
    low_rank = ad.low_rank_weight().detach().double()
    c = (ad.magnitude.detach().double() / (w0 + low_rank).norm(dim=1))[:, None]
    assert float(got["dora_scale_norm"]) == pytest.approx(float(((c - 1) * w0).norm()), rel=1e-4)
    assert float(got["dora_lowrank_norm"]) == pytest.approx(float((c * low_rank).norm()), rel=1e-4)


def test_direction_drift_is_accurate_for_tiny_updates():
    """1 - cos ~ 1e-10 here: a dense fp32 cosine would return rounding noise (~1e-7)."""
    layer = adapted(LoRA(64, 48, r=4, alpha=4), 64, 48)
    with torch.no_grad():
        layer.adapter.lora_B.copy_(torch.randn(48, 4) * 1e-5)
    ad, w0 = layer.adapter, layer.base_weight().detach().double()
    w_t = w0 + ad.lora_B.detach().double() @ ad.lora_A.detach().double() * ad.scaling  # exact, float64
    cos = (w_t * w0).sum(1) / (w_t.norm(dim=1) * w0.norm(dim=1))
    expected = float((1 - cos).mean())
    assert 1e-12 < expected < 1e-8
    assert float(probe_of(layer, "lora").measure()["dir_drift"]) == pytest.approx(expected, rel=1e-3)


def full_cases():
    from transformers.pytorch_utils import Conv1D

    lin = nn.Linear(40, 24)
    conv = Conv1D(24, 40)  # GPT-2 layout: weight is (in, out)
    emb = nn.Embedding(30, 16)
    norm = nn.LayerNorm(32)
    for module in (lin, conv, emb, norm):
        nn.init.normal_(module.weight)
    return [("linear", lin, False), ("conv1d", conv, True), ("embedding", emb, False), ("norm (1-D)", norm, False)]


@pytest.mark.parametrize(("label", "module", "transpose"), full_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_full_module_metrics_match_brute_force(label, module, transpose):
    probe = UpdateProbe("m", 0, "m", "full", module, transpose)
    w0 = module.weight.detach().clone()
    with torch.no_grad():
        module.weight.add_(torch.randn_like(module.weight) * 0.05)
    w = module.weight.detach()
    if transpose:
        w, w0 = w.t(), w0.t()
    assert_metrics_match(probe.measure(), brute_force(w - w0, w0))


def test_cheap_routes_equal_dense_singular_values():
    for _, layer in [*lora_cases(), *mora_cases()]:
        dense = torch.linalg.svdvals(layer.delta_weight().double())
        ad = layer.adapter
        assert type(ad).update_singular_values is not AdapterMethod.update_singular_values  # a cheap route
        cheap = ad.update_singular_values(layer.unmerged_base_weight())
        cheap = torch.sort(cheap.double(), descending=True).values
        n = min(len(cheap), len(dense))
        torch.testing.assert_close(cheap[:n], dense[:n], rtol=1e-5, atol=1e-5 * float(dense[0]))
        for rest in (cheap[n:], dense[n:]):  # what one side has beyond the other is zero
            assert float(rest.abs().sum()) < 1e-5 * float(dense[0])


def test_mora_sharing_is_a_kronecker_product():
    """`in = 3R`, `out = 2R`: dW = J_{2x3} (x) M, so sigma(dW) = sqrt(6) sigma(M)."""
    layer = randomise(adapted(MoRA(60, 40, r=4, mora_type="sharing"), 60, 40))  # R = sqrt(100 * 4) = 20
    ad = layer.adapter
    assert ad.r_hat == 20
    expected = math.sqrt(6) * torch.linalg.svdvals(ad.mora_M.detach().double())
    cheap = ad.update_singular_values(layer.unmerged_base_weight())
    torch.testing.assert_close(torch.sort(cheap, descending=True).values, expected)
    dense = torch.linalg.svdvals(layer.delta_weight().double())
    torch.testing.assert_close(dense[:20], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora", "mora-sharing", "mora-rope", "full"])
def test_zero_update_reports_zeros_never_nan(method):
    if method == "full":
        probe = UpdateProbe("m", 0, "m", "full", nn.Linear(16, 12))
    else:
        name, _, variant = method.partition("-")
        cls = {"lora": LoRA, "dora": DoRA, "mora": MoRA}[name]
        kw = {"mora_type": variant} if variant else {}
        probe = probe_of(adapted(cls(32, 24, r=4, **kw), 32, 24), name)
    got = probe.measure()
    for name in (*ALL, *(("dora_scale_norm", "dora_lowrank_norm") if method == "dora" else ())):
        assert float(got[name]) == 0.0, name


def test_zero_weight_gives_inf_ratio_not_nan():
    lin = nn.Linear(8, 8, bias=False)
    nn.init.zeros_(lin.weight)
    probe = UpdateProbe("m", 0, "m", "full", lin)
    assert float(probe.measure()["rel_norm"]) == 0.0
    with torch.no_grad():
        lin.weight[0, 0] = 1.0
    got = probe.measure()
    assert math.isinf(float(got["rel_norm"])) and float(got["effective_rank"]) == 1.0


# -- the callback in real fits ----------------------------------------------------------------

VOCAB, SEQ = 64, 16
HYBRID = {
    "rules": [
        {"method": "lora", "modules": ["q_proj", "v_proj"], "hparams": {"r": 4, "alpha": 8}},
        {"method": "dora", "modules": ["k_proj", "o_proj"], "hparams": {"r": 4, "alpha": 8}},
        {"method": "mora", "modules": ["up_proj", "down_proj"], "hparams": {"r": 4, "mora_type": "rope"}},
        {"method": "mora", "modules": ["gate_proj"], "hparams": {"r": 4, "mora_type": "sharing"}},
        {"method": "full", "modules": ["lm_head", "model.norm"]},
    ]
}


def llama(hidden: int = 32, layers: int = 4, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden + hidden // 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


class LlamaModule(L.LightningModule):
    """A user module that injects its own adapters at the end of `__init__` (no AdapterCallback)."""

    def __init__(self, policy: dict, hidden: int = 32, layers: int = 4, lr: float = 1e-2) -> None:
        super().__init__()
        self.model = llama(hidden, layers)
        self.lr = lr
        inject_adapters(self, policy)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def token_data(n: int = 16, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randint(0, VOCAB, (n, SEQ), generator=g)), batch_size=batch_size)


def fit(module, callbacks, tmp_path: Path, max_steps: int, loggers=False) -> L.Trainer:
    tr = trainer(tmp_path, max_steps=max_steps, logger=loggers, callbacks=callbacks, log_every_n_steps=5)
    tr.fit(module, token_data())
    return tr


def test_fit_writes_table_logs_and_figures(tmp_path, capsys):
    module = LlamaModule(HYBRID)
    diag = UpdateDiagnostics(every_n_steps=5, track_grad_norm=True)
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    trainer = fit(module, [diag], tmp_path, max_steps=20, loggers=loggers)
    log_dir = Path(trainer.log_dir)
    assert diag.table_path == log_dir / "update_diagnostics.csv"

    rows = read_table(log_dir)
    modules = {r["module"] for r in rows}
    # 4 blocks x 7 adapted linears + lm_head + model.norm (full modules are tracked too)
    assert len(modules) == 4 * 7 + 2
    steps = [0, 5, 10, 15, 20]
    assert sorted({r["step"] for r in rows}) == steps
    assert len(rows) == len(steps) * len(modules)  # exactly one row per (step, module)
    with open(diag.table_path, newline="") as f:
        assert tuple(next(csv.reader(f))) == COLUMNS
    by_step = {s: [r for r in rows if r["step"] == s] for s in steps}
    for r in by_step[0]:  # the first row is a zero update everywhere
        for name in ALL:
            assert r[name] == 0.0, (r["module"], name)
        assert math.isnan(r["grad_norm"])
    for r in by_step[20]:
        for name in ALL:  # a 1-D (norm) weight is a diagonal map: its rows keep their direction
            if not (name == "dir_drift" and r["module"] == "model.model.norm"):
                assert r[name] > 0, (r["module"], name)
        assert r["grad_norm"] > 0 and not math.isnan(r["grad_norm"])
        assert r["block"] is None or 0 <= r["block"] < 4
        if r["method"] == "dora":
            assert r["dora_scale_norm"] > 0 and r["dora_lowrank_norm"] > 0
        else:
            assert math.isnan(r["dora_scale_norm"])
    methods = {r["method"] for r in rows}
    assert methods == {"lora", "dora", "mora", "full"}

    # the per-layer scalars reached both loggers through log_metrics, keyed by block and kind
    with open(Path(loggers[0].log_dir) / "metrics.csv", newline="") as f:
        header = next(csv.reader(f))
    for key in ("updates/0/self_attn.q_proj/rel_norm", "updates/3/mlp.up_proj/effective_rank", "train_loss"):
        assert key in header
    assert "updates/none/model.lm_head/r90" in header and "updates/mean/mora/rel_norm" in header

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(loggers[1].log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert "updates/updates_heatmap" in events.Tags()["images"]
    assert "updates/1/mlp.down_proj/rel_norm" in events.Tags()["scalars"]

    for name in ("updates_heatmap", "updates_curves", "updates_ranks", "updates_drift"):
        png = log_dir / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"  # what is drawn: tests/test_figures.py
    assert "update diagnostics" in capsys.readouterr().out  # the rich summary at fit end

    report_dir = tmp_path / "report"
    table = render_report(log_dir, out_dir=report_dir)
    assert table.row_count == 5  # blocks 0-3 and 'none'
    assert (report_dir / "updates_heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_failures_warn_once_and_training_continues(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(LoRA, "update_singular_values", broken)
    policy = {"rules": [{"method": "lora", "modules": ["q_proj"], "hparams": {"r": 2}}]}
    module = LlamaModule(policy, layers=2)
    diag = UpdateDiagnostics(every_n_steps=1, plots=False, log_dir=str(tmp_path / "diag"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(module, [diag], tmp_path, max_steps=3)
    messages = [str(w.message) for w in caught if "UpdateDiagnostics" in str(w.message)]
    assert len(messages) == 2  # one per module, not one per step
    assert all("spectrum" in m and "boom" in m for m in messages)
    assert "model.model.layers.0.self_attn.q_proj" in messages[0]
    rows = read_table(tmp_path / "diag")
    assert len(rows) == 4 * 2 and all(math.isnan(r["rel_norm"]) for r in rows)
    assert rows[-1]["dir_drift"] > 0  # the other stages still ran


def test_resumed_fit_continues_the_table(tmp_path):
    policy = {"rules": [{"method": "lora", "modules": ["q_proj"], "hparams": {"r": 2}}]}
    log_dir = str(tmp_path / "diag")
    module = LlamaModule(policy, layers=2)
    trainer = fit(module, [UpdateDiagnostics(every_n_steps=2, plots=False, log_dir=log_dir)], tmp_path, max_steps=4)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    again = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=False,
        callbacks=[UpdateDiagnostics(every_n_steps=2, plots=False, log_dir=log_dir)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    again.fit(LlamaModule(policy, layers=2), token_data(), ckpt_path=ckpt)
    rows = read_table(log_dir)
    assert [r["step"] for r in rows] == [s for s in (0, 2, 4, 6) for _ in range(2)]  # each step once per module
    assert rows[0]["rel_norm"] == 0.0 and all(r["rel_norm"] > 0 for r in rows[2:])


def test_module_selection_and_argument_errors(tmp_path):
    module = LlamaModule(HYBRID, layers=2)
    diag = UpdateDiagnostics(every_n_steps=50, modules=["q_proj", "re:.*mlp\\.down_proj"], plots=False)
    fit(module, [diag], tmp_path, max_steps=2)
    rows = diag.rows
    assert {r["kind"] for r in rows} == {"self_attn.q_proj", "mlp.down_proj"}
    assert sorted({r["step"] for r in rows}) == [0, 2]  # start and end only

    for kwargs, match in [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"modules": []}, "modules"),
        ({"logged_metrics": ["nope"]}, "logged_metrics"),
    ]:
        with pytest.raises(ValueError, match=match):
            UpdateDiagnostics(**kwargs)
    with pytest.raises(FileNotFoundError, match="No diagnostics table"):
        render_report(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="matches no adapted module"):
        fit(LlamaModule(HYBRID, layers=2), [UpdateDiagnostics(modules=["nothing_here"])], tmp_path, max_steps=1)


def test_mora_rope_update_has_higher_effective_rank_than_lora(tmp_path):
    """MoRA paper claim: its update is high-rank. Same budget per module (r=8), memorisation task.

    LoRA's effective rank is bounded by r = 8; rope-MoRA's update is block-diagonal in rotated
    copies of M and reaches far beyond. The measured numbers are in benchmarks/DIAGNOSTICS.md.
    """
    policy = {
        "rules": [
            {"method": "mora", "modules": ["q_proj", "v_proj", "up_proj"], "hparams": {"r": 8, "mora_type": "rope"}},
            {"method": "lora", "modules": ["k_proj", "o_proj", "gate_proj", "down_proj"], "hparams": {"r": 8}},
        ]
    }
    module = LlamaModule(policy, hidden=64, layers=2, lr=3e-3)
    diag = UpdateDiagnostics(every_n_steps=30, plots=False, log_dir=str(tmp_path / "diag"))
    fit(module, [diag], tmp_path, max_steps=30)
    final = [r for r in diag.rows if r["step"] == 30]
    mora = [r["effective_rank"] for r in final if r["method"] == "mora"]
    lora = [r["effective_rank"] for r in final if r["method"] == "lora"]
    assert max(lora) <= 8 + 1e-6
    assert min(mora) > max(lora)


# -- a method the package has never seen ------------------------------------------------------


class RowScale(AdapterMethod):
    """A toy plug-in method, `W' = (1 + g) ⊙_row W0`, with one extra diagnostic and no routes of its own."""

    method = "rowscale"
    diagnostic_names = ("gain_norm",)

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.gain = nn.Parameter(torch.zeros(out_features))

    def forward(self, x, base_out, layer):
        plain = base_out if layer.bias is None else base_out - layer.bias
        return base_out + plain * self.gain.to(base_out.dtype)

    def delta_weight(self, weight):
        return self.gain.to(weight.dtype)[:, None] * weight

    def merge_weight(self, weight):
        return weight * (1 + self.gain.to(weight.dtype))[:, None]

    def unmerge_weight(self, merged):
        return merged / (1 + self.gain.to(merged.dtype))[:, None]

    def extra_diagnostics(self, weight, row_norms):
        return {"gain_norm": self.gain.detach().double().norm()}


@pytest.fixture
def rowscale(monkeypatch):
    from lightning_peft.adapters import ADAPTERS

    monkeypatch.setitem(ADAPTERS, RowScale.method, RowScale)  # registered for this test only
    return RowScale


def test_new_method_is_measured_exactly_through_the_defaults(rowscale):
    layer = randomise(adapted(rowscale(24, 20), 24, 20), scale=0.3)
    got = probe_of(layer, "rowscale").measure()
    assert_metrics_match(got, brute_force(layer.delta_weight(), layer.base_weight()))
    assert float(got["gain_norm"]) == pytest.approx(float(layer.adapter.gain.detach().double().norm()))


def test_extra_diagnostics_without_a_column_are_warned_not_dropped_silently(rowscale, tmp_path):
    policy = {"rules": [{"method": "rowscale", "modules": ["q_proj"]}]}
    module = LlamaModule(policy, layers=2)
    diag = UpdateDiagnostics(every_n_steps=2, plots=False, log_dir=str(tmp_path / "diag"))
    with pytest.warns(UserWarning, match=r"without a table column are not logged: \['rowscale: gain_norm'\]"):
        fit(module, [diag], tmp_path, max_steps=2)
    final = [r for r in diag.rows if r["step"] == 2]
    assert len(final) == 2 and all(r["rel_norm"] > 0 and r["method"] == "rowscale" for r in final)


def test_w0_statistics_follow_merge_and_replaced_weights():
    layer = randomise(adapted(LoRA(48, 40, r=4, alpha=8), 48, 40))
    probe = probe_of(layer, "lora")
    before = probe.measure()
    layer.merge()  # the stored weight now holds W0 + dW: W0 is read back through unmerge
    assert_metrics_match(probe.measure(), {k: float(v) for k, v in before.items()})
    layer.unmerge()
    layer.base.weight = nn.Parameter(3 * layer.base.weight.detach(), requires_grad=False)  # a new W0 object
    ref = brute_force(layer.delta_weight(), layer.base_weight())
    assert_metrics_match(probe.measure(), ref)
    assert float(probe.measure()["rel_norm"]) == pytest.approx(float(before["rel_norm"]) / 3, rel=1e-4)
