"""Hostile and careless input, class by class: each test names the class it guards.

1 YAML read as written; 2 values that cannot be right; 3 loaded tensors are looked at;
4 no unsafe unpickling; 5 no torn writes or partial merges, umask honoured; 6 no silent
policy mistakes; 8 errors name the culprit. (7, the cost of loading, is measured in
benchmarks/policy_load.py: timings never go in tests.)
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import warnings
from pathlib import Path

import pytest
import torch
from helpers import CausalLMModule, tiny_llama, token_loader, tokens, trainer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lightning_peft import (
    AdapterCallback,
    AdapterStateError,
    DepthSelector,
    LayerPolicy,
    PolicyError,
    PolicyWarning,
    Rule,
    find_adapters,
    get_plan,
    inject_adapters,
    load_adapters,
    merge_adapters,
    remove_adapters,
    restore_from_checkpoint,
    save_adapters,
)
from lightning_peft.adapters.base import AdapterMethod, register_adapter
from lightning_peft.callbacks.checkpoint_io import AtomicCheckpointIO
from lightning_peft.cli.main import main
from lightning_peft.policy.schema import MAX_NESTING

REPO = Path(__file__).resolve().parents[1]
LORA_QV = {"rules": [{"name": "qv", "method": "lora", "modules": ["q_proj", "v_proj"], "hparams": {"r": 4}}]}


def _policy_file(tmp_path: Path, text: str | bytes, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a
    )


# -- 1. YAML is read as written ---------------------------------------------------------------


@pytest.mark.parametrize("written", ['["2:4"]', "[2:4]", "['2:4']", "\n          - 2:4"])
def test_depth_range_from_a_yaml_file_selects_blocks_2_and_3(tmp_path, written):
    text = f"rules:\n  - method: lora\n    modules: [q_proj]\n    depth:\n      indices: {written}\n"
    policy = LayerPolicy.from_yaml(_policy_file(tmp_path, text))
    assert policy.rules[0].depth.indices == ["2:4"]
    assert sorted(r.block for r in policy.resolve(tiny_llama()).rows) == [2, 3]


def test_depth_range_from_a_dict_and_inline_text():
    data = {"rules": [{"method": "lora", "modules": ["q_proj"], "depth": {"indices": ["2:4"]}}]}
    assert LayerPolicy.from_dict(data).rules[0].depth.indices == ["2:4"]
    assert LayerPolicy.load("{rules: [{method: lora, depth: {indices: [2:4]}}]}").rules[0].depth.indices == ["2:4"]


def _selector_items(draw, n: int) -> tuple[list, list[str]]:
    """Items for `indices` as Python values and as YAML text written by hand (quoted or not)."""
    items, texts = [], []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            i = draw(st.integers(-n, n - 1))
            items.append(i)
            texts.append(str(i))
        else:
            a, b = draw(st.integers(-n, n - 1)), draw(st.integers(-n, n))
            sa = "" if draw(st.booleans()) else str(a)
            sb = "" if draw(st.booleans()) else str(b)
            item = f"{sa}:{sb}"
            items.append(item)
            quote = draw(st.sampled_from(['"', "'", ""])) if sa and sb else draw(st.sampled_from(['"', "'"]))
            texts.append(f"{quote}{item}{quote}")
    return items, texts


@st.composite
def yaml_selectors(draw):
    n = draw(st.integers(1, 70))  # past 60: YAML 1.1 would read `1:5` as 65
    kind = draw(st.sampled_from(["indices", "indices", "fraction", "first", "last", "outer", "inner"]))
    if kind == "indices":
        items, texts = _selector_items(draw, n)
        if draw(st.booleans()):
            return n, {"indices": items}, "{indices: [" + ", ".join(texts) + "]}"
        return n, {"indices": items}, "\n" + "".join(f"      - {t}\n" for t in texts)
    if kind == "fraction":
        lo, hi = sorted(draw(st.lists(st.sampled_from([0, 0.0, 0.1, 0.25, 0.5, 0.75, 1, 1.0]), min_size=2, max_size=2)))
        return n, {"fraction": [lo, hi]}, f"{{fraction: [{lo}, {hi}]}}"
    k = draw(st.integers(0, 40))
    return n, {kind: k}, f"{{{kind}: {k}}}"


def _blocks_or_error(make, n):
    try:
        return make().blocks(n)
    except PolicyError as err:
        return type(err)


@settings(max_examples=300, deadline=None)
@given(yaml_selectors())
def test_property_any_selector_in_yaml_selects_what_python_selects(case):
    """Class 1: a selector written in YAML resolves to the same blocks as the same selector in Python."""
    n, python, text = case
    yaml_text = f"rules:\n  - method: lora\n    depth: {text}\n" if not text.startswith("\n") else None
    if yaml_text is None:
        yaml_text = f"rules:\n  - method: lora\n    depth:\n      indices:{text}"
    expected = _blocks_or_error(lambda: DepthSelector(**python), n)
    try:
        policy = LayerPolicy.from_text(yaml_text)
    except PolicyError:
        assert expected is PolicyError  # refused in both
        return
    assert _blocks_or_error(lambda: policy.rules[0].depth, n) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("rules:\n  - method: lora\n    hparams: {r: 8, r: 2}\n", r"duplicate key 'r' at line 3"),
        (
            "rules:\n  - method: lora\nrules:\n  - method: dora\n",
            r"duplicate key 'rules' at line 3 \(first at line 1\)",
        ),
        ("rules:\n  - method: lora\n    method: dora\n", r"duplicate key 'method'"),
        (
            'rules:\n  - method: lora\n    hparams: {r: "8"}\n',
            r"rule 0 .*hyper-parameter `r` of lora must be int, got the string '8'",
        ),
        ("rules:\n  - method: lora\n    hparams: {r: 8.0}\n", r"`r` of lora must be int, got the float 8.0"),
        ("rules:\n  - method: lora\n    hparams: {alpha: .nan}\n", r"`alpha` of lora must be a finite number, got nan"),
        (
            "rules:\n  - method: lora\n    hparams: {use_rslora: on}\n",
            r"`use_rslora` of lora must be bool, got the string 'on'",
        ),
        ("rules:\n  - method: lora\nstrict: yes\n", r"`strict` must be bool, got the string 'yes'"),
        (
            "rules:\n  - method: lora\n    depth: {first: '2'}\n",
            r"rule 0 .*depth selector `first` must be int or null, got the string '2'",
        ),
        ("rules:\n  - method: lora\n    modules: [1]\n", r"rule 0 .*`modules` item 0 must be str, got the int 1"),
        ("rules:\n  - method: lora\n    name: 7\n", r"rule 0 .*`name` must be str or null"),
        ("rules:\n  - [lora]\n", r"rule 0: must be a Rule or a mapping, got list"),
        ("- method: lora\n", r"a policy must be a mapping with `rules`, got list"),
        ("rules: lora\n", r"`rules` must be a list of rules, got str"),
    ],
)
def test_yaml_traps_are_named_errors(tmp_path, text, match):
    path = _policy_file(tmp_path, text)
    with pytest.raises(PolicyError, match=re.escape(str(path)) + ".*" + match):
        LayerPolicy.from_yaml(path)


def test_non_utf8_and_deep_nesting_are_named_errors(tmp_path):
    latin1 = _policy_file(tmp_path, "rules:\n  - method: lora\n    name: caf\xe9\n".encode("latin-1"), "latin1.yaml")
    with pytest.raises(PolicyError, match=re.escape(str(latin1)) + r": not UTF-8 text \(byte 0xe9 at offset 37\)"):
        LayerPolicy.from_yaml(latin1)
    depth = 5000
    for name, text in [
        ("flow.yaml", "rules: " + "[" * depth + "]" * depth + "\n"),
        ("block.yaml", "".join(f"{' ' * i}k{i}:\n" for i in range(depth))),
    ]:
        path = _policy_file(tmp_path, text, name)
        with pytest.raises(PolicyError, match=re.escape(str(path)) + r": (?s:.*)(nesting deeper than|maximum nesting)"):
            LayerPolicy.from_yaml(path)
    ok = _policy_file(
        tmp_path, "rules:\n  - method: lora\n    hparams: " + "{a: " * (MAX_NESTING - 3) + "1" + "}" * (MAX_NESTING - 3)
    )
    with pytest.raises(PolicyError, match="Unknown hyper-parameter"):  # deep but legal YAML reaches the policy checks
        LayerPolicy.from_yaml(ok)


def test_cli_reads_the_policy_as_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    override = tmp_path / "policy.yaml"
    override.write_text(
        "adapters:\n  policy:\n    rules:\n"
        "      - {name: mid, method: lora, depth: {indices: [2:4]}, hparams: {r: 4}}\n"
    )
    main(["plan", "--config", "configs/uuid_hybrid.yaml", "--config", str(override)])
    out = capsys.readouterr().out
    assert "total lora" in out and "56 modules" not in out
    assert re.search(r"14 modules adapted over 6 blocks", out)
    override.write_text(
        "adapters:\n  policy:\n    rules:\n"
        "      - {name: mid, method: lora, depth: {indices: [2:4]}, hparams: {r: '4'}}\n"
    )
    with pytest.raises(SystemExit) as info:
        main(["plan", "--config", "configs/uuid_hybrid.yaml", "--config", str(override)])
    assert info.value.code == 2
    assert "rule 0 (mid): hyper-parameter `r` of lora must be int, got the string '4'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            [
                "plan",
                "--config",
                "configs/uuid_hybrid.yaml",
                "--adapters.policy",
                "{rules: [{method: lora, method: dora}]}",
            ]
        )
    assert "duplicate key 'method'" in capsys.readouterr().err


# -- 2. values that cannot be right -----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "hparams", "match"),
    [
        ("lora", {"alpha": math.nan}, r"`alpha` of lora must be a finite number, got nan"),
        ("lora", {"alpha": math.inf}, r"`alpha` of lora must be a finite number, got inf"),
        ("dora", {"eps": math.nan}, r"`eps` of dora must be a finite number"),
        ("dora", {"eps": -math.inf}, r"`eps` of dora must be a finite number"),
        ("mora", {"dropout": math.nan}, r"`dropout` of mora must be a finite number"),
        ("lora", {"use_rslora": "false"}, r"`use_rslora` of lora must be bool, got the string 'false'"),
        ("lora", {"use_rslora": 0}, r"`use_rslora` of lora must be bool, got the int 0"),
        ("lora", {"r": True}, r"`r` of lora must be int, got the bool True"),
        ("lora", {"r": "8"}, r"`r` of lora must be int, got the string '8'"),
        ("mora", {"mora_type": 2.0}, r"`mora_type` of mora must be (str or int|int or str), got the float 2.0"),
    ],
)
def test_impossible_values_fail_when_the_rule_is_built(method, hparams, match):
    with pytest.raises(PolicyError, match=r"rule 0 \(bad\): hyper-parameter " + match):
        LayerPolicy(rules=[{"name": "bad", "method": method, "hparams": hparams}])
    with pytest.raises(PolicyError, match=match):  # a Rule written in Python is held to the same rules
        Rule(method, hparams=hparams)


def test_a_new_method_gets_typed_checks_from_its_signature():
    class Scaled(AdapterMethod):
        method = "scaled_test_only"

        def __init__(self, in_features: int, out_features: int, *, gain: float = 1.0, on: bool = True) -> None:
            super().__init__(in_features, out_features)
            self.gain = torch.nn.Parameter(torch.tensor(gain))

        @classmethod
        def count_parameters(cls, in_features, out_features, **hparams):
            return 1

        def forward(self, x, base_out, layer):
            return base_out * self.gain

        def delta_weight(self, weight):
            return weight * (self.gain - 1)

    register_adapter(Scaled)  # the registry is restored by conftest's fixture
    with pytest.raises(PolicyError, match=r"`gain` of scaled_test_only must be a finite number, got inf"):
        Rule("scaled_test_only", hparams={"gain": math.inf})
    with pytest.raises(PolicyError, match=r"`on` of scaled_test_only must be bool, got the string 'no'"):
        Rule("scaled_test_only", hparams={"on": "no"})
    assert Rule("scaled_test_only", hparams={"gain": 2, "on": False}).hparams == {"gain": 2, "on": False}


def test_rank_many_times_the_layer_is_an_error_larger_than_the_layer_a_warning():
    model = tiny_llama()  # q_proj is 32 -> 32: 1,024 weights
    policy = LayerPolicy(rules=[Rule("lora", ["q_proj"], hparams={"r": 4096}, name="huge")])
    with pytest.raises(
        PolicyError, match=r"rule 0 \(huge\) on 'model.layers.0.self_attn.q_proj' \(32->32\).*more than 4x"
    ):
        policy.resolve(model)
    with pytest.warns(PolicyWarning, match=r"rule 0 \(big\) on 'model.layers.0.self_attn.q_proj'.*2,048 trainable"):
        LayerPolicy(rules=[Rule("lora", ["q_proj"], hparams={"r": 32}, name="big")]).resolve(model)


# -- 3. loaded tensors are looked at ----------------------------------------------------------


@pytest.fixture
def saved_qv(tmp_path):
    model = tiny_llama()
    inject_adapters(model, LayerPolicy.from_dict(LORA_QV))
    with torch.no_grad():
        for _, layer in find_adapters(model):
            layer.adapter.lora_B.normal_()
    return model, save_adapters(model, tmp_path / "qv")


KEY = "model.layers.1.self_attn.v_proj.adapter.lora_B"


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t[KEY].__setitem__((0, 0), math.nan), rf"tensor '{KEY}' holds NaN/inf"),
        (lambda t: t[KEY].__setitem__((1, 2), -math.inf), rf"tensor '{KEY}' holds NaN/inf"),
        (lambda t: t.__setitem__(KEY, t[KEY].to(torch.int64)), rf"tensor '{KEY}' has dtype torch.int64"),
        (lambda t: t.__setitem__(KEY, t[KEY].to(torch.bool)), rf"tensor '{KEY}' has dtype torch.bool"),
        (
            lambda t: t.__setitem__(KEY, t[KEY].t().contiguous()),
            rf"tensor '{KEY}' has shape \(4, 16\), the model needs \(16, 4\)",
        ),
    ],
)
@pytest.mark.parametrize("target", ["fresh", "injected"])
def test_adapter_files_with_bad_tensors_are_refused_naming_file_and_tensor(saved_qv, edit, match, target):
    _, directory = saved_qv
    tensors = load_file(directory / "adapters.safetensors")
    edit(tensors)
    header = json.loads(json.dumps({"lightning_peft_plan": (directory / "plan.json").read_text()}))
    save_file(tensors, directory / "adapters.safetensors", metadata=header)
    victim = tiny_llama(seed=3)
    if target == "injected":
        inject_adapters(victim, LayerPolicy.from_dict(LORA_QV))
    before = _state(victim)
    with pytest.raises(AdapterStateError, match=re.escape(str(directory / "adapters.safetensors")) + ".*" + match):
        load_adapters(victim, directory)
    assert _bit_identical(_state(victim), before)
    assert (get_plan(victim) is None) == (target == "fresh")


def test_save_adapters_refuses_non_finite_tensors_and_writes_nothing(saved_qv):
    model, directory = saved_qv
    files = {p.name: p.read_bytes() for p in directory.iterdir()}
    with torch.no_grad():
        find_adapters(model)[3][1].adapter.lora_A[0, 0] = math.nan
    with pytest.raises(AdapterStateError, match=r"adapter.lora_A'\] hold NaN/inf; nothing was written"):
        save_adapters(model, directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == files


@pytest.fixture
def checkpoint_file(tmp_path):
    """A real adapter-only checkpoint written by `Trainer.fit` with AdapterCallback."""
    module = CausalLMModule()
    tr = trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[AdapterCallback(LORA_QV, verbose=False)])
    tr.fit(module, train_dataloaders=token_loader())
    path = tmp_path / "good.ckpt"
    tr.save_checkpoint(path)
    return path


def test_checkpoints_with_bad_tensors_are_refused_naming_path_and_tensor(checkpoint_file, tmp_path):
    ckpt = torch.load(checkpoint_file, weights_only=True)
    key = "model." + KEY
    for value, match in [
        (torch.full_like(ckpt["state_dict"][key], math.nan), "holds NaN/inf"),
        (ckpt["state_dict"][key].to(torch.int32), "has dtype torch.int32"),
        ("not a tensor", "is a str, not a tensor"),
    ]:
        bad = dict(ckpt, state_dict={**ckpt["state_dict"], key: value})
        path = tmp_path / "bad.ckpt"
        torch.save(bad, path)
        victim = CausalLMModule()
        before = _state(victim)
        with pytest.raises(AdapterStateError, match=re.escape(str(path)) + rf".*tensor '{re.escape(key)}' {match}"):
            restore_from_checkpoint(victim, path)
        assert _bit_identical(_state(victim), before) and get_plan(victim) is None


def test_resume_from_a_checkpoint_with_nan_names_path_and_tensor(checkpoint_file, tmp_path):
    ckpt = torch.load(checkpoint_file, weights_only=True)
    key = "model." + KEY
    path = tmp_path / "nan.ckpt"
    torch.save(
        dict(ckpt, state_dict={**ckpt["state_dict"], key: torch.full_like(ckpt["state_dict"][key], math.nan)}), path
    )
    module = CausalLMModule()
    tr = trainer(tmp_path, max_steps=4, callbacks=[AdapterCallback(LORA_QV, verbose=False)])
    with pytest.raises(AdapterStateError, match=re.escape(str(path)) + rf".*tensor '{re.escape(key)}' holds NaN/inf"):
        tr.fit(module, train_dataloaders=token_loader(), ckpt_path=path)
    assert module.train_losses == []


# -- 4. never unpickle without weights_only=True ----------------------------------------------


class _Payload:
    """Unpickling this calls `open(target, "w")`: it creates a file."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_checkpoint_is_refused_by_every_loading_path_and_never_runs(checkpoint_file, tmp_path):
    target = tmp_path / "pwned"
    ckpt = torch.load(checkpoint_file, weights_only=True)
    evil = tmp_path / "evil.ckpt"
    torch.save({**ckpt, "lightning_peft": {**ckpt["lightning_peft"], "x": _Payload(target)}}, evil)
    with pytest.raises(AdapterStateError, match=re.escape(str(evil)) + r": refused to unpickle"):
        restore_from_checkpoint(tiny_llama(), evil)
    assert not target.exists()
    module = CausalLMModule()
    tr = trainer(tmp_path, max_steps=3, callbacks=[AdapterCallback(LORA_QV, verbose=False)])
    with pytest.raises(Exception, match=r"(?i)weights_only|unpickl|unsupported global"):
        tr.fit(module, train_dataloaders=token_loader(), ckpt_path=evil)
    assert not target.exists()


