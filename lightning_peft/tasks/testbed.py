"""Learning vs forgetting testbed: a byte-level Llama that knows English prose, fine-tuned on Python source.

The setting of "LoRA Learns Less and Forgets Less" (arXiv:2405.09673) at CPU scale:

- the **base** (`ProseBaseLM`) is a byte-level Llama pretrained by the project on English prose
  (Python's help topics and standard-library docstrings, `ByteCorpus` source `"both"`), built once
  deterministically (a plain PyTorch loop) and cached by a hash of its recipe
  (`lightning_peft.tasks.base_cache`);
- the **new domain** (`StdlibSource`) is the Python source of standard-library modules whose
  docstrings are *not* in the prose (so learning code cannot teach back the prose), split by file
  into training and held-out validation files;
- **learning** = `val_loss` on held-out source files (nats/byte); **forgetting** = the rise of the loss
  on held-out prose documents the base never trained on (`HeldOutProse`, a `ReferenceLoss` probe for
  `ForgettingMonitor`): `-forget/ref_logprob_change`, nats/byte.

Both signals are held-out losses: they move smoothly and are far from their limits (the prose loss of
a unigram model, `unigram_loss`, is the ceiling of forgetting). Everything depends on the Python
version (the texts change between releases); within one version it is deterministic.
"""

from __future__ import annotations

import json
import math
import os
import sysconfig
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from lightning_peft.callbacks.reference_probe import ReferenceLoss

from ._common import LRSchedule, seeded
from .base_cache import BASE_RECORD, base_cache_key, cache_root, cached_base
from .causal_lm import CausalLM
from .corpus_data import (
    DOCSTRING_MODULES,
    ByteTokenizer,
    WindowedBytes,
    corpus_documents,
    split_documents,
    to_windows,
)

__all__ = ["HeldOutProse", "ProseBaseLM", "StdlibSource", "prose_split", "stdlib_source_files", "unigram_loss"]

PROSE_VAL_FRACTION = 0.1
PROSE_SPLIT_SEED = 0


def prose_split(val_fraction: float = PROSE_VAL_FRACTION, seed: int = PROSE_SPLIT_SEED) -> tuple[list[str], list[str]]:
    """(training, held-out) prose documents: `ByteCorpus`'s `"both"` corpus split at document level."""
    return split_documents(corpus_documents("both"), val_fraction, seed)


def unigram_loss(train_docs: list[str], eval_docs: list[str]) -> float:
    """Nats/byte of the training bytes' unigram distribution (add-one smoothed) on `eval_docs`:
    what a model that forgot all context would score, the ceiling of forgetting."""
    counts = Counter(b for doc in train_docs for b in doc.encode("utf-8"))
    total = sum(counts.values()) + 256
    data = [b for doc in eval_docs for b in doc.encode("utf-8")]
    return -sum(math.log((counts[b] + 1) / total) for b in data) / len(data)


