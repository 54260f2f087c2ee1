"""HF peft's adapter folder format: what our layers become, and back, as each method declares it.

A peft adapter folder is `adapter_config.json` (a `LoraConfig`, `HiraConfig`, ...) plus
`adapter_model.safetensors` with keys `base_model.model.<module>.<suffix>`. Each method's
`AdapterMethod.peft` (a `PeftMapping`, see lightning_peft/adapters/base.py) says which tuner
holds it, its tensor suffixes, which config fields carry its hyper-parameters, and which of
them vary per module through patterns (`rank_pattern`, `alpha_pattern`: regexes matched as
`(.*\\.)?(<key>)$`, peft's `get_pattern_key`). One config holds one value of every other
field, so a plan whose rows disagree on one becomes several adapters with disjoint
`target_modules`, which peft activates together (`base_model.set_adapter([...])`); see
docs/export.md. This module names no method: it reads the mappings.

This module knows names and layouts only; it never imports peft (an optional dependency).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_peft.adapters.base import AdapterMethod, PeftMapping, get_adapter_class, peft_methods
from lightning_peft.errors import InputError
from lightning_peft.interop.patterns import PatternError, compile_pattern, pattern_value
from lightning_peft.policy import PolicyError, check_method_hparams
from lightning_peft.policy.schema import signature_types

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."


class PeftFormatError(InputError):
    """A peft adapter folder we cannot read, or a layer peft's format cannot hold."""


def peft_mapping(method: str) -> PeftMapping:
    """The registered method's peft mapping; `PeftFormatError` when it declares none."""
    mapping = get_adapter_class(method).peft
    if mapping is None:
        raise PeftFormatError(f"method {method!r} has no HF peft equivalent")
    return mapping


@dataclass
class PeftLayer:
    """One module's adapter in peft's terms (name relative to the model peft wraps)."""

    name: str
    method: str
    hparams: dict[str, Any]  # the hyper-parameters the method's mapping writes, keyed by our names
    fan_in_fan_out: bool
    tensors: dict[str, Tensor] = field(default_factory=dict)  # peft key suffix -> tensor

    @property
    def mapping(self) -> PeftMapping:
        return peft_mapping(self.method)

    def group_key(self) -> tuple[Any, ...]:
        """What one peft config can hold only once: the method, every hyper-parameter without a pattern, Conv1D."""
        shared = tuple((k, self.hparams[k]) for k in self.mapping.hparams if k not in self.mapping.patterns)
        return (self.method, shared, self.fan_in_fan_out)


def hparam_suffix(items: Iterable[tuple[str, Any]]) -> str:
    """`_rslora_dropout0p1`: `_<flag>` per true flag (`use_` dropped), `_<name><value>` per non-zero number."""
    out = ""
    for key, value in items:
        if isinstance(value, bool):
            out += f"_{key.removeprefix('use_')}" if value else ""
        elif value:
            out += f"_{key}{value:g}".replace(".", "p")  # peft adapter names are module names: no "."
    return out


def group_name(layer: PeftLayer) -> str:
    """A readable adapter name for one group, e.g. `dora`, `lora_rslora`, `lora_dropout0p1`, `hira_r8`.

    A name inside the tuner's prefix (`lora` in `lora_`) gets `_adapter` appended: peft warns
    about such names and may re-initialise their weights.
    """
    method, shared, fan_in_fan_out = layer.group_key()
    name = method + hparam_suffix(shared) + ("_conv1d" if fan_in_fan_out else "")
    return name + "_adapter" if name in layer.mapping.prefix else name


def group_layers(layers: Iterable[PeftLayer]) -> dict[str, list[PeftLayer]]:
    """Layers split into the fewest peft configs (one per distinct group key), in first-seen order."""
    groups: dict[str, list[PeftLayer]] = {}
    for layer in layers:
        groups.setdefault(group_name(layer), []).append(layer)
    return groups


def _most_common(values: list[Any]) -> Any:
    return max(dict.fromkeys(values), key=values.count)


def _target_modules(names: list[str], all_module_names: Iterable[str]) -> list[str] | str:
    """Exact names; a regex when a plain name would also suffix-match an untargeted module."""
    targets = set(names)
    ambiguous = any(
        other not in targets and any(other.endswith("." + t) for t in targets) for other in all_module_names
    )
    if ambiguous:
        return "^(" + "|".join(re.escape(n) for n in names) + ")$"
    return list(names)


