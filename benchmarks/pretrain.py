"""The MoRA paper's pretraining experiment (section 5.3, Table 3) in miniature, on CPU.

    python benchmarks/pretrain.py --threads 1                    # six variants, seed 0
    python benchmarks/pretrain.py --threads 1 --seeds 1          # add seed 1 (runs already in the CSV are kept)
    python benchmarks/pretrain.py --plot-only                    # redraw the figures and the table from the CSVs

A small Llama is trained from scratch (byte-level, `ByteCorpus`: Python's help topics and standard-library
docstrings) as full training and as LoRA, ReLoRA, MoRA (sharing), ReMoRA and the hybrid (MoRA outer blocks,
DoRA inner), all adapter variants with the same r on every block Linear, and with embeddings, norms and the
LM head trainable (the reference script's `--train_embhead`). Every run uses the same data split and order,
steps and schedule (ReLoRA's jagged cosine; the variants without restarts get its plain warm-up + cosine);
seeds change the initialisation. Validation perplexity is exp(mean loss per byte).

Writes `<out>/curves.csv` (variant, seed, step, val_loss, val_ppl on the first `--val-batches` validation
batches), `<out>/runs.csv` (one row per run: trainable parameters, lr, wall time, final val loss on the whole
validation set), one `UpdateDiagnostics` folder per adapter run, and the figures `benchmarks/pretrain_ppl.png`
and `benchmarks/pretrain_cumulative_rank.png`. benchmarks/PRETRAIN.md has the measured results.
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_peft import AdapterCallback, MergeRestart, UpdateDiagnostics
from lightning_peft.tasks import ByteCorpus, CausalLM

HERE = Path(__file__).resolve().parent
EMBHEAD = ["embed_tokens", "lm_head", "norm", "input_layernorm", "post_attention_layernorm"]
"""What the MoRA reference script's `--train_embhead` trains besides the adapters."""
ALL_BLOCKS = {"fraction": [0.0, 1.0]}


@dataclass(frozen=True)
class Variant:
    label: str
    family: str  # "full" or "adapter": picks the learning rate
    methods: tuple[tuple[str, dict | None], ...] = ()  # (method, depth selector) rules on every block Linear
    restart: bool = False


VARIANTS = {
    "full": Variant("full training", "full"),
    "lora": Variant("LoRA", "adapter", (("lora", ALL_BLOCKS),)),
    "relora": Variant("ReLoRA", "adapter", (("lora", ALL_BLOCKS),), restart=True),
    "mora": Variant("MoRA (sharing)", "adapter", (("mora", ALL_BLOCKS),)),
    "remora": Variant("ReMoRA", "adapter", (("mora", ALL_BLOCKS),), restart=True),
    "hybrid": Variant("hybrid (MoRA outer, DoRA inner)", "adapter", (("mora", {"outer": 1}), ("dora", {"inner": 1}))),
}


def policy(variant: Variant, r: int) -> dict | None:
    """Embeddings, norms and head trained fully; the variant's method(s) on every `*_proj` Linear of the blocks."""
    if not variant.methods:
        return None
    hparams = {
        "lora": {"r": r, "alpha": 2 * r},
        "dora": {"r": r, "alpha": 2 * r},
        "mora": {"r": r, "mora_type": "sharing"},
    }
    rules = [{"name": "embhead", "method": "full", "modules": EMBHEAD}]
    for method, depth in variant.methods:
        rule = {"name": method, "method": method, "modules": ["*_proj"], "depth": depth, "hparams": hparams[method]}
        rules.append(rule)
    return {"rules": rules}


class ValRecorder(Callback):
    """Keeps (step, val_loss) after every validation outside the sanity check."""

    def __init__(self) -> None:
        self.points: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and "val_loss" in trainer.callback_metrics:
            self.points.append((trainer.global_step, float(trainer.callback_metrics["val_loss"])))


def build(key: str, seed: int, args: argparse.Namespace) -> tuple[CausalLM, ByteCorpus, list[Callback]]:
    variant = VARIANTS[key]
    lr = args.lr_full if variant.family == "full" else args.lr_adapter
    model = CausalLM(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq_len,
        init_seed=seed,
        lr=lr,
        warmup_steps=args.warmup,
        lr_schedule="cosine_restarts",
        restart_every=args.restart_every if variant.restart else None,
        restart_warmup_steps=args.restart_warmup if variant.restart else 0,
        min_lr_ratio=0.1,
        generate_on_eval=False,
    )
    data = ByteCorpus(seq_len=args.seq_len, batch_size=args.batch_size, seed=args.data_seed, source="both")
    callbacks: list[Callback] = []
    rules = policy(variant, args.r)
    if rules is not None:
        callbacks.append(AdapterCallback(rules, verbose=False))
        diag_dir = args.out / "diagnostics" / f"{key}_seed{seed}"
        callbacks.append(UpdateDiagnostics(every_n_steps=args.diag_every, log_dir=str(diag_dir), plots=False))
    if variant.restart:
        callbacks.append(MergeRestart(every=args.restart_every, seed=seed))
    return model, data, callbacks