def stdlib_source_files(stdlib: str | None = None) -> list[Path]:
    """Top-level standard-library `.py` files, sorted, without the modules whose docstrings are in the prose."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    prose_modules = {name.split(".")[0] for name in DOCSTRING_MODULES}
    files = sorted(
        p for p in root.glob("*.py") if p.stem not in prose_modules and p.stem not in ("this", "antigravity")
    )
    if len(files) < 2:
        raise FileNotFoundError(f"StdlibSource: fewer than 2 standard-library source files under {root}")
    return files


class StdlibSource(WindowedBytes):
    """Byte-level language modelling of standard-library Python source, split by file (seeded).

    Batches are as `ByteCorpus`'s (`input_ids`, `attention_mask`, `labels`); `val_loss` is in nats/byte.

    Args:
        seq_len: bytes per window.
        batch_size: windows per batch.
        val_fraction: share of files held out for validation (and test).
        seed: seed of the training shuffle (epoch k's order is drawn from `seed + k`).
        split_seed: seed of the file split (kept apart, so that seeds change the order, not the data).
        num_workers: data loader worker processes.
        max_train_windows: keep only the first this many training windows (`None`: all).
        max_val_windows: keep only the first this many validation windows (`None`: all).
    """

    def __init__(
        self,
        seq_len: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.2,
        seed: int = 0,
        split_seed: int = 0,
        num_workers: int = 0,
        max_train_windows: int | None = None,
        max_val_windows: int | None = 256,
    ) -> None:
        super().__init__()
        if seq_len < 2 or batch_size < 1 or not 0.0 < val_fraction < 1.0:
            raise ValueError(f"StdlibSource: need seq_len >= 2, batch_size >= 1, 0 < val_fraction < 1; "
                             f"got {seq_len}, {batch_size}, {val_fraction}")  # fmt: skip
        for name, value in (("max_train_windows", max_train_windows), ("max_val_windows", max_val_windows)):
            if value is not None and value < 1:
                raise ValueError(f"StdlibSource: {name} must be >= 1 or None, got {value}")
        self.save_hyperparameters()

    def split(self) -> tuple[list[str], list[str]]:
        docs = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_source_files()]
        return split_documents(docs, self.hparams.val_fraction, self.hparams.split_seed)

    def keep(self, train: torch.Tensor, val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hp = self.hparams
        if hp.max_val_windows is not None and len(val) > hp.max_val_windows:  # an even spread over the held-out files
            val = val[torch.linspace(0, len(val) - 1, hp.max_val_windows).round().long()]
        return (train if hp.max_train_windows is None else train[: hp.max_train_windows]), val


class HeldOutProse(ReferenceLoss):
    """`ReferenceLoss` on the prose documents `ProseBaseLM`'s base never trained on (nats/byte).

    Args:
        num_windows: windows in the fixed sample; seq_len, seed, batch_size: as `ReferenceLoss`.
    """

    def __init__(self, num_windows: int = 64, seq_len: int = 128, seed: int = 0, batch_size: int = 16) -> None:
        super().__init__(
            texts=prose_split()[1], tokenize="bytes", separator_id=ByteTokenizer.eos_token_id, seq_len=seq_len,
            num_windows=num_windows, seed=seed, unit="byte", batch_size=batch_size,
        )  # fmt: skip


def _pretrain(model: torch.nn.Module, spec: dict[str, Any]) -> dict[str, Any]:
    """AdamW with linear warm-up and cosine decay to 10% on random windows of the training prose."""
    tokenizer = ByteTokenizer()
    train_docs, val_docs = prose_split()
    windows = to_windows(train_docs, spec["seq_len"], tokenizer).long()
    val = to_windows(val_docs, spec["seq_len"], tokenizer).long()
    steps, warmup = spec["steps"], spec["warmup_steps"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(spec["seed"])
    with seeded(spec["seed"]):
        model.train()
        for _ in range(steps):
            batch = windows[torch.randint(len(windows), (spec["batch_size"],), generator=generator)]
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        held_out = [float(model(input_ids=b, labels=b).loss) for b in val.split(32)]
    built = {
        "steps": steps, "seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()), "final_train_loss": float(loss.detach()),
        "held_out_prose_loss": sum(held_out) / len(held_out), "held_out_windows": len(val),
        "unigram_prose_loss": unigram_loss(train_docs, val_docs),
    }  # fmt: skip
    return {"built": built}


def _llama(arch: dict[str, Any], init_seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = ByteTokenizer()
    config = LlamaConfig(**arch, attn_implementation="sdpa", tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    with seeded(init_seed):
        return LlamaForCausalLM(config)


def build_prose_base(spec: dict[str, Any], cache_dir: str | Path | None = None, verbose: bool = True) -> Path:
    """The cached folder of the prose base `spec` describes (pretrained now if absent)."""
    root = cache_dir or cache_root("prose-base")
    return cached_base(root, spec, lambda: (model := _llama(spec["arch"], spec["init_seed"]), _pretrain(model, spec)),
                       verbose=verbose)  # fmt: skip


class ProseBaseLM(CausalLM):
    """`CausalLM` whose base is a byte-level Llama pretrained on English prose (cached on disk).

    The first construction with a recipe pretrains it (`pretrain_steps` AdamW steps, minutes on one
    core) and saves it under `$LIGHTNING_PEFT_CACHE/prose-base/<hash>` (default `~/.cache/lightning-peft`);
    later ones load it. `base_record` holds how the build went (size, held-out prose loss, seconds).

    Args:
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
            max_position_embeddings: the base's Llama config (vocabulary: 256 bytes).
        init_seed: seed of the base's initialisation and of its pretraining batches.
        pretrain_steps, pretrain_lr, pretrain_batch_size, pretrain_seq_len, pretrain_warmup_steps: the recipe.
        cache_dir: where bases are kept (default above).
        lr, weight_decay, warmup_steps, lr_schedule: the fine-tuning run's optimizer (as `CausalLM`).
        max_new_tokens, generate_on_eval: as `CausalLM` (the byte data has no prompts: loss only by default).
    """

    def __init__(
        self,
        hidden_size: int = 64,
        intermediate_size: int = 172,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 4,
        max_position_embeddings: int = 256,
        init_seed: int = 0,
        pretrain_steps: int = 1200,
        pretrain_lr: float = 3e-3,
        pretrain_batch_size: int = 16,
        pretrain_seq_len: int = 128,
        pretrain_warmup_steps: int = 100,
        cache_dir: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: LRSchedule = "constant",
        max_new_tokens: int = 64,
        generate_on_eval: bool = False,
    ) -> None:
        if pretrain_steps < 1 or pretrain_lr <= 0 or pretrain_batch_size < 1 or pretrain_seq_len < 2:
            raise ValueError(f"ProseBaseLM: need pretrain_steps >= 1, pretrain_lr > 0, pretrain_batch_size >= 1, "
                             f"pretrain_seq_len >= 2; got {pretrain_steps}, {pretrain_lr}, {pretrain_batch_size}, "
                             f"{pretrain_seq_len}")  # fmt: skip
        arch = {
            "vocab_size": 256, "hidden_size": hidden_size, "intermediate_size": intermediate_size,
            "num_hidden_layers": num_hidden_layers, "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_key_value_heads, "max_position_embeddings": max_position_embeddings,
        }  # fmt: skip
        spec = {"arch": arch, "init_seed": init_seed, "steps": pretrain_steps, "lr": pretrain_lr,
                "batch_size": pretrain_batch_size, "seq_len": pretrain_seq_len, "warmup_steps": pretrain_warmup_steps,
                "seed": init_seed, "corpus": "ByteCorpus:both", "format": 1}  # fmt: skip
        root = Path(cache_dir).expanduser() if cache_dir else cache_root("prose-base")
        folder = root / base_cache_key(spec)
        if not (folder / BASE_RECORD).is_file():
            folder = build_prose_base(spec, root)
        super().__init__(pretrained_path=str(folder), vocab_size=256, init_seed=init_seed, lr=lr,
                         weight_decay=weight_decay, warmup_steps=warmup_steps, lr_schedule=lr_schedule,
                         max_new_tokens=max_new_tokens, generate_on_eval=generate_on_eval)  # fmt: skip
        self.tokenizer = ByteTokenizer()
        self.base_record: dict[str, Any] = json.loads((folder / BASE_RECORD).read_text())


if __name__ == "__main__":  # python -m lightning_peft.tasks.testbed: build (or find) the default base
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(json.dumps(ProseBaseLM().base_record, indent=2))
