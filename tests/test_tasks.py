"""Built-in tasks: UUID memorisation data + causal LM, Python-help topics + MiniLM classifier."""

from __future__ import annotations

import math
import uuid

import lightning as L
import pytest
import torch
from helpers import trainer

from lightning_peft.tasks import (
    TOPIC_GROUPS,
    CausalLM,
    CharAccuracy,
    CharTokenizer,
    ExactMatch,
    PydocTopics,
    SequenceClassification,
    UUIDMemorization,
    greedy_generate,
)
from lightning_peft.tasks._common import build_optimizer
from lightning_peft.tasks.text_data import chunk_text

TINY_LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one thread is as fast, and much faster when other processes share the cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _trainer(max_steps: int, *callbacks: L.Callback, **kwargs) -> L.Trainer:
    """The tests' quiet trainer, with no validation inside fit unless asked."""
    return trainer(max_steps=max_steps, callbacks=list(callbacks), **{"limit_val_batches": 0, **kwargs})


# -- UUID data -------------------------------------------------------------------------------------------------


def test_uuid_pairs_are_deterministic_valid_uuid4():
    a, b = UUIDMemorization(num_pairs=50, seed=3), UUIDMemorization(num_pairs=50, seed=3)
    assert a.pairs == b.pairs
    assert UUIDMemorization(num_pairs=50, seed=4).pairs != a.pairs
    assert UUIDMemorization(num_pairs=10, seed=3).pairs == a.pairs[:10]  # a prefix: more pairs extend the set
    for key, value in a.pairs:
        for s in (key, value):
            u = uuid.UUID(s)
            assert str(u) == s and len(s) == 36 and u.version == 4 and u.variant == uuid.RFC_4122
    assert len({k for k, _ in a.pairs}) == 50


