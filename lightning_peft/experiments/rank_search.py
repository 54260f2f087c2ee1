"""The LoRA article's procedure for choosing a rank, as plain functions over an `evaluate` callable.

Hu et al. 2021 (arXiv 2106.09685, §7.2 and Table 6) tune LoRA by starting from a very small
rank, raising it (1, 2, 4, 8, ...) while validation performance still improves, and then, at
that rank, adapting more weight matrices (W_q, W_v -> all of attention -> every Linear). This
module follows that procedure:

1. **Rank sweep** on the first target set: evaluate `ranks` in order; stop at the first rank
   whose gain over the previous one is below `plateau` (the previous rank is chosen: the last
   increase did not pay), at a failed run, or when the cost exceeds `cost_limit`.
2. **Widening** at the chosen rank: evaluate the next target sets in the configured order;
   keep a wider set while it gains at least `plateau` over the chosen one and stays within the
   cost limit, stop at the first that does not.

`rank_search(evaluate, ...)` takes any `evaluate(variant) -> record` (a `compare` run, or a
synthetic curve in the tests) and returns every step with its decision.

One deliberate difference: the article fixes `alpha` to the first rank tried, so `alpha / r`
shrinks as the rank grows and larger ranks train with smaller steps (rsLoRA, arXiv 2312.03732,
shows this slows high ranks down). By default every rank here keeps `alpha = 2 r` (the ratio of
the project's presets), so the sweep compares ranks, not step sizes; `alpha: <number>` restores
the article's fixed alpha.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_peft.adapters.base import get_adapter_class, is_supported_layer, method_for_role
from lightning_peft.experiments.compare import Variant, run_comparison
from lightning_peft.experiments.names import name_problem
from lightning_peft.experiments.runner import build_model, carried_rules, load_config
from lightning_peft.policy import LayerPolicy, PolicyError, discover_blocks, normalise_name, pattern_matches

# Named target sets; a widening step is one of these names or `{name: [globs]}`. The globs cover
# Llama/Mistral (`q_proj`...), BERT (`attention.self.query`...) and GPT-2 (`c_attn`, fused q/k/v).
WIDENING_STEPS: dict[str, list[str]] = {
    "qv": ["q_proj", "v_proj", "attention.self.query", "attention.self.value", "attn.c_attn"],
    "attention": [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "attn.c_attn",
        "attn.c_proj",
    ],
    "all_linear": ["*"],
}
ALL_BLOCKS = {"fraction": [0.0, 1.0]}  # rank-search rules adapt the repeated blocks only
COST_KEYS = ("trainable_params", "step_time_median_s", "peak_memory_mb")


class RankSearchError(ValueError):
    """A rank search that cannot run as configured; raised before any run starts."""


class NoRankKept(RankSearchError):
    """The search ran but not even its first step could be kept (exit code 1, not 2: the input was fine)."""


@dataclass
class TargetSet:
    """One widening step: a name and the module globs it adapts."""

    name: str
    modules: list[str]


def parse_widening(steps: Sequence[str | dict[str, list[str]]]) -> list[TargetSet]:
    """Built-in names (`qv`, `attention`, `all_linear`) or `{name: [globs]}` -> `TargetSet`s."""
    if not steps:
        raise RankSearchError("`widen` is empty: give at least the target set of the rank sweep")
    out: list[TargetSet] = []
    for i, step in enumerate(steps):
        if isinstance(step, str):
            if step not in WIDENING_STEPS:
                raise RankSearchError(
                    f"unknown widening step {step!r} (step {i}); built-in steps are {sorted(WIDENING_STEPS)}, "
                    "or give {name: [module globs]}"
                )
            out.append(TargetSet(step, list(WIDENING_STEPS[step])))
        elif isinstance(step, dict) and len(step) == 1:
            ((name, globs),) = step.items()
            if not isinstance(globs, list) or not globs or not all(isinstance(g, str) and g for g in globs):
                raise RankSearchError(f"widening step {i} ({name!r}) needs a non-empty list of module globs")
            out.append(TargetSet(str(name), list(globs)))
        else:
            raise RankSearchError(f"widening step {i} must be a name or {{name: [globs]}}, got {step!r}")
    names = [t.name for t in out]
    if len({n.casefold() for n in names}) != len(names):  # variant folders: `QV` and `qv` are one on macOS
        raise RankSearchError(f"widening steps repeat a name (case-insensitively): {names}")
    return out


@dataclass
class SearchSettings:
    """What the search compares and when it stops.

    Args:
        metric: validation metric to maximise (or minimise, `mode: min`), a key of the run's metrics.
        mode: `max` or `min`.
        ranks: ranks of the sweep, increasing.
        widen: target sets in order; the first is the sweep's, the rest are tried at the chosen rank.
        plateau: the smallest gain in `metric` that justifies a larger rank or a wider target set.
        cost_key: `trainable_params`, `step_time_median_s`, `peak_memory_mb`, or a metric name.
        cost_limit: a variant whose cost exceeds this is not kept (not even run, when the cost
            is the parameter count, which the plan knows before training).
        method: the adapter method searched (LoRA in the article).
        alpha: fixed `alpha` for methods that take one (the article's choice); `None`: `alpha = 2 r`.
        hparams: further hyper-parameters of the searched method (e.g. `dropout`).
    """

    metric: str
    mode: str = "max"
    ranks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    widen: list[str | dict[str, list[str]]] = field(default_factory=lambda: ["qv", "attention", "all_linear"])
    plateau: float = 0.01
    cost_key: str = "trainable_params"
    cost_limit: float | None = None
    method: str = field(default_factory=lambda: method_for_role("low_rank"))
    alpha: float | None = None
    hparams: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise RankSearchError(f"`mode` must be 'max' or 'min', got {self.mode!r}")
        ranks = list(self.ranks)
        if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
            raise RankSearchError(f"`ranks` must be positive integers, got {ranks}")
        if ranks != sorted(set(ranks)):
            raise RankSearchError(f"`ranks` must be strictly increasing, got {ranks}")
        if not math.isfinite(self.plateau) or self.plateau < 0:
            raise RankSearchError(f"`plateau` must be a finite number >= 0, got {self.plateau}")
        if self.cost_limit is not None and not self.cost_limit > 0:
            raise RankSearchError(f"`cost_limit` must be positive, got {self.cost_limit}")
        self.targets = parse_widening(self.widen)
        for target in self.targets:  # every variant name the search could make, before anything runs
            problem = name_problem(variant_name(max(ranks), target.name))
            if problem is not None:
                raise RankSearchError(
                    f"widening step {target.name!r}: its variants' names ({variant_name(max(ranks), target.name)!r}) "
                    f"{problem}"
                )
        try:
            get_adapter_class(self.method)
        except ValueError as err:
            raise RankSearchError(f"`method`: {err}") from None

    def gain(self, new: float, old: float) -> float:
        return new - old if self.mode == "max" else old - new


@dataclass
class SearchStep:
    """One evaluated (or skipped) variant and what the search decided from it."""

    phase: str  # "rank" or "widen"
    rank: int
    targets: str
    name: str
    metric: float
    cost: float
    status: str
    decision: str


@dataclass
class SearchResult:
    """Every step, and the chosen rank and target set (`chosen` is the step that won)."""

    steps: list[SearchStep]
    chosen: SearchStep

    @property
    def rank(self) -> int:
        return self.chosen.rank

    @property
    def targets(self) -> str:
        return self.chosen.targets


def variant_name(rank: int, targets: str) -> str:
    return f"r{rank}-{targets}"


def search_policy(settings: SearchSettings, rank: int, targets: TargetSet, keep: Sequence[dict] = ()) -> dict:
    """The policy of one variant: the searched method at `rank` on `targets` in every block.

    `keep`: rules of the base policy that are not part of the search (`none` carve-outs go first,
    `full` rules such as a new classification head go last), so every variant trains them alike.
    """

    hparams = {**(get_adapter_class(settings.method).hparams_for_rank(rank) or {}), **settings.hparams, "r": rank}
    if settings.alpha is not None and "alpha" in hparams and "alpha" not in settings.hparams:
        hparams["alpha"] = settings.alpha  # the article's fixed alpha
    rule = {
        "name": f"{settings.method}-{targets.name}",
        "method": settings.method,
        "modules": list(targets.modules),
        "depth": dict(ALL_BLOCKS),
        "hparams": hparams,
    }
    first = [r for r in keep if r.get("method") == "none"]
    last = [r for r in keep if r.get("method") != "none"]
    return {"rules": [*first, rule, *last], "strict": False}


Record = Any  # anything with .status, .metrics (dict) and the cost attributes (compare.VariantRecord)
Evaluate = Callable[[Any], Record]
Estimate = Callable[[int, TargetSet], float | None]


def _value(record: Record, key: str) -> float:
    if key in COST_KEYS:
        return float(getattr(record, key))
    value = record.metrics.get(key)
    if value is None:
        raise RankSearchError(f"run {record.name!r} logged no {key!r}; it logged {sorted(record.metrics)}")
    return float(value)


@dataclass
class SearchVariant:
    """What `evaluate` receives: the variant's name, rank, target set and policy (a mapping)."""

    name: str
    rank: int
    targets: TargetSet
    policy: dict[str, Any]


def _failed(record: Record) -> str | None:
    status = str(getattr(record, "status", "ok"))
    error = getattr(record, "error", None)
    return (error or status) if error or status.startswith("fail") else None


class _Searcher:
    """Runs one step at a time and records it; the two phases below decide from the steps."""

    def __init__(self, evaluate: Evaluate, settings: SearchSettings, keep: Sequence[dict], estimate: Estimate | None):
        self.evaluate, self.settings, self.keep, self.estimate = evaluate, settings, keep, estimate
        self.steps: list[SearchStep] = []

    def run(self, phase: str, rank: int, target: TargetSet) -> SearchStep:
        s = self.settings
        name = variant_name(rank, target.name)
        step = SearchStep(phase, rank, target.name, name, math.nan, math.nan, "ok", "")
        self.steps.append(step)
        predicted = self.estimate(rank, target) if self.estimate and s.cost_key == "trainable_params" else None
        if predicted is not None and s.cost_limit is not None and predicted > s.cost_limit:
            step.cost, step.status = float(predicted), "skipped"
            step.decision = f"not run: cost {predicted:,.0f} > limit {s.cost_limit:,.0f}"
            return step
        record = self.evaluate(SearchVariant(name, rank, target, search_policy(s, rank, target, self.keep)))
        error = _failed(record)
        if error is not None:
            step.status, step.decision = "failed", f"failed: {error}"
            return step
        step.metric, step.cost = _value(record, s.metric), _value(record, s.cost_key)
        if s.cost_limit is not None and step.cost > s.cost_limit:
            step.status, step.decision = "over_limit", f"cost {step.cost:,.4g} > limit {s.cost_limit:,.4g}"
        return step

    def better_than(self, step: SearchStep, best: SearchStep | None) -> bool:
        """Whether `step` is kept over `best`; writes the decision into the step."""
        if step.status != "ok":
            return False
        if best is None:
            step.decision = "first"
            return True
        gain = self.settings.gain(step.metric, best.metric)
        if gain < self.settings.plateau:
            step.decision = f"plateau: gain {gain:+.4g} over {best.name} < {self.settings.plateau:g}"
            return False
        step.decision = f"gain {gain:+.4g} over {best.name}"
        return True


def rank_search(
    evaluate: Evaluate,
    settings: SearchSettings,
    keep: Sequence[dict] = (),
    estimate: Estimate | None = None,
) -> SearchResult:
    """Run the LoRA article's rank search (see the module docstring) and return every step.

    Args:
        evaluate: `evaluate(SearchVariant) -> record` with `.status`, `.error`, `.metrics` and the
            cost attributes of `compare.VariantRecord`.
        settings: metric, ranks, widening steps, plateau and cost limit.
        keep: base-policy rules kept in every variant (see `search_policy`).
        estimate: `estimate(rank, targets) -> trainable parameters`, to skip over-limit variants unrun.

    Raises:
        RankSearchError: when no variant of the rank sweep could be kept (all failed or over the limit).
    """
    searcher = _Searcher(evaluate, settings, keep, estimate)
    sweep, *wider = settings.targets
    best: SearchStep | None = None
    for rank in settings.ranks:
        step = searcher.run("rank", rank, sweep)
        if not searcher.better_than(step, best):
            break
        best = step
    if best is None:
        raise NoRankKept(f"no rank could be kept: {searcher.steps[0].name} {searcher.steps[0].decision}")
    for target in wider:
        step = searcher.run("widen", best.rank, target)
        if not searcher.better_than(step, best):
            break
        best = step
    best.decision += " (chosen)"
    return SearchResult(searcher.steps, best)


# -- report ----------------------------------------------------------------------------------

SEARCH_FILE = "rank_search.csv"
SEARCH_FIGURE = "rank_search.png"


def search_table(result: SearchResult, settings: SearchSettings):
    """A rich table: one row per step, the chosen one marked."""
    from rich.table import Table

    table = Table(
        title=f"rank search ({settings.method}, {settings.metric} {settings.mode}, plateau {settings.plateau:g})"
    )
    for col in ("phase", "variant", settings.metric, settings.cost_key, "decision"):
        table.add_column(col, justify="right" if col in (settings.metric, settings.cost_key) else "left")
    for s in result.steps:
        style = "bold green" if s is result.chosen else None
        table.add_row(s.phase, s.name, f"{s.metric:.4f}", f"{s.cost:,.6g}", s.decision, style=style)
    return table


def write_search(result: SearchResult, settings: SearchSettings, out_dir: str | Path) -> list[Path]:
    """`rank_search.csv` (one row per step) and `rank_search.png`; returns the paths written."""
    import csv

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SEARCH_FILE
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["phase", "rank", "targets", "variant", settings.metric, settings.cost_key, "status", "decision"]
        )
        for s in result.steps:
            writer.writerow([s.phase, s.rank, s.targets, s.name, s.metric, s.cost, s.status, s.decision])
    return [path, draw_search(result, settings, out / SEARCH_FIGURE)]


