"""The GPU-only checks in one run, written as one markdown table.

    python benchmarks/gpu_check.py --out runs/gpu_check.md          # needs CUDA
    python benchmarks/gpu_check.py --device cpu --dry-run --out /tmp/x.md  # every row, tiny, on CPU

Rows: bf16 and fp16 step time and peak memory of ours against HF peft for every method peft
has (LoRA, DoRA, HiRA; MoRA is ours only), interleaved round by round against the frozen-base
floor (benchmarks/step_time.py's protocol); the same with `torch.compile` (inductor);
FSDP2 on one GPU through Lightning's `ModelParallelStrategy` (a short fit of a hybrid
policy); QLoRA (a 4-bit NF4 base from bitsandbytes, peft and ours) when bitsandbytes is
installed. A check that fails writes its error into its row and the others still run.
`--dry-run` shrinks every shape so the script's logic can be tested without a GPU: its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import AdapterCallback

sys.path.insert(0, str(Path(__file__).parent))
import step_time  # benchmarks/ is not a package: imported from its folder

FULL = {"hidden": 2048, "intermediate": 5632, "layers": 8, "heads": 16, "seq": 1024, "batch": 4, "vocab": 32000}
TINY = {"hidden": 64, "intermediate": 128, "layers": 3, "heads": 4, "seq": 16, "batch": 2, "vocab": 128}
FLOOR = "floor (frozen base)"
PEFT_OF = {"ours LoRA": "peft LoRA", "ours DoRA": "peft DoRA", "ours HiRA": "peft HiRA"}


@dataclass
class Row:
    check: str
    dtype: str
    config: str
    times: list[float] | None = None  # seconds per step
    peak_mib: float | None = None
    note: str = ""


def peft_hira(r: int) -> Callable[[nn.Module], nn.Module]:
    def apply(model: nn.Module) -> nn.Module:
        from peft import HiraConfig, get_peft_model

        return get_peft_model(model, HiraConfig(r=r, target_modules=step_time.TARGETS))

    return apply


def methods(r: int) -> dict[str, Callable[[nn.Module], nn.Module]]:
    ours, uniform = step_time.ours, step_time.uniform
    return {
        FLOOR: step_time.floor,
        "peft LoRA": step_time.peft_method(False, r),
        "ours LoRA": ours(uniform("lora", r=r, alpha=2 * r)),
        "peft DoRA": step_time.peft_method(True, r),
        "ours DoRA": ours(uniform("dora", r=r, alpha=2 * r)),
        "peft HiRA": peft_hira(r),
        "ours HiRA": ours(uniform("hira", r=r)),
        "ours MoRA sharing": ours(uniform("mora", r=r, mora_type="sharing")),
        "ours MoRA rope": ours(uniform("mora", r=r, mora_type="rope")),
    }


def shape_args(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**(TINY if args.dry_run else FULL), r=args.r)


def batch_for(shape: argparse.Namespace, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen).to(device)


def peak_step_mib(runner: step_time.Runner, batch: torch.Tensor, device: str) -> float | None:
    """Peak CUDA memory of one training step above what was resident before it (None off CUDA)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step_time.train_step(runner, batch)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - resident) / 2**20


def timed_rows(check: str, dtype: torch.dtype, configs: dict, args: argparse.Namespace, wrap=None) -> list[Row]:
    """Build every config on one base, warm up, time interleaved rounds, then peak memory one by one."""
    shape = shape_args(args)
    base = step_time.build_base(shape)
    batch = batch_for(shape, args.device)
    runners, notes = [], {}
    for name, apply in configs.items():
        runner = step_time.make_runner(name, apply, base, args.device, dtype)
        if wrap is not None:
            start = time.perf_counter()
            runner.model = wrap(runner.model)
            step_time.train_step(runner, batch)  # the first step compiles
            notes[name] = f"first step (compile) {time.perf_counter() - start:.1f} s"
        runners.append(runner)
    for _ in range(args.warmup):
        for runner in runners:
            step_time.train_step(runner, batch)
    times = step_time.time_interleaved(runners, step_time.train_step, batch, args.rounds, args.device)
    tag = str(dtype).removeprefix("torch.")
    rows = []
    for runner in runners:
        peak = peak_step_mib(runner, batch, args.device)
        rows.append(Row(check, tag, runner.name, times[runner.name], peak, notes.get(runner.name, "")))
    return rows


def precision_rows(args: argparse.Namespace, dtype: torch.dtype) -> list[Row]:
    return timed_rows("step", dtype, methods(args.r), args)