def adapter_config(
    layers: list[PeftLayer],
    all_module_names: Iterable[str],
    base_model_name_or_path: str | None,
    task_type: str | None = None,
) -> dict[str, Any]:
    """The `adapter_config.json` mapping of one group (all layers share `group_key()`), as its mapping says."""
    mapping = layers[0].mapping
    config: dict[str, Any] = {
        "peft_type": mapping.peft_type,
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        **mapping.select,
        **mapping.fixed,
    }
    for key, (config_field, _) in mapping.hparams.items():
        values = [x.hparams[key] for x in layers]
        config[config_field] = _most_common(values)
        if key in mapping.patterns:
            common = config[config_field]
            config[mapping.patterns[key]] = {
                re.escape(x.name): x.hparams[key] for x in layers if x.hparams[key] != common
            }
    config.update(
        fan_in_fan_out=layers[0].fan_in_fan_out,
        target_modules=_target_modules([x.name for x in layers], all_module_names),
        modules_to_save=None,
        layers_to_transform=None,
        layers_pattern=None,
    )
    return config


def peft_state_dict(layers: list[PeftLayer]) -> dict[str, Tensor]:
    """`adapter_model.safetensors` contents of one group."""
    return {
        f"{PEFT_KEY_PREFIX}{layer.name}.{suffix}": tensor.detach().to("cpu").contiguous()
        for layer in layers
        for suffix, tensor in layer.tensors.items()
    }


def write_adapter(directory: Path, config: dict[str, Any], state: dict[str, Tensor]) -> None:
    """Write one peft adapter folder (the caller handles atomicity of the enclosing folder)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(state, str(directory / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})


# -- reading ------------------------------------------------------------------------------


def read_peft_config(directory: str | Path) -> dict[str, Any]:
    """Read and check `adapter_config.json` of one adapter folder; named errors (file and field) otherwise."""
    path = Path(directory) / PEFT_CONFIG_FILE
    if not path.is_file():
        raise PeftFormatError(f"{path} is missing: {directory} is not a peft adapter folder")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise PeftFormatError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise PeftFormatError(f"{path}: expected a JSON object")
    cls = config_method(config, path)
    mapping = cls.peft
    assert mapping is not None
    for key, default in mapping.unsupported.items():
        value = config.get(key, default)
        if value not in (default, [], {}, None, False):
            raise PeftFormatError(f"{path}: `{key}: {value!r}` is not supported by lightning-peft's {cls.label} layers")
    if mapping.base_changing_inits is not None:
        init_field, refused = mapping.base_changing_inits
        init = str(config.get(init_field, True)).lower()
        if init.startswith(refused):
            raise PeftFormatError(
                f"{path}: `{init_field}: {init}` changes the base weights, so the adapter is relative to a "
                "modified base; convert it to a plain adapter with peft first "
                "(save_pretrained(path_initial_model_for_weight_conversion=...))"
            )
    try:
        check_config_patterns(config, mapping, path)
    except PatternError as err:
        raise PeftFormatError(str(err)) from None
    return config  # `layers_to_transform` & co. need no support: the adapted modules are read from the weights


def config_method(config: dict[str, Any], path: Path) -> type[AdapterMethod]:
    """The registered method a peft config describes: its tuner type and `select` fields (type-checked)."""
    peft_type = config.get("peft_type")
    candidates = [cls for cls in peft_methods() if cls.peft.peft_type == peft_type]  # type: ignore[union-attr]
    if not candidates:
        types = sorted({cls.peft.peft_type for cls in peft_methods()})  # type: ignore[union-attr]
        raise PeftFormatError(
            f"{path}: peft_type {peft_type!r} is not supported; lightning-peft imports {types} adapters, "
            "not LoHa, LoKr, IA3, AdaLoRA, prompt tuning, ..."
        )
    for cls in candidates:
        for key, value in cls.peft.select.items():  # type: ignore[union-attr]
            if key in config and type(config[key]) is not type(value):
                raise PeftFormatError(f"{path}: `{key}: {config[key]!r}` must be a {type(value).__name__}")
    for cls in candidates:
        if all(config.get(k, False) == v for k, v in cls.peft.select.items()):  # type: ignore[union-attr]
            return cls
    raise PeftFormatError(f"{path}: no registered method matches this {peft_type} config")


def check_config_patterns(config: dict[str, Any], mapping: PeftMapping, path: Path) -> None:
    """Every regex of the config compiles, and pattern fields are mappings; errors name the file and field."""
    targets = config.get("target_modules")
    if isinstance(targets, str):
        compile_pattern(targets, f"{path}: target_modules")
    elif targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise PeftFormatError(f"{path}: target_modules must be a regex string or a list of names, got {targets!r}")
    for pattern_field in mapping.patterns.values():
        patterns = config.get(pattern_field) or {}
        if not isinstance(patterns, dict):
            raise PeftFormatError(f"{path}: {pattern_field} must be a mapping of regex -> value, got {patterns!r}")
        for key in patterns:
            compile_pattern(key, f"{path}: {pattern_field} key")


def mapped_hparams(cls: type[AdapterMethod], hparams: dict[str, Any]) -> dict[str, Any]:
    """The hyper-parameters the method's mapping carries, floats as floats (`alpha: 8` -> `8.0`)."""
    assert cls.peft is not None
    types = signature_types(cls.__init__)
    return {k: float(hparams[k]) if types.get(k) is float else hparams[k] for k in cls.peft.hparams}


