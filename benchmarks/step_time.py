"""Step time and memory: lightning-peft vs HF peft, interleaved in one process.

    python benchmarks/step_time.py                      # defaults below, CPU
    python benchmarks/step_time.py --device cuda --dtype bfloat16

Every configuration trains the same small Llama (built from a config, no download) on the
same batch. Configurations are interleaved round by round, so machine noise hits all of
them alike; we report the median and spread of warm steps (forward + backward + AdamW
step). Memory is reported as the bytes autograd saves for backward (exact, per config, in
this process), plus peak RSS of a fresh subprocess per config (`--rss`) on CPU or
`torch.cuda.max_memory_allocated` on a GPU. Every figure is also given as a ratio to the
frozen-base floor (the physical limit for any adapter) and to peft's same method.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def ours(policy: dict) -> Callable[[nn.Module], nn.Module]:
    def apply(model: nn.Module) -> nn.Module:
        from lightning_peft import inject_adapters

        inject_adapters(model, policy)
        return model

    return apply


def uniform(method: str, **hparams) -> dict:
    return {"rules": [{"method": method, "modules": TARGETS, "hparams": hparams}]}


def peft_method(use_dora: bool, r: int) -> Callable[[nn.Module], nn.Module]:
    def apply(model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS, use_dora=use_dora)
        return get_peft_model(model, config)

    return apply


def floor(model: nn.Module) -> nn.Module:
    """Frozen base plus one tiny trainable tensor in the first block, so backward still runs
    through every layer (input gradients), as it must for any adapter: the physical limit."""
    model.requires_grad_(False)
    model.model.layers[0].input_layernorm.weight.requires_grad_(True)
    return model


def full(model: nn.Module) -> nn.Module:
    model.requires_grad_(True)
    return model


def dora_before(r: int) -> Callable[[nn.Module], nn.Module]:
    """Our DoRA with the training forward it had before the fast-norm work (benchmarks/dora_before.py)."""

    def apply(model: nn.Module) -> nn.Module:
        from dora_before import use_dora_before  # benchmarks/ is on sys.path when this file runs

        return use_dora_before(ours(uniform("dora", r=r, alpha=2 * r))(model))

    return apply


def configurations(r: int, with_dora_before: bool = False) -> dict[str, Callable[[nn.Module], nn.Module]]:
    hybrid = {
        "rules": [
            {"method": "mora", "modules": TARGETS, "depth": {"outer": 1}, "hparams": {"r": r, "mora_type": "rope"}},
            {"method": "dora", "modules": TARGETS, "depth": {"inner": 1}, "hparams": {"r": r, "alpha": 2 * r}},
        ]
    }
    configs = {
        "floor (frozen base)": floor,
        "full fine-tuning": full,
        "peft LoRA": peft_method(False, r),
        "ours LoRA": ours(uniform("lora", r=r, alpha=2 * r)),
        "peft DoRA": peft_method(True, r),
        "ours DoRA": ours(uniform("dora", r=r, alpha=2 * r)),
        "ours MoRA sharing": ours(uniform("mora", r=r, mora_type="sharing")),
        "ours MoRA rope": ours(uniform("mora", r=r, mora_type="rope")),
        "ours hybrid (MoRA outer, DoRA inner)": ours(hybrid),
    }
    if with_dora_before:
        configs["ours DoRA (before)"] = dora_before(r)
    return configs


def selected(args: argparse.Namespace) -> dict[str, Callable[[nn.Module], nn.Module]]:
    """The configurations to run: all, or the floor plus those named in `--only` (exact names)."""
    configs = configurations(args.r, args.dora_before)
    if not args.only:
        return configs
    names = ["floor (frozen base)", *(n.strip() for n in args.only.split(",") if n.strip())]
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise SystemExit(f"--only: unknown configuration(s) {unknown}; choose from {list(configs)}")
    return {n: configs[n] for n in dict.fromkeys(names)}


@dataclass
class Runner:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    trainable: int


def make_runner(name: str, apply: Callable, base: nn.Module, device: str, dtype: torch.dtype) -> Runner:
    model = apply(copy.deepcopy(base).to(device=device, dtype=dtype))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return Runner(name, model, torch.optim.AdamW(params, lr=1e-4), sum(p.numel() for p in params))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
clock = time.perf_counter  # `--clock process`: CPU seconds of this process, robust to other load on a shared CPU


def time_interleaved(
    runners: list[Runner], step: Callable[[Runner, torch.Tensor], None], batch: torch.Tensor, rounds: int, device: str
) -> dict[str, list[float]]:
    """Seconds per call of `step` for each runner, every runner once per round (noise hits all alike)."""
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for _ in range(rounds):
        for runner in runners:
            sync(device)
            start = clock()
            step(runner, batch)
            sync(device)
            times[runner.name].append(clock() - start)
    return times


def train_step(runner: Runner, batch: torch.Tensor) -> None:
    runner.optimizer.zero_grad(set_to_none=True)
    loss = runner.model(input_ids=batch, labels=batch).loss
    loss.backward()
    runner.optimizer.step()


def saved_activation_bytes(runner: Runner, batch: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one forward (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter) and t.requires_grad is not None:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = runner.model(input_ids=batch, labels=batch).loss
    loss.backward()
    runner.optimizer.zero_grad(set_to_none=True)
    frozen = {p.untyped_storage().data_ptr() for p in runner.model.parameters()}
    return sum(b for ptr, b in seen.items() if ptr not in frozen)


def eval_forward(runner: Runner, batch: torch.Tensor) -> None:
    with torch.no_grad():
        runner.model(input_ids=batch)


def rss_peak(name: str, args: argparse.Namespace) -> float:
    """Training RSS (MiB above the built model) of a fresh process running one configuration."""
    cmd = (
        [sys.executable, __file__, "--rss-child", name]
        + [
            f"--{k}={v}"
            for k, v in vars(args).items()
            if k in ("hidden", "intermediate", "layers", "heads", "seq", "batch", "vocab", "r")
        ]
        + (["--dora-before"] if args.dora_before else [])
    )
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def rss_child(args: argparse.Namespace) -> None:
    """Peak RSS while training, above the resting RSS of the built model (params, adapters)."""
    import psutil

    process = psutil.Process()
    base = build_base(args)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    apply = configurations(args.r, args.dora_before)[args.rss_child]
    runner = make_runner(args.rss_child, apply, base, "cpu", torch.float32)
    del base
    resting = process.memory_info().rss
    peak = resting
    for _ in range(3):  # sample after forward (activations alive), after backward and after the step
        runner.optimizer.zero_grad(set_to_none=True)
        loss = runner.model(input_ids=batch, labels=batch).loss
        peak = max(peak, process.memory_info().rss)
        loss.backward()
        peak = max(peak, process.memory_info().rss)
        runner.optimizer.step()
        peak = max(peak, process.memory_info().rss)
    print((peak - resting) / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds; each runs every config once")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS per config in subprocesses")
    parser.add_argument("--json", default=None, help="write raw results here")
    parser.add_argument("--only", default="", help="comma-separated configuration names (the floor always runs)")
    parser.add_argument("--dora-before", action="store_true", help="add our DoRA's pre-fast-norm forward")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time or process CPU time")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args)
        return
    global clock
    clock = CLOCKS[args.clock]
    dtype = getattr(torch, args.dtype)
    base = build_base(args)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    batch = batch.to(args.device)
    runners = [make_runner(n, f, base, args.device, dtype) for n, f in selected(args).items()]
    for _ in range(args.warmup):
        for runner in runners:
            train_step(runner, batch)
    times = time_interleaved(runners, train_step, batch, args.rounds, args.device)
    for runner in runners:
        runner.model.eval()
    eval_times = time_interleaved(runners, eval_forward, batch, max(2, args.rounds // 2), args.device)
    merged_times = measure_merged(runners, batch, args)
    memory = {}
    for runner in runners:
        runner.model.train()
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        memory[runner.name] = saved_activation_bytes(runner, batch) / 2**20
    cuda_peak = {}
    if args.device.startswith("cuda"):
        for runner in runners:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            train_step(runner, batch)
            sync(args.device)
            cuda_peak[runner.name] = torch.cuda.max_memory_allocated() / 2**20
    rss = {r.name: rss_peak(r.name, args) for r in runners} if args.rss and args.device == "cpu" else {}
    report(runners, times, eval_times, merged_times, memory, cuda_peak, rss, args)


def measure_merged(runners: list[Runner], batch: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """Eval forward after merging our adapters, and the plain model, interleaved."""
    from lightning_peft import merge_adapters

    picked = [r for r in runners if r.name.startswith("ours") or r.name.startswith("floor")]
    for runner in picked:
        merge_adapters(runner.model)
    out = time_interleaved(picked, eval_forward, batch, max(2, args.rounds // 2), args.device)
    from lightning_peft import unmerge_adapters

    for runner in picked:
        unmerge_adapters(runner.model)
    return {k: statistics.median(v) for k, v in out.items()}


def same_run_ratios(med: dict, memory: dict, rss: dict, cuda_peak: dict) -> dict[str, float]:
    """The targets' ratios, for those whose configurations ran."""
    pairs = {
        "ours LoRA / peft LoRA (target <= 1.00)": (med, "ours LoRA", "peft LoRA"),
        "ours DoRA / peft DoRA (target <= 0.85)": (med, "ours DoRA", "peft DoRA"),
        "ours DoRA / peft DoRA saved activations (target <= 1.00)": (memory, "ours DoRA", "peft DoRA"),
        "ours MoRA sharing / ours LoRA (target <= 1.10)": (med, "ours MoRA sharing", "ours LoRA"),
        "ours MoRA rope / ours LoRA (target <= 1.30)": (med, "ours MoRA rope", "ours LoRA"),
        "ours DoRA / peft DoRA training RSS (target <= 1.00)": (rss, "ours DoRA", "peft DoRA"),
        "ours DoRA / peft DoRA peak CUDA (target <= 1.00)": (cuda_peak, "ours DoRA", "peft DoRA"),
    }
    return {k: d[a] / d[b] for k, (d, a, b) in pairs.items() if a in d and b in d}


