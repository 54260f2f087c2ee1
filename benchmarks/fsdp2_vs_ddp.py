"""FSDP2 (`ModelParallelStrategy`) vs DDP step time on CPU: two gloo processes, one thread each.

Usage: python benchmarks/fsdp2_vs_ddp.py [--steps 30] [--rounds 3]

Each round runs the same hybrid-policy fit (MoRA outer blocks, DoRA inner) under DDP, then
under FSDP2 (`fully_shard` on every block and the model), in fresh launches; rank zero
records the median optimizer-step time after 5 warm-up steps. The ratio FSDP2 / DDP of each
round is printed with the medians, so a noisy machine shows as spread between rounds.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_peft import AdapterCallback

POLICY = {
    "rules": [
        {"method": "mora", "modules": ["*"], "depth": {"outer": 1}, "hparams": {"r": 8}},
        {"method": "dora", "modules": ["*"], "depth": {"inner": 1}, "hparams": {"r": 8}},
    ]
}
SHAPE = {
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}


class Bench(L.LightningModule):
    def __init__(self, shard: bool) -> None:
        super().__init__()
        self.shard = shard
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(LlamaConfig(**SHAPE))
        self.times: list[float] = []

    def configure_model(self) -> None:
        if self.shard:
            for block in self.model.model.layers:
                fully_shard(block)
            fully_shard(self.model)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.model(input_ids=x, labels=x).loss

    def on_train_batch_start(self, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t0)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def run_one(strategy_name: str, steps: int, out: Path) -> None:
    torch.set_num_threads(1)
    shard = strategy_name == "fsdp2"
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if shard else "ddp"
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=2,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[AdapterCallback(POLICY, verbose=False)],
    )
    data = torch.randint(0, SHAPE["vocab_size"], (steps * 4, 128), generator=torch.Generator().manual_seed(0))
    model = Bench(shard)
    trainer.fit(model, DataLoader(TensorDataset(data), batch_size=2))
    if trainer.global_rank == 0:
        out.write_text(json.dumps(statistics.median(model.times[5:])))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: one fit
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run_one(args.run, args.steps, Path(args.out))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    results: dict[str, list[float]] = {"ddp": [], "fsdp2": []}
    for _ in range(args.rounds):
        for name in results:
            out = Path(f"/tmp/fsdp2_vs_ddp_{name}.json")
            cmd = [sys.executable, __file__, "--run", name, "--steps", str(args.steps), "--out", str(out)]
            subprocess.run(cmd, check=True, env=env, capture_output=True)
            results[name].append(json.loads(out.read_text()))
    ratios = [f / d for f, d in zip(results["fsdp2"], results["ddp"], strict=True)]
    print(f"model {SHAPE}, seq 128, global batch 4, {args.steps} steps, hybrid policy r=8, 2 gloo processes x 1 thread")
    for name, times in results.items():
        print(f"{name}: median step ms per round {[round(t * 1e3, 1) for t in times]}")
    print(f"FSDP2 / DDP per round: {[round(r, 2) for r in ratios]}; median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
