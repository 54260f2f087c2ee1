"""Learning vs forgetting per method on the testbed (prose-pretrained byte Llama -> Python source).

    python benchmarks/learn_forget.py --out runs/learn_forget_testbed            # sweep + seeds + report
    python benchmarks/learn_forget.py --out runs/learn_forget_testbed --report-only

Every run is one variant of a `lightning-peft compare` of `configs/testbed_continual.yaml`
(resumable: finished runs are skipped). Per method, at equal trainable budgets (r=8 everywhere):

1. learning-rate sweep on seed 0 over a half-decade ladder, starting from three rates and
   extended at an edge until the best rate (lowest final held-out source loss) is inside the
   grid (or the ladder ends, which the report flags);
2. seeds 1.. at that rate (a seed changes adapter initialisation and data order);
3. per step: mean and sd over seeds of learning (held-out source loss, nats/byte) and
   forgetting (rise of the held-out prose loss, nats/byte, `-forget/ref_logprob_change`);
   the frontier (forgetting interpolated at equal source loss); the saturation check
   (forgetting as a share of its ceiling: the unigram prose loss minus the base's).
   `summary.json`, `summary.md` and `learn_forget.png` go to `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from lightning_peft.experiments.compare import Variant, read_curves, run_comparison

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/testbed_continual.yaml"
LEARN, FORGET = "val_loss", "forget/ref_logprob_change"
BLOCKS = {"fraction": [0.0, 1.0]}
R8 = {"r": 8, "alpha": 16}
MLP, ATTN = ["gate_proj", "up_proj", "down_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]


def _rule(name: str, method: str, hparams: dict | None = None, modules: list | None = None, depth=None) -> dict:
    rule = {"name": name, "method": method, "modules": modules or ["*"], "depth": depth or BLOCKS}
    return {**rule, "hparams": hparams} if hparams else rule


METHODS = {
    "full": [_rule("full-blocks", "full")],
    "lora": [_rule("lora", "lora", R8)],
    "dora": [_rule("dora", "dora", R8)],
    "mora_sharing": [_rule("mora", "mora", {"r": 8, "mora_type": "sharing"})],
    "mora_rope": [_rule("mora", "mora", {"r": 8, "mora_type": "rope"})],
    "hira": [_rule("hira", "hira", {"r": 8})],
    "hybrid": [
        _rule("mora-outer", "mora", {"r": 8}, depth={"outer": 1}), _rule("dora-inner", "dora", R8, depth={"inner": 1})
    ],
    "split": [_rule("mora-mlp", "mora", {"r": 8}, MLP), _rule("lora-attn", "lora", R8, ATTN)],
}  # fmt: skip
LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
START = 1e-3  # the middle of the first three rates (the extension finds the rest)
SEED_KEYS = ("seed_everything", "data.init_args.seed")


def _variant(method: str, lr: float, seed: int | None = None, steps: int | None = None) -> Variant:
    overrides = {"adapters.policy": {"rules": METHODS[method]}, "model.init_args.lr": lr}
    if steps is not None:
        overrides["trainer.max_steps"] = steps
    if seed is not None:
        overrides.update(dict.fromkeys(SEED_KEYS, seed))
    return Variant(f"{method}_lr{lr:g}" + ("" if seed is None else f"_s{seed}"), overrides)


def _final(curve: list[dict], key: str) -> float:
    values = [c[key] for c in curve if math.isfinite(c.get(key, math.nan))]
    return values[-1] if values else math.inf


def _run(variants: list[Variant], folder: Path) -> dict[str, list[dict]]:
    run_comparison(CONFIG, variants, folder, figures=False, table=False, metric=LEARN, forget_metric=FORGET)
    return read_curves(folder)


def sweep(method: str, out: Path, steps: int | None, run: bool = True) -> tuple[float, dict[float, float], bool]:
    """Seed-0 runs until the best rate is not at an edge of the swept grid; (best, scores, interior).
    `run=False`: the rates already swept in `out`."""
    i = LADDER.index(START)
    lrs = list(LADDER[i - 1 : i + 2])
    folder = out / "sweep" / method
    if not run:
        lrs = sorted(
            float(p.name.split("_lr")[-1]) for p in folder.glob(f"{method}_lr*") if (p / "curves.csv").is_file()
        )
    while True:
        curves = _run([_variant(method, lr, steps=steps) for lr in lrs], folder) if run else read_curves(folder)
        scores = {lr: _final(curves.get(f"{method}_lr{lr:g}", []), LEARN) for lr in lrs}
        best = min(scores, key=scores.get)
        edge = LADDER.index(best) + (-1 if best == lrs[0] else 1 if best == lrs[-1] else 0)
        if best not in (lrs[0], lrs[-1]) or not run or not 0 <= edge < len(LADDER):
            interior = best not in (lrs[0], lrs[-1])
            print(f"{method}: final {LEARN} by lr {scores} -> lr {best:g} (interior: {interior})", flush=True)
            return best, scores, interior
        lrs = sorted({*lrs, LADDER[edge]})


def seed_runs(method: str, lr: float, seeds: list[int], out: Path, steps: int | None) -> None:
    _run([_variant(method, lr, seed=s, steps=steps) for s in seeds], out / "seeds" / method)


def _mean_sd(values: list[float]) -> list[float]:
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def _interp_forget(run: list[dict], level: float, base_loss: float) -> float | None:
    """Forgetting where the source loss first falls to `level` (linear between validations; the base
    model is the point (base_loss, 0)); `None` if the run never gets there."""
    points = [(base_loss, 0.0)] + [(c[LEARN], -c[FORGET]) for c in run]
    for (l0, f0), (l1, f1) in zip(points, points[1:], strict=False):
        if l1 <= level <= l0 and l0 > l1:
            return f0 + (f1 - f0) * (l0 - level) / (l0 - l1)
    return None


def shared_levels(chosen: dict, seeds: list[int], out: Path, base_loss: float, count: int = 3) -> list[float]:
    """`count` source-loss levels between the base's and the worst method's mean final loss: every method gets there."""
    worst = max(statistics.fmean(_final(r, LEARN) for r in method_runs(m, v[0], seeds, out)) for m, v in chosen.items())
    return [base_loss - (base_loss - worst) * k / count for k in range(1, count + 1)]


def method_runs(method: str, lr: float, seeds: list[int], out: Path) -> list[list[dict]]:
    sweep_curves, seed_curves = read_curves(out / "sweep" / method), {}
    if (out / "seeds" / method).is_dir():
        seed_curves = read_curves(out / "seeds" / method)
    runs = [sweep_curves[f"{method}_lr{lr:g}"]]
    runs += [seed_curves[f"{method}_lr{lr:g}_s{s}"] for s in seeds if f"{method}_lr{lr:g}_s{s}" in seed_curves]
    return runs


def aggregate(chosen: dict, seeds: list[int], out: Path, base: dict, levels: list[float]) -> dict:
    summary = {}
    for method, (lr, scores, interior) in chosen.items():
        runs = method_runs(method, lr, seeds, out)
        steps = sorted(set.intersection(*({c["step"] for c in run} for run in runs)))
        curve = []
        for step in steps:
            at = [next(c for c in run if c["step"] == step) for run in runs]
            curve.append({"step": int(step), "learn": _mean_sd([c[LEARN] for c in at]),
                          "forget": _mean_sd([-c[FORGET] for c in at])})  # fmt: skip
        frontier = {}
        for level in levels:
            hits = [f for f in (_interp_forget(run, level, base["source_loss"]) for run in runs) if f is not None]
            frontier[f"{level:.3f}"] = {"runs": len(hits), "forget": _mean_sd(hits) if hits else None}
        end = [-_final(run, FORGET) for run in runs]
        summary[method] = {"lr": lr, "sweep": {f"{k:g}": v for k, v in scores.items()}, "interior": interior,
                           "seeds": len(runs), "curve": curve, "frontier": frontier,
                           "end_learn": _mean_sd([_final(run, LEARN) for run in runs]), "end_forget": _mean_sd(end),
                           "saturation": _mean_sd([f / base["forget_ceiling"] for f in end])}  # fmt: skip
    return summary


def base_numbers() -> dict:
    """The base's record, its prose-loss ceiling (unigram) and its held-out source loss, measured here."""
    from lightning_peft.tasks import ProseBaseLM, StdlibSource

    module = ProseBaseLM()
    data = StdlibSource(seq_len=128, batch_size=8, val_fraction=0.2, max_val_windows=48)
    data.setup()
    module.eval()
    with torch.no_grad():
        losses = [float(module(b, labels=b).loss) for b in data.val_windows.long().split(8)]
    built = module.base_record["built"]
    return {**built, "source_loss": statistics.fmean(losses),
            "forget_ceiling": built["unigram_prose_loss"] - built["held_out_prose_loss"]}  # fmt: skip


