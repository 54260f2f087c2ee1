"""The policy examples in docs/policies.md and the README run as written and say what they print."""

from __future__ import annotations

import contextlib
import io
import re

import pytest
import yaml
from helpers import REPO, tiny_llama
from torch import nn

from lightning_peft import LayerPolicy

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
    with contextlib.redirect_stdout(out):
        exec(code, {"model": tiny_llama()})
    summary = re.search(r"summary reads `(.*?)`:", " ".join(DOCS[doc].split()))
    if summary is not None:  # the documented output is the output
        assert out.getvalue().strip() == summary.group(1)
    else:
        assert "modules adapted over 6 blocks" in out.getvalue()
