"""Add per-layer adapters to an ordinary LightningModule: the only new line is the callback.

    python examples/add_callback.py

The module below is what a Lightning + HF user already has: a causal LM, a training step,
and an optimizer over `self.parameters()`. `AdapterCallback` injects MoRA into the outer
blocks and DoRA into the inner ones before `configure_optimizers` runs, so the optimizer
sees only the adapter tensors; the base model stays frozen. Everything it writes goes
under `runs/add_callback/` (checkpoints, then the saved adapters in `adapters/`).
"""

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_peft import AdapterCallback, LayerPolicy, save_adapters


class MyLanguageModel(L.LightningModule):  # unchanged user code: it knows nothing about adapters
    def __init__(self) -> None:
        super().__init__()
        config = LlamaConfig(
            vocab_size=64,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        self.model = LlamaForCausalLM(config)

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        loss = self.model(input_ids=tokens, labels=tokens).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


RUN_DIR = "runs/add_callback"


def main(run_dir: str = RUN_DIR, max_steps: int = 40) -> None:
    L.seed_everything(0)
    tokens = torch.randint(0, 64, (64, 24), generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(tokens), batch_size=16, shuffle=True)

    policy = LayerPolicy.from_yaml("mora_outer_dora_inner")  # a preset name, or any YAML path
    model = MyLanguageModel()
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=[AdapterCallback(policy)],
        accelerator="cpu",
        logger=False,
        default_root_dir=run_dir,  # checkpoints go to run_dir/checkpoints, not the current folder
    )
    trainer.fit(model, data)
    save_adapters(model, f"{run_dir}/adapters")  # adapters.safetensors + plan.json, the size of the adapters
    print(f"run folder: {run_dir} (checkpoints/, adapters/)")


if __name__ == "__main__":
    main()
