"""Cost of loading a policy as its rule count grows: it must be linear.

    python benchmarks/policy_load.py                # 10 / 100 / 1,000 / 10,000 rules, 5 repeats

Each policy has N distinct rules (one module name and one depth index each, alternating
LoRA/DoRA/MoRA with hyper-parameters), so every rule goes through every check: unknown
keys, field and hyper-parameter types, method lookup, duplicate detection. Timed:
`LayerPolicy.from_dict` on the mapping and `LayerPolicy.from_yaml` on the same policy
written to a file (strict YAML reading included). Prints a Markdown table of CPU time
(`time.process_time`: this process only, so a busy shared machine does not inflate it)
with medians and min-max over the repeats, and the median wall time.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from lightning_peft import LayerPolicy

METHODS = [("lora", {"r": 8, "alpha": 16.0}), ("dora", {"r": 4, "alpha": 8, "eps": 1e-6}), ("mora", {"r": 8})]


def policy_dict(num_rules: int) -> dict:
    rules = []
    for i in range(num_rules):
        method, hparams = METHODS[i % len(METHODS)]
        rules.append(
            {
                "name": f"rule-{i}",
                "method": method,
                "modules": [f"layer_{i}.proj", "re:never_.*"] if i % 2 else [f"layer_{i}.proj"],
                "depth": {"indices": [i % 7, "2:4"]},
                "hparams": dict(hparams),
            }
        )
    return {"rules": rules, "strict": False}


def timed(fn, repeats: int) -> tuple[list[float], list[float]]:
    """CPU and wall seconds of each call."""
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return cpu, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"Python {platform.python_version()}, {platform.processor() or platform.machine()}")
    print(
        "| rules | from_dict CPU ms (median) | min-max | per rule us | wall ms "
        "| from_yaml CPU ms (median) | min-max | per rule us | wall ms |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.rules:
            data = policy_dict(n)
            path = Path(tmp) / f"policy_{n}.yaml"
            path.write_text(yaml.safe_dump(data, sort_keys=False))
            assert len(LayerPolicy.from_dict(data).rules) == n
            assert LayerPolicy.from_yaml(path).to_dict() == LayerPolicy.from_dict(data).to_dict()
            cells = []
            for load in (lambda data=data: LayerPolicy.from_dict(data), lambda path=path: LayerPolicy.from_yaml(path)):
                cpu, wall = timed(load, args.repeats)
                med = statistics.median(cpu)
                cells += [f"{1e3 * med:.1f}", f"{1e3 * min(cpu):.1f}-{1e3 * max(cpu):.1f}", f"{1e6 * med / n:.0f}"]
                cells.append(f"{1e3 * statistics.median(wall):.0f}")
            print(f"| {n:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
