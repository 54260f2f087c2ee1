"""Mean ± sd over seeds of the MiniLM comparison (benchmarks/LEARN_FORGET.md, "MiniLM with a larger validation set").

    python benchmarks/learn_forget_minilm/summarize.py runs/learn_forget_minilm/seed0 runs/learn_forget_minilm/seed1 ...
"""

from __future__ import annotations

import statistics
import sys

from lightning_peft.experiments.records import read_comparison

METRICS = ("val_acc", "forget/embed_spearman_change", "forget/embed_cosine_change")


def main(folders: list[str]) -> None:
    runs = [read_comparison(folder) for folder in folders]
    names = [r.name for r in runs[0]]
    print(f"| method | seeds | trainable | {' | '.join(METRICS)} |")
    print("|---|---:|---:|" + "---:|" * len(METRICS))
    for name in names:
        records = [r for run in runs for r in run if r.name == name and r.status == "ok"]
        cells = []
        for metric in METRICS:
            values = [r.metrics[metric] for r in records if metric in r.metrics]
            sd = statistics.stdev(values) if len(values) > 1 else float("nan")
            cells.append(f"{statistics.fmean(values):.4f} ± {sd:.4f}" if values else "-")
        print(f"| {name} | {len(records)} | {records[0].trainable_params:,} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
