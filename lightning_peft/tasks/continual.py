"""UUID continual miniature: a base model that already knows set A, fine-tuned on a disjoint set B.

The experiment of "LoRA learns less and forgets less" (arXiv:2405.09673) in miniature. The
random-init Llama first memorises a set A of UUID pairs by full fine-tuning (a plain
PyTorch loop, until every value is generated exactly or `prior_steps` run out); that base is
saved with `save_pretrained` in a cache folder named by a hash of its config, data and seed,
so every later run, whatever its policy, starts from the same weights without retraining.
Each policy then learns set B (`UUIDMemorization` with another seed): learning = accuracy on
B (the usual `val_char_acc`), forgetting = accuracy lost on A (`ForgettingMonitor` with
`UUIDRecall`, which reads the pairs from `UUIDContinualLM.prior_pairs`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_peft.callbacks.forgetting import PriorKnowledge

from ._common import LRSchedule, seeded
from .base_cache import BASE_RECORD, base_cache_key, cache_root, cached_base
from .causal_lm import CausalLM, greedy_generate
from .metrics import char_matches
from .uuid_data import UUID_LENGTH, CharTokenizer, _lm_batch, make_uuid_pairs

__all__ = ["UUIDContinualLM", "UUIDRecall", "base_cache_key", "default_cache_dir", "memorise_uuid_base"]


def default_cache_dir() -> Path:
    """`$LIGHTNING_PEFT_CACHE` or `~/.cache/lightning-peft`, plus `/uuid-base`."""
    return cache_root("uuid-base")


def _recall(model: torch.nn.Module, pairs: list[tuple[str, str]], tokenizer: CharTokenizer) -> tuple[float, float]:
    prompts = torch.tensor([tokenizer.encode(f"{k}:", add_bos=True) for k, _ in pairs])
    texts = [tokenizer.decode(row, placeholder="?") for row in greedy_generate(model, prompts, UUID_LENGTH)]
    chars = sum(char_matches(t, v) for t, (_, v) in zip(texts, pairs, strict=True))
    return chars / (UUID_LENGTH * len(pairs)), sum(t == v for t, (_, v) in zip(texts, pairs, strict=True)) / len(pairs)


def _train_base(model: torch.nn.Module, pairs: list[tuple[str, str]], steps: int, lr: float, seed: int) -> dict:
    """Full fine-tuning on `pairs` (whole set per step, AdamW) until exact recall or `steps` run out."""
    tokenizer = CharTokenizer()
    batch = _lm_batch([tokenizer.encode(f"{k}:{v}", add_bos=True, add_eos=True) for k, v in pairs], 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    step, char_acc, exact = 0, 0.0, 0.0
    with seeded(seed):
        model.train()
        while step < steps:
            loss = model(**batch, use_cache=False).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % 50 == 0 or step == steps:
                model.eval()
                char_acc, exact = _recall(model, pairs, tokenizer)
                model.train()
                if exact == 1.0:
                    break
    return {"steps": step, "char_acc": char_acc, "exact_match": exact, "final_loss": float(loss.detach())}


def memorise_uuid_base(
    model: torch.nn.Module, spec: dict[str, Any], cache_dir: str | Path | None = None, verbose: bool = True
) -> Path:
    """Train `model` (random init) to memorise set A and cache it; return the cached folder.

    `spec` holds `prior_pairs`, `prior_seed`, `prior_steps`, `prior_lr` and the model config;
    its hash names the folder. A folder that is already there is reused (not retrained); see
    `lightning_peft.tasks.base_cache` for the atomic write.
    """

    def build() -> tuple[torch.nn.Module, dict[str, Any]]:
        pairs = make_uuid_pairs(spec["prior_pairs"], spec["prior_seed"])
        return model, {
            "memorised": _train_base(model, pairs, spec["prior_steps"], spec["prior_lr"], spec["prior_seed"])
        }

    return cached_base(cache_dir or default_cache_dir(), spec, build, verbose=verbose)


def _random_init_llama(arch: dict[str, Any], init_seed: int) -> torch.nn.Module:
    """The config-built Llama that `CausalLM(**arch, init_seed=init_seed)` holds, built directly:
    a nested `CausalLM` inside a LightningCLI instantiation would take the outer module's
    hyper-parameters (Lightning's `save_hyperparameters` reads the CLI's given init args)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = CharTokenizer()
    config = LlamaConfig(
        **arch, attn_implementation="sdpa", tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    with seeded(init_seed):
        return LlamaForCausalLM(config)


class UUIDContinualLM(CausalLM):
    """`CausalLM` whose base already memorised a UUID set A (cached on disk), for learning-vs-forgetting runs.

    The base is the config-built Llama (seeded by `init_seed`) after full fine-tuning on
    `make_uuid_pairs(prior_pairs, prior_seed)`; train it on a disjoint set (e.g.
    `UUIDMemorization(seed=0)`) and measure what it keeps of A with
    `ForgettingMonitor(UUIDRecall())`. The record of how well the base knows A is in
    `base_record` (and `lightning_peft_base.json` in the cache folder).

    Args:
        prior_pairs: size of set A.
        prior_seed: seed of set A (use another seed for the training data).
        prior_steps: most full fine-tuning steps for memorising A.
        prior_lr: AdamW learning rate for memorising A.
        cache_dir: where memorised bases are kept (default `$LIGHTNING_PEFT_CACHE` or
            `~/.cache/lightning-peft`, then `uuid-base/<hash>`).
        Others: as `CausalLM` (model config, optimizer of the fine-tuning run).
    """

    def __init__(
        self,
        prior_pairs: int = 32,
        prior_seed: int = 1000,
        prior_steps: int = 600,
        prior_lr: float = 3e-3,
        cache_dir: str | None = None,
        vocab_size: int = 32,
        hidden_size: int = 64,
        intermediate_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        max_position_embeddings: int = 128,
        init_seed: int = 0,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: LRSchedule = "constant",
        max_new_tokens: int = UUID_LENGTH,
        generate_on_eval: bool = True,
    ) -> None:
        if prior_pairs < 1 or prior_steps < 1 or prior_lr <= 0:
            raise ValueError(f"need prior_pairs >= 1, prior_steps >= 1, prior_lr > 0; got {prior_pairs}, "
                             f"{prior_steps}, {prior_lr}")  # fmt: skip
        arch = {
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_key_value_heads,
            "max_position_embeddings": max_position_embeddings,
        }
        spec = {"arch": arch, "init_seed": init_seed, "prior_pairs": prior_pairs, "prior_seed": prior_seed,
                "prior_steps": prior_steps, "prior_lr": prior_lr, "format": 1}  # fmt: skip
        folder = default_cache_dir() if cache_dir is None else Path(cache_dir)
        start, built = time.perf_counter(), False
        if not (Path(folder).expanduser() / base_cache_key(spec) / BASE_RECORD).is_file():
            built = True
            folder = memorise_uuid_base(_random_init_llama(arch, init_seed), spec, folder)
        else:
            folder = Path(folder).expanduser() / base_cache_key(spec)
        super().__init__(
            pretrained_path=str(folder), vocab_size=vocab_size, init_seed=init_seed, lr=lr,
            weight_decay=weight_decay, warmup_steps=warmup_steps, lr_schedule=lr_schedule,
            max_new_tokens=max_new_tokens, generate_on_eval=generate_on_eval,
        )  # fmt: skip
        self.base_record: dict[str, Any] = json.loads((folder / BASE_RECORD).read_text())
        # Seconds this instance spent building the cached base (0 when it was cached already): compare
        # reports it apart from the variant's own cost (`build_time_s`), since only the first run pays it.
        self.one_time_build_s = time.perf_counter() - start if built else 0.0
        self.prior_pairs = make_uuid_pairs(prior_pairs, prior_seed)


class UUIDRecall(PriorKnowledge):
    """Greedy-generation accuracy on UUID key -> value pairs the base model memorised.

    Args:
        num_pairs: size of the memorised set (`None`: the module's `prior_pairs`, as set by
            `UUIDContinualLM`, which knows which pairs its cached base memorised).
        seed: seed of `make_uuid_pairs` for that set (with `num_pairs`).
        batch_size: prompts generated per forward pass.

    Metrics: `prior_char_acc` (correct value characters) and `prior_exact_match`.
    """

    def __init__(self, num_pairs: int | None = None, seed: int | None = None, batch_size: int = 64) -> None:
        if (num_pairs is None) != (seed is None):
            raise ValueError("UUIDRecall: give both `num_pairs` and `seed`, or neither (use the module's prior_pairs)")
        for name, value in (("num_pairs", num_pairs), ("batch_size", batch_size)):  # a probe needs items
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"UUIDRecall: {name} must be a positive integer, got {value!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"UUIDRecall: seed must be an integer, got {seed!r}")
        self.num_pairs = num_pairs
        self.seed = seed
        self.batch_size = batch_size

    def pairs(self, pl_module: pl.LightningModule) -> list[tuple[str, str]]:
        if self.num_pairs is not None:
            return make_uuid_pairs(self.num_pairs, self.seed or 0)
        pairs = getattr(pl_module, "prior_pairs", None)
        if not pairs:
            raise ValueError(
                f"UUIDRecall: {type(pl_module).__name__} has no `prior_pairs`; give num_pairs and seed of the "
                "memorised set, or use UUIDContinualLM"
            )
        return list(pairs)

    def capture(self, pl_module: pl.LightningModule) -> None:
        datamodule = getattr(pl_module.trainer, "datamodule", None)
        new_keys = {k for k, _ in getattr(datamodule, "pairs", [])}
        overlap = new_keys & {k for k, _ in self.pairs(pl_module)}
        if overlap:
            raise ValueError(
                f"UUIDRecall: {len(overlap)} keys of the prior set are also in the training data; "
                "the prior and the new set must be disjoint (use another data seed)"
            )

    def measure(self, pl_module: pl.LightningModule) -> dict[str, float]:
        tokenizer = pl_module.tokenizer
        pairs = self.pairs(pl_module)
        correct = exact = 0
        device = pl_module.device
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            prompts = torch.tensor([tokenizer.encode(f"{k}:", add_bos=True) for k, _ in chunk], device=device)
            generated = pl_module.generate(prompts, UUID_LENGTH)
            for row, (_, value) in zip(generated.cpu(), chunk, strict=True):
                text = tokenizer.decode(row, placeholder="?")
                correct += char_matches(text, value)
                exact += int(text == value)
        return {"prior_char_acc": correct / (UUID_LENGTH * len(pairs)), "prior_exact_match": exact / len(pairs)}
