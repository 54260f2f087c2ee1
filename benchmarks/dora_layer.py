"""One adapted Linear, forward + backward: frozen floor, LoRA, DoRA and DoRA's old forward, interleaved.

    python benchmarks/dora_layer.py --tokens 1024 --in-features 512 --out-features 1376 --rounds 40

Process CPU time per call (one thread), the minimum over the rounds (the least disturbed
run on a shared machine) and the median. The layer-level view behind the DoRA changes
in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from dora_before import use_dora_before
from torch import nn

from lightning_peft.adapters import AdapterLinear, DoRA, LoRA


def adapted(cls: type, args: argparse.Namespace) -> AdapterLinear:
    torch.manual_seed(0)
    layer = AdapterLinear(
        nn.Linear(args.in_features, args.out_features, bias=False),
        cls(args.in_features, args.out_features, r=args.r, alpha=2 * args.r),
    )
    with torch.no_grad():
        layer.adapter.lora_B.normal_(0, 0.01)
    return layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--in-features", type=int, default=512)
    parser.add_argument("--out-features", type=int, default=1376)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers = {
        "floor": nn.Linear(args.in_features, args.out_features, bias=False).requires_grad_(False),
        "LoRA": adapted(LoRA, args),
        "DoRA": adapted(DoRA, args),
        "DoRA (before)": use_dora_before(adapted(DoRA, args)),
    }
    x = torch.randn(args.tokens, args.in_features, requires_grad=True)
    grad = torch.randn(args.tokens, args.out_features)
    times: dict[str, list[float]] = {k: [] for k in layers}
    for _ in range(args.rounds):
        for name, layer in layers.items():
            start = time.process_time()
            layer(x).backward(grad)
            times[name].append(time.process_time() - start)
    floor = min(times["floor"])
    print(f"tokens {args.tokens}, {args.in_features} -> {args.out_features}, r={args.r}, {args.rounds} rounds")
    print("| layer | min ms | median ms | min x floor | (min - LoRA min) / floor min |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, t in times.items():
        extra = (min(t) - min(times["LoRA"])) / floor
        cells = f"{1000 * min(t):.2f} | {1000 * statistics.median(t):.2f} | {min(t) / floor:.3f} | {extra:+.3f}"
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
