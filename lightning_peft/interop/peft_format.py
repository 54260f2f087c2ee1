"""HF peft's LoRA adapter folder format: what our LoRA/DoRA layers become, and back.

A peft LoRA folder is `adapter_config.json` (a `LoraConfig`) plus `adapter_model.safetensors`
with keys `base_model.model.<module>.lora_A.weight` `(r, in)`, `....lora_B.weight` `(out, r)`
and, for DoRA, `....lora_magnitude_vector` `(out,)` (peft's `get_peft_model_state_dict`).
One `LoraConfig` holds one value of `use_dora`, `use_rslora`, `lora_dropout` and
`fan_in_fan_out` for all its modules; ranks and alphas vary per module through
`rank_pattern` / `alpha_pattern` (regexes matched as `(.*\\.)?(<key>)$`, peft's
`get_pattern_key`). A plan whose rows disagree on those flags therefore becomes several
adapters with disjoint `target_modules`, which peft activates together
(`base_model.set_adapter([...])`); see docs/export.md. HiRA goes to peft's HiRA tuner
(`....hira_A`, `....hira_B`), one config per rank.

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

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."
# Our adapter state-dict key -> peft's key suffix, for the methods peft's LoRA tuner represents exactly.
PEFT_TENSOR_NAMES: dict[str, dict[str, str]] = {
    "lora": {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"},
    "dora": {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"},
    "hira": {"hira_A": "hira_A", "hira_B": "hira_B"},  # peft's HiRA tuner (`HiraConfig`, W0 ⊙ BA)
}
PEFT_TYPES = {"lora": "LORA", "dora": "LORA", "hira": "HIRA"}
# LoraConfig fields whose non-default values change the math or the targets in ways our layers
# do not reproduce: importing an adapter that sets one is an error naming the field.
UNSUPPORTED_LORA_FIELDS: dict[str, Any] = {
    "lora_bias": False,
    "modules_to_save": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "velora_config": None,
    "kasa_config": None,
    "monteclora_config": None,
    "use_bdlora": None,
    "megatron_config": None,
}

# Initialisations that rewrite the base weights (peft's PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class PeftFormatError(ValueError):
    """A peft adapter folder we cannot read, or a layer peft's format cannot hold."""


@dataclass
class PeftLayer:
    """One module's LoRA/DoRA factors in peft's terms (name relative to the model peft wraps)."""

    name: str
    r: int
    alpha: float
    use_dora: bool
    use_rslora: bool
    dropout: float
    fan_in_fan_out: bool
    tensors: dict[str, Tensor] = field(default_factory=dict)  # peft key suffix -> tensor
    peft_type: str = "LORA"

    def group_key(self) -> tuple[str, bool, bool, float, bool, int | None]:
        """The flags one peft config can hold only once (HiRA: also the rank, its rank_pattern is not honoured)."""
        rank = self.r if self.peft_type == "HIRA" else None
        return (self.peft_type, self.use_dora, self.use_rslora, self.dropout, self.fan_in_fan_out, rank)


def group_name(key: tuple[str, bool, bool, float, bool, int | None]) -> str:
    """A readable adapter name for one group of flags, e.g. `dora`, `lora_rslora`, `lora_dropout0.1`, `hira_r8`."""
    peft_type, use_dora, use_rslora, dropout, fan_in_fan_out, rank = key
    name = f"hira_r{rank}" if peft_type == "HIRA" else "dora" if use_dora else "lora"
    name += "_rslora" if use_rslora else ""
    name += f"_dropout{dropout:g}" if dropout else ""
    return name + ("_conv1d" if fan_in_fan_out else "")


def group_layers(layers: Iterable[PeftLayer]) -> dict[str, list[PeftLayer]]:
    """Layers split into the fewest `LoraConfig`s (one per distinct flag set), in first-seen order."""
    groups: dict[str, list[PeftLayer]] = {}
    for layer in layers:
        groups.setdefault(group_name(layer.group_key()), []).append(layer)
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


