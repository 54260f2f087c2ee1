"""One "node" of a two-node fit on this machine (launched twice, together, by tests/test_multinode.py).

`ddp`: started by `torchrun --nnodes 2 --nproc-per-node 1` with a c10d rendezvous on 127.0.0.1
(Lightning reads torchrun's environment). `fsdp2`: started as a plain script with the variables
Lightning reads on a cluster without a scheduler (MASTER_ADDR, MASTER_PORT, NODE_RANK, WORLD_SIZE),
`ModelParallelStrategy` with `fully_shard` per block.

Each node builds the built-in UUID continual task (both build its memorised base into the same
cache at once), trains the hybrid policy with MergeRestart, diagnostics, a CSV logger and periodic
checkpoints for FIRST steps, then resumes from the last checkpoint to STEPS. Each rank writes what
it saw (ranks, paths, steps) and the gathered adapters to `rank<k>.json` / `rank<k>.pt`.
"""

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

from lightning_peft import AdapterCallback, MergeRestart
from lightning_peft.core.sharding import full_state_dict
from lightning_peft.diagnostics import UpdateDiagnostics
from lightning_peft.tasks import UUIDContinualLM, UUIDMemorization

torch.set_num_threads(1)

FIRST, STEPS = 4, 6  # restarts at the start of steps 2 and 4: the second one after the resume
POLICY = {
    "rules": [
        {"method": "mora", "modules": ["*"], "depth": {"outer": 1}, "hparams": {"r": 2}},
        {"method": "dora", "modules": ["*"], "depth": {"inner": 1}, "hparams": {"r": 2}},
    ]
}
TASK = {"prior_pairs": 4, "prior_steps": 3, "hidden_size": 16, "intermediate_size": 32, "generate_on_eval": False}


class ContinualLM(UUIDContinualLM):
    """The built-in task trained with SGD: Adam would turn the rounding-level differences between
    DDP and FSDP2 into full-size steps, and the test compares the two runs."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5, momentum=0.9)


class ShardedContinualLM(ContinualLM):
    """With FSDP2 applied in `configure_model`, as a user would add it."""

    def configure_model(self) -> None:
        if any(isinstance(m, torch.distributed.fsdp.FSDPModule) for m in self.modules()):
            return
        for block in self.model.model.layers:
            fully_shard(block)
        fully_shard(self.model)


def make_trainer(out: Path, strategy: str, steps: int) -> L.Trainer:
    if strategy == "fsdp2":
        chosen = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        chosen = "ddp"
    return L.Trainer(
        strategy=chosen,
        accelerator="cpu",
        num_nodes=2,
        devices=1,
        max_steps=steps,
        limit_val_batches=0,
        logger=CSVLogger(str(out), name="logs"),
        callbacks=[
            AdapterCallback(POLICY, adapter_only_checkpoint=strategy != "fsdp2"),  # FSDP2: full sharded ones
            MergeRestart(every=2),
            UpdateDiagnostics(every_n_steps=2, plots=False),
            ModelCheckpoint(every_n_train_steps=2, save_top_k=-1, save_last=True),
        ],
        default_root_dir=str(out),
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def fit(out: Path, strategy: str, steps: int, ckpt_path: str | None) -> tuple[L.Trainer, L.LightningModule]:
    L.seed_everything(1)
    cls = ShardedContinualLM if strategy == "fsdp2" else ContinualLM
    model = cls(**TASK)  # every node builds (or waits for) the cached base here
    data = UUIDMemorization(num_pairs=16, seed=0, batch_size=4)
    trainer = make_trainer(out, strategy, steps)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer, model


def report(trainer: L.Trainer, model: L.LightningModule, phase: str) -> dict:
    checkpoint = next(cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint))
    return {
        f"{phase}_global_rank": trainer.global_rank,
        f"{phase}_node_rank": trainer.node_rank,
        f"{phase}_local_rank": trainer.local_rank,
        f"{phase}_world_size": trainer.world_size,
        f"{phase}_cluster": type(trainer.strategy.cluster_environment).__name__,
        f"{phase}_log_dir": trainer.log_dir,
        f"{phase}_ckpt_dir": checkpoint.dirpath,
        f"{phase}_last": checkpoint.last_model_path,
        f"{phase}_step": trainer.global_step,
    }


def main(out: Path, strategy: str) -> None:
    trainer, model = fit(out, strategy, FIRST, None)
    seen = report(trainer, model, "fit")
    trainer, model = fit(out, strategy, STEPS, seen["fit_last"])
    seen.update(report(trainer, model, "resume"))
    seen["node_rank_env"] = os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK")
    adapters = full_state_dict(model, [k for k in model.state_dict() if ".adapter." in k or ".base.weight" in k])
    rank = trainer.global_rank
    (out / f"rank{rank}.json").write_text(json.dumps(seen, indent=1))
    torch.save({k: v.detach().clone() for k, v in adapters.items()}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