def test_uuid_batches_are_deterministic_and_shaped():
    def epochs(dm: UUIDMemorization, n: int = 2) -> list[list[torch.Tensor]]:
        dm.setup("fit")
        loader = dm.train_dataloader()
        out = []
        for epoch in range(n):
            loader.sampler.set_epoch(epoch)  # what Lightning's fit loop does every epoch
            out.append([b["input_ids"] for b in loader])
        return out

    a = epochs(UUIDMemorization(num_pairs=40, batch_size=8, seed=1))
    b = epochs(UUIDMemorization(num_pairs=40, batch_size=8, seed=1))
    c = epochs(UUIDMemorization(num_pairs=40, batch_size=8, seed=2))
    assert all(torch.equal(x, y) for ea, eb in zip(a, b, strict=True) for x, y in zip(ea, eb, strict=True))
    assert not torch.equal(torch.cat(a[0]), torch.cat(a[1]))  # reshuffled each epoch
    assert not torch.equal(torch.cat(a[0]), torch.cat(c[0]))
    # the order of an epoch depends only on (seed, epoch): a resumed run sees the same batches
    fresh = UUIDMemorization(num_pairs=40, batch_size=8, seed=1)
    fresh.setup("fit")
    loader = fresh.train_dataloader()
    loader.sampler.set_epoch(1)
    assert all(torch.equal(x, y) for x, y in zip(a[1], [b["input_ids"] for b in loader], strict=True))

    dm = UUIDMemorization(num_pairs=40, batch_size=8, seed=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    assert batch["input_ids"].shape == (8, 75)  # bos + 73 chars + eos
    assert torch.equal(batch["labels"], batch["input_ids"])  # loss over the whole sequence, no padding here
    assert (batch["input_ids"][:, 0] == tok.bos_token_id).all() and (
        batch["input_ids"][:, -1] == tok.eos_token_id
    ).all()
    text = tok.decode(batch["input_ids"][0])
    assert len(text) == 73 and text[36] == ":" and (text[:36], text[37:]) in dm.pairs

    dm = UUIDMemorization(num_pairs=40, batch_size=16, eval_pairs=20)
    dm.setup("validate")
    val = list(dm.val_dataloader())
    assert sum(len(b["values"]) for b in val) == 20
    first = val[0]
    assert first["prompt_ids"].shape == (16, 38)  # bos + key + ':'
    assert tok.decode(first["prompt_ids"][0]) == first["keys"][0] + ":"
    assert list(zip(first["keys"], first["values"], strict=True)) == dm.pairs[:16]


def test_uuid_padding_is_masked():
    dm = UUIDMemorization(num_pairs=4)
    collate = dm.train_dataloader().collate_fn
    batch = collate([[1, 5, 2], [1, 5, 6, 7, 2]])
    assert batch["labels"].tolist() == [[1, 5, 2, -100, -100], [1, 5, 6, 7, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_char_tokenizer_round_trip():
    tok = CharTokenizer()
    assert tok.vocab_size == len(tok) == 21
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "205f3777-52b6-4270-9f67-c5125867d358:0123456789abcdef"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == len(text) + 2
    assert all(3 <= i < 21 for i in ids[1:-1])
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.decode([1, 3, 2, 4], placeholder="?") == "?0?1"
    with pytest.raises(ValueError, match="'G'"):
        tok.encode("abcG")


def test_char_accuracy_on_hand_made_strings():
    target = "205f3777-52b6-4270-9f67-c5125867d358"
    one_wrong = target[:-1] + "9"
    metric = CharAccuracy()
    metric.update([one_wrong], [target])
    assert metric.compute().item() == pytest.approx(35 / 36)
    metric.update([target], [target])
    assert metric.compute().item() == pytest.approx(71 / 72)
    metric.reset()
    metric.update([target[:18]], [target])  # too short: the missing characters are wrong
    assert metric.compute().item() == pytest.approx(0.5)
    metric.reset()
    metric.update([target[1:] + "0"], [target])  # shifted by one: position-wise comparison
    assert metric.compute().item() < 0.2

    exact = ExactMatch()
    exact.update([one_wrong, target, target + "x"], [target, target, target])
    assert exact.compute().item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        exact.update(["a"], ["a", "b"])


# -- causal LM -------------------------------------------------------------------------------------------------


def test_causal_lm_names_init_seed_and_rng_isolation():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = CausalLM(**TINY_LLAMA, init_seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # construction leaves the caller's RNG alone
    torch.manual_seed(999)
    b = CausalLM(**TINY_LLAMA, init_seed=7)
    c = CausalLM(**TINY_LLAMA, init_seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(
        sa["model.model.layers.0.self_attn.q_proj.weight"], sc["model.model.layers.0.self_attn.q_proj.weight"]
    )
    names = dict(a.named_modules())
    assert isinstance(names["model.model.layers.1.self_attn.q_proj"], torch.nn.Linear)
    assert isinstance(names["model.model.layers.1.mlp.down_proj"], torch.nn.Linear)
    assert a.model.config.num_hidden_layers == 2


def test_causal_lm_loads_a_local_pretrained_folder(tmp_path):
    source = CausalLM(**TINY_LLAMA, init_seed=5)
    source.model.save_pretrained(tmp_path)
    loaded = CausalLM(pretrained_path=str(tmp_path), init_seed=0)
    assert loaded.model.training  # from_pretrained's eval mode is undone: Lightning keeps the mode it gets
    sa, sb = source.model.state_dict(), loaded.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(FileNotFoundError, match="local folder"):
        CausalLM(pretrained_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="lr_schedule"):
        CausalLM(**TINY_LLAMA, lr_schedule="cosine")


def test_configure_optimizers_sees_only_trainable_params():
    model = CausalLM(**TINY_LLAMA)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.lm_head"))
    opt = model.configure_optimizers()
    params = [p for group in opt.param_groups for p in group["params"]]
    assert len(params) == 1 and params[0] is model.model.lm_head.weight


def test_linear_warmup_and_decay_schedule():
    """LR per optimizer step: transformers' warm-up from 0 over 4 steps, then linear decay to 0 at step 12."""

    def lrs(**kw) -> list[float]:
        config = build_optimizer([torch.nn.Parameter(torch.zeros(1))], lr=2.0, weight_decay=0.0, **kw)
        optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
        out = []
        for _ in range(13):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    linear = lrs(warmup_steps=4, lr_schedule="linear", total_steps=12)
    assert [linear[s] for s in (0, 1, 3, 4, 8, 12)] == pytest.approx([0.0, 0.5, 1.5, 2.0, 1.0, 0.0])
    assert lrs(warmup_steps=2, lr_schedule="constant")[:4] == pytest.approx([0.0, 1.0, 2.0, 2.0])
    plain = build_optimizer([torch.nn.Parameter(torch.zeros(1))], lr=2.0, weight_decay=0.0)
    assert isinstance(plain, torch.optim.AdamW)  # no schedule: the optimizer alone


def test_greedy_generate_with_and_without_cache_agree():
    model = CausalLM(**TINY_LLAMA, init_seed=3).eval()
    prompts = torch.randint(3, 21, (3, 10))
    with_cache = greedy_generate(model.model, prompts, 12, use_cache=True)
    without = greedy_generate(model.model, prompts, 12, use_cache=False)
    assert with_cache.shape == (3, 12)
    assert torch.equal(with_cache, without)
    with torch.no_grad():  # make EOS (id 2) the likely next token: decoding must go on past it
        model.model.lm_head.weight[2] = 3 * model.model.lm_head.weight[2] + 0.05 * model.model.lm_head.weight[5]
    with_cache = greedy_generate(model.model, prompts, 12, use_cache=True)
    assert (with_cache[:, :-1] == 2).any()
    assert torch.equal(with_cache, greedy_generate(model.model, prompts, 12, use_cache=False))


def _module_function(module: str, code: str, name: str, **env):
    """A function whose frames belong to `module` (so warnings see it there)."""
    namespace = {"__name__": module, **env}
    exec(compile(code, module.replace(".", "/") + ".py", "exec"), namespace)
    return namespace[name]


def test_deprecated_library_call_from_the_package_fails_the_suite():
    """The conftest guard: a library's deprecation that our code triggers raises, even when the library
    attributes the warning to its own frame (as transformers' `deprecate_kwarg` does)."""
    import warnings

    library = _module_function(
        "transformers.probe",
        "def old_api():\n    warnings.warn('old_api is deprecated', FutureWarning, stacklevel=1)\n",
        "old_api",
        warnings=warnings,
    )
    ours = _module_function("lightning_peft.probe", "def step():\n    old_api()\n", "step", old_api=library)
    with pytest.raises(FutureWarning, match="lightning_peft.probe calls a deprecated API: old_api is deprecated"):
        ours()
    elsewhere = _module_function("lightning.probe", "def step():\n    old_api()\n", "step", old_api=library)
    elsewhere()  # another package's deprecated call only warns: it is that package's business


def test_uuid_fit_reduces_loss_and_validates():
    dm = UUIDMemorization(num_pairs=16, batch_size=8)
    model = CausalLM(vocab_size=dm.vocab_size, **TINY_LLAMA, lr=1e-2)
    rec = LossRecorder()
    trainer = _trainer(30, rec)
    trainer.fit(model, datamodule=dm)
    assert len(rec.losses) == 30
    first, last = sum(rec.losses[:5]) / 5, sum(rec.losses[-5:]) / 5
    assert last < first - 0.25, rec.losses  # ln(21) = 3.04 at init; the UUID format alone is worth ~0.5
    assert model.tokenizer is dm.tokenizer

    trainer = _trainer(1, limit_val_batches=1.0)
    (metrics,) = trainer.validate(model, datamodule=dm, verbose=False)
    assert set(metrics) == {"val_loss", "val_ppl", "val_char_acc", "val_exact_match"}
    # every UUID example has the same number of trained tokens: the token-weighted perplexity is exp(mean loss)
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-4)
    assert 0.0 <= metrics["val_char_acc"] <= 1.0 and 0.0 <= metrics["val_exact_match"] <= 1.0
    (tested,) = trainer.test(model, datamodule=dm, verbose=False)
    assert tested["test_char_acc"] == pytest.approx(metrics["val_char_acc"])
    preds = [s for batch in trainer.predict(model, datamodule=dm) for s in batch]
    assert len(preds) == 16 and all(len(s) == 36 for s in preds)
    # the logged char accuracy is the one of the predicted strings
    acc = CharAccuracy()
    acc.update(preds, [v for _, v in dm.pairs])
    assert acc.compute().item() == pytest.approx(metrics["val_char_acc"])


def test_seeded_fits_are_identical():
    def run() -> list[float]:
        L.seed_everything(0, verbose=False)
        dm = UUIDMemorization(num_pairs=16, batch_size=8)
        model = CausalLM(vocab_size=dm.vocab_size, **TINY_LLAMA, lr=1e-2, warmup_steps=3, lr_schedule="linear")
        rec = LossRecorder()
        _trainer(8, rec, deterministic=True).fit(model, datamodule=dm)
        return rec.losses

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        a, b = run(), run()
    finally:  # Trainer(deterministic=True) switches torch's global flag on and leaves it on
        torch.use_deterministic_algorithms(was_deterministic)
    assert len(a) == 8 and a == b


def test_vocab_too_small_is_a_clear_error():
    dm = UUIDMemorization(num_pairs=4)
    model = CausalLM(vocab_size=8, **TINY_LLAMA)
    with pytest.raises(ValueError, match="vocab_size"):
        _trainer(1).fit(model, datamodule=dm)


# -- text classification ---------------------------------------------------------------------------------------


def test_chunk_text_sizes():
    paragraphs = ["word " * 10, "x" * 50, "longer " * 100, "tail"]
    chunks = chunk_text([" ".join(p.split()) for p in paragraphs], min_chars=60, max_chars=120)
    assert all(len(c) <= 120 for c in chunks)
    assert all(len(c) >= 60 for c in chunks[:-1])
    # nothing lost, order kept, except a trailing chunk shorter than min_chars // 2
    assert " ".join(chunks).split() == " ".join(paragraphs).split()[:-1]


def test_pydoc_topics_split():
    a, b = PydocTopics(seed=0), PydocTopics(seed=0)
    assert a.splits == b.splits
    assert a.num_labels == len(TOPIC_GROUPS) == 7
    train, val = a.splits["train"], a.splits["val"]
    assert not {t for t, _ in train} & {t for t, _ in val}
    counts = a.class_counts("train")
    assert min(counts.values()) >= 30, counts
    assert all(1 <= len(t) <= 400 for t, _ in train + val)
    assert 0.15 < len(val) / (len(train) + len(val)) < 0.25
    capped = PydocTopics(max_per_class=20)
    assert sum(capped.class_counts("train").values()) + sum(capped.class_counts("val").values()) == 7 * 20
    assert PydocTopics(seed=1).splits["val"] != val


def test_pydoc_topics_batches():
    dm = PydocTopics(max_length=32, batch_size=4, max_per_class=10)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 32
    assert batch["input_ids"][:, 0].eq(dm.tokenizer.cls_token_id).all()
    assert batch["labels"].dtype == torch.long and batch["labels"].max() < 7
    assert dm.vocab_size == 30522


def test_tiny_bert_classifier_fits():
    dm = PydocTopics(max_length=32, batch_size=8, max_per_class=8)
    model = SequenceClassification(num_labels=dm.num_labels, pretrained_path=None, lr=3e-3)
    assert model.embedding_dim == 64
    rec = LossRecorder()
    trainer = _trainer(12, rec)
    trainer.fit(model, datamodule=dm)
    assert len(rec.losses) == 12
    (metrics,) = _trainer(1, limit_val_batches=1.0).validate(model, datamodule=dm, verbose=False)
    assert set(metrics) == {"val_loss", "val_acc"} and 0.0 <= metrics["val_acc"] <= 1.0
    with pytest.raises(ValueError, match="num_labels"):
        _trainer(1).fit(SequenceClassification(num_labels=3, pretrained_path="none"), datamodule=dm)


def test_minilm_encoder_loads_real_weights():
    model = SequenceClassification(num_labels=7).eval()
    assert model.embedding_dim == 384
    assert type(model.encoder).__name__ == "BertModel" and model.encoder.config.num_hidden_layers == 6
    assert isinstance(dict(model.named_modules())["encoder.encoder.layer.5.attention.self.query"], torch.nn.Linear)
    tok = PydocTopics().tokenizer
    sentences = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    enc = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        emb = model.embed(enc["input_ids"], enc["attention_mask"])
    assert emb.shape == (3, 384)
    emb = torch.nn.functional.normalize(emb, dim=-1)
    sim = emb @ emb.T
    # pretrained sentence embeddings: paraphrases are close, unrelated text is not (random weights fail this)
    assert sim[0, 1] > 0.6 and sim[0, 2] < 0.3 and sim[0, 1] - sim[0, 2] > 0.4, sim


def test_minilm_classifier_training_reduces_loss():
    dm = PydocTopics(max_length=48, batch_size=16, max_per_class=30)
    model = SequenceClassification(num_labels=dm.num_labels, lr=2e-4)
    assert model.training and model.encoder.training  # from_pretrained's eval mode is undone
    dm.setup("fit")
    probe = next(iter(dm.val_dataloader()))

    def probe_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = float(model.loss_fn(model._logits(probe), probe["labels"]))
        model.train()
        return loss

    before = probe_loss()
    assert before == pytest.approx(torch.log(torch.tensor(7.0)).item(), abs=0.1)  # fresh head: uniform guess
    rec = LossRecorder()
    _trainer(10, rec).fit(model, datamodule=dm)
    after = probe_loss()
    assert after < before - 0.15, (before, after, rec.losses)


def test_constructor_args_parse_from_a_lightning_cli(monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["lightning-peft"])

    class CLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")

    args = ["--data.num_pairs=8", "--model.lr=0.01", "--model.lr_schedule=linear", "--model.num_hidden_layers=1"]
    cli = CLI(CausalLM, UUIDMemorization, run=False, args=[*args, "--trainer.logger=false"], seed_everything_default=0)
    assert cli.model.hparams.vocab_size == 21 and cli.model.hparams.lr == 0.01
    assert cli.model.model.config.num_hidden_layers == 1 and cli.datamodule.hparams.num_pairs == 8

    args = ["--model.pretrained_path=none", "--data.max_per_class=5", "--trainer.logger=false"]
    cli = LightningCLI(SequenceClassification, PydocTopics, run=False, args=args, seed_everything_default=0)
    assert cli.model.embedding_dim == 64 and cli.datamodule.hparams.max_per_class == 5
