"""LoRA: low-rank update `dW = s * B @ A` (Hu et al. 2021, arXiv 2106.09685).

    y = W0 x + b + s * B A dropout(x),   s = alpha / r   (rsLoRA: alpha / sqrt(r))

A is Kaiming-uniform (as `nn.Linear`'s default init, so it matches HF peft), B is zero,
so the layer equals its base at initialisation. Dropout only touches the delta path.

Diagnostics never build the `out x in` update: its singular values come from two thin QRs
and an `r x r` SVD, its row terms from `(out, r)` products (docs/methods.md).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    AdapterMethod,
    PeftMapping,
    accumulation_dtype,
    check_dropout,
    check_rank,
    kaiming_uniform_,
    register_adapter,
)
from .sharded import whole

if TYPE_CHECKING:
    from .base import AdapterLinear


def lora_peft_mapping(use_dora: bool) -> PeftMapping:
    """peft's LoRA tuner (`LoraConfig`), which holds LoRA and, with `use_dora`, DoRA."""
    tensors = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
    return PeftMapping(
        peft_type="LORA",
        tensors={**tensors, "magnitude": "lora_magnitude_vector"} if use_dora else tensors,
        hparams={
            "r": ("r", 8),
            "alpha": ("lora_alpha", 8),
            "use_rslora": ("use_rslora", False),
            "dropout": ("lora_dropout", 0.0),
        },
        patterns={"r": "rank_pattern", "alpha": "alpha_pattern"},
        select={"use_dora": use_dora},
        fixed={"bias": "none", "init_lora_weights": True},
        unsupported={
            "lora_bias": False,
            "modules_to_save": None,
            "target_parameters": None,
            "trainable_token_indices": None,
            "layer_replication": None,
            "alora_invocation_tokens": None,
            "use_qalora": False,
            "velora_config": None,
            "kasa_config": None,
            "monteclora_config": None,
            "use_bdlora": None,
            "megatron_config": None,
        },
        # peft's PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA
        base_changing_inits=("init_lora_weights", ("pissa", "olora", "corda", "loftq", "lora_ga")),
    )


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LowRankFactors(AdapterMethod):
    """Shared storage and checks for methods built on `B @ A` factors (LoRA, DoRA)."""

    parameter_roles = {"lora_A": "A", "lora_B": "B"}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__(in_features, out_features)
        self.r = check_rank(r)
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
            raise ValueError(f"`alpha` must be a positive number, got {alpha!r}")
        self.alpha = float(alpha)
        self.dropout_p = check_dropout(dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.dropout = nn.Dropout(self.dropout_p) if self.dropout_p > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, in_features))  # (r, in)
        self.lora_B = nn.Parameter(torch.empty(out_features, r))  # (out, r)
        self.reset_parameters()

    @classmethod
    def hparams_for_rank(cls, r: int) -> dict[str, Any]:
        """`alpha = 2r`: the scaling `alpha / r` stays 2 at every rank, so ranks differ in capacity, not step size."""
        return {"r": r, "alpha": 2 * r}

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Kaiming-uniform A (peft's default), zero B: the update starts at exactly zero."""
        kaiming_uniform_(self.lora_A, generator)
        nn.init.zeros_(self.lora_B)

    @torch.no_grad()
    def restart(self, layer: AdapterLinear, cycle: int, generator: torch.Generator) -> None:
        """ReLoRA (arXiv 2307.05695): A re-drawn, B zero, so the next cycle adds a fresh rank-r update."""
        self.reset_parameters(generator)

    def add_lora_delta(self, out: Tensor, x: Tensor) -> Tensor:
        """`out + s * B A x` as one fused matmul-add (`addmm`, scaling as its alpha): no extra passes."""
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(out.dtype)
        h = F.linear(x, a).to(out.dtype)  # (..., r)
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=self.scaling)
        return flat.view(out.shape)

    def low_rank_weight(self) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    def low_rank_rows(self, rows: slice) -> Tensor:
        """Rows `rows` of `s B A`; sharded factors are gathered whole (`(out, r)` and `(r, in)`: small)."""
        return (whole(self.lora_B)[rows] @ whole(self.lora_A)) * self.scaling

    @torch.no_grad()
    def row_update(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """`||s (BA)_i||^2` and `<s (BA)_i, W0_i>` from `(out, r)` products: no `out x in` matrix."""
        a, b, s = self.lora_A.detach().float(), self.lora_B.detach().float(), self.scaling
        dot = s * ((weight.detach().float() @ a.t()) * b).sum(1)  # (out,)
        dv_sq = s * s * ((b @ (a @ a.t())) * b).sum(1)  # (out,)
        return dv_sq, dot, None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, dropout={self.dropout_p}"


@register_adapter
class LoRA(LowRankFactors):
    """LoRA with `r`, `alpha`, `dropout` and the rsLoRA scaling option."""

    method = "lora"
    label = "LoRA"
    suggest_roles = frozenset({"low_rank"})
    peft = lora_peft_mapping(use_dora=False)
    low_rank_target = True

    @classmethod
    def factor_hparams(cls, rank: int) -> dict[str, Any]:
        """`alpha = r`: scaling 1, so the update is `B @ A` itself."""
        return {"r": rank, "alpha": float(rank)}

    def forward(self, x: Tensor, base_out: Tensor, layer: AdapterLinear) -> Tensor:
        return self.add_lora_delta(base_out, self.dropout(x))

    def delta_weight(self, weight: Tensor) -> Tensor:
        return self.low_rank_weight().to(weight.dtype)

    def merge_rows(self, weight_rows: Tensor, rows: slice) -> Tensor:
        return weight_rows + self.low_rank_rows(rows).to(weight_rows.dtype)

    @torch.no_grad()
    def update_singular_values(self, weight: Tensor) -> Tensor:
        """`sigma(s B A) = s sigma(R_B R_A^T)` with `B = Q_B R_B`, `A^T = Q_A R_A`: an `r x r` SVD."""
        return lora_singular_values(self.lora_A, self.lora_B, self.scaling)


def lora_singular_values(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """Singular values of `scaling * B @ A` from two thin QRs and an `r x r` SVD."""
    dtype = accumulation_dtype(lora_A.device)
    _, r_b = torch.linalg.qr(lora_B.detach().to(dtype))  # (min(out, r), r)
    _, r_a = torch.linalg.qr(lora_A.detach().to(dtype).t())  # (min(in, r), r)
    return torch.linalg.svdvals(r_b @ r_a.t()) * abs(scaling)
