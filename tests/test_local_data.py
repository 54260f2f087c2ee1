"""LocalData: a user's own files with a local model's tokenizer; masking, packing, splits, broken records, CLI fit."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from helpers import short_run_trainer

from lightning_peft.tasks import CausalLM, DataError, LocalData
from lightning_peft.tasks.records import IGNORE_INDEX
from lightning_peft.tasks.user_files import read_file

REPO = Path(__file__).resolve().parents[1]


def _make_tiny_module():
    spec = importlib.util.spec_from_file_location("make_tiny_model", REPO / "examples" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """examples/make_tiny_model.py's folder, smaller: a 2-block Llama, a 512-token BPE, the data files."""
    torch.set_num_threads(1)
    make = _make_tiny_module()
    out = tmp_path_factory.mktemp("tiny")
    topics = make.topic_texts()
    tokenizer = make.train_tokenizer(list(topics.values())[:30], vocab_size=512)
    model = make.build_model(tokenizer, hidden_size=32, layers=2, seed=0)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    make.write_data(out, dict(list(topics.items())[:24]))
    return out


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _runs(ids: list[int], labels: list[int], trained: bool) -> list[list[int]]:
    """Maximal runs of consecutive tokens that are trained (or masked)."""
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if (label != IGNORE_INDEX) == trained:
            assert not trained or label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What does assert do?"},
    {"role": "assistant", "content": "It checks a condition."},
    {"role": "user", "content": "And pass?"},
    {"role": "assistant", "content": "Nothing at all."},
]


