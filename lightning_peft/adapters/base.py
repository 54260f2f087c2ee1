"""The adapter protocol and `AdapterLinear`, the wrapper every method plugs into.

An adapter method is a small `nn.Module` (subclass of `AdapterMethod`) that owns only its
trainable tensors. `AdapterLinear` owns the frozen base layer and one method:

    y = method(x, base(x), layer)            unmerged
    y = base'(x),  W' = method.merge(W0)     merged (zero overhead)

Keeping the adapter tensors in their own child module (`layer.adapter`) apart from
`layer.base` makes key filtering trivial (`.adapter.` in the name) and lets FSDP wrap the
trainable tensors in their own unit.

`AdapterMethod` is the only place that knows a method. Besides its math (`forward`,
`delta_weight`, merge) it answers, through optional hooks with exact defaults, what the
rest of the package needs: the singular values and row terms of its update (diagnostics),
extra named diagnostics, state derived from the base weight (fit start), and its parameter
count (plans). docs/methods.md lists the methods and walks through adding one.
"""

from __future__ import annotations

import functools
import inspect
import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .quantized import check_mergeable, dequantized_linear, dequantized_weight, is_quantized, quantized_layer_types
from .sharded import assign_whole, gather_rows, is_dtensor, local, row_range, whole

try:  # GPT-2 style layers store their weight as (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None  # type: ignore[assignment,misc]

ADAPTERS: dict[str, type[AdapterMethod]] = {}


def register_adapter(cls: type[AdapterMethod]) -> type[AdapterMethod]:
    """Class decorator: make `cls` available to policies under `cls.method`."""
    name = cls.method
    if not name or name != name.lower():
        raise ValueError(f"Adapter method name must be a non-empty lower-case string, got {name!r}")
    if name in ADAPTERS and ADAPTERS[name] is not cls:
        raise ValueError(f"Adapter method {name!r} is already registered by {ADAPTERS[name].__qualname__}")
    ADAPTERS[name] = cls
    return cls


def get_adapter_class(method: str) -> type[AdapterMethod]:
    """Look up a registered method by name; raise a `ValueError` listing valid names."""
    if method not in ADAPTERS:
        raise ValueError(f"Unknown adapter method {method!r}; choose one of {sorted(ADAPTERS)}")
    return ADAPTERS[method]


def hyperparameter_names(cls: type[AdapterMethod]) -> list[str]:
    """The keyword hyper-parameters a method accepts: its `__init__` signature is the schema."""
    params = inspect.signature(cls.__init__).parameters
    return [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY]


def check_hyperparameters(method: str, hparams: dict[str, Any]) -> None:
    """Raise a `ValueError` naming any hyper-parameter `method` does not accept."""
    cls = get_adapter_class(method)
    valid = hyperparameter_names(cls)
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise ValueError(f"Unknown hyper-parameter(s) {unknown} for method {method!r}; valid: {valid}")


def check_rank(r: Any) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"`r` must be a positive integer, got {r!r}")
    return r


