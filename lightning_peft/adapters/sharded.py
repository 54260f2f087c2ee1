"""Sharded parameters (FSDP2 `DTensor`s) as the adapter methods' merge-and-restart rules see them.

Under FSDP2 (`fully_shard`, Lightning's `ModelParallelStrategy`) every parameter outside a
forward is a `DTensor` of which each rank holds a block of rows (dim 0). A merge then works
where the shards are: each rank folds its own rows of the update into its own rows of the base,
gathering only the small factors (`whole(lora_A)`, `(out, r)` or `R x R` tensors). On plain
tensors every helper here is the identity, so the methods' rules are written once for both.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]

try:  # where a rank's block starts; private in torch: without it, merges gather the whole weight
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover
    compute_local_shape_and_global_offset = None  # type: ignore[assignment]


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def whole(t: Tensor) -> Tensor:
    """The whole tensor: gathered from the ranks for a `DTensor` (a collective), else `t` itself."""
    return t.full_tensor() if is_dtensor(t) else t


def local(t: Tensor) -> Tensor:
    """This rank's block of a `DTensor` (a view: writing it writes the parameter), else `t` itself."""
    return t.to_local() if is_dtensor(t) else t


def row_range(t: Tensor) -> slice | None:
    """The rows (dim 0) of `t` this rank holds: all rows of a plain tensor; for a `DTensor` whose
    only sharded dim is 0 (FSDP2's layout, HSDP's too) its own block; None when it is sharded
    another way (a transposed GPT-2 `Conv1D` weight, tensor parallelism)."""
    if not is_dtensor(t):
        return slice(0, t.shape[0])
    if compute_local_shape_and_global_offset is None:  # pragma: no cover - then merges gather the weight
        return None
    if not all(p.is_replicate() or (isinstance(p, Shard) and p.dim == 0) for p in t.placements):
        return None
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return slice(offset[0], offset[0] + shape[0])


@torch.no_grad()
def assign_whole(param: Tensor, value: Tensor) -> None:
    """`param <- value`, `value` being the whole tensor and the same on every rank (a seeded re-draw):
    each rank copies its own block, with no communication."""
    if is_dtensor(param):
        value = value.to(device=local(param).device, dtype=param.dtype)
        value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(value)


@torch.no_grad()
def gather_rows(values: Tensor, rows: slice, like: Tensor) -> Tensor:
    """The whole `(out,)` vector from each rank's `values` for its `rows` of `like` (a small all-gather)."""
    if not is_dtensor(like) or (rows.start == 0 and rows.stop == like.shape[0]):
        return values
    spread = DTensor.from_local(values, like.device_mesh, like.placements, shape=(like.shape[0],), stride=(1,))
    return spread.full_tensor()
