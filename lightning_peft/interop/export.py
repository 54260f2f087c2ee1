"""Adapters that leave the tool: HF peft adapter folders, merged transformers checkpoints, peft import.

    export_peft(model, "out/")     # LoRA/DoRA (or HiRA) -> peft folder(s) (PeftModel.from_pretrained loads them)
    export_merged(model, "out/")   # one transformers `save_pretrained` folder, adapters folded in
    import_peft(model, "adapter/") # a peft LoRA/DoRA folder -> our layers (train on, diagnose)

Layers peft cannot represent (MoRA, `full` modules, any other method) take a route the caller
chooses: `fold` writes them into a copy of the base weights saved beside the adapter
(`base/`), `svd` converts an additive update to LoRA by truncated SVD with a per-layer
fidelity report. Without a route the export stops and names the layers. Every export is
staged in a temporary folder next to the target and renamed into place: an error leaves
nothing behind, and a non-empty target is refused unless `overwrite=True`.

Names: a plan made on a LightningModule names modules with its attribute prefix
(`model.model.layers.0...`); peft and transformers see the bare Hugging Face model. Every
function here takes `submodule` (the attribute path of that model, e.g. `"model"`); by
default the single `PreTrainedModel` child of a non-HF module is used. See docs/export.md.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.adapters.base import (
    ADAPTERS,
    AdapterLinear,
    get_adapter_class,
    is_supported_layer,
    layer_shape,
    low_rank_target,
)
from lightning_peft.adapters.quantized import dequantize_model
from lightning_peft.callbacks.adapter import restore_from_checkpoint
from lightning_peft.core.hints import option_hint
from lightning_peft.core.inject import (
    find_adapters,
    get_plan,
    inject_adapters,
    load_adapter_state,
    merge_adapters,
    model_restarts,
)
from lightning_peft.core.io import UnsafeWriteError, check_replaceable, replace_dir_safely
from lightning_peft.core.names import prefix_hint
from lightning_peft.core.stored import AdapterStateError, check_state
from lightning_peft.diagnostics.snapshot import write_snapshot
from lightning_peft.errors import InputError
from lightning_peft.interop.hf_classes import auto_class_name, peft_task_type
from lightning_peft.interop.manifest import MANIFEST_FILE, adapter_folders, read_manifest
from lightning_peft.interop.peft_format import (
    PeftFormatError,
    PeftLayer,
    adapter_config,
    group_layers,
    hparam_suffix,
    mapped_hparams,
    peft_state_dict,
    read_peft_config,
    read_peft_layers,
    write_adapter,
)
from lightning_peft.policy import LayerPolicy, Plan, PlanRow, Rule, normalise_name

FOLD_CLI, FOLD_PY = "'{<method>: fold}'", {"<method>": "fold"}  # the route hint, in both spellings
BASE_DIR = "base"
ROUTES = ("fold", "svd")


class ExportError(InputError):
    """An export or import that cannot be done as asked; nothing was written or changed."""


# -- names and prefixes -------------------------------------------------------------------


def resolve_submodule(model: nn.Module, submodule: str | None = None) -> tuple[str, nn.Module]:
    """`(prefix, hf_model)`: the model peft/transformers see and the plan-name prefix in front of it.

    `submodule` is an attribute path (`"model"`, `""` for the model itself). By default a
    module that is not itself a transformers `PreTrainedModel` but has exactly one such child
    (a LightningModule holding `self.model`) exports that child.
    """
    if submodule is None:
        submodule = _default_submodule(model)
    if not submodule:
        return "", model
    try:
        hf = model.get_submodule(submodule)
    except AttributeError:
        raise ExportError(f"submodule {submodule!r} does not exist in {type(model).__name__}") from None
    return normalise_name(submodule) + ".", hf


def _default_submodule(model: nn.Module) -> str:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ""
    if isinstance(model, PreTrainedModel):
        return ""
    children = [n for n, c in model.named_children() if isinstance(c, PreTrainedModel)]
    return children[0] if len(children) == 1 else ""


def _strip_prefix(rows: list[PlanRow], prefix: str) -> dict[str, PlanRow]:
    outside = [r.name for r in rows if not r.name.startswith(prefix)]
    if outside:
        raise ExportError(
            f"Planned module(s) {outside[:4]} lie outside the exported submodule {prefix[:-1]!r}; "
            f"pass {option_hint('submodule', repr(''), '')} to export the whole model"
        )
    return {r.name[len(prefix) :]: r for r in rows}


# -- staging: nothing half-written --------------------------------------------------------


def check_target(target: str | Path, overwrite: bool, protected: Iterable[str | Path] = ()) -> Path:
    """`core.io.check_replaceable` for an export folder (its manifest proves it is ours), as an `ExportError`."""
    try:
        return check_replaceable(target, MANIFEST_FILE, protected, overwrite)
    except UnsafeWriteError as err:
        raise ExportError(f"Export target: {err}") from None


@contextlib.contextmanager
def staged_folder(target: Path, overwrite: bool, protected: Iterable[str | Path] = ()) -> Iterator[Path]:
    """`core.io.replace_dir_safely` for an export folder, its refusals as `ExportError`s."""
    check_target(target, overwrite, protected)
    with replace_dir_safely(target, MANIFEST_FILE, protected, overwrite) as tmp:
        yield tmp


# -- reports --------------------------------------------------------------------------------


@dataclass
class LayerFidelity:
    """How well one layer's update survived its LoRA conversion (truncated SVD)."""

    module: str
    method: str
    rank: int
    full_rank: int
    energy: float  # share of ||dW||_F^2 kept by the kept singular values
    rel_error: float  # ||dW - B A||_F / ||dW||_F
    max_logit_diff: float | None  # this layer alone converted, on the probe batch