def test_no_torch_load_without_weights_only_in_the_package():
    calls = []
    for path in (REPO / "lightning_peft").rglob("*.py"):
        for match in re.finditer(r"torch\.load\(([^)]*)\)", path.read_text()):
            calls.append((path.name, match.group(1)))
    assert calls, "the package loads checkpoints somewhere"
    assert all("weights_only=True" in args for _, args in calls), calls


# -- 5. torn writes, partial merges, umask ----------------------------------------------------


class _Crash(BaseException):
    """A process dying at this point (BaseException: no `except Exception` swallows it)."""


def _two_models():
    old, new = tiny_llama(), tiny_llama()
    inject_adapters(old, LayerPolicy.from_dict(LORA_QV))
    inject_adapters(new, LayerPolicy(rules=[Rule("dora", ["k_proj"], hparams={"r": 2})]))
    for seed, model in ((1, old), (2, new)):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, layer in find_adapters(model):
                for p in layer.adapter.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return old, new


OLD_NEW = _two_models()


def _write_legacy_pair(model, directory: Path) -> None:
    """The format before the plan moved into the safetensors header: two files."""
    from lightning_peft.core.inject import adapter_state_dict

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter_state_dict(model).items()}, directory / "adapters.safetensors")
    (directory / "plan.json").write_text(json.dumps(get_plan(model).to_dict()))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(crash_at=st.integers(0, 12), legacy=st.booleans())
