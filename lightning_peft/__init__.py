"""lightning-peft: per-layer hybrid adapters (LoRA, DoRA, MoRA) for PyTorch Lightning."""

from lightning_peft.adapters import ADAPTERS, AdapterLinear, DoRA, LoRA, MoRA, register_adapter
from lightning_peft.callbacks.adapter import AdapterCallback, restore_from_checkpoint
from lightning_peft.callbacks.checkpoint_io import AtomicCheckpointIO
from lightning_peft.callbacks.restart import (
    JaggedCosineLR,
    MergeRestart,
    RestartError,
    reset_optimizer_state,
    restart_adapters,
)
from lightning_peft.core.inject import (
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
from lightning_peft.diagnostics import UpdateDiagnostics, render_report
from lightning_peft.interop.export import (
    ExportError,
    export_checkpoint,
    export_merged,
    export_peft,
    import_peft,
    load_peft_export,
    peft_policy,
)
from lightning_peft.interop.peft_format import PeftFormatError
from lightning_peft.policy import DepthSelector, LayerPolicy, Plan, PolicyError, PolicyWarning, Rule

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS",
    "AdapterCallback",
    "AdapterLinear",
    "AdapterStateError",
    "AtomicCheckpointIO",
    "DepthSelector",
    "DoRA",
    "ExportError",
    "LayerPolicy",
    "JaggedCosineLR",
    "LoRA",
    "MergeRestart",
    "MoRA",
    "PeftFormatError",
    "Plan",
    "PolicyError",
    "PolicyWarning",
    "RestartError",
    "Rule",
    "UpdateDiagnostics",
    "__version__",
    "adapter_state_dict",
    "export_checkpoint",
    "export_merged",
    "export_peft",
    "find_adapters",
    "get_plan",
    "import_peft",
    "inject_adapters",
    "load_adapters",
    "load_peft_export",
    "merge_adapters",
    "peft_policy",
    "register_adapter",
    "remove_adapters",
    "render_report",
    "reset_optimizer_state",
    "restart_adapters",
    "restore_from_checkpoint",
    "save_adapters",
    "unmerge_adapters",
]
