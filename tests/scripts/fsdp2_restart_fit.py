"""Two-process CPU FSDP2 fits with MergeRestart (launched by tests/test_fsdp2_restart.py).

Lightning re-launches this script for rank 1. A tiny Llama with uneven row blocks (45 MLP
rows: 23 + 22 per rank), every method and both of MoRA's restart cycles, sharded with
`fully_shard` per block. Runs (each writes the gathered adapters, merged bases and losses):

- `whole`: RESTARTS_AT x 3 steps uninterrupted, restarting every RESTART_EVERY, with diagnostics;
- `resumed`: the same to step MID (inside the second cycle), a sharded checkpoint, a resumed run to the end;
- `prune`: as `whole` with `optimizer_reset="prune"`.

The batch of step k is the global batch TOKENS[k], each rank taking every world-th row, whatever
the data loader's position: a resumed run sees what the uninterrupted one did.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsdp2_fit import TinyLM, trainer

from lightning_peft import AdapterCallback, MergeRestart, find_adapters
from lightning_peft.core.sharding import full_state_dict
from lightning_peft.diagnostics import UpdateDiagnostics

torch.set_num_threads(1)

RESTART_EVERY = 2
STEPS = 5  # restarts at the start of steps 2 and 4 (0-based)
MID = 3  # a checkpoint inside the second cycle
GLOBAL_BATCH = 4
TOKENS = torch.randint(0, 32, (STEPS, GLOBAL_BATCH, 10), generator=torch.Generator().manual_seed(0))

POLICY = {
    "rules": [
        {"method": "mora", "modules": ["*"], "depth": {"outer": 1}, "hparams": {"r": 2, "mora_type": "rope"}},
        {"method": "dora", "modules": ["self_attn.*"], "depth": {"inner": 1}, "hparams": {"r": 3}},
        {"method": "hira", "modules": ["mlp.down_proj"], "depth": {"inner": 1}, "hparams": {"r": 2}},
        {
            "method": "mora",
            "modules": ["mlp.gate_proj"],
            "depth": {"inner": 1},
            "hparams": {"r": 2, "mora_type": "sharing"},
        },
        {"method": "lora", "modules": ["mlp.up_proj"], "depth": {"inner": 1}, "hparams": {"r": 3}},
    ]
}


class RestartLM(TinyLM):
    """`TinyLM` with 45 MLP rows (uneven shards) and data chosen by step; `shard=True` applies FSDP2."""

    def __init__(self, shard: bool = False) -> None:
        super().__init__(shard, intermediate_size=45)
        self.losses: list[torch.Tensor] = []

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.arange(STEPS)), batch_size=1)  # one item per step; data by step

    def training_step(self, batch, batch_idx):
        x = TOKENS[self.trainer.global_step][self.trainer.global_rank :: self.trainer.world_size]
        loss = self.model(input_ids=x, labels=x).loss  # equal tokens per row: the mean over ranks is the global loss
        self.losses.append(loss.detach())
        return loss


def callbacks(reset: str = "reset", diagnostics_dir: Path | None = None) -> list:
    adapters = AdapterCallback(POLICY, verbose=False, adapter_only_checkpoint=False)  # full sharded checkpoints
    out = [adapters, MergeRestart(every=RESTART_EVERY, optimizer_reset=reset)]
    if diagnostics_dir is not None:
        out.append(UpdateDiagnostics(every_n_steps=1, plots=False, log_dir=str(diagnostics_dir)))
    return out


def record(model: RestartLM, tr: L.Trainer) -> dict:
    """Adapters, merged bases, cycle count and the global loss of each step this run took."""
    keys = [k for k in model.state_dict() if ".adapter." in k or k.endswith(".base.weight")]
    state = {k: v.detach().clone() for k, v in full_state_dict(model, keys).items()}  # every rank gathers
    losses = torch.stack(model.losses) if model.losses else torch.zeros(0)
    if tr.world_size > 1:
        losses = tr.strategy.reduce(losses, reduce_op="mean")
    restarts = {n: layer.restarts for n, layer in find_adapters(model)}
    return {"state": state, "losses": losses, "restarts": restarts}


def save(result: dict, tr: L.Trainer, path: Path) -> None:
    if tr.global_rank == 0:
        torch.save(result, path)


def run(out: Path, name: str) -> None:
    L.seed_everything(1)
    if name in ("whole", "prune"):
        diagnostics = out / "diagnostics" if name == "whole" else None
        tr = trainer(out, STEPS, callbacks("reset" if name == "whole" else "prune", diagnostics), True)
        model = RestartLM(shard=True)
        tr.fit(model)
        save(record(model, tr), tr, out / f"{name}.pt")
        return
    tr = trainer(out, MID, callbacks(), True)
    model = RestartLM(shard=True)
    tr.fit(model)
    tr.save_checkpoint(out / "mid.ckpt")  # a sharded (distributed) checkpoint: a folder, one file per rank
    save(record(model, tr), tr, out / "mid.pt")
    L.seed_everything(2)  # the resumed run must take everything from the checkpoint
    tr = trainer(out, STEPS, callbacks(), True)
    model = RestartLM(shard=True)
    tr.fit(model, ckpt_path=out / "mid.ckpt")
    save(record(model, tr), tr, out / "resumed.pt")


if __name__ == "__main__":
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    for run_name in json.loads(sys.argv[2]):
        run(target, run_name)
