"""What `lightning-peft compare` costs over running the same fits by hand.

    python benchmarks/compare_overhead.py --repeats 3

Both ways run the same variants of `configs/uuid_continual.yaml` in this process, one fit
after the other, with the same loggers (TensorBoard + CSV into a fresh folder):

- by hand: `lightning_peft.cli.main(["fit", "--config", ..., "--key=value", ...])` per variant;
- compare: `run_comparison(config, variants, out_dir)`, which also parses every variant before
  any run, records step times and memory, writes `comparison.csv`, curves and the depth
  summary, draws the three figures and prints the table.

Rounds alternate the order (hand, compare, compare, hand, ...) so a drift in machine load hits
both alike. Reported: wall time and this process's CPU time (`time.process_time`, less
sensitive to other processes on a shared machine) per round, and the overhead
(compare - hand) / hand of their sums.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lightning_peft.cli.main import main as cli_main
from lightning_peft.experiments.compare import Variant, override_args, run_comparison

CONFIG = "configs/uuid_continual.yaml"
VARIANTS = [
    Variant("lora_r8", {"adapters.policy": "lora_all", "model.init_args.lr": 3e-3}),
    Variant("dora_r8", {"adapters.policy": "dora_all", "model.init_args.lr": 3e-3}),
]


def by_hand(out: Path, steps: int) -> None:
    for v in VARIANTS:
        where = {"save_dir": str(out), "name": v.name, "version": ""}
        loggers = [
            {"class_path": f"lightning.pytorch.loggers.{cls}", "init_args": where}
            for cls in ("TensorBoardLogger", "CSVLogger")
        ]
        cli_main(["fit", "--config", CONFIG, *override_args(v.overrides), f"--trainer.max_steps={steps}",
                  "--trainer.enable_progress_bar=false", f"--trainer.logger={json.dumps(loggers)}"])  # fmt: skip


def with_compare(out: Path, steps: int) -> None:
    common = {"trainer.max_steps": steps, "trainer.enable_progress_bar": False}
    variants = [Variant(v.name, {**v.overrides, **common}) for v in VARIANTS]
    records = run_comparison(CONFIG, variants, out)
    assert all(r.status == "ok" for r in records), [r.error for r in records]


def timed(fn, steps: int) -> tuple[float, float]:
    out = Path(tempfile.mkdtemp(prefix="lp-overhead-"))
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        fn(out, steps)
        return time.perf_counter() - wall, time.process_time() - cpu
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    timed(by_hand, 2)  # warm-up: imports, the cached UUID base, first-call costs
    totals = {"hand": [0.0, 0.0], "compare": [0.0, 0.0]}
    for i in range(args.repeats):
        order = [("hand", by_hand), ("compare", with_compare)]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            wall, cpu = timed(fn, args.steps)
            totals[name][0] += wall
            totals[name][1] += cpu
            print(f"round {i} {name:8s} wall {wall:7.1f} s  cpu {cpu:7.1f} s", flush=True)
    (hw, hc), (cw, cc) = totals["hand"], totals["compare"]
    print(f"\n{len(VARIANTS)} variants x {args.steps} steps, {args.repeats} rounds; torch {torch.__version__}, "
          f"{platform.machine()}, 1 thread")  # fmt: skip
    print(f"wall: hand {hw:.1f} s, compare {cw:.1f} s, overhead {100 * (cw - hw) / hw:+.1f} %")
    print(f"cpu:  hand {hc:.1f} s, compare {cc:.1f} s, overhead {100 * (cc - hc) / hc:+.1f} %")


if __name__ == "__main__":
    main()
