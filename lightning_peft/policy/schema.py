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

import functools
import math
import re
import types
import typing
from collections.abc import Callable
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


_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when present: 10x faster


class StrictLoader(_SafeLoader):
    """`yaml.SafeLoader` with the YAML 1.2 core schema and no duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            # Scalar keys compare by (tag, text) without being constructed twice; others by value.
            if isinstance(key_node, yaml.ScalarNode):
                key: Any = (key_node.tag, key_node.value)
            else:
                key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                line, first = key_node.start_mark.line + 1, seen[key].start_mark.line + 1
                shown = key[1] if isinstance(key_node, yaml.ScalarNode) else key
                raise ConfigInputError(f"duplicate key {shown!r} at line {line} (first at line {first})")
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = self.construct_scalar(node)
        if text.startswith("0o"):
            return int(text[2:], 8)
        if text.startswith("0x"):
            return int(text[2:], 16)
        return int(text, 10)  # `010` is ten, as in YAML 1.2 and JSON


def _core_schema(loader: type) -> None:
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
    for event in yaml.parse(text, Loader=_SafeLoader):
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


_KINDS = {str: "string", bool: "bool", int: "int", float: "float", list: "list", dict: "mapping"}


def describe(value: Any) -> str:
    """`the string '8'`, `the float nan`: what a value is, for error messages."""
    if value is None:
        return "null"
    return f"the {_KINDS.get(type(value), type(value).__name__)} {value!r}"


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
    return _checker(annotation)(value)


Checker = Callable[[Any], "str | None"]


@functools.cache
def _checker(annotation: Any) -> Checker:
    """A checking function per annotation, built once (policies with many rules check the same types)."""
    if annotation is Any or annotation is object:
        return lambda value: None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return _union_checker(annotation, args)
    if origin in (list, tuple):
        return _sequence_checker(annotation, _checker(args[0] if args else Any))
    if origin is dict:
        key, value = args if args else (Any, Any)
        return _mapping_checker(annotation, _checker(key), _checker(value))
    if origin is typing.Literal:
        return lambda value: None if value in args else f"must be one of {list(args)}, got {describe(value)}"
    return _scalar_checker(annotation)


def _union_checker(annotation: Any, args: tuple) -> Checker:
    members = [(_checker(a), typing.get_origin(a)) for a in args]

    def check(value: Any) -> str | None:
        if any(c(value) is None for c, _ in members):
            return None
        errors = [c(value) for c, _ in members]
        for error, (_, origin) in zip(errors, members, strict=True):  # the container the value is: its detail
            if (origin is dict and isinstance(value, dict)) or (origin in (list, tuple) and isinstance(value, list)):
                return error
        return f"must be {type_name(annotation)}, got {describe(value)}"

    return check


def _sequence_checker(annotation: Any, item: Checker) -> Checker:
    name = type_name(annotation)

    def check(value: Any) -> str | None:
        if not isinstance(value, list | tuple):
            return f"must be {name}, got {describe(value)}"
        for i, element in enumerate(value):
            error = item(element)
            if error is not None:
                return f"item {i} {error}"
        return None

    return check


def _mapping_checker(annotation: Any, key_check: Checker, value_check: Checker) -> Checker:
    name = type_name(annotation)

    def check(value: Any) -> str | None:
        if not isinstance(value, dict):
            return f"must be {name}, got {describe(value)}"
        for key, element in value.items():
            error = key_check(key)
            if error is not None:
                return f"key {key!r} {error}"
            error = value_check(element)
            if error is not None:
                return f"value of {key!r} {error}"
        return None

    return check


def _scalar_checker(annotation: Any) -> Checker:
    if annotation is float:
        return _float_error
    if annotation is None:
        annotation = type(None)
    if not isinstance(annotation, type):  # a forward reference or typing construct not known here: accept
        return lambda value: None
    name = type_name(annotation)

    def check(value: Any) -> str | None:
        # Exact kinds: a bool is not an int (nor an int a bool), though Python's bool subclasses int.
        ok = isinstance(value, annotation) and (annotation is bool or not isinstance(value, bool))
        return None if ok else f"must be {name}, got {describe(value)}"

    return check


def _float_error(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be float, got {describe(value)}"
    return None if math.isfinite(value) else f"must be a finite number, got {value!r}"


def signature_types(func: Any) -> dict[str, Any]:
    """Resolved annotations of a function or class (string annotations evaluated); `{}` if unresolvable."""
    try:
        return typing.get_type_hints(func)
    except (NameError, TypeError):
        return {}
