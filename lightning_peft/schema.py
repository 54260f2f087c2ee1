"""Configuration read as written: strict YAML, and type checks that never coerce.

PyYAML implements YAML 1.1, where `2:4` is the base-60 integer 124, `010` is octal, `on`
and `no` are booleans and `1e3` is a string. A depth range written `"2:4"` would silently
become block 124 as soon as some layer re-reads the string as YAML (jsonargparse does, for
every value it checks against `int`). `StrictLoader` reads plain scalars with the YAML 1.2
core schema instead (decimal/hex/octal-with-`0o` integers, floats with a dot or an
exponent, `true`/`false`, `null`), refuses duplicate keys and absurd nesting, and is the
loader of both `LayerPolicy.from_yaml` and the `lightning-peft` command line.

`check_type` is the other half: a value is accepted when it already has the annotated
type, never converted (`"8"` is not an `int`, `"false"` is not a `bool`, `8.0` is not an
`int`), and a float must be finite. Policies check their fields and every adapter's
hyper-parameters with it, driven by the annotations, so a new method is covered for free.
"""

from __future__ import annotations

import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

MAX_NESTING = 64  # a policy needs about 5 levels; thousands would only exhaust the stack
YAML_MODE = "lightning_peft_yaml"  # the jsonargparse parser mode registered by `register_jsonargparse_loader`


class ConfigInputError(yaml.YAMLError, ValueError):
    """YAML that is not read as written: duplicate keys, deep nesting, bad encoding."""


_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_CORE_TAGS = ("bool", "int", "float", "null", "timestamp")


class StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` with the YAML 1.2 core schema and no duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                line = key_node.start_mark.line + 1
                first = seen[key].start_mark.line + 1
                raise ConfigInputError(f"duplicate key {key!r} at line {line} (first at line {first})")
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = self.construct_scalar(node)
        if text.startswith("0o"):
            return int(text[2:], 8)
        if text.startswith("0x"):
            return int(text[2:], 16)
        return int(text, 10)  # `010` is ten, as in YAML 1.2 and JSON


def _core_schema(loader: type[yaml.SafeLoader]) -> None:
    loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag.rsplit(":", 1)[-1] not in _CORE_TAGS]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    loader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))
    loader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
    loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    loader.add_implicit_resolver("tag:yaml.org,2002:null", _NULL, ["~", "n", "N", ""])
    loader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)


_core_schema(StrictLoader)


def _check_nesting(text: str) -> None:
    """Refuse nesting deeper than `MAX_NESTING` before composing (which recurses per level)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_NESTING:
                line = event.start_mark.line + 1
                raise ConfigInputError(f"nesting deeper than {MAX_NESTING} levels at line {line}")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def load_yaml(text: str) -> Any:
    """Parse YAML text as written (see the module docstring); raises a `yaml.YAMLError`."""
    _check_nesting(text)
    return yaml.load(text, Loader=StrictLoader)  # StrictLoader is a SafeLoader subclass


def read_yaml_file(path: str | Path) -> Any:
    """Read a UTF-8 YAML file as written; errors are `ConfigInputError`/`yaml.YAMLError` with the cause."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigInputError(
            f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); save the file as UTF-8"
        ) from None
    return load_yaml(text)


def _jsonargparse_yaml_load(text: str) -> Any:
    value = load_yaml(text)
    # As jsonargparse's own YAML loader: a bare `key:` or `{a, b}` on the command line stays a string.
    if isinstance(value, dict) and value and all(v is None for v in value.values()):
        keys = set(text.strip(" {}").replace(" ", "").split(","))
        if (len(value) == 1 and text.strip() == f"{next(iter(value))}:") or keys == set(value):
            return text
    return value


def register_jsonargparse_loader() -> str:
    """Register `load_yaml` as a jsonargparse parser mode; returns the mode's name."""
    from jsonargparse import set_loader

    set_loader(YAML_MODE, _jsonargparse_yaml_load, exceptions=(yaml.YAMLError,))
    return YAML_MODE


# -- type checks --------------------------------------------------------------------------


def describe(value: Any) -> str:
    """`the string '8'`, `the float nan`: what a value is, for error messages."""
    kind = {str: "string", bool: "bool", int: "int", float: "float", list: "list", dict: "mapping"}
    return f"the {kind.get(type(value), type(value).__name__)} {value!r}"


def type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(annotation))
        return f"{origin.__name__}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def type_error(value: Any, annotation: Any) -> str | None:
    """Why `value` is not exactly of type `annotation` (no coercion), or `None` when it is.

    Floats must be finite; `bool` is not an `int`; an `int` is a valid `float`.
    """
    if annotation is Any or annotation is object:
        return None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        errors = [type_error(value, a) for a in args]
        if any(e is None for e in errors):
            return None
        specific = [e for e, a in zip(errors, args, strict=True) if _is_container(a) and _is_container_value(value, a)]
        return specific[0] if specific else f"must be {type_name(annotation)}, got {describe(value)}"
    if origin in (list, tuple):
        return _sequence_error(value, annotation, args[0] if args else Any)
    if origin is dict:
        return _mapping_error(value, annotation, args)
    if origin is typing.Literal:
        return None if value in args else f"must be one of {list(args)}, got {describe(value)}"
    return _scalar_error(value, annotation)


def _is_container(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (list, tuple, dict)


def _is_container_value(value: Any, annotation: Any) -> bool:
    return isinstance(value, dict) if typing.get_origin(annotation) is dict else isinstance(value, list | tuple)


def _sequence_error(value: Any, annotation: Any, item: Any) -> str | None:
    if not isinstance(value, list | tuple):
        return f"must be {type_name(annotation)}, got {describe(value)}"
    for i, element in enumerate(value):
        error = type_error(element, item)
        if error is not None:
            return f"item {i} {error}"
    return None


def _mapping_error(value: Any, annotation: Any, args: tuple) -> str | None:
    if not isinstance(value, dict):
        return f"must be {type_name(annotation)}, got {describe(value)}"
    key_type, value_type = args if args else (Any, Any)
    for key, element in value.items():
        error = type_error(key, key_type)
        if error is not None:
            return f"key {key!r} {error}"
        error = type_error(element, value_type)
        if error is not None:
            return f"value of {key!r} {error}"
    return None


def _scalar_error(value: Any, annotation: Any) -> str | None:
    if annotation is type(None) or annotation is None:
        ok = value is None
    elif annotation is bool:
        ok = isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
    elif isinstance(annotation, type):
        ok = isinstance(value, annotation)
    else:  # a forward reference or typing construct this checker does not know: accept
        ok = True
    return None if ok else f"must be {type_name(annotation)}, got {describe(value)}"


def signature_types(func: Any) -> dict[str, Any]:
    """Resolved annotations of a function or class (string annotations evaluated); `{}` if unresolvable."""
    try:
        return typing.get_type_hints(func)
    except (NameError, TypeError):
        return {}
