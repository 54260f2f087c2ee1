"""The policy examples in docs/policies.md and the README run as written and say what they print."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import warnings

import pytest
import yaml
from helpers import REPO, tiny_llama
from torch import nn

from lightning_peft import LayerPolicy, PolicyWarning
from lightning_peft.cli.main import command_lines, command_name
from lightning_peft.cli.main import main as cli_main

DOCS = {"docs/policies.md": (REPO / "docs" / "policies.md").read_text(), "README.md": (REPO / "README.md").read_text()}


def blocks(language: str) -> list[tuple[str, str]]:
    return [(doc, m) for doc, text in DOCS.items() for m in re.findall(rf"```{language}\n(.*?)```", text, re.S)]


class Backbone(nn.Module):
    """A model whose repeated blocks sit at `backbone.blocks` (not a name found automatically)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.blocks = nn.ModuleList(
            nn.ModuleDict({"attn": nn.ModuleDict({n: nn.Linear(16, 16) for n in ("q", "k", "v")})}) for _ in range(4)
        )


@pytest.mark.parametrize(("doc", "text"), [b for b in blocks("yaml") if "rules:" in b[1]])
def test_yaml_policy_examples_resolve(doc, text):
    policy = LayerPolicy.from_dict(yaml.safe_load(text), source=doc)
    model = Backbone() if policy.blocks == "backbone.blocks" else tiny_llama()
    assert policy.resolve(model).rows


@pytest.mark.parametrize(("doc", "code"), [b for b in blocks("python") if "LayerPolicy(" in b[1]])
def test_python_policy_examples_run(doc, code):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        if doc == "README.md":  # the carve-out idiom the README teaches (`none` first) is not an overlap
            warnings.simplefilter("error", PolicyWarning)
        exec(code, {"model": tiny_llama()})
    summary = re.search(r"summary reads `(.*?)`:", " ".join(DOCS[doc].split()))
    if summary is not None:  # the documented output is the output
        assert out.getvalue().strip() == summary.group(1)
    else:
        assert "modules adapted over 6 blocks" in out.getvalue()


# -- drift: paths, commands, numbers and examples the docs name ------------------------------------

PATH = re.compile(
    r"(?<![\w/.~$<-])((?:configs|docs|benchmarks|examples|policies|lightning_peft|tests)/[\w./*<>-]*[\w*>])"
)
NAMING_FILES = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted((REPO / "benchmarks").rglob("*.md")),
    *sorted((REPO / "configs").rglob("*.yaml")),
    *sorted((REPO / "benchmarks").rglob("*.yaml")),
    *sorted((REPO / "examples").glob("*.py")),
]


def test_every_path_the_docs_and_configs_name_exists():
    """README, docs/, benchmarks/*.md, configs and examples: a repository path they name is there."""
    missing = []
    for file in NAMING_FILES:
        for match in PATH.finditer(file.read_text()):
            path = match.group(1).rstrip(".")
            if "<" not in path and "*" not in path and not (REPO / path).exists():
                missing.append(f"{file.relative_to(REPO)}: {path}")
    assert not missing, missing


def readme_commands() -> list[list[str]]:
    """Every `lightning-peft ...` line of the README's bash blocks, as argv (comments dropped)."""
    commands = []
    for _, block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("lightning-peft "):
                commands.append(shlex.split(line, comments=True)[1:])
    return commands


ALL_COMMANDS = [
    "fit", "validate", "test", "predict", "plan", "export",
    "report", "inspect", "compare", "compare rank-search", "suggest",
]  # fmt: skip


def test_every_command_is_listed_in_the_help_with_one_line(capsys):
    assert list(command_lines()) == ALL_COMMANDS
    with pytest.raises(SystemExit) as exit_info:
        cli_main([])  # no command: the whole list, not an argparse one-liner
    assert exit_info.value.code == 2
    listed = capsys.readouterr().out
    for name, line in command_lines().items():
        assert line and "\n" not in line
        assert re.search(rf"^\s+{re.escape(name)}\s", listed, re.M), name
    for argv in readme_commands():
        assert command_name(argv) is not None, argv