def draw_search(result: SearchResult, settings: SearchSettings, path: str | Path) -> Path:
    """Metric and cost against rank (the sweep) and against the target set (widening at the chosen rank)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    sweep = [s for s in result.steps if s.phase == "rank"]
    base = [s for s in sweep if s.rank == result.rank]  # the sweep's kept rank: where widening starts
    widen = base + [s for s in result.steps if s.phase == "widen"]
    panels = (
        (sweep, f"rank sweep on {sweep[0].targets}", "rank", [s.rank for s in sweep]),
        (widen, f"widening at rank {result.rank}", "adapted matrices", None),
    )
    for i, (steps, title, xlabel, xs) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        positions = xs if xs is not None else list(range(len(steps)))
        ax.plot(positions, [s.metric for s in steps], "o-", color="tab:blue")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(settings.metric, color="tab:blue")
        if xs is not None:
            ax.set_xscale("log", base=2)
            ax.set_xticks(positions, [str(x) for x in positions])
        else:
            ax.set_xticks(positions, [s.targets for s in steps])
        for s, x in zip(steps, positions, strict=True):
            if s.rank == result.rank and (xs is not None or s is result.chosen):
                ax.axvline(x, color="tab:green", linestyle=":")
        twin = ax.twinx()
        twin.plot(positions, [s.cost for s in steps], "s--", color="tab:orange")
        twin.set_ylabel(settings.cost_key, color="tab:orange")
        if settings.cost_limit is not None:
            twin.axhline(settings.cost_limit, color="tab:red", linewidth=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


# -- running it through `compare` -----------------------------------------------------------------

CHOSEN_POLICY = "chosen_policy.yaml"


def block_layers(model: Any) -> list[str]:
    """Names of the adaptable layers inside the model's repeated blocks (what a target set may name)."""

    blocks_path, _ = discover_blocks(model)
    if blocks_path is None:
        return []
    names = [normalise_name(n) for n, m in model.named_modules() if is_supported_layer(m)]
    return [n for n in names if n.startswith(blocks_path + ".") and n[len(blocks_path) + 1 :].split(".")[0].isdigit()]


