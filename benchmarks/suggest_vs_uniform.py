"""The suggested policy against uniform LoRA, DoRA and MoRA at the same budget, over seeds.

    python benchmarks/suggest_vs_uniform.py --config configs/uuid_continual.yaml --budget 32768 \
        --out runs/bench_suggest/uuid --seeds 0 1 2

One pilot (the config's seed) decides the policy (`lightning_peft.experiments.suggest`); then every policy
runs once per seed through `compare` (same data, same steps), and this prints a markdown table
of learning and forgetting (mean and standard deviation over seeds, at the end and at every
validation), the figures and CSVs staying in `--out`.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
from pathlib import Path

import lightning
import torch
import transformers

from lightning_peft.experiments.compare import Variant, read_comparison, read_curves, run_comparison
from lightning_peft.experiments.suggest import SuggestSettings, comparison_variants, suggest


def mean_std(values: list[float]) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{values and statistics.fmean(values):.3f} ± {std:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--budget", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pilot-steps", type=int, default=50)
    parser.add_argument("--metric", default="val_char_acc")
    parser.add_argument("--forget", default="forget/prior_char_acc_change")
    parser.add_argument("--report-only", action="store_true", help="tabulate the finished runs in --out, train nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    settings = SuggestSettings(budget=args.budget, pilot_steps=args.pilot_steps)
    result = suggest(args.config, out / "suggest", settings)
    base = comparison_variants(result, settings, result.carried, args.budget - result.carried_params)
    base = [base[0], *reversed(base[1:])]  # suggested, then the high-rank method, DoRA, LoRA
    variants = [
        Variant(f"{v.name}-s{seed}", {**v.overrides, "seed_everything": seed}) for v in base for seed in args.seeds
    ]
    if args.report_only:
        records = read_comparison(out / "runs")
    else:
        records = run_comparison(args.config, variants, out / "runs", metric=args.metric, forget_metric=args.forget)
    curves = read_curves(out / "runs")
    print(f"\nbudget {args.budget:,}; suggested policy: {result.policy_path}\n")
    print(f"| policy | trainable | {args.metric} (end) | {args.forget} (end) | {args.metric} by step |")
    print("| --- | --- | --- | --- | --- |")
    for v in base:
        runs = [r for r in records if r.name.rsplit("-s", 1)[0] == v.name and r.status == "ok"]
        learn = [r.metrics.get(args.metric, math.nan) for r in runs]
        forget = [r.metrics.get(args.forget, math.nan) for r in runs]
        steps = sorted({c["step"] for r in runs for c in curves.get(r.name, [])})
        by_step = ", ".join(
            f"{int(s)}: {mean_std([c[args.metric] for r in runs for c in curves.get(r.name, []) if c['step'] == s])}"
            for s in steps
        )
        params = runs[0].trainable_params if runs else 0
        seeds = len(runs)
        print(f"| {v.name} ({seeds} seeds) | {params:,} | {mean_std(learn)} | {mean_std(forget)} | {by_step} |")
    print(
        f"\nseeds {args.seeds}, pilot {args.pilot_steps} steps; torch {torch.__version__}, lightning "
        f"{lightning.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}, 1 torch thread"
    )


if __name__ == "__main__":
    main()