def overhead_lines(times: dict[str, list[float]], floor_name: str) -> list[str]:
    """`(X - ours LoRA) / floor` per interleaved round, for each DoRA variant: median and min-max."""
    if "ours LoRA" not in times:
        return []
    lines = ["", "| extra over ours LoRA, in floors (per round) | median | min-max |", "| --- | ---: | ---: |"]
    for name in ("ours DoRA", "ours DoRA (before)", "peft DoRA"):
        if name in times:
            per_round = [
                (x - lora) / fl for x, lora, fl in zip(times[name], times["ours LoRA"], times[floor_name], strict=True)
            ]
            lines.append(
                f"| {name} - ours LoRA (target <= 0.03 for ours DoRA) | {statistics.median(per_round):.3f} | "
                f"{min(per_round):.3f} to {max(per_round):.3f} |"
            )
    return lines


def report(runners, times, eval_times, merged_times, memory, cuda_peak, rss, args) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (min(v), max(v)) for k, v in times.items()}
    ev = {k: statistics.median(v) for k, v in eval_times.items()}
    floor_name = "floor (frozen base)"
    peft_of = {"ours LoRA": "peft LoRA", "ours DoRA": "peft DoRA", "ours DoRA (before)": "peft DoRA"}
    peft_of = {k: v for k, v in peft_of.items() if v in med}
    lines = [
        f"Model: Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"seq {args.seq}, batch {args.batch}, vocab {args.vocab}, r={args.r}, {args.device} {args.dtype}; "
        f"{args.rounds} interleaved rounds after {args.warmup} warm-up rounds; {args.clock} clock.",
        "",
        "| configuration | trainable | step ms (median) | min-max | x floor | x peft same method | eval fwd ms"
        " (unmerged) | eval fwd ms (merged) | saved activations MiB |"
        + (" peak CUDA MiB |" if cuda_peak else "")
        + (" training RSS MiB |" if rss else ""),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        + (" ---: |" if cuda_peak else "")
        + (" ---: |" if rss else ""),
    ]
    for runner in runners:
        n = runner.name
        vs_peft = f"{med[n] / med[peft_of[n]]:.2f}" if n in peft_of else "-"
        merged = f"{1000 * merged_times[n]:.1f}" if n in merged_times else "-"
        row = (
            f"| {n} | {runner.trainable:,} | {1000 * med[n]:.1f} | {1000 * spread[n][0]:.0f}-{1000 * spread[n][1]:.0f} "
            f"| {med[n] / med[floor_name]:.2f} | {vs_peft} | {1000 * ev[n]:.1f} | {merged} | {memory[n]:.1f} |"
        )
        if cuda_peak:
            row += f" {cuda_peak[n]:.0f} |"
        if rss:
            row += f" {rss[n]:.0f} |"
        lines.append(row)
    ratios = same_run_ratios(med, memory, rss, cuda_peak)
    lines += ["", "| ratio (same run) | measured |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    lines += overhead_lines(times, floor_name)
    import lightning
    import peft
    import transformers

    lines += [
        "",
        f"Versions: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"lightning {lightning.__version__}, Python {platform.python_version()}.",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        + (torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"),
    ]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"median_s": med, "eval_s": ev, "merged_s": merged_times, "saved_mib": memory, "rss": rss}, f)


if __name__ == "__main__":
    main()
