"""ByteCorpus: byte-level LM data from Python's own documentation (split, windows, batches, a real fit)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lightning_peft.tasks import ByteCorpus, ByteTokenizer, CausalLM
from lightning_peft.tasks.corpus_data import corpus_documents, split_documents

TINY = {
    "vocab_size": 256,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
}


def _joined(docs: list[str]) -> bytes:
    return b"".join(d.encode("utf-8") + b"\x00" for d in docs)


@pytest.mark.parametrize("source", ["topics", "docstrings", "both"])
def test_documents_are_deterministic_and_unique(source):
    docs = corpus_documents(source)
    assert docs == corpus_documents(source)
    assert len(docs) == len(set(docs)) > 50
    assert all(d.strip() and "\x00" not in d for d in docs)


def test_both_is_topics_then_docstrings():
    topics, docstrings = corpus_documents("topics"), corpus_documents("docstrings")
    both = corpus_documents("both")
    assert both[: len(topics)] == topics
    assert set(both) == set(topics) | set(docstrings)


def test_split_is_seeded_disjoint_and_complete():
    docs = corpus_documents("both")
    train, val = split_documents(docs, 0.1, seed=0)
    assert (train, val) == split_documents(docs, 0.1, seed=0)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(docs)
    assert len(val) == round(0.1 * len(docs))
    assert split_documents(docs, 0.1, seed=1)[1] != val
    assert split_documents(["a", "b"], 0.001, seed=0)[1] and split_documents(["a", "b"], 0.999, seed=0)[0]


def test_windows_are_the_document_stream_cut_in_order():
    dm = ByteCorpus(seq_len=64, source="topics", val_fraction=0.2, seed=3)
    dm.setup()
    train_docs, val_docs = split_documents(corpus_documents("topics"), 0.2, seed=3)
    for windows, docs in ((dm.train_windows, train_docs), (dm.val_windows, val_docs)):
        stream = _joined(docs)
        assert windows.dtype == torch.uint8 and windows.shape == (len(stream) // 64, 64)
        assert bytes(windows.flatten().tolist()) == stream[: windows.numel()]
    # no validation document's text reaches the training windows
    train_bytes = bytes(dm.train_windows.flatten().tolist())
    assert not any(_joined([d]) in train_bytes for d in val_docs if len(d) > 200)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "naïve café ∑ 😀 def f(x):\n\treturn x"
    ids = tok.encode(text)
    assert len(tok) == tok.vocab_size == 256 and max(ids) < 256
    assert ids == list(text.encode("utf-8")) and len(ids) > len(text)
    assert tok.decode(ids) == tok.decode(torch.tensor(ids)) == text
    assert tok.decode(ids[:-1] + [0xFF]).endswith("\ufffd")  # a cut character is replaced, not an error


def test_batches_shapes_labels_and_cap():
    dm = ByteCorpus(seq_len=32, batch_size=4, max_train_windows=10, seed=0)
    dm.setup()
    assert len(dm.train_windows) == 10
    uncapped = ByteCorpus(seq_len=32, seed=0)
    uncapped.setup()
    assert torch.equal(dm.train_windows, uncapped.train_windows[:10])
    assert torch.equal(dm.val_windows, uncapped.val_windows)
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"]) and batch["attention_mask"].eq(1).all()
    assert torch.equal(batch["input_ids"], dm.val_windows[:4].long())
    seen = torch.cat([b["input_ids"] for b in dm.train_dataloader()])
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, dm.train_windows.long().tolist()))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": "wiki"}, "source"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"seq_len": 1}, "seq_len"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_train_windows": 0}, "max_train_windows"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ByteCorpus(**kwargs)


def test_causal_lm_fits_three_steps_on_bytes():
    L.seed_everything(0, verbose=False)
    dm = ByteCorpus(seq_len=32, batch_size=4, max_train_windows=64, source="topics")
    model = CausalLM(**TINY, lr=3e-3, generate_on_eval=False)
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=4,
        val_check_interval=3,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 3 and model.tokenizer is dm.tokenizer
    val_loss = float(trainer.callback_metrics["val_loss"])
    # a fresh model predicts ~uniformly over 256 bytes: loss near ln(256); three steps move it only a little
    assert math.isfinite(val_loss) and abs(val_loss - math.log(256)) < 0.5


def test_vocab_below_256_is_refused():
    dm = ByteCorpus(seq_len=32, batch_size=4, max_train_windows=8, source="topics")
    model = CausalLM(**{**TINY, "vocab_size": 128})
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="vocab_size"):
        trainer.fit(model, datamodule=dm)
