"""Step time and peak memory of LoRA on an nf4 (QLoRA) base against the same LoRA on the fp32 base.

    python benchmarks/qlora_step.py                       # CPU, 1 thread, the defaults below
    python benchmarks/qlora_step.py --device cuda         # on a GPU (bitsandbytes' CUDA kernels)

Each variant runs in its own process (so peak memory is its own): a Llama built from a config and saved
once, loaded in fp32 or quantized to nf4 (fp32 compute), LoRA r=16 on every block projection, AdamW on the
adapters, `--warmup` untimed steps then `--steps` timed ones on a fixed random batch, `--repeats` rounds.
Reported: the bytes of the base's weights as stored; the process's peak resident memory (CPU,
`ru_maxrss`: it includes Python, torch and the libraries, about 0.5 GB before any model, and the load:
transformers reads the fp32 weights before quantizing them); the resident memory after the timed steps
(`VmRSS`), or `max_memory_allocated` (CUDA); the median step time with the range over rounds, as CPU time
of the process (`process_time`, the honest number on a shared machine: with one thread it is the
compute) and as wall time. Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

POLICY = {"rules": [{"name": "lora", "method": "lora", "modules": ["*_proj"], "hparams": {"r": 16, "alpha": 32}}]}


def build_base(folder: Path, args: argparse.Namespace) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


def load(folder: Path, variant: str, device: str):
    from transformers import AutoModelForCausalLM

    from lightning_peft.adapters.quantized import bnb_config

    kwargs = {}
    if variant != "fp32":
        kwargs = {"quantization_config": bnb_config(variant, torch.float32), "device_map": {"": device}}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    return model.to(device) if variant == "fp32" else model


def stored_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def run_variant(folder: Path, variant: str, args: argparse.Namespace) -> dict:
    """One process: load, inject, train; the numbers as a dict."""
    from lightning_peft.core.inject import inject_adapters

    torch.set_num_threads(args.threads)
    model = load(folder, variant, args.device).train()
    model.requires_grad_(False)
    inject_adapters(model, POLICY)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(args.device)

    def step() -> float:
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    for _ in range(args.warmup):
        step()
    rounds = []
    for _ in range(args.repeats):
        if args.device == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        rounds.append(((time.perf_counter() - start) / args.steps, (time.process_time() - cpu_start) / args.steps))
    if args.device == "cuda":
        peak = now = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB; includes loading
        now = resident_bytes()
    wall, cpu = zip(*rounds, strict=True)
    sizes = {"stored_mb": stored_bytes(model) / 2**20, "peak_mb": peak / 2**20, "rss_mb": now / 2**20}
    return {"variant": variant, **sizes, "wall": wall, "cpu": cpu}


def resident_bytes() -> int:
    """The process's resident memory now (Linux `/proc/self/status`), after the timed steps."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["fp32", "nf4"])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this variant here, print JSON
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.one:
        print(json.dumps(run_variant(Path(args.folder), args.one, args)))
        return
    print(f"torch {torch.__version__}, device {args.device}, {args.threads} thread(s), {vars(args)}")
    with tempfile.TemporaryDirectory() as tmp:
        build_base(Path(tmp), args)
        results = []
        for variant in args.variants:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--one", variant, "--folder", tmp]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    head = "| base | stored weights (MB) | peak memory (MB) | memory after training (MB) | CPU s/step | wall s/step |"
    print(head + "\n| --- | ---: | ---: | ---: | --- | --- |")
    for r in results:
        memory = f"{r['stored_mb']:.1f} | {r['peak_mb']:.0f} | {r['rss_mb']:.0f}"
        print(f"| {r['variant']} | {memory} | {_spread(r['cpu'])} | {_spread(r['wall'])} |")


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


if __name__ == "__main__":
    main()
