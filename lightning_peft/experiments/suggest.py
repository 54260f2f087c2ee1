"""`suggest`: a per-layer policy chosen from a short pilot run's update diagnostics, under a parameter budget.

The pilot trains uniform LoRA at a small rank (`pilot_rank`) on the target modules for a few
steps with `UpdateDiagnostics`; its last measurement of each module is the evidence. The
decision rule (documented with its sources in `docs/suggest.md`), per module, first match wins:

1. **small update** (`rel_norm` below `skip_below` x the median over modules): leave it frozen;
   below `low_below` x the median: LoRA at a low rank (`low_rank_fraction` of the base rank).
   Layers differ in how much they need to move (AdaLoRA, arXiv 2303.10512, allocates rank by a
   similar importance signal).
2. **rank-saturated** (`r90 >= saturation x pilot_rank`: 90 % of the update's energy needs
   nearly every direction the pilot adapter has): the high-rank method (`mora` by default;
   MoRA, arXiv 2405.12130, argues that low rank limits memorisation-like updates).
3. **magnitude-led** (row-norm change relative to the rows' rotation angle at or above
   `dora_above`): DoRA, whose separate magnitude vector (arXiv 2402.09353) learns row norms
   without moving directions.
4. otherwise LoRA (arXiv 2106.09685) at the base rank.

Modules with the same kind and method form one rule (blocks as depth indices). Ranks are then
allocated so that the resolved plan's trainable-parameter count (the number `plan` prints,
with the base policy's carried `full` rules included) is at most `budget`: the largest common
rank that fits, then one rank more per rule, most-moved rules first, while it still fits.
Each rule's learning rate is `lr_scales[method]` times the run's (MoRA's `r=8` rates in the
MoRA paper's Table 5 are about 1.5x LoRA's).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning_peft.adapters.base import get_adapter_class, hyperparameter_names, is_supported_layer, method_for_role
from lightning_peft.diagnostics import TABLE_FILE, read_table
from lightning_peft.experiments.compare import Variant, run_comparison
from lightning_peft.experiments.fingerprint import fingerprint
from lightning_peft.experiments.policy_search import SearchSettings
from lightning_peft.experiments.policy_search_run import search_command
from lightning_peft.experiments.runner import build_model, carried_params, carried_rules, load_config, run_fit
from lightning_peft.policy import LayerPolicy, PolicyError, discover_blocks, normalise_name, pattern_matches

TIERS = ("skip", "low", "high", "magnitude", "base")
# The method of each tier is asked of the registry (`AdapterMethod.suggest_roles`); `high` may be overridden.
TIER_ROLES = {"low": "low_rank", "high": "high_rank", "magnitude": "magnitude", "base": "low_rank"}


class SuggestError(ValueError):
    """`suggest` cannot produce a policy as asked; raised before the pilot runs when the input is at fault."""


@dataclass
class SuggestSettings:
    """The budget and the thresholds of the decision rule (module docstring).

    Args:
        budget: the most trainable parameters the suggested plan may have (carried rules included).
        pilot_rank: LoRA rank of the pilot run; the cap `r90` is compared with.
        pilot_steps: optimizer steps of the pilot.
        pilot_modules: module globs the pilot adapts (inside the repeated blocks); the candidates.
        high_rank_method: method for rank-saturated modules (a registered method taking `r`); default: the
            registered method whose `suggest_roles` include `high_rank`.
        saturation: `r90 / pilot_rank` at or above which a module is rank-saturated.
        skip_below: `rel_norm / median` below which a module stays frozen.
        low_below: `rel_norm / median` below which a module gets a low-rank LoRA.
        dora_above: relative magnitude drift / rotation angle at or above which a module gets DoRA.
        low_rank_fraction: low-rank modules' rank as a fraction of the base rank.
        lr_scales: learning-rate scale per method, written to each rule's `optim.lr_scale`; a method not
            named gets its own `default_lr_scale`.
    """

    budget: int
    pilot_rank: int = 4
    pilot_steps: int = 50
    pilot_modules: list[str] = field(default_factory=lambda: ["*"])
    high_rank_method: str | None = None
    saturation: float = 0.75
    skip_below: float = 0.1
    low_below: float = 0.5
    dora_above: float = 1.0
    low_rank_fraction: float = 0.25
    lr_scales: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("budget", "pilot_rank", "pilot_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SuggestError(f"`{name}` must be a positive integer, got {value!r}")
        if self.high_rank_method is None:
            self.high_rank_method = method_for_role("high_rank")
        try:
            cls = get_adapter_class(self.high_rank_method)
        except ValueError as err:
            raise SuggestError(f"`high_rank_method`: {err}") from None
        if "r" not in hyperparameter_names(cls):
            raise SuggestError(f"`high_rank_method` {self.high_rank_method!r} takes no rank `r`")
        for name in ("saturation", "skip_below", "low_below", "dora_above", "low_rank_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise SuggestError(f"`{name}` must be a finite number >= 0, got {value!r}")
        if self.skip_below > self.low_below:
            raise SuggestError(f"`skip_below` ({self.skip_below}) must not exceed `low_below` ({self.low_below})")
        if not self.pilot_modules:
            raise SuggestError("`pilot_modules` is empty: the pilot would adapt nothing")
        bad = {k: v for k, v in self.lr_scales.items() if not (isinstance(v, int | float) and v > 0)}
        if bad:
            raise SuggestError(f"`lr_scales` must be positive numbers, got {bad}")

    def lr_scale(self, method: str) -> float:
        """The learning-rate scale of `method`'s rules: `lr_scales`, else the method's own default."""
        return self.lr_scales.get(method, get_adapter_class(method).default_lr_scale)


@dataclass
class ModuleEvidence:
    """What the pilot measured for one module (its last diagnostics row) and the module's shape."""

    name: str
    block: int | None
    kind: str
    in_features: int
    out_features: int
    rel_norm: float
    r90: float
    effective_rank: float
    mag_angle: float  # relative row-norm change / rotation angle (both first order in the update)
    cap: int  # the pilot adapter's rank

    def describe(self, median: float) -> str:
        where = "-" if self.block is None else str(self.block)
        return (
            f"block {where}: rel_norm {self.rel_norm:.3g} ({self.rel_norm / median:.2f}x median), "
            f"r90 {self.r90:g}/{self.cap}, eff rank {self.effective_rank:.2f}, mag/angle {self.mag_angle:.3g}"
        )


