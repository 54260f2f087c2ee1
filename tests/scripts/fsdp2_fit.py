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
from lightning_peft.core.sharding import full_state_dict
from lightning_peft.diagnostics import UpdateDiagnostics

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
    "hira": policy("hira", "lora"),
    "hybrid": policy("mora", "dora"),
}


def tokens() -> torch.Tensor:
    return torch.randint(0, 32, (STEPS * GLOBAL_BATCH, 12), generator=torch.Generator().manual_seed(0))


class TinyLM(L.LightningModule):
    """A tiny Llama; `shard=True` applies FSDP2 in `configure_model`, as users do."""

    def __init__(self, shard: bool = False, intermediate_size: int = 64) -> None:
        super().__init__()
        self.shard = shard
        with torch.random.fork_rng():
            torch.manual_seed(0)
            config = LlamaConfig(
                vocab_size=32,
                hidden_size=32,
                intermediate_size=intermediate_size,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
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
        # Momentum gives the optimizer a state that a resumed run must restore.
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5, momentum=0.9)


def trainer(out: Path, steps: int, callbacks: list, sharded_checkpoint: bool) -> L.Trainer:
    strategy = ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=sharded_checkpoint
    )
    return L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=2,
        max_steps=steps,
        callbacks=callbacks,
        default_root_dir=str(out),
        logger=False,
        enable_progress_bar=False,
        use_distributed_sampler=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )


def save_adapters(model: L.LightningModule, trainer: L.Trainer, path: Path) -> None:
    state = full_state_dict(model, [k for k in model.state_dict() if ".adapter." in k])  # every rank gathers
    if trainer.global_rank == 0:
        torch.save({k: v.detach().clone() for k, v in state.items()}, path)


def fit(name: str, out: Path) -> None:
    """Train one policy for STEPS steps; rank zero writes the gathered adapters."""
    L.seed_everything(1)
    tr = trainer(out, STEPS, [AdapterCallback(POLICIES[name], verbose=False)], sharded_checkpoint=False)
    model = TinyLM(shard=True)
    tr.fit(model)
    save_adapters(model, tr, out / f"{name}.pt")


def fit_and_resume(out: Path, sharded_checkpoint: bool) -> None:
    """The hybrid policy with diagnostics: STEPS steps, a checkpoint, then a resumed run to 2 * STEPS."""
    tag = "sharded" if sharded_checkpoint else "full"
    L.seed_everything(1)
    diagnostics = UpdateDiagnostics(every_n_steps=1, plots=False, track_grad_norm=True, log_dir=str(out / tag))
    # Adapter-only files are gathered single files; a sharded checkpoint keeps every tensor.
    adapters = AdapterCallback(POLICIES["hybrid"], verbose=False, adapter_only_checkpoint=not sharded_checkpoint)
    tr = trainer(out, STEPS, [adapters, diagnostics], sharded_checkpoint)
    model = TinyLM(shard=True)
    tr.fit(model)
    tr.save_checkpoint(out / f"{tag}.ckpt")
    save_adapters(model, tr, out / f"{tag}_step{STEPS}.pt")
    L.seed_everything(2)  # a resumed run must not depend on the seed: everything comes from the checkpoint
    adapters = AdapterCallback(POLICIES["hybrid"], verbose=False, adapter_only_checkpoint=not sharded_checkpoint)
    tr = trainer(out, 2 * STEPS, [adapters], sharded_checkpoint)
    model = TinyLM(shard=True)
    tr.fit(model, ckpt_path=out / f"{tag}.ckpt")
    save_adapters(model, tr, out / f"{tag}_resumed.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name in json.loads(sys.argv[2]):
        if name.startswith("resume_"):
            fit_and_resume(out, sharded_checkpoint=name == "resume_sharded")
        else:
            fit(name, out)