@dataclass
class ExportReport:
    """What an export wrote and what it changed on the way."""

    path: str
    format: str
    adapters: dict[str, list[str]] = field(default_factory=dict)  # adapter folder -> modules
    folded: list[str] = field(default_factory=list)
    converted: list[LayerFidelity] = field(default_factory=list)
    max_logit_diff: float | None = None  # every conversion at once, on the probe batch
    prefix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self):
        """A rich table of the converted layers (empty when nothing was converted), fit for 80 columns:
        the prefix every module name shares goes to the title and module names never wrap."""
        import os

        from rich.table import Table

        names = [f.module for f in self.converted]
        prefix = os.path.commonprefix(names).rpartition(".")[0] if len(names) > 1 else ""
        under = f" under {prefix}." if prefix else ""
        table = Table(
            title=f"SVD conversion to LoRA{under} (all layers at once: max |logit diff| {self.max_logit_diff})",
            caption="rank: kept / full; energy: share of ||dW||_F^2 kept; rel. err: ||dW - BA||_F / ||dW||_F",
        )
        table.add_column("module", no_wrap=True)
        table.add_column("method")
        for col in ("rank", "energy", "rel. err", "|dlogit|"):
            table.add_column(col, justify="right", no_wrap=True)
        for f in self.converted:
            diff = "-" if f.max_logit_diff is None else f"{f.max_logit_diff:.2e}"
            module = f.module[len(prefix) + 1 :] if prefix else f.module
            table.add_row(module, f.method, f"{f.rank}/{f.full_rank}", f"{f.energy:.4f}", f"{f.rel_error:.2e}", diff)
        return table


# -- export to peft -------------------------------------------------------------------------