def test_property_a_crash_anywhere_in_save_leaves_the_old_or_the_new_adapters(tmp_path_factory, crash_at, legacy):
    old, new = OLD_NEW
    directory = tmp_path_factory.mktemp("save") / "adapters"
    _write_legacy_pair(old, directory) if legacy else save_adapters(old, directory)
    import lightning_peft.core.io as io_module  # the one crash-safe writer

    calls = {"n": 0}
    real = {"replace": os.replace, "fsync": os.fsync, "open": os.open}

    def step(name):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise _Crash
            return real[name](*args, **kwargs)

        return wrapped

    patches = {"replace": step("replace"), "fsync": step("fsync"), "open": step("open")}
    saved = (io_module.os.replace, io_module.os.fsync, io_module.os.open)
    io_module.os.replace, io_module.os.fsync, io_module.os.open = (
        patches["replace"],
        patches["fsync"],
        patches["open"],
    )
    try:
        save_adapters(new, directory)
        crashed = False
    except _Crash:
        crashed = True
    finally:
        io_module.os.replace, io_module.os.fsync, io_module.os.open = saved
    fresh = tiny_llama()
    plan = load_adapters(fresh, directory)
    expected = new if plan.fingerprint() == get_plan(new).fingerprint() else old
    assert plan.fingerprint() == get_plan(expected).fingerprint()
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, expected(input_ids=ids).logits)
    if not crashed:
        assert expected is new