def run(key: str, seed: int, args: argparse.Namespace) -> tuple[list[tuple[int, float]], dict]:
    """Train one variant with one seed; return its validation curve and its summary row."""
    L.seed_everything(seed, verbose=False)
    model, data, callbacks = build(key, seed, args)
    recorder = ValRecorder()
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=args.val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=args.val_batches,
        callbacks=[*callbacks, recorder],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_s = time.perf_counter() - start
    final = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = final.validate(model, datamodule=data, verbose=False)  # the whole validation set
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    embhead = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and is_embhead(n))
    summary = {
        "variant": key,
        "seed": seed,
        "trainable": trainable,
        "adapter_params": trainable - embhead if VARIANTS[key].methods else 0,
        "lr": model.hparams.lr,
        "fit_s": round(fit_s, 1),
        "final_val_loss": metrics["val_loss"],
        "final_val_ppl": math.exp(metrics["val_loss"]),
    }
    return recorder.points, summary


def is_embhead(name: str) -> bool:
    return any(part in EMBHEAD for part in name.split("."))


# -- files ------------------------------------------------------------------------------------------------------


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_csv(path: Path, rows: list[dict]) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


# -- figures and table ------------------------------------------------------------------------------------------


def plot_curves(curves: list[dict], path: Path) -> None:
    """Validation perplexity vs step: mean over seeds, band = min..max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, variant in VARIANTS.items():
        rows = [r for r in curves if r["variant"] == key]
        if not rows:
            continue
        steps = sorted({int(r["step"]) for r in rows})
        per_step = [[float(r["val_ppl"]) for r in rows if int(r["step"]) == s] for s in steps]
        mean = [sum(v) / len(v) for v in per_step]
        seeds = len({r["seed"] for r in rows})
        low, high = [min(v) for v in per_step], [max(v) for v in per_step]
        late = [i for i, s in enumerate(steps) if s >= steps[-1] / 2]  # the second half, on a linear scale
        for axis, idx in ((ax, range(len(steps))), (zoom, late)):
            x = [steps[i] for i in idx]
            (line,) = axis.plot(x, [mean[i] for i in idx], label=f"{variant.label} ({seeds} seed{'s' * (seeds > 1)})")
            if seeds > 1:
                axis.fill_between(x, [low[i] for i in idx], [high[i] for i in idx], alpha=0.15, color=line.get_color())
    ax.set_yscale("log")
    ax.set_title("whole run (log scale)")
    zoom.set_title("second half")
    for axis in (ax, zoom):
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("validation perplexity per byte (mean, band: min-max)")
        axis.grid(True, which="both", alpha=0.3)
    zoom.legend(fontsize=8)
    fig.suptitle("Byte-level pretraining from scratch, small Llama")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cumulative_rank(out: Path, path: Path, restart_every: int, seed: int = 0) -> bool:
    """Left: mean effective rank over the adapted modules vs step, of the update summed over all cycles
    (`cum_effective_rank`) and of the current cycle's, for ReLoRA and ReMoRA (LoRA and MoRA without restarts
    for reference). Right: the exact (numerical) rank of the summed update. False if there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    drawn = False
    for key, color in (("relora", "tab:blue"), ("remora", "tab:red"), ("lora", "tab:cyan"), ("mora", "tab:orange")):
        rows = read_csv(out / "diagnostics" / f"{key}_seed{seed}" / "update_diagnostics.csv")
        restart = VARIANTS[key].restart
        lines = (
            [(left, "cum_effective_rank", "-", "all cycles"), (right, "cum_rank", "-", "all cycles")] if restart else []
        )
        lines.append((left, "effective_rank", "--" if restart else ":", "current cycle" if restart else "no restarts"))
        for ax, column, style, what in lines:
            points = mean_by_step(rows, column)
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, style, color=color, label=f"{VARIANTS[key].label}: {what}")
                drawn = True
    if not drawn:
        plt.close(fig)
        return False
    right.axhline(128, color="gray", lw=0.8)
    right.annotate("full rank (128)", (0, 128), xytext=(2, -12), textcoords="offset points", color="gray", fontsize=8)
    for ax, ylabel in ((left, "effective rank of the update"), (right, "numerical rank, all cycles")):
        for x in range(restart_every, int(ax.get_xlim()[1]), restart_every):
            ax.axvline(x, color="gray", lw=0.5, ls=":")
        ax.set_xlabel("optimizer step (dotted: merges)")
        ax.set_ylabel(f"{ylabel} (mean over modules)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Update rank across merge-and-restart cycles (r=16 budget, 128-wide layers, seed {seed})", y=0.99)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def mean_by_step(rows: list[dict], column: str) -> list[tuple[int, float]]:
    by_step: dict[int, list[float]] = {}
    for row in rows:
        if row.get("method") == "full":  # embeddings, norms, head: not adapter updates
            continue
        value = row.get(column)
        if value not in (None, "", "nan"):
            by_step.setdefault(int(row["step"]), []).append(float(value))
    return [(step, sum(v) / len(v)) for step, v in sorted(by_step.items()) if v]