def _hparams_with_defaults(row: PlanRow) -> dict[str, Any]:
    """The row's hyper-parameters with the method's own defaults filled in (its signature is the schema)."""
    params = inspect.signature(get_adapter_class(row.method).__init__).parameters
    defaults = {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    return {**defaults, **row.hparams}


def _peft_method(method: str) -> Any:
    """The method's peft mapping, or `None` (`full`, `none`, a method peft cannot hold)."""
    return ADAPTERS[method].peft if method in ADAPTERS else None


def _peft_layer(name: str, row: PlanRow, layer: AdapterLinear) -> PeftLayer:
    cls = get_adapter_class(row.method)
    names = cls.peft.tensors
    state = layer.adapter.state_dict()
    unknown = sorted(set(state) - set(names))
    if unknown:
        raise ExportError(f"{row.name}: {row.method} tensors {unknown} have no place in peft's format")
    hparams = mapped_hparams(cls, _hparams_with_defaults(row))
    tensors = {names[k]: v for k, v in state.items()}
    return PeftLayer(name, row.method, hparams, row.layer_type != "Linear", tensors)


def _routes_for(rows: dict[str, PlanRow], routes: dict[str, str] | None, svd: tuple[Any, Any]) -> dict[str, str]:
    """Each row's route: `peft`, `fold` or `svd`; a layer without one is a named error."""
    routes = dict(routes or {})
    for method, route in routes.items():
        if route not in ROUTES:
            raise ExportError(f"routes[{method!r}] = {route!r}; choose one of {list(ROUTES)}")
    chosen, stuck = {}, []
    for name, row in rows.items():
        route = routes.get(row.method, "peft" if _peft_method(row.method) is not None else None)
        if route == "svd" and row.method == "full":
            raise ExportError(
                f"{row.name}: a `full` module has no low-rank update to convert; use "
                + option_hint("routes", "'{full: fold}'", {"full": "fold"})
            )
        if route is None:
            stuck.append(f"{row.name} ({row.method})")
        chosen[name] = route
    if stuck:
        raise ExportError(
            f"peft's format cannot represent {len(stuck)} layer(s), e.g. {stuck[:4]}; choose a route per "
            f"method: {option_hint('routes', FOLD_CLI, FOLD_PY)} writes them into the base weights saved beside "
            f"the adapter, `svd` converts them to {low_rank_target().label} (with --svd_rank or --svd_energy)"
        )
    if "svd" in chosen.values() and (svd[0] is None) == (svd[1] is None):
        raise ExportError("the 'svd' route needs exactly one of --svd_rank (an int) or --svd_energy (in (0, 1])")
    if svd[1] is not None and not 0.0 < float(svd[1]) <= 1.0:
        raise ExportError(f"svd_energy must be in (0, 1], got {svd[1]!r}")
    if svd[0] is not None and (isinstance(svd[0], bool) or not isinstance(svd[0], int) or svd[0] < 1):
        raise ExportError(f"svd_rank must be a positive integer, got {svd[0]!r}")
    return chosen


def _check_exportable(model: nn.Module) -> Plan:
    plan = get_plan(model)
    if plan is None:
        raise ExportError(f"{type(model).__name__} carries no lightning-peft adapters (nothing to export)")
    merged = [n for n, layer in find_adapters(model) if layer.merged]
    if merged:
        raise ExportError(
            f"The model's adapters are merged (e.g. {merged[0]}): its base weights already hold the updates, "
            "so exporting the adapters would apply them twice; call unmerge_adapters() first"
        )
    return plan


def _check_restarts_exportable(model: nn.Module, save_base: bool) -> None:
    """A base that holds merged restart cycles must travel with the adapters (peft would apply them to the original)."""
    restarts = model_restarts(model)
    if restarts and not save_base:
        raise ExportError(
            f"The base weights hold {restarts} merged restart cycle(s) (MergeRestart): peft would apply these "
            f"adapters to the original base. Pass {option_hint('save_base', 'true', True)} (the merged base goes "
            "to out/base) or export merged (`--format merged`, Python: `export_merged`)"
        )


def _check_base_writable(hf: nn.Module, needed: bool) -> None:
    if needed and not hasattr(hf, "save_pretrained"):
        raise ExportError(
            f"{type(hf).__name__} has no save_pretrained to write the base; pass "
            f"{option_hint('submodule', 'NAME', 'NAME')} naming the Hugging Face model inside it"
        )


def export_peft(
    model: nn.Module,
    out: str | Path,
    *,
    submodule: str | None = None,
    routes: dict[str, str] | None = None,
    svd_rank: int | None = None,
    svd_energy: float | None = None,
    probe: Tensor | dict[str, Tensor] | None = None,
    save_base: bool = False,
    overwrite: bool = False,
    protected: Iterable[str | Path] = (),
) -> ExportReport:
    """Write the model's adapters as HF peft adapter folder(s) (LoRA/DoRA, or HiRA); see the module docstring.

    One flag set (use_dora, use_rslora, dropout, Conv1D) gives one adapter at `out` itself; several give
    one subfolder each, loaded together by `load_peft_export(base, out)` (or the lines in `out/README.md`).

    Args:
        model: a model with injected, unmerged adapters (left unchanged).
        out: the target folder.
        submodule: attribute path of the model peft wraps (default: see `resolve_submodule`).
        routes: per method, `fold` or `svd`, for layers peft cannot represent (`full` only folds).
        svd_rank / svd_energy: the `svd` route's rank, or the share of `||dW||_F^2` to keep.
        probe: inputs for the logit check of `svd` conversions (random token ids by default).
        save_base: also write the (unmodified) base model to `out/base/` (always done when folding).
        overwrite: replace `out` when an earlier export wrote it (its manifest proves it).
        protected: paths `out` must not hold (the checkpoint being exported); see `core.io.check_replaceable`.
    """
    plan = _check_exportable(model)
    _check_restarts_exportable(model, save_base)
    prefix, hf = resolve_submodule(model, submodule)
    rows = _strip_prefix(plan.rows, prefix)
    chosen = _routes_for(rows, routes, (svd_rank, svd_energy))
    _check_one_peft_type(rows, chosen)
    _check_base_writable(hf, save_base or "fold" in chosen.values())
    check_target(out, overwrite, protected)
    layers = {normalise_name(n)[len(prefix) :]: layer for n, layer in find_adapters(model)}
    peft_layers = [_peft_layer(n, rows[n], layers[n]) for n, route in chosen.items() if route == "peft"]
    report = ExportReport(path=str(out), format="peft", prefix=prefix)
    work = copy.deepcopy(hf) if save_base or set(chosen.values()) & set(ROUTES) else None
    if "svd" in chosen.values():
        assert work is not None
        converted = convert_to_lora(
            work, [n for n, r in chosen.items() if r == "svd"], rows, svd_rank, svd_energy, probe, report
        )
        peft_layers += converted
    report.folded = [rows[n].name for n, r in chosen.items() if r == "fold"]
    if work is not None:
        unwrap(work, merge={n for n, r in chosen.items() if r == "fold"})
    base = work if save_base or "fold" in chosen.values() else None  # `svd` alone leaves the base as it was
    with staged_folder(Path(out), overwrite, protected) as tmp:
        _write_peft_folder(tmp, group_layers(peft_layers), hf, base, report)
    return report


def _write_peft_folder(
    folder: Path, groups: dict[str, list[PeftLayer]], hf: nn.Module, base: nn.Module | None, report: ExportReport
) -> None:
    """Adapters (at `folder` itself for one group, else one subfolder each), the base if given, manifest."""
    all_names = [normalise_name(n) for n, _ in hf.named_modules() if n]
    source = getattr(getattr(hf, "config", None), "_name_or_path", None) or None
    task_type = peft_task_type(hf)
    for name, group in groups.items():
        target = folder if len(groups) == 1 else folder / name
        write_adapter(target, adapter_config(group, all_names, source, task_type), peft_state_dict(group))
        report.adapters["." if len(groups) == 1 else name] = [x.name for x in group]
    if base is not None:
        _save_pretrained(base, folder / BASE_DIR)
    _write_manifest(folder, report, base=base is not None)
    _write_readme(folder, list(report.adapters), BASE_DIR if base is not None else source, auto_class_name(task_type))


def _check_one_peft_type(rows: dict[str, PlanRow], chosen: dict[str, str]) -> None:
    """One `PeftModel` holds one tuner type: e.g. HiRA and LoRA/DoRA adapters cannot be loaded together."""
    target = low_rank_target()
    types: dict[str, dict[str, list[str]]] = {}  # peft type -> method -> modules
    for name, route in chosen.items():
        if route in ("peft", "svd"):  # `svd` writes the low-rank target
            method = rows[name].method if route == "peft" else target.method
            peft_type = get_adapter_class(method).peft.peft_type
            types.setdefault(peft_type, {}).setdefault(method, []).append(rows[name].name)
    if len(types) > 1:
        others = {m: n for t, methods in types.items() if t != target.peft.peft_type for m, n in methods.items()}
        method, modules = next(iter(others.items()))
        raise ExportError(
            f"peft loads one adapter type per model, and this plan needs {get_adapter_class(method).label} "
            f"({modules[:3]}) beside {target.peft.peft_type} adapters; choose "
            f"{option_hint('routes', '{' + method + ': svd}', {method: 'svd'})} "
            f"({get_adapter_class(method).label} as {target.label}) or `{{{method}: fold}}` (into the saved base)"
        )


def _write_manifest(folder: Path, report: ExportReport, base: bool) -> None:
    data = {**report.to_dict(), "base": BASE_DIR if base else None}
    (folder / MANIFEST_FILE).write_text(json.dumps(data, indent=1))


def loading_snippet(names: list[str], base: str | None, auto_class: str) -> list[str]:
    """Python that loads the export with peft, run from inside the export folder (tests run it as written)."""
    where = repr(base) if base else "'<the base model this adapter was trained on>'"
    lines = ["from peft import PeftModel", f"from transformers import {auto_class}", ""]
    lines += [f"base = {auto_class}.from_pretrained({where})"]
    if names == ["."]:
        lines += ["model = PeftModel.from_pretrained(base, '.')"]
    else:
        lines += [f"model = PeftModel.from_pretrained(base, '{names[0]}', adapter_name='{names[0]}')"]
        lines += [f"model.load_adapter('{n}', adapter_name='{n}')" for n in names[1:]]
        lines += [f"model.base_model.set_adapter({names})  # all active at once: they adapt disjoint modules"]
    return lines


def _write_readme(folder: Path, names: list[str], base: str | None, auto_class: str) -> None:
    lines = ["# Exported by lightning-peft", "", "Load it with HF peft, from inside this folder:", "", "```python"]
    lines += [*loading_snippet(names, base, auto_class), "```", ""]
    lines += ["Or: `lightning_peft.load_peft_export(base, folder)`. Details: lightning-peft docs/export.md."]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def _save_pretrained(model: nn.Module, folder: Path) -> None:
    if not hasattr(model, "save_pretrained"):
        raise ExportError(
            f"{type(model).__name__} has no save_pretrained (not a transformers model); pass "
            f"{option_hint('submodule', 'NAME', 'NAME')} naming the Hugging Face model inside it"
        )
    model.save_pretrained(folder, safe_serialization=True)


def unwrap(model: nn.Module, merge: set[str] | None = None) -> nn.Module:
    """Replace every `AdapterLinear` of `model` by its plain base layer, in place (call it on a copy).

    Layers named in `merge` (names relative to `model`) are merged first; the others get
    their unmodified base weights back.
    """
    merge = merge or set()
    for raw, layer in find_adapters(model):
        if normalise_name(raw) in merge:
            layer.merge()
        else:
            layer.unmerge()
        parent_name, _, child = raw.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)
    return model


