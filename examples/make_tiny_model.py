"""Make a small local model folder and data files, so `configs/sft_local.yaml` runs offline on any machine.

    python examples/make_tiny_model.py --out tiny

writes

    tiny/model/        a small Llama (random weights) and its tokenizer, both with save_pretrained: the kind
                       of folder a user downloads from the hub (config.json, model.safetensors, tokenizer.json)
    tiny/chat.jsonl    instruction data as chats: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
    tiny/pairs.jsonl   the same as prompt/completion pairs: {"prompt": ..., "completion": ...}
    tiny/text.txt      plain text for continued pretraining (paragraphs separated by blank lines)

The tokenizer is a byte-level BPE trained with `tokenizers` on Python's own help texts (`pydoc_data.topics`),
with a chat template. The instruction pairs ask for the first sentence of each help topic. Nothing is
downloaded; the script takes a few seconds.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""Each turn is `<|role|>\\ncontent<|end|>\\n`; the generation prompt opens an assistant turn."""

SPECIAL_TOKENS = ["<pad>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def topic_texts() -> dict[str, str]:
    from pydoc_data.topics import topics

    return {key: topics[key].strip() for key in sorted(topics)}


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (no unknown token: every byte is in the alphabet) wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_model(tokenizer, hidden_size: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def first_sentence(text: str, limit: int = 160) -> str:
    """The first sentence of a help topic's body (its title and `****` underline skipped), at most `limit` chars."""
    lines = text.splitlines()
    if len(lines) > 1 and lines[1].strip() and set(lines[1].strip()) <= set("*=-"):
        lines = lines[2:]
    sentence = re.split(r"(?<=[.:])\s", " ".join(" ".join(lines).split()), maxsplit=1)[0]
    return sentence[:limit]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def write_data(out: Path, topics: dict[str, str]) -> None:
    questions = [
        (f"What is the Python help topic '{key}' about?", first_sentence(text)) for key, text in topics.items()
    ]
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in questions]
    write_jsonl(out / "chat.jsonl", chats)
    write_jsonl(out / "pairs.jsonl", [{"prompt": q + "\n", "completion": a} for q, a in questions])
    paragraphs = [p.strip() for text in topics.values() for p in text.split("\n\n") if len(p.strip()) > 40]
    (out / "text.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tiny", help="folder to write model/, chat.jsonl, pairs.jsonl, text.txt")
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    (out / "model").mkdir(parents=True, exist_ok=True)
    topics = topic_texts()
    tokenizer = train_tokenizer(list(topics.values()), args.vocab_size)
    model = build_model(tokenizer, args.hidden_size, args.layers, args.seed)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    write_data(out, topics)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out / 'model'}: Llama with {params:,} parameters, BPE tokenizer with {len(tokenizer)} tokens")
    print(f"wrote {out / 'chat.jsonl'}, {out / 'pairs.jsonl'} ({len(topics)} records each) and {out / 'text.txt'}")


if __name__ == "__main__":
    main()
