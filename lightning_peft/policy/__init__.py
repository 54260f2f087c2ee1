"""Policies: which adapter method each module of a model gets (docs/policies.md).

Built on `adapters/` only. `LayerPolicy.resolve(model)` is pure (it reads names and shapes, so it
works on `meta`) and returns a `Plan`; every problem a policy can have is raised here, naming the rule.
"""

from lightning_peft.policy.errors import PolicyError, PolicyWarning, check_fields, check_unknown_keys
from lightning_peft.policy.layer_policy import MAX_ADAPTER_TO_LAYER_PARAMS, LayerPolicy
from lightning_peft.policy.matching import discover_blocks, normalise_name, pattern_matches
from lightning_peft.policy.optim import OptimSettings, as_optim_settings, check_rule_optim
from lightning_peft.policy.plan import Plan, PlanRow
from lightning_peft.policy.presets import PRESETS_PACKAGE, list_presets, preset_text
from lightning_peft.policy.rules import SPECIAL_METHODS, Rule, check_method_hparams
from lightning_peft.policy.schema import ConfigInputError, load_yaml, read_yaml_file
from lightning_peft.policy.selectors import DepthSelector

__all__ = [
    "MAX_ADAPTER_TO_LAYER_PARAMS",
    "PRESETS_PACKAGE",
    "SPECIAL_METHODS",
    "ConfigInputError",
    "DepthSelector",
    "LayerPolicy",
    "OptimSettings",
    "Plan",
    "PlanRow",
    "PolicyError",
    "PolicyWarning",
    "Rule",
    "as_optim_settings",
    "check_fields",
    "check_method_hparams",
    "check_rule_optim",
    "check_unknown_keys",
    "discover_blocks",
    "list_presets",
    "load_yaml",
    "normalise_name",
    "pattern_matches",
    "preset_text",
    "read_yaml_file",
]
