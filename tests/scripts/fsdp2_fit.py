"""Two-process CPU FSDP2 fits (Lightning's `ModelParallelStrategy`, gloo) with AdapterCallback.

Launched by tests/test_fsdp2.py. Lightning re-launches this script for rank 1. For each
policy named on the command line it trains a tiny Llama sharded with `fully_shard` on each
block and on the model, then rank zero writes the gathered adapter tensors, so the test can
compare them with a single-process run over the same global batches.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_peft import AdapterCallback

STEPS = 3
GLOBAL_BATCH = 8


def policy(outer: str, inner: str, hparams: dict | None = None) -> dict:
    hp = {"r": 4, **(hparams or {})}
    return {
        "rules": [
            {"method": outer, "modules": ["*"], "depth": {"outer": 1}, "hparams": dict(hp)},
            {"method": inner, "modules": ["*"], "depth": {"inner": 1}, "hparams": {"r": 4}},
        ]
    }


POLICIES = {
    "lora": policy("lora", "lora"),
    "dora": policy("dora", "dora"),
    "mora_sharing": policy("mora", "mora", {"mora_type": "sharing"}),
    "mora_rope": policy("mora", "mora", {"mora_type": "rope"}),
    "hybrid": policy("mora", "dora"),
}


def tokens() -> torch.Tensor:
    return torch.randint(0, 32, (STEPS * GLOBAL_BATCH, 12), generator=torch.Generator().manual_seed(0))


class TinyLM(L.LightningModule):
    """A tiny Llama; `shard=True` applies FSDP2 in `configure_model`, as users do."""

    def __init__(self, shard: bool = False) -> None:
        super().__init__()
        self.shard = shard
        with torch.random.fork_rng():
            torch.manual_seed(0)
            config = LlamaConfig(
                vocab_size=32, hidden_size=32, intermediate_size=64,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            )
            self.model = LlamaForCausalLM(config)

    def train_dataloader(self) -> DataLoader:
        # Interleaved, unshuffled shards: rank k's batch j holds global samples 8j+k, 8j+k+2, ...,
        # so the two ranks together see exactly the single-process batch j.
        data = TensorDataset(tokens())
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler)

    def configure_model(self) -> None:
        if not self.shard:
            return
        for block in self.model.model.layers:
            fully_shard(block)
        fully_shard(self.model)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.model(input_ids=x, labels=x).loss

    def configure_optimizers(self):
        # SGD, not Adam: Adam turns rounding-level gradient differences into full-size steps.
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


def fit(name: str, out: Path) -> None:
    L.seed_everything(1)
    trainer = L.Trainer(
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        accelerator="cpu", devices=2, max_steps=STEPS,
        callbacks=[AdapterCallback(POLICIES[name], verbose=False)],
        default_root_dir=str(out), logger=False, enable_progress_bar=False, use_distributed_sampler=False,
        enable_model_summary=False, enable_checkpointing=False,
    )
    model = TinyLM(shard=True)
    trainer.fit(model)
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()
             if ".adapter." in k}
    if trainer.global_rank == 0:
        torch.save({k: v.detach().clone() for k, v in state.items()}, out / f"{name}.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name in json.loads(sys.argv[2]):
        fit(name, out)
