"""ReferenceLoss (forgetting on reference text) and the testbed's cached prose base: numbers, resume, bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_peft import AdapterCallback
from lightning_peft.callbacks.forgetting import ForgettingMonitor
from lightning_peft.callbacks.reference_probe import ReferenceError, ReferenceLoss, read_reference_texts, sample_windows
from lightning_peft.tasks import ByteCorpus, CausalLM
from lightning_peft.tasks.base_cache import BASE_RECORD, cached_base

LORA_ALL = {"rules": [{"method": "lora", "modules": ["*"], "depth": {"fraction": [0.0, 1.0]}, "hparams": {"r": 4}}]}
TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 6,
    "Pack my box with five dozen liquor jugs, said the sphinx of black quartz. " * 5,
    "How vexingly quick daft zebras jump; the five boxing wizards jump quickly. " * 5,
]


def _byte_lm() -> CausalLM:
    return CausalLM(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, lr=0.05,
                    generate_on_eval=False)  # fmt: skip


def _trainer(tmp_path, monitor: ForgettingMonitor, steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, val_check_interval=1, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        limit_val_batches=1, callbacks=[AdapterCallback(LORA_ALL, verbose=False), monitor], logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
    )  # fmt: skip


def _data() -> ByteCorpus:
    return ByteCorpus(seq_len=32, batch_size=4, max_train_windows=16, source="topics")


def _hf_loss(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """The Hugging Face model's own mean next-token loss over the windows (equal lengths: mean of means)."""
    with torch.no_grad():
        return sum(float(model(input_ids=w[None], labels=w[None]).loss) for w in windows) / len(windows)


def test_reference_loss_equals_the_models_own_loss_on_the_same_sample(tmp_path):
    probe = ReferenceLoss(texts=TEXTS, tokenize="bytes", separator_id=0, seq_len=24, num_windows=5, seed=3, unit="byte")
    module = _byte_lm()
    base = copy.deepcopy(module.model).eval()
    monitor = ForgettingMonitor(probe, log_dir=str(tmp_path))
    _trainer(tmp_path, monitor, steps=3).fit(module, datamodule=_data())

    stream = [b for t in TEXTS for b in (*t.encode(), 0)]
    assert probe.windows.shape == (5, 24)
    for row in probe.windows:  # every window is a 24-byte slice of the stream at a multiple of 24
        start = next(i for i in range(0, len(stream) - 23, 24) if stream[i : i + 24] == row.tolist())
        assert start % 24 == 0
    assert monitor.baseline["ref_logprob"] == pytest.approx(-_hf_loss(base, probe.windows), abs=1e-5)
    after = -_hf_loss(module.model.eval(), probe.windows)
    logged = module.trainer.callback_metrics
    assert float(logged["forget/ref_logprob"]) == pytest.approx(after, abs=1e-5)
    change = after - monitor.baseline["ref_logprob"]
    assert float(logged["forget/ref_logprob_change"]) == pytest.approx(change, abs=1e-5)
    assert after != pytest.approx(monitor.baseline["ref_logprob"], abs=1e-4)  # training moved it: a sign error shows


