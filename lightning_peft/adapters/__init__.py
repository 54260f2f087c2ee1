"""Adapter methods. A new method is one file here plus its import line below."""

from .base import (
    ADAPTERS,
    AdapterLinear,
    AdapterMethod,
    PeftMapping,
    check_hyperparameters,
    diagnostic_names,
    get_adapter_class,
    hyperparameter_names,
    is_supported_layer,
    layer_shape,
    low_rank_target,
    method_label,
    peft_methods,
    register_adapter,
)
from .dora import DoRA
from .hira import HiRA
from .lora import LoRA
from .mora import MoRA, mora_rank

__all__ = [
    "ADAPTERS",
    "AdapterLinear",
    "AdapterMethod",
    "DoRA",
    "HiRA",
    "LoRA",
    "MoRA",
    "PeftMapping",
    "check_hyperparameters",
    "diagnostic_names",
    "get_adapter_class",
    "hyperparameter_names",
    "is_supported_layer",
    "layer_shape",
    "low_rank_target",
    "method_label",
    "mora_rank",
    "peft_methods",
    "register_adapter",
]
