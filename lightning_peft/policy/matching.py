"""Module matching (globs and regexes on dotted names) and discovery of the repeated blocks that define depth."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator

from torch import nn

from lightning_peft.adapters.base import AdapterLinear, is_supported_layer
from lightning_peft.policy.errors import PolicyError

# Wrapper infixes that torch.compile / FSDP / checkpointing / DDP add to module names.
_WRAPPER_PARTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def _name_suffixes(name: str) -> Iterator[str]:
    parts = name.split(".")
    for i in range(len(parts)):
        yield ".".join(parts[i:])


def pattern_matches(pattern: str, name: str) -> bool:
    """Policy name matching: a glob (or `re:<regex>`) against the name or any dotted suffix of it."""
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return any(regex.fullmatch(s) for s in _name_suffixes(name))
    return any(fnmatch.fnmatchcase(s, pattern) for s in _name_suffixes(name))


def normalise_name(name: str) -> str:
    """Drop wrapper infixes (`_orig_mod`, `_fsdp_wrapped_module`, ...) from a module name."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)


def discover_blocks(model: nn.Module, path: str | None = None) -> tuple[str | None, int]:
    """The container of repeated blocks that defines depth, and how many blocks it holds.

    Auto-discovery picks the longest `ModuleList`/`Sequential` whose children all share one
    class (HF `model.layers`, BERT `encoder.layer`, GPT-2 `transformer.h`); `path` overrides.
    """
    if path is not None:
        try:
            container = model.get_submodule(path)
        except AttributeError as err:
            raise PolicyError(f"`blocks: {path}` does not name a submodule of {type(model).__name__}") from err
        if not isinstance(container, nn.ModuleList | nn.Sequential):
            raise PolicyError(f"`blocks: {path}` is a {type(container).__name__}, not a ModuleList/Sequential")
        return path, len(container)
    best: tuple[str | None, int] = (None, 0)
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear) or not isinstance(module, nn.ModuleList | nn.Sequential):
            continue
        children = list(module.children())
        if len(children) < 2 or len({type(c) for c in children}) != 1:
            continue
        if is_supported_layer(children[0]) or not any(True for _ in children[0].children()):
            continue  # a list of bare layers (e.g. MoE experts) is not a stack of blocks
        if len(children) > best[1]:
            best = (normalise_name(name), len(children))
    return best


def _block_of(name: str, blocks_path: str | None) -> tuple[int | None, str]:
    """(block index, name inside the block) for a normalised module name."""
    if blocks_path is not None and name.startswith(blocks_path + "."):
        rest = name[len(blocks_path) + 1 :]
        index, _, inner = rest.partition(".")
        if index.isdigit():
            return int(index), inner or name
    return None, name


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _has_children(module: nn.Module) -> bool:
    return any(True for _ in module.children())
