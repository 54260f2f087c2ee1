"""`suggest --strategy search`: an Optuna search over per-layer policies at a trainable-parameter budget.

The modules inside the repeated blocks fall into **groups**: a module type (`attention`, `mlp`:
the first `module_types` glob that matches the module's name inside its block) times a depth
band (`outer`: the first and last `outer_blocks` blocks, `inner`: the rest). A trial picks per
group a method (every registered method with a rank, plus `none` and `full` where they fit),
a share of the budget and a learning-rate scale; each method then sizes itself to its share
(`AdapterMethod.rank_for_budget`), so nothing here knows a concrete method.

Before anything is sampled, every **uniform** policy at the budget (one method, one rank, on
every module) and the heuristic `suggest`'s policy are enqueued as the first trials, so the
search never reports a policy worse than one it measured. Short trials report their
validation metric to a pruner (successive halving or Hyperband) and the poor ones stop early.

Studies live in Optuna RDB storage (a SQLite file in the run folder by default): a stopped
search resumes without re-running finished trials, and several processes pointed at one
storage work on one search. docs/suggest.md states the rule that picks one policy from a
two-objective (learning, forgetting) Pareto front.

The pure parts (space -> policy, budget sizing, baselines, study, choice) take no training;
`make_objective` is the one place that trains.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_peft.adapters.base import ADAPTERS, get_adapter_class, is_supported_layer, layer_shape
from lightning_peft.experiments.compare import SharedParser, Variant, run_variant
from lightning_peft.experiments.runner import carried_params
from lightning_peft.policy import LayerPolicy, PolicyError, discover_blocks, normalise_name, pattern_matches

SPECIAL = ("none", "full")
UNIFORM = "uniform-"
HEURISTIC = "heuristic"
SEARCHED = "search"


class SearchError(ValueError):
    """A search that cannot run as asked; raised before anything trains."""


class Infeasible(Exception):
    """A sampled point of the space that no policy within the budget realises (the trial is skipped)."""


def require_optuna() -> Any:
    """Optuna, or a one-line error naming the extra that installs it."""
    try:
        import optuna
    except ImportError:
        raise SearchError("`suggest --strategy search` needs Optuna: pip install 'lightning-peft[search]'") from None
    return optuna


@dataclass
class SearchSettings:
    """What the search explores and how long it trains (`--search.*`).

    Args:
        n_trials: trials that train (complete or pruned), over every worker and every resume.
        trial_steps: `trainer.max_steps` of a trial (`None`: the config's); `compare` uses the config's.
        metric: the learning metric the runs log after each validation; `mode`: `max` or `min`.
        score: `last` (the metric at the trial's end) or `mean` (over its validations: learning speed).
        forget_metric: a second objective (e.g. `forget/prior_char_acc_change`); `forget_mode` its direction.
        module_types: type name -> globs over a module's name inside its block; the first match wins.
        outer_blocks: blocks at each end in the `outer` band; 0: no depth split.
        modules: globs of the candidate modules inside the blocks.
        methods: methods a group may take (default: every registered method with a rank, `none`, `full`).
        lr_scale_range: log-uniform range of each group's learning-rate scale; equal ends fix it.
        pruner: `successive_halving`, `hyperband` or `none` (always `none` with two objectives).
        reduction_factor: the pruner's eta (a third of the trials survive each rung with 3).
        prune_after: the first step at which a trial may be pruned (the pruner's `min_resource`;
            `None`: Optuna's estimate from the first trial). Early validations of a short run are
            noisy: pruning at the first one stops trials on little evidence.
        sampler: `tpe` or `nsga2` (two objectives) or `random`.
        seed: the trials' `seed_everything` and the sampler's seed.
        compare_seeds: seeds of `--compare true`; they must differ from `seed`.
        heuristic: also enqueue the heuristic `suggest`'s policy (a pilot run) as a first trial.
        study_name: the study inside the storage.
        heartbeat_s: a worker's heartbeat; a trial silent for twice this is failed and retried.
        timeout_s: stop this worker after this many seconds (finished trials are kept).
    """

    n_trials: int = 20
    trial_steps: int | None = None
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    score: Literal["last", "mean"] = "last"
    forget_metric: str | None = None
    forget_mode: Literal["min", "max"] = "max"
    module_types: dict[str, list[str]] = field(
        default_factory=lambda: {"attention": ["*attn*", "*attention*"], "mlp": ["*"]}
    )
    outer_blocks: int = 1
    modules: list[str] = field(default_factory=lambda: ["*"])
    methods: list[str] | None = None
    lr_scale_range: tuple[float, float] = (0.5, 2.0)
    pruner: Literal["successive_halving", "hyperband", "none"] = "successive_halving"
    reduction_factor: int = 3
    prune_after: int | None = None
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    seed: int = 0
    compare_seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    heuristic: bool = True
    study_name: str = "suggest"
    heartbeat_s: int = 60
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("n_trials", "reduction_factor", "heartbeat_s"):
            if getattr(self, name) < 1:
                raise SearchError(f"`search.{name}` must be >= 1, got {getattr(self, name)!r}")
        for name in ("trial_steps", "prune_after"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SearchError(f"`search.{name}` must be >= 1, got {getattr(self, name)!r}")
        if self.outer_blocks < 0:
            raise SearchError(f"`search.outer_blocks` must be >= 0, got {self.outer_blocks!r}")
        lo, hi = self.lr_scale_range
        if not 0 < lo <= hi:
            raise SearchError(f"`search.lr_scale_range` must be 0 < lo <= hi, got {list(self.lr_scale_range)}")
        if not self.module_types or not all(self.module_types.values()):
            raise SearchError("`search.module_types` needs at least one type, each with at least one glob")
        if self.seed in self.compare_seeds:
            raise SearchError(
                f"`search.compare_seeds` {self.compare_seeds} must not hold the search's seed {self.seed}"
            )
        for method in self.methods or []:
            if method not in SPECIAL and method not in ADAPTERS:
                raise SearchError(f"`search.methods`: unknown method {method!r}; choose from {search_methods(None)}")
            if method not in SPECIAL and get_adapter_class(method).hparams_for_rank(1) is None:
                raise SearchError(f"`search.methods`: {method!r} has no rank to size to a budget")

    @property
    def directions(self) -> list[str]:
        first = "maximize" if self.mode == "max" else "minimize"
        if self.forget_metric is None:
            return [first]
        return [first, "maximize" if self.forget_mode == "max" else "minimize"]


def search_methods(methods: Sequence[str] | None) -> list[str]:
    """The methods a group may take: the given ones, or every registered method with a rank plus `none`, `full`."""
    if methods is not None:
        return list(dict.fromkeys(methods))
    sized = [name for name, cls in ADAPTERS.items() if cls.hparams_for_rank(1) is not None]
    return [*sized, *SPECIAL]


# -- the space: modules, groups, sizing ------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    """One candidate Linear layer inside the repeated blocks."""

    name: str
    block: int
    kind: str  # the name inside its block (`self_attn.q_proj`)
    in_features: int
    out_features: int
    full_params: int  # what method `full` trains (weight and bias)


@dataclass
class Group:
    """Modules of one type in one depth band: one rule of every searched policy."""

    name: str
    modules: list[Module]
    depth: dict[str, Any]  # the rule's depth selector
    pattern: str  # an anchored regex naming exactly the group's module kinds inside the blocks

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [(m.in_features, m.out_features) for m in self.modules]


def scan_modules(model: nn.Module, patterns: Sequence[str]) -> tuple[str, int, list[Module]]:
    """(blocks path, number of blocks, the Linear layers inside the blocks that `patterns` match)."""
    blocks_path, num_blocks = discover_blocks(model)
    if blocks_path is None:
        raise SearchError(f"{type(model).__name__} has no repeated blocks: there are no depth bands to search")
    found = []
    for raw, module in model.named_modules():
        name = normalise_name(raw)
        if not is_supported_layer(module) or not name.startswith(blocks_path + "."):
            continue
        index, _, kind = name[len(blocks_path) + 1 :].partition(".")
        if index.isdigit() and any(pattern_matches(p, name) for p in patterns):
            in_f, out_f = layer_shape(module)
            found.append(Module(name, int(index), kind, in_f, out_f, sum(p.numel() for p in module.parameters())))
    if not found:
        raise SearchError(f"`search.modules` {list(patterns)} match no Linear layer inside {blocks_path}")
    return blocks_path, num_blocks, found


def depth_bands(num_blocks: int, outer: int) -> list[tuple[str, dict[str, Any], set[int]]]:
    """(band name, depth selector, blocks): `outer`/`inner`, or one band `all` when there is no inner block."""
    blocks = set(range(num_blocks))
    if outer == 0 or num_blocks <= 2 * outer:
        return [("all", {"fraction": [0.0, 1.0]}, blocks)]
    edge = set(range(outer)) | set(range(num_blocks - outer, num_blocks))
    return [("outer", {"outer": outer}, edge), ("inner", {"inner": outer}, blocks - edge)]


def module_type(module: Module, module_types: dict[str, list[str]]) -> str | None:
    return next((t for t, globs in module_types.items() if any(pattern_matches(g, module.kind) for g in globs)), None)


def make_groups(
    modules: Sequence[Module], blocks_path: str, num_blocks: int, module_types: dict[str, list[str]], outer: int
) -> list[Group]:
    """Type x band groups in the order of `module_types`, then outer before inner; empty groups dropped."""
    groups = []
    for type_name in module_types:
        typed = [m for m in modules if module_type(m, module_types) == type_name]
        for band, depth, blocks in depth_bands(num_blocks, outer):
            members = [m for m in typed if m.block in blocks]
            if members:
                kinds = "|".join(re.escape(k) for k in sorted({m.kind for m in members}))
                pattern = f"re:{re.escape(blocks_path)}\\.\\d+\\.(?:{kinds})"
                groups.append(Group(f"{type_name}-{band}", members, dict(depth), pattern))
    return groups


def size_group(method: str, modules: Sequence[Module], budget: int) -> tuple[dict[str, Any], int] | None:
    """`(hparams, parameters)` of `method` filling `budget` on `modules`; `None` when it does not fit."""
    if method == "none":
        return {}, 0
    if method == "full":
        count = sum(m.full_params for m in modules)
        return ({}, count) if count <= budget else None
    return get_adapter_class(method).rank_for_budget([(m.in_features, m.out_features) for m in modules], budget)


def count_group(method: str, hparams: dict[str, Any], modules: Sequence[Module]) -> int:
    """Trainable parameters of `method` with `hparams` on `modules`."""
    if method in SPECIAL:
        return 0 if method == "none" else sum(m.full_params for m in modules)
    cls = get_adapter_class(method)
    return sum(cls.count_parameters(m.in_features, m.out_features, **hparams) for m in modules)


@dataclass
class GroupChoice:
    """One group's method, sized hyper-parameters, their parameter count and learning-rate scale."""

    group: Group
    method: str
    hparams: dict[str, Any]
    params: int
    lr_scale: float = 1.0

    def describe(self) -> str:
        if self.method == "none":
            return f"{self.group.name}: none"
        hp = ", ".join(f"{k}={v}" for k, v in self.hparams.items())
        return f"{self.group.name}: {self.method}{f' {hp}' if hp else ''}, lr x{self.lr_scale:.3g}, {self.params:,}"


@dataclass
class SearchSpace:
    """Everything a trial needs to turn sampled values into a policy within `budget`."""

    groups: list[Group]
    options: dict[str, list[str]]  # group name -> methods that fit the budget on it
    budget: int  # for the searched modules (the carried `full` rules' parameters taken off)
    lr_range: tuple[float, float]
    carried: list[dict[str, Any]] = field(default_factory=list)

    @property
    def modules(self) -> list[Module]:
        return [m for g in self.groups for m in g.modules]

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between the runs of one study (Optuna's distributions depend on it)."""
        groups = {g.name: [m.name for m in g.modules] for g in self.groups}
        return {"groups": groups, "options": self.options, "budget": self.budget, "lr": list(self.lr_range)}


def build_space(
    model: nn.Module, settings: SearchSettings, budget: int, carried: Sequence[dict[str, Any]] = ()
) -> SearchSpace:
    """Groups of `model` and the methods that fit `budget` on each; `SearchError` when nothing fits."""
    blocks_path, num_blocks, modules = scan_modules(model, settings.modules)
    groups = make_groups(modules, blocks_path, num_blocks, settings.module_types, settings.outer_blocks)
    methods = search_methods(settings.methods)
    options = {g.name: [m for m in methods if size_group(m, g.modules, budget) is not None] for g in groups}
    if not any(m != "none" for opts in options.values() for m in opts):
        raise SearchError(f"a budget of {budget:,} parameters holds no method from {methods} on any group")
    return SearchSpace(groups, options, budget, tuple(settings.lr_scale_range), list(carried))


# -- a trial's policy ------------------------------------------------------------------------------

SHARE_RANGE = (0.05, 1.0)  # each adapter group's weight; the budget is split in proportion


def allocate(space: SearchSpace, methods: dict[str, str], weights: dict[str, float]) -> list[GroupChoice]:
    """Size every group: `full` groups first (fixed cost), the rest of the budget split by `weights`.

    What the floors of the per-group ranks leave unused goes to the groups in order of weight,
    each growing while it fits. `Infeasible` when a group cannot hold its method.
    """
    fixed = sum(count_group("full", {}, g.modules) for g in space.groups if methods[g.name] == "full")
    spare = space.budget - fixed
    if spare < 0:
        raise Infeasible(f"the `full` groups need {fixed:,} parameters, over the budget {space.budget:,}")
    adapters = [g for g in space.groups if methods[g.name] not in SPECIAL]
    total = sum(weights[g.name] for g in adapters)
    choices: dict[str, GroupChoice] = {}
    for g in space.groups:
        method = methods[g.name]
        share = int(spare * weights[g.name] / total) if method not in SPECIAL else space.budget
        sized = size_group(method, g.modules, share)
        if sized is None:
            raise Infeasible(f"{g.name}: {method} does not fit its share of {share:,} parameters")
        choices[g.name] = GroupChoice(g, method, *sized)
    left = space.budget - sum(c.params for c in choices.values())
    for g in sorted(adapters, key=lambda g: -weights[g.name]):
        grown = size_group(methods[g.name], g.modules, choices[g.name].params + left)
        if grown is not None:
            left -= grown[1] - choices[g.name].params
            choices[g.name] = GroupChoice(g, methods[g.name], *grown)
    return [choices[g.name] for g in space.groups]


def sample_choices(trial: Any, space: SearchSpace) -> list[GroupChoice]:
    """Suggest a method, a budget weight and a learning-rate scale per group; sized by `allocate`."""
    methods = {g.name: trial.suggest_categorical(f"{g.name}.method", space.options[g.name]) for g in space.groups}
    if all(m == "none" for m in methods.values()):
        raise Infeasible("every group is `none`: the policy trains nothing")
    weights = {g.name: trial.suggest_float(f"{g.name}.share", *SHARE_RANGE) for g in space.groups
               if methods[g.name] not in SPECIAL}  # fmt: skip
    lo, hi = space.lr_range
    choices = allocate(space, methods, weights)
    for c in choices:
        if c.method != "none":
            c.lr_scale = trial.suggest_float(f"{c.group.name}.lr_scale", lo, hi, log=True) if lo < hi else lo
    return choices


def policy_from_choices(choices: Sequence[GroupChoice], carried: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The policy mapping: carried `none` rules, one rule per trained group, carried `full` rules."""
    rules = [dict(r) for r in carried if r.get("method") == "none"]
    for c in choices:
        if c.method == "none":
            continue
        rule = {"name": f"{c.group.name}-{c.method}", "method": c.method, "modules": [c.group.pattern],
                "depth": dict(c.group.depth)}  # fmt: skip
        if c.hparams:
            rule["hparams"] = dict(c.hparams)
        rule["optim"] = {"lr_scale": float(f"{c.lr_scale:.4g}")}
        rules.append(rule)
    rules += [dict(r) for r in carried if r.get("method") != "none"]
    return {"rules": rules, "strict": not carried}


def check_budget(policy: dict[str, Any], model: nn.Module, budget: int) -> int:
    """The policy's trainable parameters from the resolved plan; `Infeasible` when over `budget`."""
    try:
        plan = LayerPolicy.from_dict(policy, source="searched policy").resolve(model)
    except PolicyError as err:
        raise Infeasible(str(err)) from None
    if plan.trainable_params > budget:
        raise Infeasible(f"{plan.trainable_params:,} trainable parameters, over the budget {budget:,}")
    return plan.trainable_params


# -- the first trials: uniform policies and the heuristic --------------------------------------


@dataclass
class Baseline:
    """A policy enqueued before the sampler runs: its label, the space's values that approximate it, the policy."""

    label: str
    params: dict[str, Any]
    policy: dict[str, Any]
    trainable: int


def approximate_params(space: SearchSpace, choices: Sequence[GroupChoice]) -> dict[str, Any]:
    """Space values close to `choices` (each group's weight from its parameter share), clipped to the ranges."""
    largest = max([c.params for c in choices if c.method not in SPECIAL] or [1])
    lo, hi = space.lr_range
    params: dict[str, Any] = {}
    for c in choices:
        name = c.group.name
        params[f"{name}.method"] = c.method
        if c.method not in SPECIAL:
            params[f"{name}.share"] = min(SHARE_RANGE[1], max(SHARE_RANGE[0], c.params / largest))
        if c.method != "none" and lo < hi:
            params[f"{name}.lr_scale"] = min(hi, max(lo, c.lr_scale))
    return params


def uniform_baselines(space: SearchSpace) -> list[Baseline]:
    """Every method that fits on all searched modules at one rank: the largest such rank, lr scale 1."""
    out = []
    methods = list(dict.fromkeys(m for opts in space.options.values() for m in opts if m != "none"))
    for method in methods:
        if any(method not in space.options[g.name] for g in space.groups):
            continue
        sized = size_group(method, space.modules, space.budget)
        if sized is None:
            continue
        hparams = sized[0]
        choices = [GroupChoice(g, method, hparams, count_group(method, hparams, g.modules)) for g in space.groups]
        rank = f"-r{hparams['r']}" if "r" in hparams else ""
        policy = policy_from_choices(choices, space.carried)
        out.append(Baseline(f"{UNIFORM}{method}{rank}", approximate_params(space, choices), policy, sized[1]))
    return out


def baseline_from_policy(space: SearchSpace, label: str, policy: dict[str, Any], model: nn.Module) -> Baseline:
    """A fixed policy (the heuristic's) as a baseline; its space values from its plan, group by group."""
    plan = LayerPolicy.from_dict(policy, source=label).resolve(model)
    rows = {r.name: r for r in plan.rows}
    choices = []
    for g in space.groups:
        mine = [rows[m.name] for m in g.modules if m.name in rows]
        methods = [r.method for r in mine] or ["none"]
        method = max(dict.fromkeys(methods), key=methods.count)  # the group's most common method
        method = method if method in space.options[g.name] else "none"
        scales = [r.optim.get("lr_scale", 1.0) for r in mine]
        lr = math.exp(sum(map(math.log, scales)) / len(scales)) if scales else 1.0
        choices.append(GroupChoice(g, method, {}, sum(r.params for r in mine), lr))
    return Baseline(label, approximate_params(space, choices), policy, plan.trainable_params)


def enqueue_baselines(study: Any, baselines: Sequence[Baseline]) -> list[str]:
    """Enqueue the baselines no trial of the study holds yet (a resumed search enqueues nothing twice)."""
    present = {t.user_attrs.get("label") for t in study.get_trials(deepcopy=False)}
    added = []
    for b in baselines:
        if b.label not in present:
            study.enqueue_trial(b.params, user_attrs={"label": b.label, "policy": b.policy, "trainable": b.trainable})
            added.append(b.label)
    return added


def trial_policy(trial: Any, space: SearchSpace, model: nn.Module) -> tuple[dict[str, Any], str]:
    """The trial's policy and label: an enqueued (or retried) trial's own, else the sampled one, checked."""
    fixed = trial.user_attrs.get("policy")
    try:
        choices = sample_choices(trial, space)  # also for fixed trials: the sampler learns from their values
    except Infeasible:
        if fixed is None:
            raise
        choices = []
    if fixed is not None:
        return fixed, trial.user_attrs.get("label", SEARCHED)
    policy = policy_from_choices(choices, space.carried)
    trial.set_user_attr("trainable", check_budget(policy, model, space.budget + carried_full(space, model)))
    trial.set_user_attr("policy", policy)
    trial.set_user_attr("label", SEARCHED)
    trial.set_user_attr("groups", [c.describe() for c in choices])
    return policy, SEARCHED


def carried_full(space: SearchSpace, model: nn.Module) -> int:
    return carried_params(model, space.carried)


# -- the study ---------------------------------------------------------------------------------------


def make_sampler(settings: SearchSettings, seed: int, startup: int) -> Any:
    optuna = require_optuna()
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, startup))
    return optuna.samplers.TPESampler(
        seed=seed, multivariate=True, group=True, constant_liar=True, n_startup_trials=startup
    )


def make_pruner(settings: SearchSettings) -> Any:
    """Successive halving or Hyperband on the trials' reported steps; none with two objectives."""
    optuna = require_optuna()
    if settings.forget_metric is not None or settings.pruner == "none":
        return optuna.pruners.NopPruner()
    eta = settings.reduction_factor
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=settings.prune_after or 1, reduction_factor=eta)
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=settings.prune_after or "auto", reduction_factor=eta)


def storage_url(storage: str | None, out_dir: str | Path) -> str:
    """`--storage` as given, or a SQLite file in the run folder."""
    if storage:
        return storage
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(Path(out_dir) / 'search.db').resolve()}"


