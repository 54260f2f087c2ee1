"""HiRA: Hadamard high-rank adaptation (Huang et al., ICLR 2025, OpenReview TwJrTz9cRS).

    y = W0 x + b + (W0 ⊙ (B A)) dropout(x),   i.e.  W' = W0 ⊙ (1 + B A)

The update `W0 ⊙ BA` is the base weight modulated element-wise by a rank-`r` product, so
its rank is not bounded by `r` (up to `r * rank(W0)`) at LoRA's parameter count. There is
no scaling factor. A is Kaiming-uniform and B is zero, so the layer equals its base at
initialisation; dropout only touches the update path. This is HF peft's `HiraModel`
(peft >= 0.20) for `nn.Linear` and GPT-2 `Conv1D`, matched to 1e-5 in the tests.

Everything else comes from `AdapterMethod`'s defaults: the diagnostics take the exact
dense route (`svdvals` of `W0 ⊙ sBA`), the parameter count is the instance's. Merging
multiplies W0 by `1 + BA`; unmerging divides by it, exact to rounding, except where an
entry of `1 + BA` is small: then the pre-merge weight is kept to restore it exactly.
docs/methods.md walks through this file as the example of adding a method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdapterMethod, PeftMapping, check_dropout, check_rank, kaiming_uniform_, register_adapter
from .sharded import whole

if TYPE_CHECKING:
    from .base import AdapterLinear

# Dividing by `1 + BA` amplifies rounding by at most 1 / |1 + BA|; below this, keep a copy instead.
MIN_UNMERGE_FACTOR = 0.5


@register_adapter
class HiRA(AdapterMethod):
    """HiRA with rank `r` (of the Hadamard factor `B A`) and `dropout`."""

    method = "hira"
    label = "HiRA"
    # peft's HiRA tuner (`HiraConfig`); peft 0.21 does not apply its rank_pattern, so one config per rank
    peft = PeftMapping(
        peft_type="HIRA",
        tensors={"hira_A": "hira_A", "hira_B": "hira_B"},
        hparams={"r": ("r", 8), "dropout": ("hira_dropout", 0.0)},
        fixed={"init_weights": True, "rank_pattern": {}},
    )

    def __init__(self, in_features: int, out_features: int, *, r: int = 8, dropout: float = 0.0) -> None:
        super().__init__(in_features, out_features)
        self.r = check_rank(r)
        self.dropout_p = check_dropout(dropout)
        self.dropout = nn.Dropout(self.dropout_p) if self.dropout_p > 0 else nn.Identity()
        self.hira_A = nn.Parameter(torch.empty(r, in_features))  # (r, in)
        self.hira_B = nn.Parameter(torch.empty(out_features, r))  # (out, r)
        self._premerge: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Kaiming-uniform A and zero B, as peft's default `init_weights=True`."""
        kaiming_uniform_(self.hira_A, generator)
        nn.init.zeros_(self.hira_B)

    @torch.no_grad()
    def restart(self, layer: AdapterLinear, cycle: int, generator: torch.Generator) -> None:
        """A re-drawn, B zero: the next cycle modulates the merged weight `W0 ⊙ (1 + B A)`."""
        self._premerge = None
        self.reset_parameters(generator)

    def hadamard_factor(self) -> Tensor:
        """`B A`, `(out, in)`, in the adapter's dtype."""
        return self.hira_B @ self.hira_A

    def forward(self, x: Tensor, base_out: Tensor, layer: AdapterLinear) -> Tensor:
        w0 = layer.base_weight()
        update = (w0.to(self.hira_A.dtype) * self.hadamard_factor()).to(x.dtype)  # (out, in)
        return base_out + F.linear(self.dropout(x), update).to(base_out.dtype)

    def delta_weight(self, weight: Tensor) -> Tensor:
        return weight * self.hadamard_factor().to(weight.dtype)

    def merge_weight(self, weight: Tensor) -> Tensor:
        factor = 1 + self.hadamard_factor().to(weight.dtype)
        small = bool((factor.abs() < MIN_UNMERGE_FACTOR).any())
        self._premerge = weight.detach().clone() if small else None
        return weight * factor

    def merge_rows(self, weight_rows: Tensor, rows: slice) -> Tensor:
        """`W0_i ⊙ (1 + (B A)_i)` for this rank's rows, from `B`'s rows and the whole (small) `A`."""
        factor = whole(self.hira_B)[rows] @ whole(self.hira_A)
        return weight_rows * (1 + factor.to(weight_rows.dtype))

    def unmerge_weight(self, merged: Tensor) -> Tensor:
        if self._premerge is not None:
            return self._premerge.to(device=merged.device, dtype=merged.dtype)
        return merged / (1 + self.hadamard_factor().to(merged.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, dropout={self.dropout_p}"