def mag_angle_ratio(row: dict[str, Any], out_features: int) -> float:
    """Row-norm drift relative to the rms row norm of W0, over the mean rotation angle.

    `mag_drift` is first order in the update, `dir_drift = 1 - cos` second order; the angle
    `acos(1 - dir_drift)` puts both on the same footing. `||W0||_F = fro_norm / rel_norm`.
    """
    rel, fro = row["rel_norm"], row["fro_norm"]
    if not rel or not math.isfinite(rel) or rel <= 0:
        return 0.0
    rms_row = (fro / rel) / math.sqrt(out_features)
    rel_mag = row["mag_drift"] / rms_row if rms_row > 0 else 0.0
    angle = math.acos(max(-1.0, min(1.0, 1.0 - row["dir_drift"])))
    if angle <= 0:
        return math.inf if rel_mag > 0 else 0.0
    return rel_mag / angle


@dataclass
class Decision:
    """One module's tier (`TIERS`) and why."""

    evidence: ModuleEvidence
    tier: str
    reason: str


def decide(evidence: Sequence[ModuleEvidence], settings: SuggestSettings) -> list[Decision]:
    """Apply the decision rule to every module (see the module docstring)."""
    moved = [e.rel_norm for e in evidence if e.rel_norm > 0 and math.isfinite(e.rel_norm)]
    if not moved:
        raise SuggestError("the pilot's updates are all zero: train it longer or at a higher learning rate")
    median = statistics.median(moved)
    out = []
    for e in evidence:
        share = e.rel_norm / median
        if share < settings.skip_below:
            out.append(Decision(e, "skip", f"update {share:.2f}x the median < {settings.skip_below:g}: frozen"))
        elif share < settings.low_below:
            why = f"update {share:.2f}x the median < {settings.low_below:g}: low-rank {tier_method('low', settings)}"
            out.append(Decision(e, "low", why))
        elif e.r90 >= settings.saturation * e.cap:
            why = f"r90 {e.r90:g} of the pilot's {e.cap} >= {settings.saturation:g}x: rank-saturated"
            out.append(Decision(e, "high", f"{why}, {settings.high_rank_method}"))
        elif e.mag_angle >= settings.dora_above:
            method = tier_method("magnitude", settings)
            why = f"mag/angle {e.mag_angle:.3g} >= {settings.dora_above:g}: magnitude-led, {method}"
            out.append(Decision(e, "magnitude", why))
        else:
            out.append(Decision(e, "base", f"moderate, not saturated, direction-led: {tier_method('base', settings)}"))
    return out