def check_dropout(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p < 1.0:
        raise ValueError(f"`dropout` must be a float in [0, 1), got {p!r}")
    return float(p)


@torch.no_grad()
def kaiming_uniform_(param: Tensor, generator: torch.Generator | None = None) -> None:
    """`nn.Linear`'s default init (`a = sqrt(5)`); with `generator`, drawn on the CPU then copied.

    Drawing on the CPU makes a seeded re-draw (merge-and-restart) the same on every device and rank.
    """
    if generator is None:
        nn.init.kaiming_uniform_(param, a=math.sqrt(5))
        return
    value = torch.empty(param.shape, dtype=torch.float32)
    nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
    assign_whole(param, value)  # a sharded parameter takes its own rows of the same draw


def adapter_param_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapter tensors are fp32 masters for half-precision bases, else the base dtype (fp32/fp64)."""
    return base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 for small exact reductions (diagnostics), except where the device has none (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass(frozen=True)
class PeftMapping:
    """How a method is written as an HF peft adapter and read back; `interop/` asks, it names no method.

    Attributes:
        peft_type: peft's tuner (`"LORA"`); one loaded `PeftModel` holds one tuner type.
        tensors: our state-dict key -> peft's key suffix (`{"lora_A": "lora_A.weight"}`).
        hparams: our hyper-parameter -> `(config field, peft's default when the field is absent)`,
            in the order adapter names list them (`{"alpha": ("lora_alpha", 8)}`).
        patterns: hyper-parameters a config varies per module, -> their pattern field
            (`{"r": "rank_pattern"}`); every other hyper-parameter is one value per config.
        select: config fields that identify the method among those of its tuner, written as is
            and matched on import (`{"use_dora": True}`; an absent field reads as `False`).
        fixed: other fields written as is (`{"bias": "none"}`).
        unsupported: fields whose non-default value changes the math in ways the method does not
            reproduce (field -> its default); importing a config that sets one is refused.
        base_changing_inits: `(field, values)`: initialisations that rewrite the base weights
            (the adapter is then relative to a modified base), refused on import.
    """

    peft_type: str
    tensors: Mapping[str, str]
    hparams: Mapping[str, tuple[str, Any]]
    patterns: Mapping[str, str] = field(default_factory=dict)
    select: Mapping[str, Any] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    unsupported: Mapping[str, Any] = field(default_factory=dict)
    base_changing_inits: tuple[str, tuple[str, ...]] | None = None

    @property
    def prefix(self) -> str:
        """peft's attribute prefix of this tuner (`lora_`): an adapter name inside it makes peft warn."""
        return min(self.tensors.values()).split("_")[0] + "_"


def peft_methods() -> list[type[AdapterMethod]]:
    """The registered methods that declare a peft mapping, in registration order."""
    return [cls for cls in ADAPTERS.values() if cls.peft is not None]


def low_rank_target() -> type[AdapterMethod]:
    """The one registered method that declares itself the plain `B @ A` target (export's `svd` route)."""
    targets = [cls for cls in ADAPTERS.values() if cls.low_rank_target]
    if len(targets) != 1:
        raise ValueError(f"exactly one registered method must set low_rank_target = True, got {targets}")
    return targets[0]


SUGGEST_ROLES = ("low_rank", "high_rank", "magnitude")


def method_for_role(role: str) -> str:
    """The first registered method that offers `role` to the heuristic `suggest` (`AdapterMethod.suggest_roles`)."""
    if role not in SUGGEST_ROLES:
        raise ValueError(f"unknown suggest role {role!r}; roles: {list(SUGGEST_ROLES)}")
    for name, cls in ADAPTERS.items():
        if role in cls.suggest_roles:
            return name
    raise ValueError(f"no registered method declares the suggest role {role!r}")


def method_label(method: str) -> str:
    """A registered method's display label (`LoRA`); other names (`full`, `none`) as they are."""
    return ADAPTERS[method].label if method in ADAPTERS else method


class AdapterMethod(nn.Module, ABC):
    """One adapter method's trainable tensors and math.

    Subclasses set `method` (the registry/policy name), take `in_features`, `out_features`
    positionally and their hyper-parameters keyword-only (the signature is the policy schema),
    and implement `forward` and `delta_weight`. Every other hook has an exact default built
    on `delta_weight`; override one only to make it cheaper or to add state.

    Hooks that read the base weight take it as `weight`: the unmerged `W0` in `(out, in)`
    layout and in the adapter's dtype (`AdapterLinear.unmerged_base_weight()`).
    """

    method: ClassVar[str] = ""
    # Optimizer role of each parameter, by attribute name (LoRA: `{"lora_A": "A", "lora_B": "B"}`).
    # Per-rule optimizer settings use it without knowing the method (LoRA+'s rate for `B`).
    parameter_roles: ClassVar[dict[str, str]] = {}
    #: Names of the scalars `extra_diagnostics` returns (the diagnostics table has a column for each).
    diagnostic_names: ClassVar[tuple[str, ...]] = ()
    #: Display label in reports and figures (`LoRA`); defaults to the upper-cased method name.
    label: ClassVar[str] = ""
    #: How HF peft holds this method, or `None`: export then names the method as unsupported by peft.
    peft: ClassVar[PeftMapping | None] = None
    #: True for the one method whose update is exactly `B @ A` under `factor_hparams(r)`, with the
    #: factors in the parameters whose roles are `A` and `B`: export's `svd` route converts to it.
    low_rank_target: ClassVar[bool] = False
    #: What the heuristic `suggest` may pick this method for (`SUGGEST_ROLES`): `low_rank` (the plain,
    #: cheap default and the pilot), `high_rank` (rank-saturated modules), `magnitude` (updates led by
    #: row-norm changes). Empty: the heuristic never picks it (the search still may).
    suggest_roles: ClassVar[frozenset[str]] = frozenset()
    #: The learning-rate scale tools write for this method's rules when nothing else is known.
    default_lr_scale: ClassVar[float] = 1.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("label") and cls.method:
            cls.label = cls.method.upper()

    @classmethod
    def factor_hparams(cls, rank: int) -> dict[str, Any]:
        """Hyper-parameters under which this method's update is exactly `B @ A` (low-rank targets only)."""
        raise NotImplementedError(f"{cls.__name__} is not a low-rank target")

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features

    @classmethod
    def count_parameters(cls, in_features: int, out_features: int, **hparams: Any) -> int:
        """Trainable parameters for a layer of this shape: a meta-device instance, so no memory."""
        with torch.device("meta"):
            return cls(in_features, out_features, **hparams).num_trainable_parameters()

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # -- sizing for a parameter budget (searches, `suggest`) -------------------------------

    @classmethod
    def hparams_for_rank(cls, r: int) -> dict[str, Any] | None:
        """The method's hyper-parameters at rank `r` when a tool sizes it; `None`: it has no rank.

        Default: `{"r": r}` for a method that takes `r`. Methods with a scale tied to the rank
        override this (LoRA and DoRA keep `alpha = 2r`, so every rank takes the same step size).
        """
        return {"r": r} if "r" in hyperparameter_names(cls) else None

    @classmethod
    def rank_for_budget(cls, shapes: Sequence[tuple[int, int]], budget: int) -> tuple[dict[str, Any], int] | None:
        """The largest rank whose adapters on every `(in, out)` shape fit `budget`: `(hparams, parameters)`.

        One rank for all shapes (one policy rule). The rank is also capped where an adapter would
        outgrow its layer (then `full` is cheaper, and the policy warns). `None` when the method
        has no rank or even rank 1 does not fit. Parameter counts grow with the rank: bisection.
        """
        if cls.hparams_for_rank(1) is None or not shapes:
            return None
        counts = Counter(shapes)

        def cost(r: int) -> int | None:
            each = {s: _count_at_rank(cls, s[0], s[1], r) for s in counts}
            if any(n > s[0] * s[1] for s, n in each.items()):
                return None
            total = sum(n * counts[s] for s, n in each.items())
            return total if total <= budget else None

        if cost(1) is None:
            return None
        lo, hi = 1, max(min(s) for s in counts)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost(mid) is not None else (lo, mid - 1)
        return cls.hparams_for_rank(lo), cost(lo)

    # -- math ----------------------------------------------------------------------------

    @abstractmethod
    def forward(self, x: Tensor, base_out: Tensor, layer: AdapterLinear) -> Tensor:
        """Return the layer output given the input and the base layer's output (bias included)."""

    @abstractmethod
    def delta_weight(self, weight: Tensor) -> Tensor:
        """Dense `(out, in)` update so that `W_eff = weight + delta_weight(weight)`."""

    def merge_weight(self, weight: Tensor) -> Tensor:
        """Return the merged weight; additive methods need nothing more."""
        return weight + self.delta_weight(weight)

    def unmerge_weight(self, merged: Tensor) -> Tensor:
        """Invert `merge_weight`; additive methods' delta does not depend on W0."""
        return merged - self.delta_weight(merged)

    def merge_rows(self, weight_rows: Tensor, rows: slice) -> Tensor:
        """Rows `rows` of `merge_weight(W0)` from those rows of W0 alone: how a sharded (FSDP2) base
        is merged where its shards are. The parameters may be sharded `DTensor`s: gather only the
        small factors (`sharded.whole`). A method without this rule restarts only unsharded.
        """
        raise NotImplementedError(f"{type(self).__name__} has no row-wise merge rule for sharded bases")

    @classmethod
    def can_merge_rows(cls) -> bool:
        """Whether the method defines `merge_rows` (merge-and-restart under FSDP2 needs it)."""
        return cls.merge_rows is not AdapterMethod.merge_rows

    # -- lifecycle -----------------------------------------------------------------------

    def init_from_base(self, layer: AdapterLinear) -> None:
        """Hook run once the base layer is attached (and not on `meta`): derive state from W0 here."""

    def refresh_from_base(self, layer: AdapterLinear) -> bool:
        """Hook run at fit start: re-derive W0-based state if W0 changed after injection.

        Returns whether anything changed. State that was trained or restored must be kept.
        """
        return False

    # -- merge and restart (ReLoRA, ReMoRA; docs/methods.md) ---------------------------

    def restart(self, layer: AdapterLinear, cycle: int, generator: torch.Generator) -> None:
        """Start cycle `cycle` (1 for the first restart) after `layer` folded this update into its base.

        Re-initialise so that the update is zero again and the layer's function is unchanged at
        this instant (LoRA: A re-drawn, B zero). Random draws must come from `generator` (a CPU
        generator seeded per layer and cycle), so every rank and a resumed run draw the same.
        A method that keeps this default cannot train under `MergeRestart`.
        """
        raise NotImplementedError(f"{type(self).__name__} has no re-initialisation rule for merge-and-restart")

    @classmethod
    def can_restart(cls) -> bool:
        """Whether the method defines `restart` (checked before training starts)."""
        return cls.restart is not AdapterMethod.restart

    def set_cycle(self, cycle: int) -> None:
        """Put structure that changes between cycles in the state of cycle `cycle` (0: as built).

        Called when a checkpoint of a restarted run is loaded; MoRA switches its sharing type here.
        """

    # -- diagnostics ---------------------------------------------------------------------

    @torch.no_grad()
    def update_singular_values(self, weight: Tensor) -> Tensor:
        """Singular values of the update `W_eff - W0` (any order; zeros may be left out).

        Default: `svdvals` of the dense update in fp32. Override with an exact cheaper route.
        """
        return torch.linalg.svdvals(self.delta_weight(weight).detach().float())

    @torch.no_grad()
    def row_update(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per output row `i`: `(||dV_i||^2, <dV_i, W0_i>, g)` where the effective row is
        `W0_i + dV_i` (`g` is None) or, for a method that rescales rows, `g_i (W0_i + dV_i) / ||W0_i + dV_i||`.

        Default: `dV = delta_weight(W0)` from the dense update.
        """
        dw = self.delta_weight(weight).detach().float()
        return (dw * dw).sum(1), (dw * weight.detach().float()).sum(1), None

    def extra_diagnostics(self, weight: Tensor, row_norms: Tensor) -> dict[str, Tensor]:
        """Method-specific 0-d diagnostics, keyed by `diagnostic_names` (`row_norms`: `||W0_i||`)."""
        return {}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


@functools.lru_cache(maxsize=4096)
def _count_at_rank(cls: type[AdapterMethod], in_features: int, out_features: int, r: int) -> int:
    """`count_parameters` at `hparams_for_rank(r)`, remembered: a budget search asks for the same sizes often."""
    return cls.count_parameters(in_features, out_features, **cls.hparams_for_rank(r))


def diagnostic_names() -> tuple[str, ...]:
    """Every registered method's extra diagnostic names, in registration order, without repeats."""
    names: dict[str, None] = {}
    for cls in ADAPTERS.values():
        names.update(dict.fromkeys(cls.diagnostic_names))
    return tuple(names)


def supported_layer_types() -> tuple[type, ...]:
    """`nn.Linear`, GPT-2's `Conv1D`, and bitsandbytes' 4-/8-bit linears once bitsandbytes is imported."""
    plain = (nn.Linear,) if Conv1D is None else (nn.Linear, Conv1D)
    return plain + quantized_layer_types()


def is_supported_layer(module: nn.Module) -> bool:
    return type(module) in supported_layer_types()


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """`(in_features, out_features)` of a supported base layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if Conv1D is not None and isinstance(module, Conv1D):
        in_f, out_f = module.weight.shape
        return in_f, out_f
    raise TypeError(f"Unsupported module type {type(module).__name__}")


class AdapterLinear(nn.Module):
    """A frozen `nn.Linear` (or GPT-2 `Conv1D`) plus one adapter method.

    Args:
        base: the layer to adapt; its parameters are frozen.
        adapter: an `AdapterMethod` built for the base layer's shape.
    """

    def __init__(self, base: nn.Module, adapter: AdapterMethod) -> None:
        super().__init__()
        if not is_supported_layer(base):
            names = [t.__name__ for t in supported_layer_types()]
            raise ValueError(f"Unsupported module type {type(base).__name__}; adapters wrap {names}")
        in_f, out_f = layer_shape(base)
        if (adapter.in_features, adapter.out_features) != (in_f, out_f):
            raise ValueError(
                f"Adapter built for ({adapter.in_features}->{adapter.out_features}) cannot wrap a {in_f}->{out_f} layer"
            )
        self.base = base
        self.base.requires_grad_(False)
        self.fan_in_fan_out = not isinstance(base, nn.Linear)  # Conv1D stores (in, out)
        weight = base.weight
        self.adapter = adapter.to(device=weight.device, dtype=adapter_param_dtype(weight.dtype))
        self.merged = False
        self.restarts = 0  # merge-and-restart cycles folded into the base weight (`MergeRestart`)
        self.origin_weight: Tensor | None = None  # W0 before any restart, on the CPU (cumulative diagnostics)
        if weight.device.type != "meta":
            self.adapter.init_from_base(self)

    @property
    def in_features(self) -> int:
        return self.adapter.in_features

    @property
    def out_features(self) -> int:
        return self.adapter.out_features

    @property
    def method(self) -> str:
        return self.adapter.method

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    @property
    def quantized(self) -> bool:
        """Whether the base is a bitsandbytes 4-/8-bit layer (QLoRA; `adapters/quantized.py`)."""
        return is_quantized(self.base)

    def base_weight(self) -> Tensor:
        """The base weight in `(out, in)` layout: a view (Conv1D transposed), or for a quantized base a new
        dense tensor of the dequantized weight, which every method and diagnostic reads as `W0`."""
        if self.quantized:
            return dequantized_weight(self.base)
        w = self.base.weight
        return w.t() if self.fan_in_fan_out else w

    def check_mergeable(self, name: str = "") -> None:
        """Refuse merging into a quantized base (raises `QuantizationError` naming `name`)."""
        check_mergeable(self.base, name or f"{self.in_features}->{self.out_features} {self.method} layer")

    @torch.no_grad()
    def dequantize_base(self, dtype: torch.dtype | None = None) -> None:
        """Replace a quantized base by a plain `nn.Linear` holding its dequantized weight (a merged export)."""
        if self.quantized:
            self.base = dequantized_linear(self.base, dtype)

    def forward(self, x: Tensor) -> Tensor:
        base_out = self.base(x)
        if self.merged:
            return base_out
        return self.adapter(x, base_out, self)

    @torch.no_grad()
    def unmerged_base_weight(self) -> Tensor:
        """`W0` in `(out, in)` layout and the adapter's dtype, whether or not the layer is merged."""
        w0 = self.base_weight().detach().to(self.adapter_dtype)
        return self.adapter.unmerge_weight(w0) if self.merged else w0

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """Dense `(out, in)` effective update `W_eff - W0` (fp32 for half-precision bases)."""
        return self.adapter.delta_weight(self.unmerged_base_weight())

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype W0 is read in: fp32 for half-precision and quantized bases (their stored dtype is an integer)."""
        return adapter_param_dtype(self.base.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight; a second call is a no-op."""
        if self.merged:
            return
        self.check_mergeable()
        w = self.base_weight()
        merged = self.adapter.merge_weight(w.to(self.adapter_dtype))
        if not torch.isfinite(merged).all():
            raise ValueError(f"Merging {self.method} produced non-finite weights; the layer was left unmerged")
        w.copy_(merged.to(w.dtype))
        self.merged = True

    def base_weight_rows(self) -> tuple[Tensor, slice]:
        """The rows of the `(out, in)` base weight this process holds, and which rows they are.

        All rows unless FSDP2 shards them: then this rank's own block, with no communication.
        A base sharded another way (a GPT-2 `Conv1D` stores `(in, out)`) is gathered whole.
        """
        w = self.base_weight()
        rows = row_range(w)
        if rows is None:
            return whole(w), slice(0, w.shape[0])
        return local(w), rows

    def gather_rows(self, values: Tensor, rows: slice) -> Tensor:
        """The whole `(out,)` vector from each rank's `values` for its `rows` (a small all-gather when sharded)."""
        return gather_rows(values, rows, self.base_weight())

    @torch.no_grad()
    def restart_weight(self) -> Tensor:
        """The base weight with this cycle's update folded in, in the base dtype (checked finite).

        Under FSDP2 only the rows this rank holds (`base_weight_rows`), merged by the method's
        `merge_rows`; unsharded the whole weight, by `merge_weight`.
        """
        if self.merged:
            raise ValueError(f"{self.method} layer is merged; merge-and-restart needs unmerged adapters")
        self.check_mergeable()
        w = self.base_weight()
        if is_dtensor(w):
            rows_w, rows = self.base_weight_rows()
            merged = self.adapter.merge_rows(rows_w.to(self.adapter_dtype), rows).to(w.dtype)
        else:
            merged = self.adapter.merge_weight(w.to(self.adapter_dtype)).to(w.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError(f"Merging {self.method} produced non-finite weights")
        return merged

    @torch.no_grad()
    def merge_and_restart(self, cycle: int, generator: torch.Generator, merged: Tensor | None = None) -> None:
        """Fold the update into the base weight and start cycle `cycle` from a zero update (ReLoRA)."""
        merged = self.restart_weight() if merged is None else merged
        self._write_base(merged)
        self.adapter.restart(self, cycle, generator)
        self.restarts = cycle

    def _write_base(self, merged: Tensor) -> None:
        """Write `restart_weight()`'s result: this rank's rows in place, or a gathered weight back to its shards."""
        w = self.base_weight()
        if not is_dtensor(w):
            w.copy_(merged)
        elif row_range(w) is not None:
            local(w).copy_(merged)
        else:
            assign_whole(self.base.weight, merged.t() if self.fan_in_fan_out else merged)

    def set_restarts(self, cycle: int) -> None:
        """Mark the base weight as holding `cycle` merged cycles (a loaded checkpoint's state)."""
        self.restarts = cycle
        self.adapter.set_cycle(cycle)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight (exact up to float rounding); no-op when not merged."""
        if not self.merged:
            return
        w = self.base_weight()
        w.copy_(self.adapter.unmerge_weight(w.to(self.adapter_dtype)).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"method={self.method}, merged={self.merged}"