def check_targets(model: Any, settings: SearchSettings, keep: Sequence[dict]) -> Estimate:
    """Fit every target set to the model before anything runs; returns the parameter estimator.

    The built-in sets name several architectures' layers: each set keeps the patterns that
    match a layer of this model (so no variant carries dead patterns). Raises `RankSearchError`
    naming a set that matches no layer, or a policy that does not resolve.
    """

    layers = block_layers(model)
    for target in settings.targets:
        kept = [p for p in target.modules if any(pattern_matches(p, n) for n in layers)]
        if not kept:
            raise RankSearchError(
                f"widening step {target.name!r} ({target.modules}) adapts no module of {type(model).__name__}"
            )
        target.modules = kept

    def count(rank: int, target: TargetSet) -> int:
        policy = search_policy(settings, rank, target, keep)
        try:
            return (
                LayerPolicy.from_dict(policy, source=f"rank search step {target.name!r}")
                .resolve(model)
                .trainable_params
            )
        except PolicyError as err:
            raise RankSearchError(f"widening step {target.name!r} at rank {rank}: {err}") from None

    for target in settings.targets:  # every rank on every set resolves: no step fails after the sweep trained
        for rank in settings.ranks:
            count(rank, target)
    return count


def run_rank_search(
    config: str | Path, settings: SearchSettings, out_dir: str | Path, seed: int | None = None, rerun: bool = False
) -> SearchResult:
    """The rank search with every step a `compare` variant in `out_dir` (resumable like any comparison).

    Writes `rank_search.csv`, `rank_search.png`, `chosen_policy.yaml` and compare's own files.
    """
    import yaml

    cfg = load_config(config)
    keep = carried_rules(cfg)
    estimate = check_targets(build_model(cfg), settings, keep)
    out = Path(out_dir)
    variants: list[Variant] = []
    policies: dict[str, dict] = {}

    def evaluate(variant: SearchVariant) -> Any:
        variants.append(Variant(variant.name, {"adapters.policy": variant.policy}))
        policies[variant.name] = variant.policy
        records = run_comparison(
            config, variants, out, seed=seed, rerun=rerun, metric=settings.metric, figures=False, table=False
        )
        return records[-1]

    result = rank_search(evaluate, settings, keep, estimate)
    run_comparison(config, variants, out, seed=seed, metric=settings.metric)  # all finished: table and figures
    write_search(result, settings, out)
    (out / CHOSEN_POLICY).write_text(
        f"# rank search in {out}: chosen {result.chosen.name} ({result.chosen.decision})\n"
        + yaml.safe_dump(policies[result.chosen.name], sort_keys=False)
    )
    return result


def rank_search_command(
    base: str,
    search: SearchSettings,
    out_dir: str = "comparisons/rank_search",
    seed: int | None = None,
    rerun: bool = False,
) -> SearchResult:
    """The LoRA article's rank search (`lightning-peft compare rank-search --config search.yaml`).

    Args:
        base: the base `lightning-peft fit` config; its `none`/`full` rules are kept in every variant.
        search: metric, ranks, widening steps, plateau, cost limit (see `SearchSettings`).
        out_dir: where the variants, `comparison.csv`, `rank_search.csv/.png` and `chosen_policy.yaml` go.
        seed: `seed_everything` for every variant.
        rerun: run finished variants again.
    """
    from rich import get_console

    result = run_rank_search(base, search, out_dir, seed=seed, rerun=rerun)
    console = get_console()
    console.print(search_table(result, search))
    console.print(
        f"chosen: {search.method} r={result.rank} on {result.targets} "
        f"({search.metric} {result.chosen.metric:.4f}, {search.cost_key} {result.chosen.cost:,.6g}); "
        f"policy in {Path(out_dir) / CHOSEN_POLICY}"
    )
    return result
