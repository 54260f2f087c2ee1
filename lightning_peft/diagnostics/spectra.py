"""Per-module probes: the update of one adapted (or fully trained) module, its spectrum and drift.

Every number comes through the adapter's own hooks (`AdapterMethod.update_singular_values`,
`row_update`, `extra_diagnostics`; docs/methods.md lists each method's route). Their
defaults are exact on the dense update (`svdvals` in fp32), so a new method is measured
correctly without code here; methods with a cheaper exact route (LoRA: an `r x r` problem,
MoRA: `R x R` problems) override them, and the tests check every route against
`torch.linalg.svdvals` of the dense update. `full` modules use the dense route.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_peft.adapters.base import AdapterLinear

from .metrics import (
    CUMULATIVE_METRICS,
    DRIFT_METRICS,
    SPECTRAL_METRICS,
    acc_dtype,
    cumulative_metrics,
    magnitude_drift,
    row_direction_change,
    spectrum_metrics,
)

OnError = Callable[[str, BaseException], None]


def dense_singular_values(dw: Tensor) -> Tensor:
    """`torch.linalg.svdvals` in fp32 (a 1-D update is a diagonal map: its values are `|dw|`)."""
    dw = dw.detach().float()
    return dw.abs() if dw.ndim == 1 else torch.linalg.svdvals(dw)


class UpdateProbe:
    """Measures one tracked module: the update, its spectrum and its row drift.

    `W0` statistics (`||W0||_F`, `sigma_1(W0)`, row norms) are computed once and recomputed
    only when the frozen weight is merged, unmerged, replaced or moved. `full` modules keep a
    copy of their starting weight; adapters read `W0` from their frozen base (no copy).

    Args:
        name: normalised module name.
        block: block depth, or `None` outside the blocks.
        kind: name inside the block.
        method: the adapter method's name, or `full`.
        module: the `AdapterLinear`, or the module owning a trained `weight` (`full`).
        transpose: the `full` weight is stored `(in, out)` (GPT-2 `Conv1D`).
        snapshot: copy a `full` module's starting weight (off for a probe that only names it).
    """

    def __init__(
        self,
        name: str,
        block: int | None,
        kind: str,
        method: str,
        module: nn.Module,
        transpose: bool = False,
        snapshot: bool = True,
    ) -> None:
        self.name, self.block, self.kind, self.method = name, block, kind, method
        self.module = module
        self.transpose = transpose
        self.is_adapter = isinstance(module, AdapterLinear)
        self._start: Tensor | None = None
        if not self.is_adapter and snapshot:
            self._start = module.weight.detach().clone()  # only `full` modules are copied
        self._w0_key: tuple = ()
        self._w0_stats: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def _stored(self) -> Tensor:
        if self.is_adapter:
            return self.module.base.weight
        if self._start is None:
            raise RuntimeError(f"UpdateProbe {self.name!r} was built with snapshot=False and cannot measure")
        return self._start

    @property
    def size(self) -> int:
        if self.is_adapter:  # a quantized base stores its weight packed: its shape is not the layer's
            return max(self.module.in_features, self.module.out_features)
        return max(self._stored.shape)

    @property
    def device(self) -> torch.device:
        return self._stored.device

    def parameters(self) -> list[nn.Parameter]:
        """The trained tensors of this module (for gradient norms)."""
        owner = self.module.adapter if self.is_adapter else self.module
        return [p for p in owner.parameters(recurse=self.is_adapter) if p.requires_grad]

    def _current(self) -> Tensor:
        w = self.module.weight.detach()
        return w.t() if self.transpose and w.ndim == 2 else w

    def _w0(self) -> Tensor:
        """`W0` as `(out, in)` (or `(n,)` for a 1-D `full` weight); the adapter's dtype for adapters."""
        if not self.is_adapter:
            assert self._start is not None
            return self._start.t() if self.transpose and self._start.ndim == 2 else self._start
        return self.module.unmerged_base_weight()

    def w0_stats(self, w0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`(||W0||_F, sigma_1(W0), row norms)`, computed once per stored weight, dtype, device and merge state.

        The key holds the stored tensor's identity (a weak reference), never its address or
        version counter: W0 is frozen, and it only changes by merging or by being replaced.
        """
        src = self._stored
        key = (src.dtype, src.device, self.is_adapter and self.module.merged)
        if self._w0_stats is None or self._w0_key[1:] != key or self._w0_key[0]() is not src:
            w = w0.float()
            if w.ndim == 1:  # a diagonal map (norm weights)
                stats = (w.norm(), w.abs().max(), w.abs())
            else:
                stats = (w.norm(), torch.linalg.matrix_norm(w, ord=2), w.norm(dim=1))
            dtype = acc_dtype(w.device)
            self._w0_stats = tuple(t.to(dtype) for t in stats)  # type: ignore[assignment]
            self._w0_key = (weakref.ref(src), *key)
        assert self._w0_stats is not None
        return self._w0_stats

    def singular_values(self) -> Tensor:
        """Singular values of this module's update (the adapter's own route; dense for `full`)."""
        if self.is_adapter:
            return self.module.adapter.update_singular_values(self._w0())
        return dense_singular_values(self.delta())

    def delta(self) -> Tensor:
        """Dense fp32 update `W_eff - W0`."""
        if self.is_adapter:
            return self.module.delta_weight().float()
        return self._current().float() - self._w0().float()

    @property
    def extra_names(self) -> tuple[str, ...]:
        return type(self.module.adapter).diagnostic_names if self.is_adapter else ()

    @torch.no_grad()
    def measure(self, on_error: OnError | None = None) -> dict[str, Tensor]:
        """Every metric of this module as 0-d tensors (NaN where a stage failed).

        Args:
            on_error: called with `(stage, exception)` when a stage fails; without it the
                exception propagates.
        """
        nan = torch.tensor(math.nan, dtype=torch.float64)
        out: dict[str, Tensor] = {}
        stages = [("spectrum", self._spectrum, SPECTRAL_METRICS), ("drift", self._drift, DRIFT_METRICS)]
        if self.extra_names:
            stages.append((f"{self.method} diagnostics", self._extras, self.extra_names))
        if self.is_adapter and self.module.origin_weight is not None:
            stages.append(("cumulative update", self._cumulative, CUMULATIVE_METRICS))
        for stage, fn, names in stages:
            try:
                out.update(fn())
            except Exception as err:  # diagnostics must never stop training
                if on_error is None:
                    raise
                on_error(f"{stage} ({', '.join(names)})", err)
                out.update(dict.fromkeys(names, nan))
        if "fro_norm" in out and "mag_drift" in out:  # a rounding-level update is zero everywhere
            zero = out["fro_norm"] == 0
            for name in (*DRIFT_METRICS, *self.extra_names):
                if name in out:
                    out[name] = torch.where(zero.to(out[name].device), torch.zeros_like(out[name]), out[name])
        return out

    def _spectrum(self) -> dict[str, Tensor]:
        fro0, sigma0, _rows = self.w0_stats(self._w0())
        return spectrum_metrics(self.singular_values(), fro0, sigma0, self.size)

    def _drift(self) -> dict[str, Tensor]:
        w0 = self._w0()
        _, _, n0 = self.w0_stats(w0)
        if self.is_adapter:
            dw_sq, dot, magnitude = self.module.adapter.row_update(w0)
        else:
            dw = self.delta()
            w0f = w0.float()
            dw_sq, dot = (dw.square(), dw * w0f) if dw.ndim == 1 else ((dw * dw).sum(1), (dw * w0f).sum(1))
            magnitude = None
        change = row_direction_change(dw_sq, dot, n0)  # (out,)
        if magnitude is not None:  # W'_i = g_i V_i / ||V_i||: V's direction, flipped where g_i < 0
            m_t = magnitude.to(change.dtype)
            change = torch.where(m_t > 0, change, torch.where(m_t < 0, 2 - change, torch.ones_like(change)))
        else:
            m_t = (n0.square() + 2 * dot.to(n0.dtype) + dw_sq.to(n0.dtype)).clamp_min(0).sqrt()
        return {"mag_drift": magnitude_drift(m_t, n0), "dir_drift": change.mean()}

    def _cumulative(self) -> dict[str, Tensor]:
        """The update over every merge-and-restart cycle, `W_eff - W_orig`: dense (restarts make it high-rank)."""
        origin = self.module.origin_weight.to(self.device, torch.float32)
        total = self.module.unmerged_base_weight().float() + self.delta() - origin
        s = torch.linalg.svdvals(total).to(acc_dtype(self.device))
        return cumulative_metrics(s, origin.norm().to(s.dtype), self.size, self.module.restarts)

    def _extras(self) -> dict[str, Tensor]:
        w0 = self._w0()
        _, _, n0 = self.w0_stats(w0)
        values = self.module.adapter.extra_diagnostics(w0, n0)
        missing = set(self.extra_names) - set(values)
        if missing:
            raise ValueError(f"extra_diagnostics of {self.method!r} did not return {sorted(missing)}")
        return {name: values[name] for name in self.extra_names}