def table(runs: list[dict]) -> str:
    lines = [
        "| variant | trainable | of which adapters | lr | seeds | final val ppl (mean) | min-max | fit s (mean) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, variant in VARIANTS.items():
        rows = [r for r in runs if r["variant"] == key]
        if not rows:
            continue
        ppl = [float(r["final_val_ppl"]) for r in rows]
        fit = [float(r["fit_s"]) for r in rows]
        adapters = int(rows[0]["adapter_params"])
        lines.append(
            f"| {variant.label} | {int(rows[0]['trainable']):,} | {adapters:,} | {float(rows[0]['lr']):g} | "
            f"{len(rows)} | {sum(ppl) / len(ppl):.3f} | {min(ppl):.3f}-{max(ppl):.3f} | {sum(fit) / len(fit):.0f} |"
        )
    return "\n".join(lines)


def per_seed_table(runs: list[dict]) -> str:
    """Final validation perplexity per variant and seed: a seed fixes the base initialisation for every variant,
    so differences within a column are paired."""
    seeds = sorted({int(r["seed"]) for r in runs})
    lines = ["| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |", "| --- |" + " ---: |" * len(seeds)]
    for key, variant in VARIANTS.items():
        ppl = {int(r["seed"]): float(r["final_val_ppl"]) for r in runs if r["variant"] == key}
        if ppl:
            cells = " | ".join(f"{ppl[s]:.3f}" if s in ppl else "-" for s in seeds)
            lines.append(f"| {variant.label} | {cells} |")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=344)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--lr-full", type=float, default=1e-3)
    p.add_argument("--lr-adapter", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--restart-every", type=int, default=300, help="T: merge every T steps (ReLoRA, ReMoRA)")
    p.add_argument("--restart-warmup", type=int, default=30)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--val-batches", type=int, default=32, help="validation batches per curve point (final: all)")
    p.add_argument("--diag-every", type=int, default=50)
    p.add_argument("--data-seed", type=int, default=0, help="document split and data order (same for every run)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "pretrain_runs")
    p.add_argument("--fresh", action="store_true", help="forget the runs already in --out")
    p.add_argument("--plot-only", action="store_true")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    curves_path, runs_path = args.out / "curves.csv", args.out / "runs.csv"
    if args.fresh:
        curves_path.unlink(missing_ok=True)
        runs_path.unlink(missing_ok=True)
    if not args.plot_only:
        done = {(r["variant"], int(r["seed"])) for r in read_csv(runs_path)}
        for seed in args.seeds:
            for key in args.only:
                if (key, seed) in done:
                    print(f"{key} seed {seed}: already in {runs_path}, kept", flush=True)
                    continue
                points, summary = run(key, seed, args)
                rows = [
                    {"variant": key, "seed": seed, "step": s, "val_loss": v, "val_ppl": math.exp(v)} for s, v in points
                ]
                append_csv(curves_path, rows)
                append_csv(runs_path, [summary])
                print(f"{key} seed {seed}: ppl {summary['final_val_ppl']:.3f} ({summary['fit_s']:.0f} s)", flush=True)
    plot_curves(read_csv(curves_path), HERE / "pretrain_ppl.png")
    if not plot_cumulative_rank(args.out, HERE / "pretrain_cumulative_rank.png", args.restart_every):
        print("no diagnostics with effective ranks yet: pretrain_cumulative_rank.png not drawn")
    import lightning
    import transformers

    print(table(read_csv(runs_path)))
    print()
    print(per_seed_table(read_csv(runs_path)))
    print(
        f"\ntorch {torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()}, {args.threads} torch thread(s)"
    )


if __name__ == "__main__":
    main()