def tier_method(tier: str, settings: SuggestSettings) -> str:
    """The method a tier gets: the registered method that declares the tier's role (`high` may be overridden)."""
    if tier == "skip":
        return "none"
    if tier == "high":
        return str(settings.high_rank_method)
    return method_for_role(TIER_ROLES[tier])


# -- from decisions to rules with ranks --------------------------------------------------------


@dataclass
class RuleChoice:
    """Modules of one kind that got the same tier: one policy rule with one rank."""

    tier: str
    method: str
    kind: str
    decisions: list[Decision]
    rank: int = 1
    lr_scale: float = 1.0

    @property
    def blocks(self) -> list[int | None]:
        return [d.evidence.block for d in self.decisions]

    @property
    def priority(self) -> float:
        """Rules whose modules moved most get spare budget first."""
        return statistics.fmean(d.evidence.rel_norm for d in self.decisions)

    def hparams(self) -> dict[str, Any]:
        return dict(get_adapter_class(self.method).hparams_for_rank(self.rank) or {"r": self.rank})

    def params(self) -> int:
        cls = get_adapter_class(self.method)
        hp = self.hparams()
        return sum(cls.count_parameters(d.evidence.in_features, d.evidence.out_features, **hp) for d in self.decisions)

    def max_rank(self) -> int:
        """No module's adapter may outgrow its layer's weights (beyond that, method `full` is cheaper)."""
        cls = get_adapter_class(self.method)
        return min(rank_within_layer(cls, d.evidence.in_features, d.evidence.out_features) for d in self.decisions)


@functools.cache
def rank_within_layer(cls: type, in_features: int, out_features: int) -> int:
    """The largest rank (at least 1) at which a `cls` adapter has no more trainable parameters than the layer."""

    def fits(r: int) -> bool:
        return cls.count_parameters(in_features, out_features, **cls.hparams_for_rank(r)) <= in_features * out_features

    lo, hi = 1, min(in_features, out_features)
    while lo < hi:  # parameter counts grow with the rank
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def group_rules(decisions: Sequence[Decision], settings: SuggestSettings) -> list[RuleChoice]:
    """One `RuleChoice` per (tier, kind), in the modules' order."""
    groups: dict[tuple[str, str], RuleChoice] = {}
    for d in decisions:
        if d.tier == "skip":
            continue
        method = tier_method(d.tier, settings)
        key = (d.tier, d.evidence.kind)
        if key not in groups:
            groups[key] = RuleChoice(d.tier, method, d.evidence.kind, [], lr_scale=settings.lr_scale(method))
        groups[key].decisions.append(d)
    kinds = list(dict.fromkeys(d.evidence.kind for d in decisions))  # model order, then tier order
    return sorted(groups.values(), key=lambda c: (kinds.index(c.kind), TIERS.index(c.tier)))