def compile_rows(args: argparse.Namespace) -> list[Row]:
    names = (FLOOR, "ours DoRA") if args.dry_run else (FLOOR, "peft LoRA", "ours LoRA", "peft DoRA", "ours DoRA")
    picked = {k: v for k, v in methods(args.r).items() if k in names}  # dry run: two rows, same code path
    # Every model is its own set of guards on the same Llama code: keep them all compiled, not fall back to eager
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 1024)

    def wrap(model: nn.Module) -> nn.Module:
        return torch.compile(model, backend=args.compile_backend)

    return timed_rows(f"torch.compile ({args.compile_backend})", args.dtype, picked, args, wrap=wrap)


HYBRID = {
    "rules": [
        {"method": "mora", "modules": step_time.TARGETS, "depth": {"outer": 1}, "hparams": {"r": 8}},
        {"method": "dora", "modules": step_time.TARGETS, "depth": {"inner": 1}, "hparams": {"r": 8, "alpha": 16}},
    ]
}


def fit_rows(args: argparse.Namespace) -> list[Row]:
    """A short hybrid-policy fit under `ModelParallelStrategy` (FSDP2, one device) and without a strategy."""
    return [fit_row(args, sharded=True), fit_row(args, sharded=False)]


class FitModule(L.LightningModule):
    """The step-time Llama under a Trainer: FSDP2 (`fully_shard` per block and on the model) when `sharded`."""

    def __init__(self, shape: argparse.Namespace, steps: int, device: str, sharded: bool) -> None:
        super().__init__()
        self.model = step_time.build_base(shape)
        self.shape, self.steps, self.run_device, self.sharded = shape, steps, device, sharded
        self.times: list[float] = []

    def configure_model(self) -> None:
        if self.sharded:
            for block in self.model.model.layers:
                fully_shard(block)
            fully_shard(self.model)

    def train_dataloader(self) -> DataLoader:
        data = TensorDataset(batch_for(self.shape, "cpu").repeat(self.steps, 1))
        return DataLoader(data, batch_size=self.shape.batch)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.model(input_ids=x, labels=x).loss

    def on_train_batch_start(self, batch, batch_idx) -> None:
        step_time.sync(self.run_device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        step_time.sync(self.run_device)
        self.times.append(time.perf_counter() - self._start)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)


def fit_row(args: argparse.Namespace, sharded: bool) -> Row:
    cuda = args.device.startswith("cuda")
    steps = args.warmup + args.rounds
    trainer = L.Trainer(
        accelerator="cuda" if cuda else "cpu",
        devices=1,
        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1) if sharded else "auto",
        precision="bf16-true" if cuda else "32-true",
        max_steps=steps,
        callbacks=[AdapterCallback(HYBRID, verbose=False)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = FitModule(shape_args(args), steps, args.device, sharded)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    name = "FSDP2, ModelParallelStrategy(1, 1)" if sharded else "single device, no strategy"
    note = "hybrid policy (MoRA outer, DoRA inner); peak is the whole fit's"
    return Row("fit, 1 device", "bf16-true" if cuda else "32-true", name, module.times[args.warmup :], peak, note)


def qlora_rows(args: argparse.Namespace) -> list[Row]:
    """A 4-bit NF4 base (bitsandbytes through transformers), adapters in fp32, compute in bf16 (fp32 off CUDA)."""
    try:
        import bitsandbytes
    except ImportError:
        return [Row("QLoRA nf4", "-", "-", note="skipped: bitsandbytes is not installed")]
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from lightning_peft.adapters import is_supported_layer

    ours_note = ""
    if not is_supported_layer(bitsandbytes.nn.Linear4bit(8, 8)):
        ours_note = "skipped: this build of lightning-peft does not adapt bitsandbytes layers"
    shape = shape_args(args)
    compute = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    with tempfile.TemporaryDirectory() as folder:
        step_time.build_base(shape).save_pretrained(folder)
        configs = {k: v for k, v in methods(args.r).items() if k in (FLOOR, "peft LoRA", "ours LoRA", "ours DoRA")}
        configs["peft DoRA"] = methods(args.r)["peft DoRA"]
        runners, rows = [], []
        for name, apply in configs.items():
            if ours_note and name.startswith("ours"):
                rows.append(Row("QLoRA nf4", "nf4", name, note=ours_note))
                continue
            try:
                model = LlamaForCausalLM.from_pretrained(
                    folder, quantization_config=quant, device_map={"": args.device}, dtype=compute
                )
                model = apply(model)
            except Exception as err:  # e.g. a build of lightning-peft without quantized bases
                rows.append(Row("QLoRA nf4", "nf4", name, note=f"error: {one_line(err)}"))
                continue
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            trainable = sum(p.numel() for p in params)
            runners.append(step_time.Runner(name, model, torch.optim.AdamW(params, lr=1e-4), trainable))
    return rows + measured(runners, "QLoRA nf4", "nf4", args, batch_for(shape, args.device))


def measured(runners: list, check: str, dtype: str, args: argparse.Namespace, batch: torch.Tensor) -> list[Row]:
    for _ in range(args.warmup):
        for runner in runners:
            step_time.train_step(runner, batch)
    times = step_time.time_interleaved(runners, step_time.train_step, batch, args.rounds, args.device)
    return [Row(check, dtype, r.name, times[r.name], peak_step_mib(r, batch, args.device)) for r in runners]


def one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:300]


