"""Shipped policies, found by name from any directory and in any install (package data)."""

from __future__ import annotations

PRESETS_PACKAGE = "lightning_peft.presets"  # package data: found by name from any directory, in any install


def list_presets() -> list[str]:
    """Names of the shipped policy presets (the repository's `policies/*.yaml`, package data in a wheel)."""
    from importlib.resources import files

    return sorted(p.name[: -len(".yaml")] for p in files(PRESETS_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str | None:
    """The YAML text of preset `name`, or `None` when no preset has that name."""
    from importlib.resources import files

    if name not in list_presets():
        return None
    return (files(PRESETS_PACKAGE) / f"{name}.yaml").read_text()
