"""A plain causal-LM LightningModule (Hugging Face model inside): the UUID task, pretraining, or any local model.

Nothing here knows about adapters: this is the kind of module a user already has. The optimizer is built in
``configure_optimizers`` from the parameters that require grad, so a callback that freezes the base model and
injects adapters before the optimizer is built trains only the adapters.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from lightning_peft.adapters.quantized import bnb_config
from lightning_peft.callbacks.restart import check_schedule_args

from ._common import LRSchedule, TaskModule, check_optim_args, from_pretrained, is_none_path, seeded
from .metrics import CharAccuracy, ExactMatch, Perplexity
from .samples import generate_samples, log_samples
from .uuid_data import UUID_LENGTH, CharTokenizer

__all__ = ["CausalLM", "greedy_generate"]

LLAMA_CONFIG_ARGS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "attn_implementation",
)
"""The constructor arguments that go straight into ``LlamaConfig``."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def enable_checkpointing(model: torch.nn.Module) -> None:
    """transformers' non-reentrant activation checkpointing (frozen inputs need no ``requires_grad`` hack).

    ``activation_checkpointing_enable`` from transformers 5.x on, ``gradient_checkpointing_enable`` before.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int, use_cache: bool = True
) -> torch.Tensor:
    """Greedy decoding of exactly ``max_new_tokens`` tokens (no early stop at EOS).

    Args:
        model: A Hugging Face causal LM.
        prompt_ids: ``(batch, prompt_len)`` token ids; all prompts must have the same length (no padding).
        max_new_tokens: Number of tokens to generate.
        use_cache: Decode with transformers' ``generate`` and its key/value cache (an empty EOS list keeps it
            from stopping early); ``False`` re-runs the whole sequence each step, a cache-free reference.

    Returns:
        ``(batch, max_new_tokens)`` generated ids.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt_len = prompt_ids.shape[1]
    if use_cache:
        from transformers import GenerationConfig

        pad = model.generation_config.pad_token_id
        config = GenerationConfig(
            do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=[], pad_token_id=0 if pad is None else pad
        )
        ids = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), generation_config=config)
        return ids[:, prompt_len:]
    ids = prompt_ids
    for _ in range(max_new_tokens):
        next_ids = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(dim=-1)
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
    return ids[:, prompt_len:]