def layer_hparams(config: dict[str, Any], cls: type[AdapterMethod], name: str, path: Path) -> dict[str, Any]:
    """The hyper-parameters peft gives module `name` under `config` (patterns first, then the field, then
    peft's default), type-checked as the method's signature says; errors name the file and the field."""
    mapping = cls.peft
    assert mapping is not None
    hparams = {}
    for key, (config_field, default) in mapping.hparams.items():
        value = config.get(config_field, default)
        if key in mapping.patterns:
            value = pattern_value(
                config.get(mapping.patterns[key]) or {}, name, value, f"{path}: {mapping.patterns[key]}"
            )
        hparams[key] = value
    try:
        check_method_hparams(cls.method, hparams)
    except PolicyError as err:
        fields = {k: f for k, (f, _) in mapping.hparams.items()}
        culprit = next((fields[k] for k in fields if f"`{k}`" in str(err)), "?")
        raise PeftFormatError(f"{path}: field `{culprit}` (module {name!r}): {err}") from None
    return mapped_hparams(cls, hparams)


def read_peft_layers(directory: str | Path) -> list[PeftLayer]:
    """The layers of one peft adapter folder, with the hyper-parameters each module actually has."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_peft_config(directory)
    cls = config_method(config, directory / PEFT_CONFIG_FILE)
    mapping = cls.peft
    assert mapping is not None
    path = directory / PEFT_WEIGHTS_FILE
    if not path.is_file():
        raise PeftFormatError(f"{path} is missing (only safetensors adapter files are read, never pickles)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise PeftFormatError(f"{path}: truncated or corrupted safetensors file ({err})") from None
    suffixes = list(mapping.tensors.values())
    by_module: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if suffix is None or not key.startswith(PEFT_KEY_PREFIX):
            raise PeftFormatError(f"{path}: unexpected tensor {key!r} for a {cls.label} adapter")
        by_module.setdefault(key[len(PEFT_KEY_PREFIX) : -len(suffix) - 1], {})[suffix] = tensor
    layers = []
    config_path = directory / PEFT_CONFIG_FILE
    fan_in_fan_out = config.get("fan_in_fan_out", False)
    if not isinstance(fan_in_fan_out, bool):
        raise PeftFormatError(f"{config_path}: `fan_in_fan_out: {fan_in_fan_out!r}` must be a bool")
    for name, tensors in by_module.items():
        missing = sorted(set(suffixes) - set(tensors))
        if missing:
            raise PeftFormatError(f"{path}: module {name!r} lacks {missing}")
        try:
            hparams = layer_hparams(config, cls, name, config_path)
        except PatternError as err:
            raise PeftFormatError(str(err)) from None
        layers.append(PeftLayer(name, cls.method, hparams, fan_in_fan_out, tensors))
    if not layers:
        raise PeftFormatError(f"{path} holds no {cls.label} tensors")
    return layers