@settings(max_examples=12, deadline=None)
@given(poisoned=st.integers(0, 11), dtype=st.sampled_from([torch.float32, torch.float16]), with_remove=st.booleans())
def test_property_a_failing_merge_leaves_the_model_bit_identical(poisoned, dtype, with_remove):
    model = tiny_llama().to(dtype)
    inject_adapters(model, LayerPolicy.from_dict(LORA_QV))
    layers = find_adapters(model)
    with torch.no_grad():
        for _, layer in layers:
            layer.adapter.lora_B.normal_(std=0.01)
        # fp32: overflows to inf; fp16: finite in fp32 but past fp16's 65504 once cast back.
        layers[poisoned][1].adapter.lora_B.fill_(1e30 if dtype == torch.float32 else 1e3)
        layers[poisoned][1].adapter.lora_A.fill_(1e30 if dtype == torch.float32 else 1e3)
    before = _state(model)
    name = layers[poisoned][0]
    with pytest.raises(AdapterStateError, match=rf"Merging '{re.escape(name)}' \(lora\).*no layer was merged"):
        remove_adapters(model, merge=True) if with_remove else merge_adapters(model)
    assert _bit_identical(_state(model), before)
    assert not any(layer.merged for _, layer in find_adapters(model)) and len(find_adapters(model)) == len(layers)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        directory = save_adapters(OLD_NEW[0], tmp_path / "adapters")
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "ckpts" / "last.ckpt")
    finally:
        os.umask(old)
    for path in [directory / "adapters.safetensors", directory / "plan.json", tmp_path / "ckpts" / "last.ckpt"]:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