def open_study(
    url: str, settings: SearchSettings, space_fingerprint: dict[str, Any] | None = None, startup: int = 10
) -> Any:
    """Create or load the study; a stored study of another space or other objectives is an error naming both."""
    optuna = require_optuna()
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    storage = RDBStorage(
        url, engine_kwargs=engine, heartbeat_interval=settings.heartbeat_s, grace_period=2 * settings.heartbeat_s,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
    )  # fmt: skip
    seed = settings.seed + len(_existing_trials(storage, settings.study_name))  # a second worker samples apart
    try:
        study = optuna.create_study(
            storage=storage, study_name=settings.study_name, directions=settings.directions, load_if_exists=True,
            sampler=make_sampler(settings, seed, startup), pruner=make_pruner(settings),
        )  # fmt: skip
    except ValueError as err:
        raise SearchError(
            f"study {settings.study_name!r} in {url}: {err}; choose another --search.study_name"
        ) from None
    if directions(study) != settings.directions:
        raise SearchError(
            f"study {settings.study_name!r} in {url} optimises {directions(study)}, not {settings.directions} "
            "(one objective or two); choose another --search.study_name"
        )
    if space_fingerprint is not None:
        stored = study.user_attrs.get("space")
        if stored is None:
            study.set_user_attr("space", space_fingerprint)
        elif stored != space_fingerprint:
            raise SearchError(
                f"study {settings.study_name!r} in {url} searched another space (groups, methods or budget differ); "
                "choose another --search.study_name or run folder"
            )
    return study


