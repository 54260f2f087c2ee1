"""How long planning and injection take on a Llama-2-7B-shaped model built on the meta device.

Nothing is allocated for the 6.7B base weights, so this measures only lightning-peft's own
work: block discovery + rule matching + per-shape hyper-parameter checks (`resolve`), and
module replacement (`inject_adapters`). The tests check correctness (tests/test_inject.py);
this script only times.

    python benchmarks/plan_7b.py [--policy mora_outer_dora_inner] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch


def build_meta_llama_7b() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def main() -> None:
    import lightning
    import transformers

    import lightning_peft
    from lightning_peft import LayerPolicy, inject_adapters
    from lightning_peft.policy import list_presets

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", nargs="*", default=list_presets())
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    print(
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"lightning {lightning.__version__}, lightning-peft {lightning_peft.__version__}"
    )
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch threads")
    t0 = time.perf_counter()
    build_meta_llama_7b()
    print(f"build model on meta: {1e3 * (time.perf_counter() - t0):.1f} ms (first build, includes lazy imports)")
    print(f"{'policy':32s} {'rows':>5s} {'trainable':>12s} {'resolve ms':>11s} {'inject ms':>10s}")
    for path in args.policy:
        policy = LayerPolicy.from_yaml(path)
        resolve_ms, inject_ms = [], []
        for _ in range(args.repeats):
            model = build_meta_llama_7b()
            t0 = time.perf_counter()
            plan = policy.resolve(model)
            t1 = time.perf_counter()
            inject_adapters(model, plan)
            t2 = time.perf_counter()
            resolve_ms.append(1e3 * (t1 - t0))
            inject_ms.append(1e3 * (t2 - t1))
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            assert trainable == plan.trainable_params, (trainable, plan.trainable_params)
        print(
            f"{Path(path).stem:32s} {len(plan.rows):5d} {plan.trainable_params:12,d} "
            f"{statistics.median(resolve_ms):11.1f} {statistics.median(inject_ms):10.1f}"
        )
    print(f"(median of {args.repeats}; model params {plan.model_params:,})")


if __name__ == "__main__":
    main()
