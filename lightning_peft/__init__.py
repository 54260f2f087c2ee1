"""lightning-peft: per-layer hybrid adapters (LoRA, DoRA, MoRA) for PyTorch Lightning."""

from .adapters import ADAPTERS, AdapterLinear, DoRA, LoRA, MoRA, register_adapter
from .callback import AdapterCallback, restore_from_checkpoint
from .checkpoint_io import AtomicCheckpointIO
from .diagnostics import UpdateDiagnostics, render_report
from .export import (
    ExportError,
    export_checkpoint,
    export_merged,
    export_peft,
    import_peft,
    load_peft_export,
    peft_policy,
)
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
from .peft_format import PeftFormatError
from .policy import DepthSelector, LayerPolicy, Plan, PolicyError, PolicyWarning, Rule
from .restart import JaggedCosineLR, MergeRestart, RestartError, reset_optimizer_state, restart_adapters

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