def hira_config(
    layers: list[PeftLayer], all_module_names: Iterable[str], base_model_name_or_path: str | None
) -> dict[str, Any]:
    """The `adapter_config.json` of one HiRA group (one rank: peft 0.21 does not apply HiRA's rank_pattern)."""
    return {
        "peft_type": "HIRA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": layers[0].r,
        "hira_dropout": layers[0].dropout,
        "fan_in_fan_out": layers[0].fan_in_fan_out,
        "init_weights": True,
        "target_modules": _target_modules([x.name for x in layers], all_module_names),
        "rank_pattern": {},
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def adapter_config(
    layers: list[PeftLayer], all_module_names: Iterable[str], base_model_name_or_path: str | None
) -> dict[str, Any]:
    """The `adapter_config.json` mapping of one group, for its peft type."""
    build = hira_config if layers[0].peft_type == "HIRA" else lora_config
    return build(layers, all_module_names, base_model_name_or_path)


def lora_config(
    layers: list[PeftLayer], all_module_names: Iterable[str], base_model_name_or_path: str | None
) -> dict[str, Any]:
    """The `adapter_config.json` mapping of one group (all layers share `group_key()`)."""
    _, use_dora, use_rslora, dropout, fan_in_fan_out, _ = layers[0].group_key()
    r = _most_common([x.r for x in layers])
    alpha = _most_common([x.alpha for x in layers])
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": True,
        "target_modules": _target_modules([x.name for x in layers], all_module_names),
        "rank_pattern": {re.escape(x.name): x.r for x in layers if x.r != r},
        "alpha_pattern": {re.escape(x.name): x.alpha for x in layers if x.alpha != alpha},
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


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


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """peft's `get_pattern_key` lookup: the first key matching `(.*\\.)?(<key>)$` wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_peft_config(directory: str | Path) -> dict[str, Any]:
    """Read and check `adapter_config.json`: LoRA (or DoRA) only; named errors otherwise."""
    path = Path(directory) / PEFT_CONFIG_FILE
    if not path.is_file():
        raise PeftFormatError(f"{path} is missing: {directory} is not a peft adapter folder")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise PeftFormatError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise PeftFormatError(f"{path}: expected a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise PeftFormatError(
            f"{path}: peft_type {peft_type!r} is not supported; lightning-peft imports LORA adapters "
            "(with or without use_dora), not LoHa, LoKr, IA3, AdaLoRA, prompt tuning, ..."
        )
    for key, default in UNSUPPORTED_LORA_FIELDS.items():
        value = config.get(key, default)
        if value not in (default, [], {}, None, False):
            raise PeftFormatError(f"{path}: `{key}: {value!r}` is not supported by lightning-peft's LoRA/DoRA layers")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_CHANGING_INITS):
        raise PeftFormatError(
            f"{path}: `init_lora_weights: {init}` changes the base weights, so the adapter is relative to a "
            "modified base; convert it to plain LoRA with peft first "
            "(save_pretrained(path_initial_model_for_weight_conversion=...))"
        )
    return config  # `layers_to_transform` & co. need no support: the adapted modules are read from the weights


def read_peft_layers(directory: str | Path) -> list[PeftLayer]:
    """The layers of a peft LoRA/DoRA folder, with the rank/alpha each module actually has."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_peft_config(directory)
    path = directory / PEFT_WEIGHTS_FILE
    if not path.is_file():
        raise PeftFormatError(f"{path} is missing (only safetensors adapter files are read, never pickles)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise PeftFormatError(f"{path}: truncated or corrupted safetensors file ({err})") from None
    use_dora = bool(config.get("use_dora", False))
    suffixes = PEFT_TENSOR_NAMES["dora" if use_dora else "lora"]
    by_module: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        suffix = next((s for s in suffixes.values() if key.endswith("." + s)), None)
        if suffix is None or not key.startswith(PEFT_KEY_PREFIX):
            raise PeftFormatError(f"{path}: unexpected tensor {key!r} for a {'DoRA' if use_dora else 'LoRA'} adapter")
        by_module.setdefault(key[len(PEFT_KEY_PREFIX) : -len(suffix) - 1], {})[suffix] = tensor
    layers = []
    for name, tensors in by_module.items():
        missing = sorted(set(suffixes.values()) - set(tensors))
        if missing:
            raise PeftFormatError(f"{path}: module {name!r} lacks {missing}")
        r = int(tensors["lora_A.weight"].shape[0])
        alpha = pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
        layers.append(
            PeftLayer(
                name=name,
                r=r,
                alpha=float(alpha),
                use_dora=use_dora,
                use_rslora=bool(config.get("use_rslora", False)),
                dropout=float(config.get("lora_dropout", 0.0)),
                fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
                tensors=tensors,
            )
        )
    if not layers:
        raise PeftFormatError(f"{path} holds no LoRA tensors")
    return layers