# -- 6. silent policy mistakes ----------------------------------------------------------------


def test_a_misspelled_pattern_next_to_a_matching_one_is_named():
    rule = Rule("lora", ["q_prj", "v_proj"], name="attn")
    with pytest.raises(
        PolicyError, match=r"rule 0 \(attn\): pattern 'q_prj' matches no module \(did you mean 'q_proj'\?\)"
    ):
        LayerPolicy(rules=[rule]).resolve(tiny_llama())
    with pytest.warns(PolicyWarning, match=r"pattern 'q_prj' matches no module.*ignored: strict is false"):
        plan = LayerPolicy(rules=[rule], strict=False).resolve(tiny_llama())
    assert {r.kind for r in plan.rows} == {"self_attn.v_proj"}


def test_non_strict_policy_that_adapts_nothing_fails_before_training(tmp_path):
    policy = {"rules": [{"method": "lora", "modules": ["nothing_like_this"]}], "strict": False}
    with (
        pytest.warns(PolicyWarning),
        pytest.raises(PolicyError, match=r"The policy adapts no module of LlamaForCausalLM"),
    ):
        LayerPolicy.from_dict(policy).resolve(tiny_llama())
    only_none = {"rules": [{"method": "none", "modules": ["*"]}]}
    with pytest.raises(PolicyError, match=r"adapts no module"):
        LayerPolicy.from_dict(only_none).resolve(tiny_llama())
    module = CausalLMModule()
    with pytest.warns(PolicyWarning), pytest.raises(PolicyError, match="adapts no module"):
        trainer(tmp_path, callbacks=[AdapterCallback(policy, verbose=False)]).fit(module, token_loader())
    assert module.train_losses == []


