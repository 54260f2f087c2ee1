"""Small helpers shared by `rank_search` and `suggest`: read a run config, build its model, run one fit.

A run config is the YAML `lightning-peft fit --config` takes. These helpers build only what
they need from it (the LightningModule, to resolve candidate policies before anything trains)
and run a fit through the same `PeftCLI` as the command line, so a pilot run is an ordinary run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml

from lightning_peft.experiments.errors import CompareError
from lightning_peft.experiments.peft_cli import PeftCLI
from lightning_peft.policy import LayerPolicy, read_yaml_file

CARRIED_METHODS = ("none", "full")  # base-policy rules kept in every generated policy


def load_config(config: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A run config as a mapping (a YAML path, or the mapping itself).

    Read as `lightning-peft fit` reads it (`read_yaml_file`: YAML 1.2 scalars, no duplicate keys),
    so an unquoted `depth: 2:4` is the same string here as in the fit, not the YAML 1.1 integer 124.
    """
    if isinstance(config, dict):
        return config
    path = Path(config)
    if not path.is_file():
        raise CompareError(f"run config {str(path)!r} does not exist")
    try:
        data = read_yaml_file(path)
    except yaml.YAMLError as err:
        raise CompareError(f"{path}: {err}") from None
    if not isinstance(data, dict) or "model" not in data:
        raise CompareError(f"{path}: not a run config (a mapping with a `model:` section)")
    return data


def build_model(config: dict[str, Any]) -> pl.LightningModule:
    """Instantiate the config's `model:` section alone (no trainer, no data, no adapters)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningModule, "model")
    cfg = parser.parse_object({"model": config["model"]})
    return parser.instantiate(cfg).model


def carried_rules(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The base policy's `none`/`full` rules (carve-outs, a new head): every generated policy keeps them."""
    policy = (config.get("adapters") or {}).get("policy")
    if policy is None:
        return []
    rules = LayerPolicy.load(policy).to_dict()["rules"]
    return [{k: v for k, v in r.items() if v not in (None, {})} for r in rules if r["method"] in CARRIED_METHODS]


def cli_args(config: str | Path, overrides: dict[str, Any], subcommand: str = "fit") -> list[str]:
    """`lightning-peft` arguments: the config, then `--dotted.key=value` for each override."""
    args = [subcommand, "--config", str(config)]
    for key, value in overrides.items():
        text = value if isinstance(value, str) else json.dumps(value)
        args.append(f"--{key}={text}")
    return args


def run_fit(config: str | Path, overrides: dict[str, Any]) -> pl.Trainer:
    """One `lightning-peft fit` run in this process; returns its trainer."""

    cli = PeftCLI(args=cli_args(config, overrides))
    return cli.trainer


def carried_params(model: Any, carried: Sequence[dict[str, Any]]) -> int:
    """Trainable parameters of the carried rules alone (they count against the budget)."""

    if not any(r.get("method") == "full" for r in carried):
        return 0  # `none` rules carve out, they train nothing
    return LayerPolicy.from_dict({"rules": list(carried), "strict": False}).resolve(model).trainable_params
