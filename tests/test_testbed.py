"""The learning-vs-forgetting testbed: cached prose base, source data split, held-out prose probe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_peft.tasks import HeldOutProse, ProseBaseLM, StdlibSource
from lightning_peft.tasks.corpus_data import DOCSTRING_MODULES
from lightning_peft.tasks.testbed import prose_split, stdlib_source_files, unigram_loss

TINY = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "pretrain_steps": 3,
        "pretrain_batch_size": 2, "pretrain_seq_len": 32}  # fmt: skip


def test_prose_base_is_pretrained_once_and_reused(tmp_path, monkeypatch):
    first = ProseBaseLM(**TINY, cache_dir=str(tmp_path))
    built = first.base_record["built"]
    assert built["steps"] == 3 and built["params"] == sum(p.numel() for p in first.parameters())
    assert built["unigram_prose_loss"] > 2.0  # bytes of English: far above a trained model, below log(256)

    import lightning_peft.tasks.testbed as testbed

    monkeypatch.setattr(testbed, "_pretrain", lambda *a, **k: pytest.fail("the cached base was pretrained again"))
    second = ProseBaseLM(**TINY, cache_dir=str(tmp_path), lr=0.1)  # the fine-tuning lr is not part of the base
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(pytest.fail.Exception):
        ProseBaseLM(**{**TINY, "pretrain_steps": 4}, cache_dir=str(tmp_path))


def test_source_split_is_by_file_and_leaves_out_the_prose_modules():
    files = stdlib_source_files()
    assert not {p.stem for p in files} & {m.split(".")[0] for m in DOCSTRING_MODULES}
    data = StdlibSource(seq_len=64, max_val_windows=10)
    data.setup()
    assert data.val_windows.shape == (10, 64) and len(data.train_windows) > 1000
    assert not {bytes(w.tolist()) for w in data.val_windows} & {bytes(w.tolist()) for w in data.train_windows[:2000]}


def test_held_out_prose_is_the_documents_the_base_never_trained_on():
    train, held_out = prose_split()
    assert not set(train) & set(held_out)
    probe = HeldOutProse(num_windows=4, seq_len=32)
    assert probe.texts == held_out and probe.prepare(None).shape == (4, 32)
    assert 0 < unigram_loss(train, held_out) < torch.log(torch.tensor(256.0))


def test_the_testbed_config_fits_with_a_tiny_base(tmp_path, monkeypatch):
    from lightning_peft.cli.main import main

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    tiny = [f"--model.init_args.{k}={v}" for k, v in TINY.items()]
    main(["fit", "--config", "configs/testbed_continual.yaml", *tiny, f"--model.init_args.cache_dir={tmp_path}",
          "--trainer.max_steps=4", "--trainer.val_check_interval=2", "--trainer.logger=false",
          f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
          "--data.init_args.max_val_windows=4", "--diagnostics.every_n_steps=2"])  # fmt: skip
    rows = (tmp_path / "forgetting.csv").read_text().splitlines()
    assert rows[0] == "step,metric,value,baseline,change" and [r.split(",")[0] for r in rows[1:]] == ["0", "2", "4"]
    assert all(r.split(",")[1] == "ref_logprob" for r in rows[1:])