class CausalLM(TaskModule):
    """Causal language model trained with the next-token loss, evaluated by greedy generation.

    By default a small Llama is built from ``transformers.LlamaConfig`` (no download). The Hugging Face model is
    kept at ``self.model``, so module names look like ``model.model.layers.0.self_attn.q_proj``.

    Batches are dicts with ``input_ids``, ``attention_mask`` and ``labels`` (see
    :class:`~lightning_peft.tasks.UUIDMemorization`). Evaluation batches that also carry ``prompt_ids`` and
    ``values`` are scored by generating ``max_new_tokens`` tokens greedily from the prompt: logged as
    ``val_char_acc`` / ``val_exact_match`` (``test_`` in ``test``). With a datamodule that has a ``tokenizer``
    (e.g. ``UUIDMemorization``), that tokenizer is used in ``setup``; otherwise a :class:`CharTokenizer`.
    Every evaluation also logs the token-weighted perplexity ``val_ppl`` (``exp`` of the mean loss per
    trained token). A datamodule with ``sample_prompt_ids`` (``LocalData``) gets them continued greedily at
    the end of every validation, logged to every logger (``tasks/samples.py``).

    Args:
        vocab_size: Vocabulary size of the model built from a config (must cover the data's tokenizer).
        hidden_size: Hidden size of the config-built Llama.
        intermediate_size: MLP size of the config-built Llama.
        num_hidden_layers: Number of decoder blocks of the config-built Llama.
        num_attention_heads: Attention heads of the config-built Llama.
        num_key_value_heads: Key/value heads (grouped-query attention) of the config-built Llama.
        max_position_embeddings: Longest sequence of the config-built Llama.
        pretrained_path: Local folder of a Hugging Face causal LM to load instead of building from a config
            (``local_files_only=True``); ``None`` builds the small Llama.
        init_seed: Seed for the base weights' initialisation; the caller's RNG state is left untouched.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warmup steps (0 = none); the schedule is stepped every optimizer step.
        lr_schedule: ``"constant"`` after warmup, ``"linear"`` decay to 0 at the trainer's last step, or
            ``"cosine_restarts"``: cosine decay to ``min_lr_ratio`` with a re-warm-up after every ``restart_every``
            steps (ReLoRA's jagged schedule, for ``MergeRestart``; docs/restart.md).
        restart_every: The merge period of ``cosine_restarts`` (``MergeRestart(every=...)``); ``None``: no re-warm-ups.
        restart_warmup_steps: Linear re-warm-up steps after each restart (``cosine_restarts``).
        min_lr_ratio: Where ``cosine_restarts`` ends, as a share of ``lr``.
        max_new_tokens: Tokens generated per evaluation prompt (36 = one UUID).
        generate_on_eval: Run greedy generation in validation/test (loss only when ``False``).
        attn_implementation: Attention kernel of the Hugging Face model (``"sdpa"`` or ``"eager"``).
        dtype: Dtype of the base weights (``"bfloat16"`` halves their memory; adapters keep fp32 masters).
        quantization: Load the ``pretrained_path`` base quantized by bitsandbytes: ``"nf4"`` (QLoRA), ``"fp4"``
            or ``"int8"``; its linears are frozen, adapters wrap them (needs ``pip install -e ".[quant]"``).
        gradient_checkpointing: Recompute each block's activations in backward (transformers' non-reentrant
            checkpointing): less memory, about one more forward of time.
        sample_new_tokens: Tokens generated per sample prompt at validation (0: no samples).
    """

    def __init__(
        self,
        vocab_size: int = 32,
        hidden_size: int = 64,
        intermediate_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        max_position_embeddings: int = 128,
        pretrained_path: str | None = None,
        init_seed: int = 0,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: LRSchedule = "constant",
        restart_every: int | None = None,
        restart_warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        max_new_tokens: int = UUID_LENGTH,
        generate_on_eval: bool = True,
        attn_implementation: str = "sdpa",
        dtype: Literal["float32", "bfloat16"] = "float32",
        quantization: Literal["nf4", "fp4", "int8"] | None = None,
        gradient_checkpointing: bool = False,
        sample_new_tokens: int = 32,
    ) -> None:
        super().__init__()
        check_optim_args(lr, weight_decay, warmup_steps, lr_schedule)
        check_schedule_args(0, warmup_steps, restart_every, restart_warmup_steps, min_lr_ratio)
        if dtype not in DTYPES:
            raise ValueError(f"CausalLM dtype must be one of {list(DTYPES)}, got {dtype!r}")
        if quantization is not None and is_none_path(pretrained_path):
            raise ValueError(f"CausalLM(quantization={quantization!r}) quantizes a loaded model: set pretrained_path")
        self.save_hyperparameters()
        self.tokenizer: Any = CharTokenizer()
        self.sample_prompt_ids: list[list[int]] = []
        with seeded(init_seed):
            self.model = self._build_model()
        if gradient_checkpointing:
            enable_checkpointing(self.model)
        self.val_ppl = Perplexity()
        self.test_ppl = Perplexity()
        self.val_char_acc = CharAccuracy()
        self.val_exact_match = ExactMatch()
        self.test_char_acc = CharAccuracy()
        self.test_exact_match = ExactMatch()

    def _build_model(self) -> torch.nn.Module:
        hp = self.hparams
        if is_none_path(hp.pretrained_path):
            return self._llama_from_config().to(DTYPES[hp.dtype])
        quantization = {}
        if hp.quantization is not None:
            config = bnb_config(hp.quantization, DTYPES[hp.dtype])
            quantization = {"quantization_config": config, "device_map": {"": "cpu"}}
        return from_pretrained(
            "AutoModelForCausalLM",
            hp.pretrained_path,
            dtype=DTYPES[hp.dtype],
            attn_implementation=hp.attn_implementation,
            **quantization,
        )

    def _llama_from_config(self) -> torch.nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            **{name: self.hparams[name] for name in LLAMA_CONFIG_ARGS},
            pad_token_id=self.tokenizer.pad_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(config)

    # -- data ------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
        if tokenizer is not None:
            self.tokenizer = tokenizer
        self.sample_prompt_ids = list(getattr(self.trainer.datamodule, "sample_prompt_ids", None) or [])
        model_vocab = self.model.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > model_vocab:
            raise ValueError(
                f"the data's tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary has {model_vocab}; "
                "raise CausalLM(vocab_size=...) or link it to the datamodule's vocab_size"
            )

    # -- model -----------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)

    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int | None = None) -> torch.Tensor:
        """Greedy continuation ids ``(batch, max_new_tokens)`` of equal-length prompts."""
        return greedy_generate(self.model, prompt_ids, max_new_tokens or self.hparams.max_new_tokens)

    def generate_text(self, prompt_ids: torch.Tensor) -> list[str]:
        """Greedy continuations as strings, one character per generated token (special tokens shown as ``?``)."""
        ids = self.generate(prompt_ids)
        return [self.tokenizer.decode(row, placeholder="?") for row in ids.cpu()]

    # -- steps -----------------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return self(batch["input_ids"], batch.get("attention_mask"), batch["labels"]).loss

    def evaluate(self, batch: dict[str, Any], prefix: str) -> torch.Tensor:
        loss = self.loss(batch)
        ppl = getattr(self, f"{prefix}_ppl")
        ppl.update(loss.detach(), (batch["labels"][:, 1:] != -100).sum())
        self.log(f"{prefix}_ppl", ppl, on_epoch=True, batch_size=len(batch["input_ids"]))
        if self.hparams.generate_on_eval and "prompt_ids" in batch and "values" in batch:
            preds = self.generate_text(batch["prompt_ids"])
            for name, prog_bar in (("char_acc", True), ("exact_match", False)):
                metric = getattr(self, f"{prefix}_{name}")
                metric.update(preds, batch["values"])
                self.log(f"{prefix}_{name}", metric, on_epoch=True, prog_bar=prog_bar, batch_size=len(preds))
        return loss

    def on_validation_epoch_end(self) -> None:
        """Continue the datamodule's sample prompts greedily and show them in every logger (not in the sanity check)."""
        if not self.sample_prompt_ids or self.hparams.sample_new_tokens < 1 or self.trainer.sanity_checking:
            return
        samples = generate_samples(self.model, self.tokenizer, self.sample_prompt_ids, self.hparams.sample_new_tokens)
        if self.trainer.is_global_zero:
            log_samples(self.loggers, samples, self.global_step)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        return self.generate_text(batch["prompt_ids"])