def _existing_trials(storage: Any, study_name: str) -> list[Any]:
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return []
    return storage.get_all_trials(study_id, deepcopy=False)


def trained_trials(study: Any) -> list[Any]:
    """Trials that trained: complete, or pruned by the pruner (not skipped as infeasible)."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return [t for t in done if "infeasible" not in t.user_attrs]


def optimize(
    study: Any, objective: Callable[[Any], Any], n_trials: int, timeout_s: float | None = None, catch: tuple = ()
) -> None:
    """Run trials until `n_trials` have trained in the whole study (every worker, every resume).

    Infeasible points are skipped (pruned before training, not counted); at most 20 of them per
    trained trial, so a space where little fits still ends.
    """

    def stop_when_done(study: Any, trial: Any) -> None:
        if len(trained_trials(study)) >= n_trials:
            study.stop()

    if len(trained_trials(study)) >= n_trials:
        return
    study.optimize(objective, n_trials=20 * n_trials, timeout=timeout_s, callbacks=[stop_when_done], catch=catch)


# -- choosing --------------------------------------------------------------------------------------


def _better(a: float, b: float, direction: str) -> bool:
    return a > b if direction == "maximize" else a < b


def pareto_front(trials: Sequence[Any], directions: Sequence[str]) -> list[Any]:
    """Trials no other trial dominates (at least as good on every objective, better on one)."""

    def dominates(a: Any, b: Any) -> bool:
        pairs = list(zip(a.values, b.values, directions, strict=True))
        return all(x == y or _better(x, y, d) for x, y, d in pairs) and any(_better(x, y, d) for x, y, d in pairs)

    return [t for t in trials if not any(dominates(o, t) for o in trials if o is not t)]


def pick(trials: Sequence[Any], directions: Sequence[str]) -> Any | None:
    """The rule of docs/suggest.md: one objective, the best value; two, the Pareto trial nearest the ideal point.

    Each objective is scaled to [0, 1] over the front (1: the front's best); the trial with the
    smallest distance to (1, 1) wins. Ties go to the better first objective, then to the earlier
    trial, so a uniform baseline (enqueued first) wins a tie with a searched policy.
    """
    trials = [t for t in trials if t.values is not None and all(math.isfinite(v) for v in t.values)]
    if not trials:
        return None
    front = pareto_front(trials, directions)

    def scaled(t: Any, i: int) -> float:
        vals = [f.values[i] for f in front]
        lo, hi = min(vals), max(vals)
        x = 1.0 if hi == lo else (t.values[i] - lo) / (hi - lo)
        return x if directions[i] == "maximize" else 1.0 - x

    def key(t: Any) -> tuple[float, float, int]:
        gap = math.hypot(*(1.0 - scaled(t, i) for i in range(len(directions))))
        first = -t.values[0] if directions[0] == "maximize" else t.values[0]
        return round(gap, 12), first, t.number

    return min(front, key=key)


def directions(study: Any) -> list[str]:
    """The study's directions as `maximize` / `minimize`."""
    return [d.name.lower() for d in study.directions]


def is_uniform(trial: Any) -> bool:
    return str(trial.user_attrs.get("label", "")).startswith(UNIFORM)


@dataclass
class Choice:
    """The chosen trial, the best uniform trial (by the same rule) and the best non-uniform one."""

    chosen: Any
    best_uniform: Any | None
    best_other: Any | None

    @property
    def uniform_wins(self) -> bool:
        return is_uniform(self.chosen)


def choose(study: Any) -> Choice:
    """Apply `pick` to the complete trials, to the uniform ones and to the others."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    chosen = pick(done, directions(study))
    if chosen is None:
        raise SearchError("no trial of the search completed; see the trials table for the failures")
    uniform = pick([t for t in done if is_uniform(t)], directions(study))
    other = pick([t for t in done if not is_uniform(t)], directions(study)) or furthest_pruned(study)
    return Choice(chosen, uniform, other)


def furthest_pruned(study: Any) -> Any | None:
    """The non-uniform trial that got furthest before it was pruned, the best at that step (a rival to
    re-run on held-out seeds when every per-layer policy was pruned)."""
    from optuna.trial import TrialState

    pruned = [t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
              if t.intermediate_values and "policy" in t.user_attrs and not is_uniform(t)]  # fmt: skip
    if not pruned:
        return None
    sign = 1 if directions(study)[0] == "maximize" else -1

    def reach(t: Any) -> tuple[int, float]:
        step = max(t.intermediate_values)
        return step, sign * t.intermediate_values[step]

    return max(pruned, key=reach)


# -- training one trial ----------------------------------------------------------------------------


def curve_score(values: Sequence[float], score: str) -> float:
    """The objective from a run's validation values: the last one, or their mean (learning speed)."""
    if not values:
        return math.nan
    return values[-1] if score == "last" else sum(values) / len(values)


class TrialPruning(Callback):
    """Report the objective after every validation (`trial.report`); stop the fit when the pruner says so.

    Stopping through `trainer.should_stop` ends the run the way early stopping does; the
    objective raises `optuna.TrialPruned` afterwards (an exception inside the fit would be
    recorded as a failed run).
    """

    def __init__(self, trial: Any, metric: str, score: str) -> None:
        self.trial, self.metric, self.score = trial, metric, score
        self.values: list[float] = []
        self.pruned_at: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.metric not in trainer.callback_metrics:
            return
        self.values.append(float(trainer.callback_metrics[self.metric]))
        step = trainer.global_step
        self.trial.report(curve_score(self.values, self.score), step)
        if self.trial.should_prune():
            self.pruned_at = step
            trainer.should_stop = True


class TrialRunError(RuntimeError):
    """A trial's fit failed (the trial is recorded as failed, the search goes on)."""


def make_objective(
    config: str | Path, space: SearchSpace, model: nn.Module, settings: SearchSettings, out_dir: str | Path
) -> Callable[[Any], Any]:
    """The training objective: the trial's policy as one short `compare` run in `out_dir/trials`."""
    optuna = require_optuna()

    shared = SharedParser()

    def objective(trial: Any) -> Any:
        try:
            policy, label = trial_policy(trial, space, model)
        except Infeasible as err:
            trial.set_user_attr("infeasible", str(err))
            raise optuna.TrialPruned(f"infeasible: {err}") from None
        overrides: dict[str, Any] = {"adapters.policy": policy, "trainer.enable_checkpointing": False}
        if settings.trial_steps is not None:
            overrides["trainer.max_steps"] = settings.trial_steps
        pruning = TrialPruning(trial, settings.metric, settings.score)
        callbacks = [pruning] if settings.forget_metric is None else []
        variant = Variant(f"trial-{trial.number:04d}", overrides)
        record, curves, _ = run_variant(config, variant, Path(out_dir) / "trials", settings.seed, shared, callbacks)
        trial.set_user_attr("wall_time_s", round(record.wall_time_s, 1))
        trial.set_user_attr("trainable", record.trainable_params)
        if record.status != "ok":
            raise TrialRunError(f"trial {trial.number} ({label}): {record.error}")
        values = [c[settings.metric] for c in curves if settings.metric in c]
        trial.set_user_attr("curve", values)
        if pruning.pruned_at is not None:
            trial.set_user_attr("pruned_at", pruning.pruned_at)
            raise optuna.TrialPruned(f"pruned at step {pruning.pruned_at}")
        learn = curve_score(values, settings.score)
        if settings.forget_metric is None:
            return learn
        return learn, record.metrics.get(settings.forget_metric, math.nan)

    return objective