def _set_base_rank(choices: Sequence[RuleChoice], base: int, low_fraction: float) -> int:
    for c in choices:
        c.rank = min(c.max_rank(), max(1, math.floor(base * low_fraction)) if c.tier == "low" else base)
    return sum(c.params() for c in choices)


def allocate(choices: list[RuleChoice], budget: int, low_fraction: float) -> list[RuleChoice]:
    """Ranks so that `sum(params) <= budget`: the largest common base rank, then +1 per rule while it fits.

    When even rank 1 everywhere does not fit, the least-moved modules are dropped (left frozen)
    until it does; the returned list holds the rules that remain.
    """
    choices = [c for c in choices if c.decisions]
    while choices and _set_base_rank(choices, 1, low_fraction) > budget:
        weakest = min((d for c in choices for d in c.decisions), key=lambda d: d.evidence.rel_norm)
        for c in choices:
            if weakest in c.decisions:
                c.decisions.remove(weakest)
        choices = [c for c in choices if c.decisions]
    if not choices:
        raise SuggestError(f"a budget of {budget:,} parameters cannot hold even one adapter at rank 1")
    lo, hi = 1, max(c.max_rank() for c in choices)
    while lo < hi:  # parameter counts grow with the rank: bisect the largest base rank that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _set_base_rank(choices, mid, low_fraction) <= budget else (lo, mid - 1)
    _set_base_rank(choices, lo, low_fraction)
    grew = True
    while grew:
        grew = False
        for c in sorted(choices, key=lambda c: -c.priority):
            if c.rank >= c.max_rank():
                continue
            c.rank += 1
            if sum(x.params() for x in choices) <= budget:
                grew = True
            else:
                c.rank -= 1
    return choices


# -- the policy file ---------------------------------------------------------------------------

TIER_SUMMARY = {  # `{method}` is the tier's method (`tier_method`)
    "low": "small update (rel_norm < {low_below:g}x the median): low-rank {method}",
    "high": "rank-saturated pilot update (r90 >= {saturation:g} x pilot rank {pilot_rank}): {method}",
    "magnitude": "magnitude-led update (mag/angle >= {dora_above:g}): {method}",
    "base": "moderate, unsaturated, direction-led update: {method}",
}


def rule_modules(choice: RuleChoice, scope: Sequence[tuple[str, int | None]], blocks_path: str | None) -> list[str]:
    """The rule's module pattern: its kind when that names exactly its modules, else an anchored regex.

    `scope` is every adaptable module (name, block): a kind such as BERT's `output.dense` also
    matches `attention.output.dense` by suffix, so it is checked, not assumed.
    """
    import re

    names = {d.evidence.name for d in choice.decisions}
    blocks = set(choice.blocks)
    hits = {name for name, block in scope if block in blocks and pattern_matches(choice.kind, name)}
    if hits == names:
        return [choice.kind]
    prefix = re.escape(blocks_path) + r"\.\d+\." if blocks_path else ""
    return ["re:" + prefix + re.escape(choice.kind)]


def _rule_body(choice: RuleChoice, modules: list[str]) -> dict[str, Any]:
    return {
        "name": f"{choice.kind}-{choice.method}" + ("-low" if choice.tier == "low" else ""),
        "method": choice.method,
        "modules": modules,
        "depth": {"indices": sorted(b for b in choice.blocks if b is not None)},
        "hparams": choice.hparams(),
        "optim": {"lr_scale": choice.lr_scale},
    }


def _yaml_item(body: dict[str, Any]) -> list[str]:
    import yaml

    text = yaml.safe_dump([body], default_flow_style=None, sort_keys=False, width=10_000)
    return ["  " + line for line in text.splitlines()]


