"""FSDP2 (`torch.distributed.fsdp.fully_shard`) awareness in one place.

Under FSDP2 every parameter of a sharded module is a `DTensor` holding one rank's rows. Code
that needs whole weights (diagnostics, merges, exports) runs inside `unsharded(model)`:
every `FSDPModule` all-gathers its parameters and its modules hold plain full tensors until
the block exits. Entering it is a collective: every rank must enter, in the same order.
Without sharding it does nothing, so callers use it unconditionally.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - torch builds without distributed
    FSDPModule = None  # type: ignore[assignment,misc]

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]


def sharded_modules(model: nn.Module) -> list[nn.Module]:
    """The FSDP2-sharded submodules of `model` (including itself), in a fixed order."""
    if FSDPModule is None:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    return bool(sharded_modules(model))


@contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Inside the block, every FSDP2-sharded module of `model` holds its full parameters.

    A collective when `model` is sharded (all ranks must enter); a no-op otherwise.
    """
    modules = sharded_modules(model)
    for module in modules:
        module.unshard()  # type: ignore[operator]
    try:
        yield
    finally:
        for module in modules:
            module.reshard()  # type: ignore[operator]


def squared_norm(tensor: Tensor) -> Tensor:
    """`||tensor||^2` in fp32; for a sharded `DTensor` summed over its mesh (a collective)."""
    if DTensor is not None and isinstance(tensor, DTensor):
        return tensor.float().square().sum().full_tensor()
    return tensor.float().square().sum()


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's block of a `DTensor` (a view: writing it writes the tensor), or `tensor` itself."""
    if DTensor is not None and isinstance(tensor, DTensor):
        return tensor.to_local()
    return tensor


def any_rank(flags: list[bool], model: nn.Module) -> list[bool]:
    """Each flag OR-ed over the ranks when `model` is sharded (a collective), so that every rank
    takes the same branch (raise, or go on to the next collective); `flags` itself otherwise."""
    if not flags or not is_sharded(model) or not torch.distributed.is_initialized():
        return flags
    device = local_tensor(next(model.parameters())).device
    votes = torch.tensor(flags, dtype=torch.int32, device=device)
    torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in votes.tolist()]


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor of a `DTensor` (a collective), or `tensor` itself."""
    if DTensor is not None and isinstance(tensor, DTensor):
        return tensor.full_tensor()
    return tensor


@torch.no_grad()
def full_state_dict(model: nn.Module, keys: list[str] | None = None) -> dict[str, Tensor]:
    """`model.state_dict()` with every `DTensor` gathered (a collective when sharded)."""
    state = model.state_dict()
    return {k: full_tensor(v) for k, v in state.items() if keys is None or k in keys}