# -- SVD conversion -------------------------------------------------------------------------


def svd_factors(delta: Tensor, rank: int | None, energy: float | None) -> tuple[Tensor, Tensor, float, int]:
    """LoRA factors `B (out, k)`, `A (k, in)` of the best rank-k approximation of `delta` (Eckart-Young).

    Returns `(B, A, energy_kept, full_rank)`; computed in fp64, returned in fp32.
    """
    u, s, vh = torch.linalg.svd(delta.detach().double().cpu(), full_matrices=False)
    full = s.numel()
    total = float(s.square().sum())
    if rank is None:
        assert energy is not None
        cumulative = s.square().cumsum(0) / max(total, 1e-300)
        rank = int((cumulative < energy - 1e-12).sum()) + 1
    k = min(rank, full)
    root = s[:k].sqrt()
    kept = float(s[:k].square().sum()) / total if total > 0 else 1.0
    return (u[:, :k] * root).float(), (root[:, None] * vh[:k]).float(), kept, full


def _outputs(model: nn.Module, probe: Tensor | dict[str, Tensor]) -> Tensor:
    out = model(**probe) if isinstance(probe, dict) else model(input_ids=probe)
    for attr in ("logits", "last_hidden_state"):
        if getattr(out, attr, None) is not None:
            return getattr(out, attr).float()
    return (out if isinstance(out, Tensor) else out[0]).float()