def policy_text(
    choices: Sequence[RuleChoice],
    decisions: Sequence[Decision],
    carried: Sequence[dict[str, Any]],
    settings: SuggestSettings,
    scope: Sequence[tuple[str, int | None]],
    blocks_path: str | None,
    header: Sequence[str],
) -> str:
    """The policy YAML; comments give the evidence behind every rule."""
    median = statistics.median(d.evidence.rel_norm for d in decisions if d.evidence.rel_norm > 0)
    lines = [f"# {h}" for h in header] + ["rules:"]
    for body in (r for r in carried if r.get("method") == "none"):
        lines += ["  # carried over from the base policy"] + _yaml_item(body)
    for c in choices:
        why = TIER_SUMMARY[c.tier].format(**vars(settings), method=c.method)
        lines.append(f"  # {c.kind} -> {c.method} r={c.rank}, lr x{c.lr_scale:g}: {why}")
        lines += [f"  #   {d.evidence.describe(median)}" for d in c.decisions]
        lines += _yaml_item(_rule_body(c, rule_modules(c, scope, blocks_path)))
    for body in (r for r in carried if r.get("method") != "none"):
        lines += ["  # carried over from the base policy (counted in the budget)"] + _yaml_item(body)
    chosen = {d.evidence.name for c in choices for d in c.decisions}
    frozen = [d for d in decisions if d.evidence.name not in chosen]
    if frozen:
        lines.append("# left frozen (no rule matches them):")
        dropped = " (dropped: the budget cannot hold it even at rank 1)"
        lines += [
            f"#   {d.evidence.kind} {d.evidence.describe(median)}: {d.reason}{dropped if d.tier != 'skip' else ''}"
            for d in frozen
        ]
    return "\n".join(lines) + "\n"


# -- pilot, evidence, the whole command ------------------------------------------------------

ALL_BLOCKS = {"fraction": [0.0, 1.0]}


