"""lightning-peft: per-layer hybrid adapters (LoRA, DoRA, MoRA) for PyTorch Lightning."""

from .adapters import ADAPTERS, AdapterLinear, DoRA, LoRA, MoRA, register_adapter
from .callback import AdapterCallback, restore_from_checkpoint
from .diagnostics import UpdateDiagnostics, render_report
from .inject import (
    AdapterStateError,
    adapter_state_dict,
    find_adapters,
    get_plan,
    inject_adapters,
    load_adapters,
    merge_adapters,
    remove_adapters,
    save_adapters,
    unmerge_adapters,
)
from .policy import DepthSelector, LayerPolicy, Plan, PolicyError, PolicyWarning, Rule

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS",
    "AdapterCallback",
    "AdapterLinear",
    "AdapterStateError",
    "DepthSelector",
    "DoRA",
    "LayerPolicy",
    "LoRA",
    "MoRA",
    "Plan",
    "PolicyError",
    "PolicyWarning",
    "Rule",
    "UpdateDiagnostics",
    "__version__",
    "adapter_state_dict",
    "find_adapters",
    "get_plan",
    "inject_adapters",
    "load_adapters",
    "merge_adapters",
    "register_adapter",
    "remove_adapters",
    "render_report",
    "restore_from_checkpoint",
    "save_adapters",
    "unmerge_adapters",
]
