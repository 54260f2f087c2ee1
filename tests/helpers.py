"""Shared tiny builders for the policy / injection / callback tests.

Every model is built from a config (no download) with 6 repeated blocks and hidden size 32,
so a full `Trainer.fit` takes a second or two on a CPU.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# Tiny models: one intra-op thread is fastest and avoids oversubscribing a shared 2-core machine
# (two threads made a 20-step fit ~40x slower under load).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
POLICIES = REPO / "policies"
PRESETS = sorted(POLICIES.glob("*.yaml"))
HYBRID = POLICIES / "mora_outer_dora_inner.yaml"

VOCAB = 64
SEQ = 16
NUM_BLOCKS = 6
# The module kinds of one tiny Llama block (names inside the block), in model order.
LLAMA_KINDS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


# A 2-block `CausalLM` for CLI configs (`model:` section): seconds per fit.
TINY_CAUSAL_LM = {
    "class_path": "lightning_peft.tasks.CausalLM",
    "init_args": {
        "vocab_size": 32,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    },
}


def short_run_trainer(tmp_path: Path, steps: int, **checkpoint_args) -> dict:
    """The `trainer:` section of an override config: `steps` steps, TensorBoard logs in `tmp_path/run/version_0`,
    checkpoints (`last.ckpt` and `checkpoint_args`) in `tmp_path/ckpts`."""
    return {
        "max_steps": steps,
        "enable_progress_bar": False,
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": str(tmp_path), "name": "run", "version": 0},
        },
        "callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(tmp_path / "ckpts"), "save_last": True, **checkpoint_args},
            }
        ],
    }


def paired_forward(reference: nn.Module, ours: nn.Module, x: torch.Tensor, seed: int = 1234):
    """Both layers on copies of `x` that require grad, under the same dropout mask: `(y_ref, y_ours, x_ref, x_ours)`."""
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(seed)
    y_ref = reference(x_ref)
    torch.manual_seed(seed)
    return y_ref, ours(x_ours), x_ref, x_ours


def random_base_layer(in_features: int, out_features: int, *, bias: bool = True, conv1d: bool = False) -> nn.Module:
    """A base layer for equivalence tests: an `nn.Linear`, or GPT-2's `Conv1D` (weight `(in, out)`, always
    a bias) with non-trivial weights."""
    if not conv1d:
        return nn.Linear(in_features, out_features, bias=bias)
    from transformers.pytorch_utils import Conv1D

    base = Conv1D(out_features, in_features)
    with torch.no_grad():
        base.weight.normal_(0, 0.2)
        base.bias.normal_(0, 0.2)
    return base


def llama_config(**overrides):
    from transformers import LlamaConfig

    kw = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": NUM_BLOCKS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    }
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    """A 6-block `LlamaForCausalLM` (hidden 32, GQA 4/2 heads), deterministic per seed."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(**overrides)).eval()


def tiny_bert(seed: int = 0, **overrides) -> nn.Module:
    """A 6-block `BertModel` (hidden 32): blocks live in `encoder.layer`."""
    from transformers import BertConfig, BertModel

    kw = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "num_hidden_layers": NUM_BLOCKS,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    }
    kw.update(overrides)
    torch.manual_seed(seed)
    return BertModel(BertConfig(**kw)).eval()


def tiny_gpt2(seed: int = 0, **overrides) -> nn.Module:
    """A 6-block `GPT2LMHeadModel` (hidden 32): `transformer.h`, GPT-2 `Conv1D` layers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    kw = {
        "vocab_size": VOCAB,
        "n_embd": 32,
        "n_layer": NUM_BLOCKS,
        "n_head": 4,
        "n_positions": 64,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    kw.update(overrides)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**kw)).eval()


BUILDERS = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}
# Qualified prefix of block i for each architecture.
BLOCK_PREFIX = {"llama": "model.layers", "bert": "encoder.layer", "gpt2": "transformer.h"}
# Number of adaptable Linear/Conv1D layers per block.
LINEARS_PER_BLOCK = {"llama": 7, "bert": 6, "gpt2": 4}


def tokens(batch: int = 4, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def model_out(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The main output tensor of an HF model (logits or last hidden state)."""
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def randomize_adapters(model: nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Give every adapter tensor random non-zero values (adapters start as a zero update)."""
    from lightning_peft import find_adapters

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in find_adapters(model):
            for p in layer.adapter.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def token_loader(n: int = 8, batch_size: int = 8, seq: int = SEQ, seed: int = 0) -> DataLoader:
    """Random-token causal-LM data: `n` fixed sequences, no shuffling (deterministic order)."""
    return DataLoader(TensorDataset(tokens(n, seq, seed)), batch_size=batch_size, shuffle=False)


class CausalLMModule(L.LightningModule):
    """The ordinary user module: wraps an HF causal LM, knows nothing about adapters."""

    def __init__(self, model: nn.Module | None = None, lr: float = 1e-2, seed: int = 0) -> None:
        super().__init__()
        self.model = (model if model is not None else tiny_llama(seed)).train()
        self.lr = lr
        self.train_losses: list[float] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits

    def _loss(self, batch) -> torch.Tensor:
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.train_losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self._loss(batch))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class EarlyOptimizerModule(CausalLMModule):
    """Anti-pattern: the optimizer is built in `__init__`, before any adapter exists."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.opt = torch.optim.AdamW(self.parameters(), lr=self.lr)

    def configure_optimizers(self):
        return self.opt


class LateLayersModule(CausalLMModule):
    """Builds its HF model in `configure_model`: no target module exists at `Callback.setup`."""

    def __init__(self, seed: int = 0, **kw) -> None:
        super().__init__(model=nn.Identity(), **kw)
        self.model = None
        self.seed = seed

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_llama(self.seed).train()


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def trainer(tmp_path: Path | None = None, **kw) -> L.Trainer:
    """A quiet single-process CPU trainer."""
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "max_steps": 3,
        "default_root_dir": tmp_path,
    }
    defaults.update(kw)
    return L.Trainer(**defaults)
