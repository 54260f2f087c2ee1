"""Two-process CPU DDP fit with AdapterCallback and MergeRestart (launched by tests/test_distributed.py).

Lightning's `ddp` strategy re-launches this script for rank 1. Every rank writes its
adapter tensors and the base weights the restarts merged into after training, so the test
can compare them across ranks.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared tiny builders
from helpers import CausalLMModule, tiny_llama

from lightning_peft import AdapterCallback, MergeRestart, adapter_state_dict, find_adapters

POLICY = {
    "rules": [
        {"method": "mora", "modules": ["*"], "depth": {"outer": 1}, "hparams": {"r": 4}},
        {"method": "dora", "modules": ["*"], "depth": {"inner": 1}, "hparams": {"r": 4}},
    ]
}


RESTART_EVERY = 2  # restarts at steps 2 and 4 of 6: MoRA's operator and DoRA's magnitude change twice


class TinyLM(CausalLMModule):
    """The tests' ordinary user module around a 4-block Llama (7 Linear layers per block)."""

    def __init__(self) -> None:
        super().__init__(model=tiny_llama(0, num_hidden_layers=4))


def main(out: Path, diagnostics: bool) -> None:
    L.seed_everything(1)  # the same seed on both ranks: adapters start identical, data shards differ
    tokens = torch.randint(0, 32, (64, 12), generator=torch.Generator().manual_seed(0))
    callbacks = [AdapterCallback(POLICY), MergeRestart(every=RESTART_EVERY)]
    if diagnostics:
        from lightning_peft.diagnostics import UpdateDiagnostics

        callbacks.append(UpdateDiagnostics(every_n_steps=2, plots=False))
    trainer = L.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_steps=6,
        callbacks=callbacks,
        default_root_dir=str(out),
        logger=L.pytorch.loggers.CSVLogger(str(out), name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = TinyLM()
    trainer.fit(model, DataLoader(TensorDataset(tokens), batch_size=8))
    state = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}
    state.update({f"{n}.base.weight": layer.base.weight.detach().clone() for n, layer in find_adapters(model)})
    torch.save(state, out / f"adapters_rank{trainer.global_rank}.pt")
    trainer.save_checkpoint(out / "final.ckpt")  # Lightning writes it on rank zero only


if __name__ == "__main__":
    main(Path(sys.argv[1]), diagnostics=len(sys.argv) > 2 and sys.argv[2] == "diagnostics")
