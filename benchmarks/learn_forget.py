"""Learning vs forgetting per method, as curves over training steps, with `lightning-peft compare`.

    python benchmarks/learn_forget.py --task uuid   --out runs/learn_forget_uuid
    python benchmarks/learn_forget.py --task minilm --out runs/learn_forget_minilm

For each method (full fine-tuning of the block layers, LoRA r=8, DoRA r=8, MoRA r=8, the
hybrid MoRA-outer/DoRA-inner; all r=8 budgets as in the policy presets):

1. learning-rate sweep on seed 0 over `--lrs`; the method's learning rate is the one with the
   largest *mean learning metric over all validations* (the area under its learning curve:
   it rewards learning fast, not only the end point, where every method saturates);
2. seeds 1.. at that learning rate (a seed changes the new data set and the initialisation of
   adapters / head; the base model is the same);
3. per method and validation step: mean and standard deviation over seeds of learning and
   forgetting (`-forget/<m>_change`); markdown tables on stdout, `summary.json` and
   `learn_forget.png` in `--out`.

Every run is one variant of one `compare` (resumable: re-running the script skips finished runs).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
from pathlib import Path

import torch

from lightning_peft.experiments.compare import Variant, read_comparison, read_curves, run_comparison

REPO = Path(__file__).resolve().parents[1]
BLOCKS = {"fraction": [0.0, 1.0]}
R8 = {"r": 8, "alpha": 16}
UNIFORM = {
    "lora_r8": [{"name": "lora", "method": "lora", "modules": ["*"], "depth": BLOCKS, "hparams": R8}],
    "dora_r8": [{"name": "dora", "method": "dora", "modules": ["*"], "depth": BLOCKS, "hparams": R8}],
    "mora_r8": [{"name": "mora", "method": "mora", "modules": ["*"], "depth": BLOCKS, "hparams": {"r": 8}}],
    "hybrid_r8": [
        {"name": "mora-outer", "method": "mora", "modules": ["*"], "depth": {"outer": 1}, "hparams": {"r": 8}},
        {"name": "dora-inner", "method": "dora", "modules": ["*"], "depth": {"inner": 1}, "hparams": R8},
    ],
    "full": [{"name": "full-blocks", "method": "full", "modules": ["*"], "depth": BLOCKS}],
}
METHODS = ("full", "lora_r8", "dora_r8", "mora_r8", "hybrid_r8")
TASKS = {
    "uuid": {
        "config": "configs/uuid_continual.yaml",
        "metric": "val_char_acc",
        "forget": "forget/prior_char_acc_change",
        "lrs": [3e-4, 1e-3, 3e-3],
        "head": [],
        "seed_keys": ["seed_everything", "data.init_args.seed"],
    },
    "minilm": {
        "config": "configs/minilm_forgetting.yaml",
        "metric": "val_acc",
        "forget": "forget/embed_spearman_change",
        "lrs": [1e-4, 1e-3],
        "lrs_by_method": {"full": [1e-4]},
        "head": [{"name": "head", "method": "full", "modules": ["head"]}],
        "seed_keys": ["seed_everything", "data.init_args.seed", "model.init_args.init_seed"],
    },
}


def policy(method: str, task: dict) -> dict:
    return {"rules": [*UNIFORM[method], *task["head"]]}


def learning_area(curve: list[dict], metric: str) -> float:
    values = [c[metric] for c in curve if math.isfinite(c.get(metric, math.nan))]
    return sum(values) / len(values) if values else -math.inf


def sweep(task: dict, methods: list[str], lrs: list[float], out: Path, run: bool = True) -> dict[str, float]:
    """Seed-0 runs over the learning rates; returns the chosen learning rate per method
    (`run=False`: choose from the runs already in `out`, skipping methods without any)."""
    lrs_of = {m: task.get("lrs_by_method", {}).get(m, lrs) for m in methods}
    variants = [
        Variant(f"{m}_lr{lr:g}", {"adapters.policy": policy(m, task), "model.init_args.lr": lr})
        for m in methods
        for lr in lrs_of[m]
    ]
    if run:
        run_comparison(task["config"], variants, out / "sweep", figures=True, table=True,
                       metric=task["metric"], forget_metric=task["forget"])  # fmt: skip
    curves = read_curves(out / "sweep")
    methods = [m for m in methods if any(f"{m}_lr{lr:g}" in curves for lr in lrs_of[m])]
    chosen = {}
    for m in methods:
        scores = {lr: learning_area(curves.get(f"{m}_lr{lr:g}", []), task["metric"]) for lr in lrs_of[m]}
        chosen[m] = max(scores, key=scores.get)
        print(f"{m}: mean {task['metric']} over validations by lr {scores} -> lr {chosen[m]:g}", flush=True)
    return chosen


def seed_runs(task: dict, chosen: dict[str, float], seeds: list[int], out: Path) -> None:
    variants = []
    for m, lr in chosen.items():
        for s in seeds:
            overrides = {"adapters.policy": policy(m, task), "model.init_args.lr": lr}
            overrides.update(dict.fromkeys(task["seed_keys"], s))
            variants.append(Variant(f"{m}_s{s}", overrides))
    run_comparison(task["config"], variants, out / "seeds", figures=True, table=True,
                   metric=task["metric"], forget_metric=task["forget"])  # fmt: skip


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


LEVELS = {"val_char_acc": (0.5, 0.9), "val_acc": (0.4, 0.5)}
"""Learning levels at which forgetting is compared (the frontier: forgetting at equal learning)."""


def _forget_when_learned(run: list[dict], task: dict, level: float) -> tuple[float, float] | None:
    """(step, forgetting) at the first validation where learning reached `level` in one run."""
    for c in run:
        if c.get(task["metric"], -math.inf) >= level:
            return c["step"], -c[task["forget"]]
    return None


def _finished_curves(folder: Path) -> dict[str, list[dict]]:
    """Curves of the runs whose record says `ok` (an interrupted run is left out)."""
    table = folder / "comparison.csv"
    ok = {r.name for r in read_comparison(folder) if r.status == "ok"} if table.is_file() else set()
    ok |= {p.parent.name for p in folder.glob("*/record.json") if json.loads(p.read_text())["status"] == "ok"}
    return {name: rows for name, rows in read_curves(folder).items() if name in ok}


def aggregate(task: dict, chosen: dict[str, float], seeds: list[int], out: Path) -> dict:
    """Per method and step: mean/sd over seeds of learning and forgetting (= -change)."""
    sweep_curves, seed_curves = _finished_curves(out / "sweep"), _finished_curves(out / "seeds")
    summary = {}
    for m, lr in chosen.items():
        runs = [sweep_curves[f"{m}_lr{lr:g}"]] + [seed_curves[f"{m}_s{s}"] for s in seeds if f"{m}_s{s}" in seed_curves]
        steps = sorted(set.intersection(*({c["step"] for c in run} for run in runs)))
        rows = []
        for step in steps:
            at = [next(c for c in run if c["step"] == step) for run in runs]
            learn, forget = _mean_sd([c[task["metric"]] for c in at]), _mean_sd([-c[task["forget"]] for c in at])
            rows.append({"step": int(step), "learn": learn, "forget": forget})
        at_level = {}
        for level in LEVELS[task["metric"]]:
            hits = [_forget_when_learned(run, task, level) for run in runs]
            hits = [h for h in hits if h is not None]
            at_level[str(level)] = {"runs": len(hits), "step": _mean_sd([h[0] for h in hits]) if hits else None,
                                    "forget": _mean_sd([h[1] for h in hits]) if hits else None}  # fmt: skip
        summary[m] = {"lr": lr, "seeds": len(runs), "curve": rows, "at_learning": at_level}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def figure(summary: dict, task: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_l, ax_f, ax_t = fig.subplots(1, 3)
    for i, (m, data) in enumerate(summary.items()):
        color = f"C{i}"
        steps = [r["step"] for r in data["curve"]]
        for ax, key in ((ax_l, "learn"), (ax_f, "forget")):
            mean = [r[key][0] for r in data["curve"]]
            sd = [r[key][1] for r in data["curve"]]
            ax.plot(steps, mean, color=color, marker=".", label=f"{m} (lr {data['lr']:g})")
            ax.fill_between(steps, [a - b for a, b in zip(mean, sd, strict=True)],
                            [a + b for a, b in zip(mean, sd, strict=True)], color=color, alpha=0.15)  # fmt: skip
        ax_t.errorbar([r["forget"][0] for r in data["curve"]], [r["learn"][0] for r in data["curve"]],
                      xerr=[r["forget"][1] for r in data["curve"]], yerr=[r["learn"][1] for r in data["curve"]],
                      color=color, marker=".", linewidth=1, elinewidth=0.5, label=m)  # fmt: skip
    ax_l.set(xlabel="step", ylabel=f"learning: {task['metric']}", title="learning (mean ± sd over seeds)")
    ax_f.set(xlabel="step", ylabel=f"forgetting: -{task['forget']}", title="forgetting (mean ± sd over seeds)")
    ax_t.set(xlabel=f"forgetting: -{task['forget']}", ylabel=f"learning: {task['metric']}",
             title="trade-off over training (each dot = a validation)")  # fmt: skip
    ax_l.legend(fontsize=7)
    fig.savefig(path, dpi=80)


def markdown(summary: dict, task: dict, at_steps: list[int]) -> str:
    head = " | ".join(f"step {s}" for s in at_steps)
    lines = [f"| method | lr | seeds | {head} |", "|---" * (3 + len(at_steps)) + "|"]
    for m, data in summary.items():
        cells = []
        for s in at_steps:
            row = next((r for r in data["curve"] if r["step"] == s), None)
            learn, forget = (None, None) if row is None else (row["learn"], row["forget"])
            cells.append("-" if row is None else f"{learn[0]:.3f} ± {learn[1]:.3f} / {forget[0]:.3f} ± {forget[1]:.3f}")
        lines.append(f"| {m} | {data['lr']:g} | {data['seeds']} | " + " | ".join(cells) + " |")
    levels = list(next(iter(summary.values()))["at_learning"])
    lines += ["", "| method | " + " | ".join(f"first reaches {task['metric']} >= {lv}: step / forgetting"
                                             for lv in levels) + " |", "|---" * (1 + len(levels)) + "|"]  # fmt: skip
    for m, data in summary.items():
        cells = []
        for lv in levels:
            hit = data["at_learning"][lv]
            if hit["step"] is None:
                cells.append("never")
                continue
            (step, step_sd), (lost, lost_sd) = hit["step"], hit["forget"]
            runs = f"{hit['runs']}/{data['seeds']} runs"
            cells.append(f"{step:.0f} ± {step_sd:.0f} / {lost:.3f} ± {lost_sd:.3f} ({runs})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="uuid")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="learning-rate grid of the sweep")
    parser.add_argument("--full-lrs", type=float, nargs="+", default=None, help="grid for full fine-tuning")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (seed 0 is the sweep's run)")
    parser.add_argument("--at", type=int, nargs="+", default=None, help="steps shown in the table")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report-only", action="store_true", help="aggregate the runs already in --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = TASKS[args.task]
    if args.full_lrs:
        task["lrs_by_method"] = {"full": args.full_lrs}
    out = args.out or REPO / "runs" / f"learn_forget_{args.task}"
    chosen = sweep(task, args.methods, args.lrs or task["lrs"], out, run=not args.report_only)
    seeds = list(range(1, args.seeds))
    if not args.report_only:
        seed_runs(task, chosen, seeds, out)
    summary = aggregate(task, chosen, seeds, out)
    figure(summary, task, out / "learn_forget.png")
    steps = [r["step"] for r in next(iter(summary.values()))["curve"]]
    at = args.at or sorted({steps[0], steps[len(steps) // 4], steps[len(steps) // 2], steps[-1]})
    machine = platform.processor() or platform.machine()
    print(f"\n{args.task}: learning / forgetting (mean ± sd over seeds); torch {torch.__version__}, {machine}, "
          f"{args.threads} thread(s); {' '.join(sys.argv)}\n")  # fmt: skip
    print(markdown(summary, task, at))


if __name__ == "__main__":
    main()