@pytest.mark.parametrize("name", ["fit", "plan", "report", "compare", "compare rank-search", "suggest"])
def test_a_command_s_usage_line_names_it(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*name.split(), "--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert re.match(rf"usage: lightning-peft (\[options\] )?{name}\b", usage), usage


def _runnable(argv: list[str]) -> bool:
    """A README command whose files are in the repository (not a run's output or a placeholder)."""
    return not any(a == "..." or a.startswith(("runs/", "path/", "my_")) for a in argv)


@pytest.mark.parametrize("argv", [a for a in readme_commands() if _runnable(a)], ids=" ".join)
def test_readme_commands_parse_as_written(argv, capsys, monkeypatch):
    """Each README command line is read by its parser as written (`--print_config`: parse, print, stop)."""
    monkeypatch.chdir(REPO)
    args = [a for a in argv if a != "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*args, "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert yaml.safe_load(capsys.readouterr().out)


def test_readme_python_blocks_compile_and_import_what_exists():
    for doc, code in blocks("python"):
        compile(code, doc, "exec")
        imports = "\n".join(line for line in code.splitlines() if line.startswith(("from lightning_peft", "import ")))
        exec(imports, {})


MAIN_JOB = re.compile(
    r"(\d+) steps, character accuracy (0\.\d+)\s*(?:-|to)\s*(0\.\d+), exact match (0\.\d+)\s*(?:-|to)\s*(0\.\d+)"
)


def quoted_main_job() -> tuple[int, tuple[float, float], tuple[float, float]]:
    """The steps and the measured ranges the README quotes for the main job."""
    match = MAIN_JOB.search(" ".join(DOCS["README.md"].split()))
    assert match, "the README quotes the main job as `N steps, character accuracy A-B, exact match C-D`"
    steps, a, b, c, d = match.groups()
    return int(steps), (float(a), float(b)), (float(c), float(d))


def test_readme_main_job_figures_belong_to_its_config():
    steps, char_acc, exact = quoted_main_job()
    config = yaml.safe_load((REPO / "configs" / "uuid_hybrid.yaml").read_text())
    assert steps == config["trainer"]["max_steps"]
    assert char_acc[0] <= char_acc[1] and exact[0] <= exact[1]


@pytest.mark.slow
def test_main_job_lands_in_the_range_the_readme_quotes(tmp_path, monkeypatch):
    """The README's main job as written (400 steps; minutes on 2 cores), its metrics inside the quoted range."""
    from lightning_peft.experiments.peft_cli import PeftCLI

    monkeypatch.chdir(REPO)
    _, char_acc, exact = quoted_main_job()
    cli = PeftCLI(
        args=["fit", "--config", "configs/uuid_hybrid.yaml", "--trainer.logger", "false"]
        + ["--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    )
    metrics = cli.trainer.callback_metrics
    assert char_acc[0] <= float(metrics["val_char_acc"]) <= char_acc[1]
    assert exact[0] <= float(metrics["val_exact_match"]) <= exact[1]


def test_add_callback_example_writes_under_its_run_folder(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("add_callback", REPO / "examples" / "add_callback.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.chdir(tmp_path)
    example.main(max_steps=2)
    written = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(p.startswith(example.RUN_DIR + "/") for p in written), written
    assert (tmp_path / example.RUN_DIR / "adapters" / "adapters.safetensors").is_file()
    assert f"run folder: {example.RUN_DIR}" in capsys.readouterr().out


PYTHON_HINT = re.compile(r"\b(?:pass|use|choose|set)\s+`?\w+=", re.IGNORECASE)


def test_hints_name_options_in_the_cli_syntax():
    """An error hint is `--name value` (core.hints.option_hint), never a bare Python `name=`."""
    found = []
    for path in sorted((REPO / "lightning_peft").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if PYTHON_HINT.search(line) and '"' in line:
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, found