def table(rows: list[Row]) -> list[str]:
    """One markdown table; `x floor` and `x peft` compare rows of the same check and dtype."""
    med = {(r.check, r.dtype, r.config): statistics.median(r.times) for r in rows if r.times}
    lines = [
        "| check | dtype | configuration | step ms (median) | min-max | x floor | x peft same method "
        "| peak MiB above resident | note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        key = (r.check, r.dtype, r.config)
        cells = ["-", "-", "-", "-"]
        if key in med:
            cells[0] = f"{1000 * med[key]:.1f}"
            cells[1] = f"{1000 * min(r.times):.1f}-{1000 * max(r.times):.1f}"
            floor = med.get((r.check, r.dtype, FLOOR))
            cells[2] = f"{med[key] / floor:.2f}" if floor else "-"
            peft = med.get((r.check, r.dtype, PEFT_OF.get(r.config, "")))
            cells[3] = f"{med[key] / peft:.2f}" if peft else "-"
        peak = "-" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        lines.append(f"| {r.check} | {r.dtype} | {r.config} | {' | '.join(cells)} | {peak} | {r.note} |")
    return lines


def header(args: argparse.Namespace) -> list[str]:
    import lightning
    import peft
    import transformers

    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = "not installed"
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
    shape = shape_args(args)
    lines = [
        f"Command: `python {' '.join(sys.argv)}`",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; device: {device}",
        f"Versions: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"lightning {lightning.__version__}, bitsandbytes {bnb}, Python {platform.python_version()}.",
        f"Model: Llama hidden {shape.hidden}, intermediate {shape.intermediate}, {shape.layers} layers, "
        f"seq {shape.seq}, batch {shape.batch}, vocab {shape.vocab}, r={args.r}; {args.rounds} interleaved "
        f"rounds after {args.warmup} warm-up rounds; peak = max allocated in one step above the resident memory.",
    ]
    if args.dry_run:
        lines.insert(0, "**Dry run: tiny shapes, the numbers mean nothing; it checks that every row runs.**\n")
    return lines + [""]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="markdown file to write")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, 2 rounds: tests the script")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (10; dry run 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (3; dry run 1)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--compile-backend", default=None, help="inductor (dry run on CPU: eager, dynamo only)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.dry_run else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 3)
    on_cuda = args.device.startswith("cuda")
    args.compile_backend = args.compile_backend or ("inductor" if on_cuda or not args.dry_run else "eager")
    args.dtype = torch.bfloat16 if on_cuda else torch.float32
    if on_cuda and not torch.cuda.is_available():
        parser.exit(
            2,
            f"gpu_check: CUDA is not available (torch {torch.__version__}); nothing was run. "
            "Without a GPU, `--device cpu --dry-run` tests the script.\n",
        )
    if not on_cuda and not args.dry_run:
        parser.exit(2, "gpu_check: these are GPU checks; off CUDA only `--dry-run` is meaningful.\n")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    checks = {
        "step bf16": lambda: precision_rows(args, torch.bfloat16),
        "step fp16": lambda: precision_rows(args, torch.float16),
        "torch.compile": lambda: compile_rows(args),
        "fit, 1 device": lambda: fit_rows(args),
        "QLoRA nf4": lambda: qlora_rows(args),
    }
    rows: list[Row] = []
    for name, check in checks.items():
        print(f"gpu_check: {name} ...", flush=True)
        try:
            rows += check()
        except Exception as err:
            traceback.print_exc()
            rows.append(Row(name, "-", "-", note=f"error: {one_line(err)}"))
    Path(args.out).write_text("\n".join(header(args) + table(rows)) + "\n")
    print(f"gpu_check: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
