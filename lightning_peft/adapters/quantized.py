"""Quantized base layers (bitsandbytes 4-bit `Linear4bit`, 8-bit `Linear8bitLt`): QLoRA, arXiv 2305.14314.

An `AdapterLinear` can wrap such a layer: its forward runs the quantized matmul, and every
method that reads `W0` (DoRA's row norms, HiRA's `W0 ⊙ BA`, the diagnostics) gets the
dequantized weight from `AdapterLinear.base_weight()`, which calls `dequantized_weight` here.
What cannot be done on a quantized base is to write a merged weight back into it: a merge is
refused (`check_mergeable`), and a merged export first swaps the base for a plain `nn.Linear`
holding the dequantized weight (`dequantized_linear`).

bitsandbytes is an optional extra; nothing here imports it unless the model already holds one of
its layers (then it is in `sys.modules`) or a quantized load is asked for (`require_bitsandbytes`).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.errors import InputError

QUANT_EXTRA = 'pip install -e ".[quant]"'


class QuantizationError(InputError):
    """A quantized base cannot do what was asked (or bitsandbytes is missing); the message says why."""


def require_bitsandbytes(option: str) -> Any:
    """The `bitsandbytes` module, or a one-line error naming the extra that installs it."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise QuantizationError(f"quantization={option!r} needs bitsandbytes: {QUANT_EXTRA}") from err
    return bitsandbytes


def quantized_layer_types() -> tuple[type, ...]:
    """bitsandbytes' linear layer types, if bitsandbytes has been imported (else none can exist)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return ()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, quantized_layer_types())


def quantization_name(module: nn.Module) -> str:
    """`nf4` / `fp4` for a 4-bit layer, `int8` for an 8-bit one (for messages)."""
    state = getattr(module.weight, "quant_state", None)
    return str(state.quant_type) if state is not None else "int8"


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> Tensor:
    """The `(out, in)` weight a quantized layer multiplies by, as a new dense tensor.

    4-bit: `dequantize_4bit` in the dtype the weight had before quantization. 8-bit: the int8
    rows times their absmax scale / 127 (bitsandbytes' `int8_vectorwise_dequant`), in float32.
    """
    import bitsandbytes.functional as bnbf

    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:
        return bnbf.dequantize_4bit(weight.data, state)
    if weight.dtype != torch.int8:  # an 8-bit layer not quantized yet (a float weight)
        return weight.data
    scale = getattr(weight, "SCB", None)
    if scale is None:  # after its first forward, Linear8bitLt keeps the row scales in its state
        scale = module.state.SCB
    return bnbf.int8_vectorwise_dequant(weight.data, scale)


@torch.no_grad()
def dequantized_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain `nn.Linear` computing what `module` computes, with its dequantized weight (and bias)."""
    weight = dequantized_weight(module)
    dtype = dtype or weight.dtype
    has_bias = module.bias is not None
    linear = nn.Linear(module.in_features, module.out_features, bias=has_bias, device=weight.device, dtype=dtype)
    linear.weight.copy_(weight)
    if has_bias:
        linear.bias.copy_(module.bias)
    return linear.requires_grad_(False)


def check_mergeable(module: nn.Module, name: str) -> None:
    """Refuse an in-place merge into a quantized base, naming the layer and what to do instead."""
    if is_quantized(module):
        raise QuantizationError(
            f"cannot merge the adapter of {name!r} in place: its base is a bitsandbytes {quantization_name(module)} "
            "layer, and re-quantizing W0 + dW would lose most of the update; keep it unmerged, or export with "
            "`lightning-peft export --format merged` (dequantizes, then merges into fp32/bf16 weights)"
        )


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Swap every quantized linear of `model` for its dequantized `nn.Linear`, in place, and drop transformers'
    quantization settings, so `save_pretrained` writes a plain checkpoint (a merged QLoRA export)."""
    for name, module in list(model.named_modules()):
        if is_quantized(module):
            model.set_submodule(name, dequantized_linear(module))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model


QUANTIZATIONS = ("nf4", "fp4", "int8")


def bnb_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    """transformers' `BitsAndBytesConfig` for `nf4` / `fp4` (4-bit, QLoRA's choice is nf4) or `int8`."""
    if quantization not in QUANTIZATIONS:
        raise QuantizationError(f"quantization must be one of {list(QUANTIZATIONS)} or null, got {quantization!r}")
    require_bitsandbytes(quantization)
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_compute_dtype=compute_dtype)
