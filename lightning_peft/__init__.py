"""lightning-peft: per-layer hybrid adapters (LoRA, DoRA, MoRA) for PyTorch Lightning."""

from .adapters import ADAPTERS, AdapterLinear, DoRA, LoRA, MoRA

__version__ = "0.1.0"

__all__ = ["ADAPTERS", "AdapterLinear", "DoRA", "LoRA", "MoRA", "__version__"]