def test_chat_labels_cover_exactly_the_assistant_turns(tiny, tmp_path):
    data = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[:3]}])
    dm = LocalData(str(data), str(tiny / "model"), val_fraction=0.0, max_length=512)
    dm.setup()
    tok = dm.tokenizer
    row = next(r for r in dm.train_rows if len(r["input_ids"]) > 40)
    ids, labels = row["input_ids"], row["labels"]
    assert ids == tok(tok.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    trained = [tok.decode(run) for run in _runs(ids, labels, trained=True)]
    # the template renders an assistant turn as "<|assistant|>\n{content}<|end|>\n": the content and its end marker
    assert trained == ["It checks a condition.<|end|>\n", "Nothing at all.<|end|>\n"]
    masked = "".join(tok.decode(run) for run in _runs(ids, labels, trained=False))
    assert masked == (
        "<s><|system|>\nYou answer briefly.<|end|>\n<|user|>\nWhat does assert do?<|end|>\n<|assistant|>\n"
        "<|user|>\nAnd pass?<|end|>\n<|assistant|>\n"
    )
    assert tok.decode(ids[: row["prompt_length"]]).endswith("<|assistant|>\n")


def test_pair_labels_are_the_completion_and_eos(tiny, tmp_path):
    data = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q: what is 2+2?\nA:", "completion": " four"}] * 3)
    dm = LocalData(str(data), str(tiny / "model"), val_fraction=0.0)
    dm.setup()
    row = dm.train_rows[0]
    tok = dm.tokenizer
    assert [tok.decode(run) for run in _runs(row["input_ids"], row["labels"], True)] == [" four<|end|>"]
    assert tok.decode(row["input_ids"][: row["prompt_length"]]) == "Q: what is 2+2?\nA:"
    everything = LocalData(str(data), str(tiny / "model"), val_fraction=0.0, train_on_prompt=True)
    everything.setup()
    assert everything.train_rows[0]["labels"] == everything.train_rows[0]["input_ids"] == row["input_ids"]


def test_text_is_packed_into_full_windows_in_document_order(tiny):
    dm = LocalData(str(tiny / "text.txt"), str(tiny / "model"), val_fraction=0.0, max_length=32)
    dm.setup()
    tok = dm.tokenizer
    documents = read_file(tiny / "text.txt").rows["text"]  # datasets' paragraphs, in file order
    stream = [t for d in documents for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    windows = [row["input_ids"] for row in dm.train_rows]
    assert all(len(w) == 32 for w in windows)
    assert len(windows) == len(stream) // 32  # fewer than 1000 paragraphs: one packing batch, one dropped tail
    assert [t for w in windows for t in w] == stream[: 32 * len(windows)]
    assert all(row["labels"] == row["input_ids"] for row in dm.train_rows)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (8, 32) and bool(batch["attention_mask"].all())


def test_truncation_is_counted_and_fully_cut_examples_are_dropped(tiny, tmp_path):
    long = {"prompt": "word " * 40, "completion": "answer"}
    short = {"prompt": "Q", "completion": " yes"}
    data = _write_jsonl(tmp_path / "mixed.jsonl", [long, short, {"prompt": "x", "completion": "word " * 40}])
    dm = LocalData(str(data), str(tiny / "model"), val_fraction=0.0, max_length=16)
    dm.setup()
    assert (dm.report.truncated, dm.report.dropped, dm.report.train) == (2, 1, 2)  # the long prompt leaves nothing
    assert max(len(r["input_ids"]) for r in dm.train_rows) == 16


def test_validation_split_is_seeded_and_disjoint_and_val_path_is_used(tiny):
    chat = str(tiny / "chat.jsonl")
    a, b = (LocalData(chat, str(tiny / "model"), val_fraction=0.25, seed=3) for _ in range(2))
    a.setup(), b.setup()
    assert (len(a.train_rows), len(a.val_rows)) == (18, 6)
    assert a.val_rows["input_ids"] == b.val_rows["input_ids"]
    train = {tuple(x) for x in a.train_rows["input_ids"]}
    assert not train & {tuple(x) for x in a.val_rows["input_ids"]}
    c = LocalData(chat, str(tiny / "model"), val_path=str(tiny / "pairs.jsonl"))
    c.setup()
    assert (len(c.train_rows), len(c.val_rows)) == (24, 24)


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet", "save_to_disk"])
def test_every_file_format_encodes_like_json_lines(tiny, tmp_path, fmt):
    import datasets

    rows = [json.loads(line) for line in (tiny / "pairs.jsonl").read_text().splitlines()]
    table = datasets.Dataset.from_list(rows)
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(rows, indent=1))
    elif fmt == "csv":
        table.to_csv(str(path), index=False)
    elif fmt == "parquet":
        table.to_parquet(str(path))
    else:
        table.save_to_disk(str(path))
    ref = LocalData(str(tiny / "pairs.jsonl"), str(tiny / "model"), val_fraction=0.0)
    got = LocalData(str(path), str(tiny / "model"), val_fraction=0.0)
    ref.setup(), got.setup()
    assert got.train_rows["input_ids"] == ref.train_rows["input_ids"]
    assert got.train_rows["labels"] == ref.train_rows["labels"]


GOOD = {"prompt": "Q", "completion": " A"}
BROKEN = {
    "bad JSON": ('{"prompt": "Q", "completion": "A"', r"line 3: bad JSON"),
    "missing field": ({"prompt": "Q"}, r"line 3: missing field 'completion'"),
    "empty completion": ({"prompt": "Q", "completion": "  "}, r"line 3: empty completion"),
    "chat without an assistant turn": (
        {"messages": [{"role": "user", "content": "hi"}]},
        r"line 3: chat without an assistant turn",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_record_stops_fit_before_any_step_naming_file_and_line(tiny, tmp_path, case):
    record, message = BROKEN[case]
    good = GOOD if case != "chat without an assistant turn" else {"messages": CHAT[1:3]}
    data = _write_jsonl(tmp_path / "train.jsonl", [good, "", record, good])  # a blank line 2: line numbers count it
    model = CausalLM(pretrained_path=str(tiny / "model"))
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(DataError, match=f"{data}.*{message}"):
        trainer.fit(model, datamodule=LocalData(str(data), str(tiny / "model"), val_fraction=0.0))
    assert trainer.global_step == 0


def test_fit_logs_perplexity_and_samples(tiny, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    model = CausalLM(pretrained_path=str(tiny / "model"), lr=0.01, sample_new_tokens=4)
    dm = LocalData(str(tiny / "chat.jsonl"), str(tiny / "model"), val_fraction=0.25, batch_size=6, num_sample_prompts=2)
    logger = CSVLogger(tmp_path, name="run")
    trainer = L.Trainer(max_steps=3, logger=logger, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, datamodule=dm)
    metrics = trainer.callback_metrics
    assert torch.isclose(metrics["val_ppl"], metrics["val_loss"].exp(), rtol=0.05)  # token- vs batch-weighted
    samples = [json.loads(line) for line in (Path(logger.log_dir) / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and samples[0]["prompt"].endswith("<|assistant|>\n")


# -- the command line --------------------------------------------------------------------------------------


def _override(tmp_path: Path, tiny: Path, train: str, steps: int) -> Path:
    override = {
        "trainer": {**short_run_trainer(tmp_path, steps), "val_check_interval": steps, "accelerator": "cpu"},
        "model": {"init_args": {"pretrained_path": str(tiny / "model"), "lr": 0.01, "sample_new_tokens": 8}},
        "data": {"init_args": {"train_path": str(train), "tokenizer_path": str(tiny / "model"), "max_length": 64}},
        "diagnostics": {"every_n_steps": steps},
    }
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("train", ["chat.jsonl", "text.txt"])
def test_cli_fit_on_the_tiny_model(tiny, tmp_path, train, monkeypatch, capsys):
    from lightning_peft.cli.main import main

    monkeypatch.chdir(REPO)
    main(["fit", "--config", "configs/sft_local.yaml", "--config", str(_override(tmp_path, tiny, tiny / train, 6))])
    ckpt = torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6 and "lightning_peft" in ckpt
    out = capsys.readouterr().out
    assert "val_ppl" in out and "val_loss" in out
    assert list((tmp_path / "run" / "version_0").glob("events.out.tfevents.*"))


def test_cli_names_the_broken_line_in_one_message(tiny, tmp_path, monkeypatch, capsys):
    from lightning_peft.cli.main import main

    monkeypatch.chdir(REPO)
    data = _write_jsonl(tmp_path / "train.jsonl", [GOOD, {"prompt": "Q", "completion": ""}])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/sft_local.yaml", "--config", str(_override(tmp_path, tiny, data, 2))])
    assert exit_info.value.code == 2
    assert f"lightning-peft fit: error: {data} line 2: empty completion" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_qlora_fit_then_merged_export_matches_the_trained_model(tiny, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from lightning_peft import restore_from_checkpoint
    from lightning_peft.cli.main import main

    monkeypatch.chdir(REPO)
    override = _override(tmp_path, tiny, tiny / "chat.jsonl", 4)
    main(["fit", "--config", "configs/sft_qlora.yaml", "--config", str(override)])
    ckpt, config = tmp_path / "ckpts" / "last.ckpt", tmp_path / "run" / "version_0" / "config.yaml"
    main(
        [
            "export",
            "--config",
            str(config),
            "--ckpt_path",
            str(ckpt),
            "--out",
            str(tmp_path / "merged"),
            "--format",
            "merged",
        ]
    )
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    trained = CausalLM(pretrained_path=str(tiny / "model"), quantization="nf4")
    restore_from_checkpoint(trained, str(ckpt))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, trained.model(x).logits, rtol=1e-4, atol=1e-5)


def test_cli_without_bitsandbytes_says_which_extra_in_one_line(tiny, tmp_path, monkeypatch, capsys):
    import sys

    from lightning_peft.cli.main import main

    monkeypatch.chdir(REPO)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                "configs/sft_qlora.yaml",
                "--config",
                str(_override(tmp_path, tiny, tiny / "chat.jsonl", 2)),
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "lightning-peft fit: error: quantization='nf4' needs bitsandbytes: pip install -e \".[quant]\""


def _lora_grads(model: CausalLM, x: torch.Tensor) -> dict[str, torch.Tensor]:
    from lightning_peft.core.inject import inject_adapters

    torch.manual_seed(0)
    inject_adapters(model.model, {"rules": [{"name": "lora", "method": "lora", "modules": ["*_proj"]}]})
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    model.train()
    model(x, labels=x).loss.backward()
    return {n: p.grad for n, p in model.model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    plain = _lora_grads(CausalLM(pretrained_path=str(tiny / "model")), x)
    model = CausalLM(pretrained_path=str(tiny / "model"), gradient_checkpointing=True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.model.modules())
    checkpointed = _lora_grads(model, x)
    assert plain.keys() == checkpointed.keys() and len(plain) == 28  # A and B of 7 projections x 2 blocks
    for name in plain:  # the same ops recomputed: equal up to fp32 rounding
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_bfloat16_base_trains_fp32_adapters(tiny):
    model = CausalLM(pretrained_path=str(tiny / "model"), dtype="bfloat16")
    assert model.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    grads = _lora_grads(model, torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0)))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