def pilot_policy(settings: SuggestSettings, carried: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The low-rank method (LoRA) at `pilot_rank` on `pilot_modules` in every block, plus the carried rules."""
    method = pilot_method()
    rule = {
        "name": "pilot",
        "method": method,
        "modules": list(settings.pilot_modules),
        "depth": dict(ALL_BLOCKS),
        "hparams": get_adapter_class(method).hparams_for_rank(settings.pilot_rank),
    }
    first = [r for r in carried if r.get("method") == "none"]
    return {"rules": [*first, rule, *[r for r in carried if r.get("method") != "none"]], "strict": False}


def pilot_method() -> str:
    """The pilot trains the registered `low_rank` method: its diagnostics are what the rule reads."""
    return method_for_role("low_rank")


def pilot_candidates(model: Any, settings: SuggestSettings) -> list[str]:
    """Names of the Linear layers inside the repeated blocks that `pilot_modules` match."""

    blocks_path, _ = discover_blocks(model)
    if blocks_path is None:
        return []
    inside = [normalise_name(n) for n, m in model.named_modules() if is_supported_layer(m)]
    inside = [
        n for n in inside if n.startswith(blocks_path + ".") and n[len(blocks_path) + 1 :].split(".")[0].isdigit()
    ]
    return [n for n in inside if any(pattern_matches(p, n) for p in settings.pilot_modules)]


def check_before_pilot(model: Any, settings: SuggestSettings, carried: Sequence[dict[str, Any]]) -> Any:
    """The pilot's plan; `SuggestError` when it adapts nothing or no policy fits the budget."""

    if not pilot_candidates(model, settings):
        raise SuggestError(
            f"the pilot adapts nothing: `pilot_modules` {settings.pilot_modules} match no Linear layer inside the "
            f"repeated blocks ({discover_blocks(model)[0] or 'none found'}) of {type(model).__name__}"
        )
    try:
        plan = LayerPolicy.from_dict(pilot_policy(settings, carried), source="pilot policy").resolve(model)
    except PolicyError as err:
        raise SuggestError(f"the pilot policy does not fit the model: {err}") from None
    pilot = get_adapter_class(pilot_method())
    adapted = [r for r in plan.rows if r.method == pilot.method]
    smallest = min(pilot.count_parameters(r.in_features, r.out_features, **pilot.hparams_for_rank(1)) for r in adapted)
    smallest += carried_params(model, carried)
    if settings.budget < smallest:
        raise SuggestError(
            f"budget {settings.budget:,} is smaller than any policy: the smallest ({pilot.label} r=1 on one module, "
            f"plus the carried rules) has {smallest:,} trainable parameters"
        )
    check_budget_below_layers(settings.budget, [(r.in_features, r.out_features) for r in adapted], carried, model)
    return plan


def check_budget_below_layers(
    budget: int, shapes: Sequence[tuple[int, int]], carried: Sequence[dict[str, Any]], model: Any
) -> None:
    """Refuse a budget that holds every candidate layer in full: adapters that large cost more than their layers."""
    full = sum(i * o for i, o in shapes) + carried_params(model, carried)
    if budget >= full:
        raise SuggestError(
            f"budget {budget:,} is at least what training all {len(shapes)} candidate layers in full costs "
            f"({full:,} parameters, carried rules included): adapters that large would cost more than their layers. "
            f"Give a budget below {full:,}, or train those layers with method 'full'"
        )


def evidence_from_table(rows: Sequence[dict[str, Any]], plan: Any, cap: int) -> list[ModuleEvidence]:
    """Each adapted module's last diagnostics row joined with its plan row (shape, block, kind)."""
    last: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["module"] not in last or row["step"] >= last[row["module"]]["step"]:
            last[row["module"]] = row
    out = []
    for p in plan.rows:
        if p.method != pilot_method():
            continue
        row = last.get(p.name)
        if row is None or not math.isfinite(row["rel_norm"]):
            raise SuggestError(f"the pilot's diagnostics hold no measurement of {p.name}")
        out.append(
            ModuleEvidence(
                p.name,
                p.block,
                p.kind,
                p.in_features,
                p.out_features,
                row["rel_norm"],
                row["r90"],
                row["effective_rank"],
                mag_angle_ratio(row, p.out_features),
                cap,
            )
        )
    if not out:
        raise SuggestError("the pilot adapted nothing, so there is no evidence to decide from")
    return out


@dataclass
class SuggestResult:
    """The written policy, its plan's parameter count, and the per-module decisions behind it."""

    policy_path: Path
    trainable_params: int
    budget: int
    decisions: list[Decision]
    rules: list[RuleChoice]
    carried: list[dict[str, Any]] = field(default_factory=list)
    carried_params: int = 0

    def methods(self) -> dict[str, str]:
        """module name -> method (`none` for frozen modules)."""
        chosen = {d.evidence.name: c.method for c in self.rules for d in c.decisions}
        return {d.evidence.name: chosen.get(d.evidence.name, "none") for d in self.decisions}


def suggest_from_evidence(
    evidence: Sequence[ModuleEvidence],
    model: Any,
    settings: SuggestSettings,
    path: str | Path,
    carried: Sequence[dict[str, Any]] = (),
    header: Sequence[str] = (),
) -> SuggestResult:
    """Decide, allocate ranks under the budget, write the policy, and check it against the model's plan."""

    check_budget_below_layers(settings.budget, [(e.in_features, e.out_features) for e in evidence], carried, model)
    decisions = decide(evidence, settings)
    spare = settings.budget - carried_params(model, carried)
    rules = allocate(group_rules(decisions, settings), spare, settings.low_rank_fraction)
    predicted = settings.budget - spare + sum(c.params() for c in rules)
    blocks_path, _ = discover_blocks(model)
    scope = [(e.name, e.block) for e in evidence]
    header = [
        *header,
        f"trainable parameters: {predicted:,} of a budget of {settings.budget:,} (the resolved plan's count)",
    ]
    text = policy_text(rules, decisions, carried, settings, scope, blocks_path, header)
    path = Path(path)
    try:
        plan = LayerPolicy.from_text(text, source=str(path)).resolve(model)  # read back as a fit reads it
    except PolicyError as err:
        raise SuggestError(f"the suggested policy does not resolve on the model: {err}") from None
    if plan.trainable_params != predicted or plan.trainable_params > settings.budget:
        raise SuggestError(
            f"the suggested policy resolves to {plan.trainable_params:,} trainable parameters, expected "
            f"{predicted:,} within the budget {settings.budget:,}; check the carried rules for overlaps"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    carried_count = settings.budget - spare
    return SuggestResult(path, plan.trainable_params, settings.budget, decisions, rules, list(carried), carried_count)


def suggest(config: str | Path, out_dir: str | Path, settings: SuggestSettings) -> SuggestResult:
    """Pilot run, then `suggest_from_evidence`; writes `out_dir/suggested_policy.yaml`.

    Every input check (the pilot adapts something, the budget can hold a policy) runs before the
    pilot. A finished pilot of the same config and pilot settings in `out_dir` is reused (the
    thresholds and the budget can be changed without training again).
    """
    import yaml

    cfg = load_config(config)
    model = build_model(cfg)
    carried = carried_rules(cfg)
    plan = check_before_pilot(model, settings, carried)
    out = Path(out_dir)
    pilot_dir = out / "pilot"
    pilot_dir.mkdir(parents=True, exist_ok=True)
    pilot_path = pilot_dir / "pilot_policy.yaml"
    digest = fingerprint(config, {}, None)  # a changed config, or a file or preset it names, re-runs the pilot
    text = f"# pilot of {Path(config).resolve()} (sha256 {digest}), {settings.pilot_steps} steps\n"
    text += yaml.safe_dump(pilot_policy(settings, carried), sort_keys=False)
    done = (pilot_dir / TABLE_FILE).is_file() and pilot_path.is_file() and pilot_path.read_text() == text
    if not done:
        (pilot_dir / TABLE_FILE).unlink(missing_ok=True)
        pilot_path.write_text(text)
        run_fit(config, pilot_overrides(settings, pilot_path, pilot_dir))
    evidence = evidence_from_table(read_table(pilot_dir), plan, settings.pilot_rank)
    header = [
        f"lightning-peft suggest for {config}: pilot LoRA r={settings.pilot_rank}, {settings.pilot_steps} steps "
        f"(diagnostics in {pilot_dir}); decision rule: docs/suggest.md",
    ]
    return suggest_from_evidence(evidence, model, settings, out / "suggested_policy.yaml", carried, header)


def pilot_overrides(settings: SuggestSettings, policy_path: Path, pilot_dir: Path) -> dict[str, Any]:
    """The pilot is the config's own run, shortened, measured once at its end, without validation or logger."""
    return {
        "adapters.policy": str(policy_path),
        "trainer.max_steps": settings.pilot_steps,
        "trainer.limit_val_batches": 0,
        "trainer.logger": False,
        "trainer.default_root_dir": str(pilot_dir),
        "diagnostics.every_n_steps": settings.pilot_steps,
        "diagnostics.log_dir": str(pilot_dir),
        "diagnostics.plots": False,
    }


# -- handing the suggestion to `compare` ----------------------------------------------------------


def uniform_policy(method: str, rank: int, settings: SuggestSettings, carried: Sequence[dict[str, Any]]) -> dict:
    """One method at one rank on every pilot module, at that method's learning-rate scale (a baseline)."""
    policy = pilot_policy(settings, carried)
    rule = next(r for r in policy["rules"] if r.get("name") == "pilot")
    hparams = get_adapter_class(method).hparams_for_rank(rank)
    rule.update(name=f"{method}-uniform", method=method, hparams=hparams)
    rule["optim"] = {"lr_scale": settings.lr_scale(method)}
    return policy


def uniform_rank(method: str, evidence: Sequence[ModuleEvidence], budget: int) -> int:
    """The largest rank of `method` on every pilot module within `budget` (0 if even rank 1 does not fit),
    and at most the rank where an adapter reaches its layer's size."""
    cls = get_adapter_class(method)

    def cost(r: int) -> int:
        hp = cls.hparams_for_rank(r)
        return sum(cls.count_parameters(e.in_features, e.out_features, **hp) for e in evidence)

    lo, hi = 0, min(rank_within_layer(cls, e.in_features, e.out_features) for e in evidence)  # none outgrows its layer
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid - 1)
    return lo


def comparison_variants(
    result: SuggestResult, settings: SuggestSettings, carried: Sequence[dict[str, Any]], spare: int
) -> list[Any]:
    """The suggested policy and the uniform baselines (LoRA, DoRA, the high-rank method) at the same budget."""

    evidence = [d.evidence for d in result.decisions]
    variants = [Variant("suggested", {"adapters.policy": str(result.policy_path)})]
    roles = (method_for_role("low_rank"), method_for_role("magnitude"), settings.high_rank_method)
    for method in dict.fromkeys(roles):
        rank = uniform_rank(method, evidence, spare)
        if rank > 0:
            variants.append(
                Variant(f"{method}-r{rank}", {"adapters.policy": uniform_policy(method, rank, settings, carried)})
            )
    return variants


def rules_table(result: SuggestResult):
    """A rich table of the suggested rules."""
    from rich.table import Table

    table = Table(title=f"suggested policy: {result.trainable_params:,} of {result.budget:,} trainable parameters")
    for col in ("module kind", "blocks", "method", "r", "lr x", "params"):
        table.add_column(col, justify="right" if col in ("r", "lr x", "params") else "left")
    for c in result.rules:
        blocks = ",".join(str(b) for b in c.blocks)
        table.add_row(c.kind, blocks, c.method, str(c.rank), f"{c.lr_scale:g}", f"{c.params():,}")
    frozen = [d.evidence for d in result.decisions if result.methods()[d.evidence.name] == "none"]
    if frozen:
        table.add_row(f"{len(frozen)} module(s) left frozen", "", "none", "", "", "0")
    if result.carried_params:
        table.add_row("carried rules", "", "", "", "", f"{result.carried_params:,}")
    return table


def suggest_command(
    base: str,
    settings: SuggestSettings,
    out_dir: str = "suggestions",
    compare: bool = False,
    seed: int | None = None,
    strategy: Literal["heuristic", "search"] = "heuristic",
    search: SearchSettings | None = None,
    storage: str | None = None,
) -> Any:
    """Suggest a per-layer policy (`lightning-peft suggest CONFIG --settings.budget N [--strategy search]`).

    Args:
        base: the `lightning-peft fit` config of the task; its `none`/`full` rules are carried over.
        settings: the budget, the pilot and the thresholds of the decision rule (`SuggestSettings`).
        out_dir: where the pilot, `suggested_policy.yaml` and (with `compare`) the comparison go.
        compare: run the suggestion against uniform LoRA, DoRA and the high-rank method at the same
            budget with `lightning-peft compare` (in `out_dir/comparison`); with `search`, the chosen
            policy against the best uniform one on `search.compare_seeds`.
        seed: `seed_everything` for the comparison's runs (heuristic).
        strategy: `heuristic` (a pilot run and a decision rule) or `search` (an Optuna search over
            per-layer policies at the budget, `lightning_peft.experiments.policy_search`; needs the `search` extra).
        search: the search's settings (`--search.n_trials`, `--search.metric`, ...).
        storage: the search's Optuna storage URL (default: a SQLite file in `out_dir`); point several
            processes at one database to share a search.
    """
    from rich import get_console

    if strategy == "search":
        return search_command(base, settings, search or SearchSettings(), out_dir, compare, storage, heuristic=suggest)
    result = suggest(base, out_dir, settings)
    console = get_console()
    console.print(rules_table(result))
    console.print(f"policy written to {result.policy_path} (its comments give the evidence for every rule)")
    if compare:
        spare = settings.budget - result.carried_params
        variants = comparison_variants(result, settings, result.carried, spare)
        run_comparison(base, variants, Path(out_dir) / "comparison", seed=seed)
    return result
