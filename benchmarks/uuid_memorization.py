"""The MoRA paper's UUID memorisation comparison (Table 2), in miniature, on CPU.

    python benchmarks/uuid_memorization.py                     # all methods, 600 steps
    python benchmarks/uuid_memorization.py --steps 300 --only lora_r8 mora_r8_sharing

Every run trains the same small Llama (hidden 128, 6 blocks, built from a config with a
fixed seed) on the same UUID key->value pairs, with adapters on every block Linear (or full
fine-tuning), and measures character accuracy of the greedily generated value at several
step counts. Prints a markdown table; the committed copy is in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_peft import AdapterCallback
from lightning_peft.tasks import CausalLM, UUIDMemorization

ALL_BLOCKS = {"fraction": [0.0, 1.0]}


def uniform(method: str, **hparams) -> dict:
    return {"rules": [{"method": method, "modules": ["*"], "depth": ALL_BLOCKS, "hparams": hparams}]}


RUNS = {
    "fft": ("FFT", None, 1e-3),
    "lora_r8": ("LoRA r=8", uniform("lora", r=8, alpha=16), 3e-3),
    "dora_r8": ("DoRA r=8", uniform("dora", r=8, alpha=16), 3e-3),
    "mora_r8_sharing": ("MoRA r=8 (sharing)", uniform("mora", r=8, mora_type="sharing"), 3e-3),
    "mora_r8_rope": ("MoRA r=8 (rope)", uniform("mora", r=8, mora_type="rope"), 3e-3),
    "lora_r32": ("LoRA r=32", uniform("lora", r=32, alpha=64), 3e-3),
    "mora_r32_sharing": ("MoRA r=32 (sharing)", uniform("mora", r=32, mora_type="sharing"), 3e-3),
    "hybrid_r8": ("hybrid r=8 (MoRA outer, DoRA inner)", "mora_outer_dora_inner", 3e-3),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--at", type=int, nargs="+", default=[150, 300, 450, 600])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--only", nargs="+", default=list(RUNS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--lr", type=float, default=None, help="override the learning rate of every selected run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for key in args.only:
        label, policy, lr = RUNS[key]
        lr = args.lr if args.lr is not None else lr
        accs, trainable, elapsed = evaluate_run(key, args)
        rows.append((label, trainable, lr, accs, elapsed))
        print(f"{label}: {accs} ({elapsed:.0f} s)", flush=True)
    header = "| method | trainable | lr | " + " | ".join(f"char acc @{s}" for s in args.at) + " | fit s |"
    lines = [header, "|" + " --- |" * (4 + len(args.at))]
    for label, trainable, lr, accs, elapsed in rows:
        cells = " | ".join(f"{100 * accs[s]:.1f}" for s in args.at)
        lines.append(f"| {label} | {trainable:,} | {lr:g} | {cells} | {elapsed:.0f} |")
    import lightning
    import transformers

    lines += [
        "",
        f"{args.pairs} UUID pairs, batch 32, {args.steps} steps, small Llama (hidden 128, 6 blocks), seed 0, "
        f"{args.threads} torch thread(s). torch {torch.__version__}, transformers {transformers.__version__}, "
        f"lightning {lightning.__version__}, Python {platform.python_version()}, {platform.machine()}.",
    ]
    print("\n".join(lines))


def evaluate_run(key: str, args: argparse.Namespace) -> tuple[dict[int, float], int, float]:
    """Train once to `args.steps`, validating (greedy generation) at each step count in `args.at`."""
    label, policy, lr = RUNS[key]
    lr = args.lr if args.lr is not None else lr
    L.seed_everything(0, verbose=False)
    model = CausalLM(hidden_size=128, intermediate_size=256, num_hidden_layers=6, lr=lr)
    data = UUIDMemorization(num_pairs=args.pairs, batch_size=32, seed=0)
    steps_per_epoch = -(-args.pairs // 32)
    callbacks = [] if policy is None else [AdapterCallback(policy, verbose=False)]
    accs: dict[int, float] = {}

    class Record(Callback):
        def on_validation_end(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking and "val_char_acc" in trainer.callback_metrics:
                accs[trainer.global_step] = float(trainer.callback_metrics["val_char_acc"])

    gap = min(b - a for a, b in zip([0, *args.at], args.at, strict=False))
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=max(1, gap // steps_per_epoch),
        callbacks=[*callbacks, Record()],
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    elapsed = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {s: accs.get(s, float("nan")) for s in args.at}, trainable, elapsed


if __name__ == "__main__":
    main()