def test_sample_is_fixed_by_the_seed_and_token_ids_match_text():
    streams = [list(range(i, i + 50)) for i in range(0, 500, 50)]
    a, b, c = (sample_windows(streams, 10, 7, seed) for seed in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (7, 10)
    assert len(sample_windows(streams, 10, 999, 0)) == 50  # all windows when fewer than asked
    by_text = ReferenceLoss(texts=TEXTS, tokenize="bytes", seq_len=16, num_windows=4)
    by_ids = ReferenceLoss(token_ids=[list(t.encode()) for t in TEXTS], seq_len=16, num_windows=4)
    assert torch.equal(by_text.prepare(None), by_ids.prepare(None))


def test_files_and_datasets_folder_give_the_same_texts(tmp_path):
    paths = []
    for i, text in enumerate(TEXTS):
        paths.append(tmp_path / f"ref{i}.txt")
        paths[-1].write_text(text)
    assert read_reference_texts(files=[str(p) for p in paths]) == TEXTS
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": TEXTS}).save_to_disk(str(tmp_path / "ds"))
    assert read_reference_texts(dataset=str(tmp_path / "ds"), text_column="body") == TEXTS
    with pytest.raises(ReferenceError, match="no column 'text'"):
        read_reference_texts(dataset=str(tmp_path / "ds"))


def test_resume_keeps_the_baseline_and_refuses_another_sample(tmp_path):
    kw = {"texts": TEXTS, "tokenize": "bytes", "seq_len": 24, "num_windows": 4}
    monitor = ForgettingMonitor(ReferenceLoss(**kw), log_dir=str(tmp_path))
    trainer = _trainer(tmp_path, monitor, steps=2)
    trainer.fit(_byte_lm(), datamodule=_data())
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    baseline = dict(monitor.baseline)

    resumed = ForgettingMonitor(ReferenceLoss(**kw), log_dir=str(tmp_path / "resumed"))
    _trainer(tmp_path, resumed, steps=4).fit(_byte_lm(), datamodule=_data(), ckpt_path=tmp_path / "mid.ckpt")
    assert resumed.baseline == baseline and [r["step"] for r in resumed.history] == [3, 4]

    other = ForgettingMonitor(ReferenceLoss(**{**kw, "seed": 9}), log_dir=str(tmp_path / "other"))
    with pytest.raises(ReferenceError, match="differs from the one the checkpoint"):
        _trainer(tmp_path, other, steps=4).fit(_byte_lm(), datamodule=_data(), ckpt_path=tmp_path / "mid.ckpt")


def test_bad_references_are_named(tmp_path):
    with pytest.raises(ReferenceError, match=r"reference file '.*missing.txt' does not exist"):
        ReferenceLoss(files=[str(tmp_path / "missing.txt")])
    with pytest.raises(ReferenceError, match=r"texts\[1\] is empty"):
        ReferenceLoss(texts=["some text", "  \n"])
    with pytest.raises(ReferenceError, match=r"texts\[0\] and texts\[2\] are identical"):
        ReferenceLoss(texts=["a b c", "d e f", "a b c"])
    with pytest.raises(ReferenceError, match="zero items"):
        ReferenceLoss(texts=[])
    with pytest.raises(ReferenceError, match="exactly one of"):
        ReferenceLoss(texts=["x"], files=["y"])
    with pytest.raises(ReferenceError, match="dataset folder"):
        ReferenceLoss(dataset=str(tmp_path / "nope"))
    with pytest.raises(ReferenceError, match="fewer than one window"):
        ReferenceLoss(texts=["short"], tokenize="bytes", seq_len=64).prepare(None)
    with pytest.raises(ValueError, match="unit must be"):
        ReferenceLoss(texts=["x"], unit="word")


def test_cached_base_is_built_once_and_records_how(tmp_path):
    """Built once, then reused; concurrent processes are tests/test_build_once.py's (a lock, then a rename)."""
    spec = {"arch": "tiny", "seed": 0}
    calls = []

    def build():
        calls.append(1)
        return torch.nn.Linear(2, 2), {"built": {"steps": 1}}

    def save_pretrained(self, folder):  # as transformers' does: the folder is created
        Path(folder).mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), Path(folder) / "w.pt")

    torch.nn.Linear.save_pretrained = save_pretrained
    try:
        folder = cached_base(tmp_path, spec, build, verbose=False)
        assert cached_base(tmp_path, spec, build, verbose=False) == folder and len(calls) == 1
        record = json.loads((folder / BASE_RECORD).read_text())
        assert record["spec"] == spec and record["built"] == {"steps": 1} and record["build_time_s"] >= 0
        other = cached_base(tmp_path, {**spec, "seed": 1}, build, verbose=False)
        assert other != folder and len(calls) == 2
        left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
        assert left == sorted([folder.name, other.name])  # no temporary folder left behind
    finally:
        del torch.nn.Linear.save_pretrained