def test_a_module_matched_by_two_rules_is_told_naming_both():
    policy = LayerPolicy(rules=[Rule("lora", ["q_proj"], name="q-lora"), Rule("dora", ["*_proj"], name="rest")])
    with pytest.warns(
        PolicyWarning, match=r"rule 1 \(rest\) also matches 6 module\(s\) that rule 0 \(q-lora\) decides"
    ):
        plan = policy.resolve(tiny_llama())
    assert {r.method for r in plan.rows if r.kind == "self_attn.q_proj"} == {"lora"}


def test_a_none_carve_out_before_the_broad_rule_is_not_an_overlap_warning():
    """The idiom the README teaches: `none` first, then the rule it overrides; no warning (errors still raise)."""
    policy = LayerPolicy(rules=[Rule("none", ["o_proj"], name="o-frozen"), Rule("lora", ["*_proj"], name="rest")])
    with warnings.catch_warnings():
        warnings.simplefilter("error", PolicyWarning)
        plan = policy.resolve(tiny_llama())
    assert "self_attn.o_proj" not in {r.kind for r in plan.rows} and len(plan.rows) == 6 * 6


# -- 8. errors name the culprit ---------------------------------------------------------------


def test_truncated_and_missing_checkpoints_name_the_path(checkpoint_file, tmp_path):
    data = checkpoint_file.read_bytes()
    for cut in (len(data) // 2, 100, 0):
        path = tmp_path / f"cut{cut}.ckpt"
        path.write_bytes(data[:cut])
        with pytest.raises(AdapterStateError, match=re.escape(str(path)) + r": truncated or not a PyTorch checkpoint"):
            restore_from_checkpoint(tiny_llama(), path)
    with pytest.raises(AdapterStateError, match=r"nope.ckpt' does not exist"):
        restore_from_checkpoint(tiny_llama(), tmp_path / "nope.ckpt")


@pytest.mark.parametrize("where", ["plan.json", "header"])
@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda row: row.update(method="vera"),
            r"plan row 0 \('model.layers.0.self_attn.q_proj'\): Unknown adapter method",
        ),
        (lambda row: row.update(hparams={"r": "4"}), r"plan row 0 .*`r` of lora must be int, got the string '4'"),
        (lambda row: row.update(in_features="32"), r"plan row 0 .*row field `in_features` must be int"),
        (lambda row: row.pop("rule"), r"plan row 0: needs the keys"),
        (lambda row: row.update(hparams={"r": 0}), r"plan row 0 \('model.layers.0.self_attn.q_proj'\): `r` must be"),
    ],
)
def test_bad_plan_rows_name_the_file_and_row(saved_qv, where, edit, match):
    _, directory = saved_qv
    plan = json.loads((directory / "plan.json").read_text())
    edit(plan["rows"][0])
    tensors = load_file(directory / "adapters.safetensors")
    if where == "header":
        save_file(tensors, directory / "adapters.safetensors", metadata={"lightning_peft_plan": json.dumps(plan)})
        source = re.escape(str(directory / "adapters.safetensors")) + r" \(header\)"
    else:
        save_file(tensors, directory / "adapters.safetensors")  # a legacy pair: the plan lives in plan.json
        (directory / "plan.json").write_text(json.dumps(plan))
        source = re.escape(str(directory / "plan.json"))
    with pytest.raises(AdapterStateError, match=source + ": " + match):
        load_adapters(tiny_llama(), directory)


