"""Sample generations at validation: a few prompts continued greedily, shown in every logger.

Loss and perplexity say whether a fine-tune learns; a handful of continuations says what it learned. Each
logger gets the samples the way it shows text: TensorBoard as a text panel, Weights & Biases as a table,
MLflow as a text artifact; any other logger with a folder gets ``samples.jsonl`` appended there. They are also
printed (rank zero), so a console run shows them too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["format_samples", "generate_samples", "log_samples"]


@torch.no_grad()
def generate_samples(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> list[dict]:
    """Greedy continuations (stopping at EOS) of each prompt, one at a time (prompts differ in length)."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad
    )
    device = next(model.parameters()).device
    samples = []
    for ids in prompts:
        prompt = torch.tensor([ids], dtype=torch.long, device=device)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
        new = out[0, prompt.shape[1] :].tolist()
        samples.append({"prompt": tokenizer.decode(ids), "completion": tokenizer.decode(new)})
    return samples


def format_samples(samples: list[dict], step: int) -> str:
    """Markdown: one quoted prompt and its continuation per sample."""
    parts = [f"**step {step}**"]
    for i, s in enumerate(samples):
        parts.append(f"{i + 1}. prompt: `{s['prompt']!r}`\n   continuation: `{s['completion']!r}`")
    return "\n\n".join(parts)


def log_samples(loggers: list[Any], samples: list[dict], step: int, tag: str = "val_samples") -> None:
    """Show ``samples`` in each logger through its own text API (see the module docstring), and print them."""
    text = format_samples(samples, step)
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        kind = type(logger).__name__
        if kind == "TensorBoardLogger":
            experiment.add_text(tag, text, global_step=step)
        elif kind == "WandbLogger":
            rows = [[step, s["prompt"], s["completion"]] for s in samples]
            logger.log_text(key=tag, columns=["step", "prompt", "completion"], data=rows)
        elif kind == "MLFlowLogger":
            experiment.log_text(logger.run_id, text, f"{tag}/step_{step}.md")
        elif getattr(logger, "log_dir", None):
            path = Path(logger.log_dir) / "samples.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps({"step": step, **s}) + "\n" for s in samples)
    rank_zero_info(f"{tag} at step {step}:\n" + "\n".join(f"  {s['prompt']!r} -> {s['completion']!r}" for s in samples))