def figure(summary: dict, base: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(17, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_l, ax_f, ax_t, ax_s = fig.subplots(1, 4)
    for i, (m, data) in enumerate(summary.items()):
        color, steps = f"C{i}", [0] + [r["step"] for r in data["curve"]]
        for ax, key, start in ((ax_l, "learn", base["source_loss"]), (ax_f, "forget", 0.0)):
            mean = [start] + [r[key][0] for r in data["curve"]]
            sd = [0.0] + [r[key][1] for r in data["curve"]]
            ax.plot(steps, mean, color=color, marker=".", label=f"{m} (lr {data['lr']:g}, {data['seeds']} seeds)")
            low, high = [a - b for a, b in zip(mean, sd, strict=True)], [a + b for a, b in zip(mean, sd, strict=True)]
            ax.fill_between(steps, low, high, color=color, alpha=0.15)
        forget = [0.0] + [r["forget"][0] for r in data["curve"]]
        ax_t.plot(
            forget, [base["source_loss"]] + [r["learn"][0] for r in data["curve"]], color=color, marker=".", label=m
        )
        lrs = sorted(data["sweep"], key=float)
        ax_s.plot([float(lr) for lr in lrs], [data["sweep"][lr] for lr in lrs], color=color, marker="o", label=m)
    ax_l.set(xlabel="step", ylabel="held-out source loss (nats/byte)", title="learning (mean ± sd over seeds)")
    ax_f.set(xlabel="step", ylabel="rise of held-out prose loss (nats/byte)", title="forgetting (mean ± sd)")
    ax_t.set(xlabel="forgetting (nats/byte)", ylabel="held-out source loss", title="trade-off (lower-left is better)")
    ax_s.set(xscale="log", xlabel="learning rate", ylabel="final source loss (seed 0)", title="learning-rate sweep")
    ax_l.legend(fontsize=7)
    fig.savefig(path, dpi=80)


def _pm(value: list[float] | None, fmt: str = ".3f") -> str:
    return "-" if value is None else f"{value[0]:{fmt}} ± {value[1]:{fmt}}"


def markdown(summary: dict, base: dict) -> str:
    lines = ["| method | lr (interior?) | sweep: final source loss by lr | seeds | final source loss | "
             "forgetting | share of ceiling |", "|---" * 7 + "|"]  # fmt: skip
    for m, d in summary.items():
        sweep_cells = ", ".join(f"{lr}: {v:.3f}" for lr, v in sorted(d["sweep"].items(), key=lambda kv: float(kv[0])))
        lines.append(f"| {m} | {d['lr']:g} ({'yes' if d['interior'] else 'EDGE'}) | {sweep_cells} | {d['seeds']} | "
                     f"{_pm(d['end_learn'])} | {_pm(d['end_forget'])} | {_pm(d['saturation'], '.1%')} |")  # fmt: skip
    levels = list(next(iter(summary.values()))["frontier"])
    lines += ["", "| method | " + " | ".join(f"forgetting at source loss {lv}" for lv in levels) + " |",
              "|---" * (1 + len(levels)) + "|"]  # fmt: skip
    for m, d in summary.items():
        cells = [f"{_pm(d['frontier'][lv]['forget'])} ({d['frontier'][lv]['runs']}/{d['seeds']})" for lv in levels]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    steps = [r["step"] for r in next(iter(summary.values()))["curve"]]
    at = sorted({steps[0], steps[len(steps) // 2], steps[-1]})
    lines += ["", "| method | " + " | ".join(f"step {s}: source loss / forgetting" for s in at) + " |",
              "|---" * (1 + len(at)) + "|"]  # fmt: skip
    for m, d in summary.items():
        rows = {r["step"]: r for r in d["curve"]}
        lines.append(f"| {m} | " + " | ".join(f"{_pm(rows[s]['learn'])} / {_pm(rows[s]['forget'])}" if s in rows
                                               else "-" for s in at) + " |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "learn_forget_testbed")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (seed 0 is the sweep's run)")
    parser.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: the config's)")
    parser.add_argument("--report-only", action="store_true", help="aggregate the runs already in --out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    base = base_numbers()
    seeds = list(range(1, args.seeds))
    chosen = {}
    for method in args.methods:  # one method at a time: its sweep, then its seeds (partial results stay usable)
        chosen[method] = sweep(method, args.out, args.steps, run=not args.report_only)
        if not args.report_only:
            seed_runs(method, chosen[method][0], seeds, args.out, args.steps)
    levels = shared_levels(chosen, seeds, args.out, base["source_loss"])
    summary = aggregate(chosen, seeds, args.out, base, levels)
    (args.out / "summary.json").write_text(json.dumps({"base": base, "methods": summary}, indent=1))
    figure(summary, base, args.out / "learn_forget.png")
    header = (f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, 1 thread; "
              f"{' '.join(sys.argv)}; {time.time() - start:.0f} s")  # fmt: skip
    (args.out / "summary.md").write_text(header + "\n\n" + markdown(summary, base))
    print(header + "\n\n" + markdown(summary, base))


if __name__ == "__main__":
    main()