def default_probe(model: nn.Module) -> Tensor | None:
    """Random token ids `(2, 16)` in the model's vocabulary (seeded), or `None` for a non-token model."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab:
        return None
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, int(vocab), (2, 16), generator=generator).to(device)


@torch.no_grad()
def convert_to_lora(
    work: nn.Module,
    names: list[str],
    rows: dict[str, PlanRow],
    rank: int | None,
    energy: float | None,
    probe: Tensor | dict[str, Tensor] | None,
    report: ExportReport,
) -> list[PeftLayer]:
    """Truncated-SVD LoRA for each named layer of `work` (a copy), with its fidelity in `report`.

    The logit check swaps each layer (then all of them) for a LoRA layer carrying the
    factors, the exact peft forward, and compares with the unconverted copy.
    """
    work.eval()
    probe = default_probe(work) if probe is None else probe
    reference = _outputs(work, probe) if probe is not None else None
    adapters = {normalise_name(n): (n, layer) for n, layer in find_adapters(work)}
    out, swaps = [], []
    for name in names:
        raw, layer = adapters[name]
        delta = layer.delta_weight()
        b, a, kept, full = svd_factors(delta, rank, energy)
        k = a.shape[0]
        err = float(torch.linalg.matrix_norm(delta.double().cpu() - b.double() @ a.double()))
        rel = err / max(float(torch.linalg.matrix_norm(delta.double())), 1e-300) if err > 0 else 0.0
        factors, hparams = {"A": a, "B": b}, _low_rank_hparams(k, _hparams_with_defaults(rows[name]))
        lora = _low_rank_layer(layer, factors, hparams)
        diff = _swap_diff(work, raw, layer, lora, probe, reference) if reference is not None else None
        swaps.append((raw, lora))
        report.converted.append(LayerFidelity(rows[name].name, rows[name].method, k, full, kept, rel, diff))
        out.append(_converted_peft_layer(name, factors, hparams, rows[name]))
    if reference is not None and swaps:
        originals = [(raw, work.get_submodule(raw)) for raw, _ in swaps]
        for raw, lora in swaps:
            _set(work, raw, lora)
        report.max_logit_diff = float((_outputs(work, probe) - reference).abs().max())
        for raw, original in originals:
            _set(work, raw, original)
    return out


def _low_rank_hparams(rank: int, source_hparams: dict[str, Any]) -> dict[str, Any]:
    """The low-rank target's hyper-parameters for rank `rank` (update exactly `B @ A`), with the source's
    dropout when the target has one, every other one at its default."""
    cls = low_rank_target()
    hparams = {**_defaults(cls), **cls.factor_hparams(rank)}
    if "dropout" in hparams and "dropout" in source_hparams:
        hparams["dropout"] = float(source_hparams["dropout"])
    return hparams


def _defaults(cls: type) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY}


def _low_rank_layer(layer: AdapterLinear, factors: dict[str, Tensor], hparams: dict[str, Any]) -> AdapterLinear:
    """A layer of the low-rank target over the same base, its `A`/`B` role parameters set to the SVD factors."""
    cls = low_rank_target()
    new = AdapterLinear(layer.base, cls(layer.in_features, layer.out_features, **hparams))
    for key, value in new.adapter.state_dict().items():
        value.copy_(factors[cls.parameter_roles[key]])
    return new.eval()


def _converted_peft_layer(name: str, factors: dict[str, Tensor], hparams: dict[str, Any], source: PlanRow) -> PeftLayer:
    """The peft layer of an SVD-converted module."""
    cls = low_rank_target()
    tensors = {suffix: factors[cls.parameter_roles[key]] for key, suffix in cls.peft.tensors.items()}
    return PeftLayer(name, cls.method, mapped_hparams(cls, hparams), source.layer_type != "Linear", tensors)


def _set(model: nn.Module, raw: str, module: nn.Module) -> None:
    parent_name, _, child = raw.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _swap_diff(work: nn.Module, raw: str, layer: nn.Module, new: nn.Module, probe: Any, reference: Tensor) -> float:
    _set(work, raw, new)
    try:
        return float((_outputs(work, probe) - reference).abs().max())
    finally:
        _set(work, raw, layer)


# -- export merged ----------------------------------------------------------------------------


def export_merged(
    model: nn.Module,
    out: str | Path,
    *,
    submodule: str | None = None,
    overwrite: bool = False,
    protected: Iterable[str | Path] = (),
) -> Path:
    """Write a transformers `save_pretrained` folder of the merged model (no adapter wrappers).

    The merge and unwrap happen on a copy: `model` keeps its adapters, unmerged. A model
    whose adapters are already merged exports as is (its base weights hold the updates).
    The merge is `merge_adapters`'s: every merged weight is checked finite in the base dtype
    first (an fp16 overflow is refused, naming the layer), and nothing is written.
    A quantized (QLoRA) base is dequantized first, so the folder holds plain weights in the dtype
    the base was loaded in (fp32 or bf16).
    """
    if get_plan(model) is None:
        raise ExportError(f"{type(model).__name__} carries no lightning-peft adapters (nothing to merge)")
    prefix, hf = resolve_submodule(model, submodule)
    _strip_prefix(get_plan(model).rows, prefix)
    if not hasattr(hf, "save_pretrained"):
        _save_pretrained(hf, Path(out))  # raises the named error
    check_target(out, overwrite, protected)
    merged = copy.deepcopy(hf)
    for _, layer in find_adapters(merged):
        layer.dequantize_base()  # a QLoRA base: merge into its dequantized weight (fp32 or bf16)
    try:
        merge_adapters(merged)
    except AdapterStateError as err:
        raise ExportError(f"{err}; nothing was written") from None
    for raw, layer in find_adapters(merged):
        _set(merged, raw, layer.base)
    dequantize_model(merged)  # quantized layers without adapters, and the config's quantization settings
    with staged_folder(Path(out), overwrite, protected) as tmp:
        _save_pretrained(merged, tmp)
        (tmp / MANIFEST_FILE).write_text(json.dumps({"format": "merged", "path": str(out)}, indent=1))
    return Path(out)


# -- loading an export with peft --------------------------------------------------------------


def load_peft_export(base: nn.Module, folder: str | Path, is_trainable: bool = False) -> nn.Module:
    """Load an `export_peft` folder onto `base` with HF peft: one adapter or several, all active."""
    from peft import PeftModel

    folder = Path(folder)
    names = list(read_manifest(folder)["adapters"])  # every name checked to stay inside `folder`
    if names == ["."]:
        return PeftModel.from_pretrained(base, str(folder), is_trainable=is_trainable)
    model = PeftModel.from_pretrained(base, str(folder / names[0]), adapter_name=names[0], is_trainable=is_trainable)
    for name in names[1:]:
        model.load_adapter(str(folder / name), adapter_name=name, is_trainable=is_trainable)
    model.base_model.set_adapter(names, inference_mode=not is_trainable)
    return model


# -- import from peft -------------------------------------------------------------------------


def read_adapters(directory: str | Path) -> list[PeftLayer]:
    """The layers of every adapter `directory` holds (one peft adapter, an export, peft's multi-adapter save).

    Adapters that share a module are refused: peft would sum them, one of our modules holds one method.
    """
    seen: dict[str, Path] = {}
    layers = []
    for folder in adapter_folders(directory):
        for x in read_peft_layers(folder):
            if x.name in seen:
                raise PeftFormatError(
                    f"{folder}: module {x.name!r} is also adapted by {seen[x.name]}; lightning-peft holds one "
                    "adapter per module (import the adapters one at a time into separate models)"
                )
            seen[x.name] = folder
            layers.append(x)
    return layers


def peft_policy(source: str | Path | list[PeftLayer], prefix: str = "") -> LayerPolicy:
    """A policy that reproduces a peft adapter's layers exactly: one rule per (method, hyper-parameters).

    `source` is a peft adapter folder (or its read layers); `prefix` goes in front of every
    module name (`"model."` for a LightningModule holding the HF model as `self.model`).
    Give it to `AdapterCallback` to train an imported adapter on.
    """
    layers = read_adapters(source) if isinstance(source, str | Path) else source
    groups: dict[str, tuple[str, dict[str, Any], list[str]]] = {}
    for x in layers:
        key = json.dumps([x.method, x.hparams], sort_keys=True)
        groups.setdefault(key, (x.method, x.hparams, []))[2].append(prefix + x.name)
    rules = [
        Rule(method=m, modules=names, hparams=hp, name=f"peft-{m}" + hparam_suffix(hp.items()).replace("_", "-"))
        for m, hp, names in groups.values()
    ]
    return LayerPolicy(rules=rules, strict=True)


def import_peft(model: nn.Module, directory: str | Path, *, submodule: str | None = None) -> Plan:
    """Inject the layers of a peft adapter folder (or an export, or peft's multi-adapter save) into
    `model` and load its tensors.

    The model can then train on (under `AdapterCallback(policy=...)` or as is), or be
    measured by the per-layer diagnostics. Everything is checked (config fields, patterns,
    tensor shapes, dtypes, NaN/inf) before the model changes.

    Raises:
        PeftFormatError: not an adapter we hold (LoHa, IA3, ...), an unsupported option, or a bad file.
        ExportError: the adapter's modules are not in the model (the message suggests a prefix).
    """
    layers = read_adapters(directory)
    prefix, _ = resolve_submodule(model, submodule)
    if get_plan(model) is not None:
        raise ExportError("The model already carries adapters; call remove_adapters() before importing")
    modules = {normalise_name(n): m for n, m in model.named_modules() if n}
    state = {}
    for x in layers:
        name = prefix + x.name
        if name not in modules:
            raise ExportError(
                f"{directory}: module {name!r} is not in {type(model).__name__}." + prefix_hint(name, list(modules))
            )
        state.update(_checked_tensors(name, x, modules[name], directory))
    plan = peft_policy(layers, prefix).resolve(model)
    expected = {prefix + x.name for x in layers}
    if {r.name for r in plan.rows} != expected:
        extra = sorted({r.name for r in plan.rows} - expected)
        raise ExportError(f"{directory}: module names are ambiguous in this model (also matched {extra[:4]})")
    inject_adapters(model, plan)
    for _, layer in find_adapters(model):  # new layers in the model's mode: an eval model stays deterministic
        layer.train(model.training)
    load_adapter_state(model, state)
    return plan


def diagnose_peft(adapter: str | Path, base: str | Path, out: str | Path, auto_class: str | None = None) -> Path:
    """Per-layer update diagnostics of a peft LoRA/DoRA adapter trained elsewhere, written for `report`.

    The base is loaded from a local folder with the transformers Auto class its `task_type`
    implies (`AutoModel` when it has none), the adapter is read into our layers, and one
    row per module (update norm, spectral ratio, ranks, DoRA drift) goes to
    `out/update_diagnostics.csv`.
    """
    import transformers

    config = read_peft_config(adapter_folders(adapter)[0])
    name = auto_class or auto_class_name(config.get("task_type"))
    if not hasattr(transformers, name):
        raise ExportError(f"auto_class {name!r} is not a transformers class")
    if not Path(base).is_dir():
        raise ExportError(f"base {str(base)!r} is not a local model folder")
    model = getattr(transformers, name).from_pretrained(str(base), local_files_only=True)
    try:
        import_peft(model, adapter, submodule="")
    except ExportError as err:
        raise ExportError(
            f"{err} The base was loaded as {name}; pass {option_hint('auto_class', 'CLASS', 'CLASS')} naming the "
            "transformers class it was trained on (e.g. AutoModelForCausalLM)."
        ) from None
    return write_snapshot(model, out)


def _checked_tensors(name: str, x: PeftLayer, module: nn.Module, directory: str | Path) -> dict[str, Tensor]:
    """`x`'s tensors under our state-dict keys, checked like every stored state (core/stored.py): each
    present, of the shape the layer and hyper-parameters need, a float dtype, and finite."""
    if not is_supported_layer(module):
        raise ExportError(f"module {name!r} is a {type(module).__name__}; adapters wrap Linear/Conv1D")
    in_f, out_f = layer_shape(module)
    cls = get_adapter_class(x.method)
    with torch.device("meta"):
        live = cls(in_f, out_f, **x.hparams).state_dict()
    ours = {suffix: key for key, suffix in cls.peft.tensors.items()}
    stored = {f"{name}.adapter.{ours[k]}": v for k, v in x.tensors.items()}
    expected = {f"{name}.adapter.{k}": v for k, v in live.items()}
    try:
        check_state(stored, expected, f"{directory} ({x.method} adapter of {name!r})", exact_keys=True)
    except AdapterStateError as err:
        raise PeftFormatError(str(err)) from None
    return stored


__all__ = [
    "ExportError",
    "ExportReport",
    "LayerFidelity",
    "PeftFormatError",
    "diagnose_peft",
    "export_merged",
    "export_peft",
    "import_peft",
    "load_peft_export",
    "peft_policy",
    "resolve_submodule",
    "svd_factors",
    "unwrap",
]


# -- from a finished run's checkpoint -------------------------------------------------------


def export_checkpoint(
    model: nn.Module, ckpt_path: str | Path, out: str | Path, *, format: str = "peft", **options: Any
) -> ExportReport | Path:
    """Rebuild a run's adapters on a freshly built `model` from its checkpoint, then export.

    `model` is the module the run trained (built from the run's config, without adapters);
    the checkpoint's stored plan is injected and its tensors loaded before exporting.
    `format` is `peft` (`options` as `export_peft`) or `merged` (`submodule`, `overwrite`).
    """

    if format not in ("peft", "merged"):
        raise ExportError(f"format must be 'peft' or 'merged', got {format!r}")
    options["protected"] = [ckpt_path, *options.get("protected", ())]  # never write over the source
    check_target(out, bool(options.get("overwrite", False)), options["protected"])
    restore_from_checkpoint(model, ckpt_path)  # weights_only=True; the stored plan and tensors are checked
    if format == "merged":
        return export_merged(model, out, **options)
    return export_peft(model, out, **options)
