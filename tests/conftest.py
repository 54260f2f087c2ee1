import sys
import warnings

import pytest
import torch
from hypothesis import settings

from lightning_peft.adapters import ADAPTERS

# Modules a deprecation warning passes through on its way from the deprecated API to its caller.
LIBRARY_ROOTS = {"warnings", "functools", "contextlib", "typing_extensions", "torch", "transformers", "jsonargparse"}


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_adapter_registry():
    """A test may register a toy method (`@register_adapter`); the global registry is restored after it."""
    saved = dict(ADAPTERS)
    yield
    ADAPTERS.clear()
    ADAPTERS.update(saved)


def deprecated_api_caller(frame) -> str:
    """Module of the first frame above a warning that is not inside one of `LIBRARY_ROOTS`."""
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.split(".")[0] not in LIBRARY_ROOTS:
            return name
        frame = frame.f_back
    return ""


@pytest.fixture(autouse=True)
def _no_deprecated_api_in_lightning_peft(monkeypatch):
    """Fail on a deprecation that our code triggers but a library attributes to its own frames.

    pyproject's `filterwarnings` catches warnings attributed to lightning_peft; transformers'
    `deprecate_kwarg`, for one, points at torch's `Module.__call__` instead. `showwarning` runs
    inside the `warn` call, so the stack still shows who called the deprecated API.
    """
    show = warnings.showwarning

    def check(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DeprecationWarning | FutureWarning):
            caller = deprecated_api_caller(sys._getframe(1))
            if caller.startswith("lightning_peft"):
                raise category(f"{caller} calls a deprecated API: {message}")
        show(message, category, filename, lineno, file, line)

    monkeypatch.setattr(warnings, "showwarning", check)


# Property-based tests draw the same examples on every run, so CI is deterministic; examples
# that once failed are pinned as explicit regression tests next to the property.
settings.register_profile("deterministic", derandomize=True)
settings.load_profile("deterministic")