def test_report_on_a_missing_folder_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["report", str(tmp_path / "missing")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("lightning-peft report: error: No diagnostics table at") and "missing" in err


def test_readme_report_example_is_where_the_configs_write():
    import yaml

    readme = (REPO / "README.md").read_text()
    example = re.search(r"lightning-peft report (\S+)", readme).group(1)
    config = yaml.safe_load((REPO / "configs" / "uuid_hybrid.yaml").read_text())
    args = config["trainer"]["logger"]["init_args"]
    assert example.startswith(f"{args['save_dir']}/{args['name']}/version_")


def test_a_policy_object_is_saved_in_the_cli_config_as_its_mapping(monkeypatch):
    """A LayerPolicy given in Python used to be dumped as 'Unable to serialize instance ...'."""
    import yaml

    from lightning_peft.experiments.peft_cli import PeftCLI

    monkeypatch.chdir(REPO)
    config = yaml.safe_load((REPO / "configs" / "uuid_hybrid.yaml").read_text())
    policy = LayerPolicy(rules=[Rule("lora", ["q_proj"], depth={"indices": ["2:4"]}, hparams={"r": 4}, name="x")])
    config["adapters"]["policy"] = policy
    config["trainer"].update(logger=False, callbacks=[])
    cli = PeftCLI(args=config, run=False)
    dumped = yaml.safe_load(cli.parser.dump(cli.config))["adapters"]["policy"]
    assert dumped["rules"][0]["depth"] == {"indices": ["2:4"]}
    assert LayerPolicy.load(dumped).to_dict() == policy.to_dict()
