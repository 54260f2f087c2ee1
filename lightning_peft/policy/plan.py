"""The resolved policy for one model: one row per targeted module, printable and serialisable."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from lightning_peft.policy.optim import OptimSettings


@dataclass
class PlanRow:
    """One targeted module: where it is, what it gets, what that costs."""

    name: str
    block: int | None
    kind: str
    layer_type: str
    in_features: int
    out_features: int
    method: str
    hparams: dict[str, Any]
    params: int
    rule: int
    optim: dict[str, float] = field(default_factory=dict)  # the rule's optimizer settings (may be absent)


@dataclass
class Plan:
    """The resolved policy for one model: a table with one row per targeted module."""

    rows: list[PlanRow]
    blocks_path: str | None
    num_blocks: int
    model_params: int

    @property
    def trainable_params(self) -> int:
        return sum(r.params for r in self.rows)

    def params_by_method(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.method] = out.get(r.method, 0) + r.params
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        rows = [PlanRow(**r) for r in data["rows"]]
        return cls(
            rows=rows, blocks_path=data["blocks_path"], num_blocks=data["num_blocks"], model_params=data["model_params"]
        )

    def fingerprint(self) -> list[tuple[str, str, str]]:
        """What must agree between a checkpoint and a live model: (module, method, hparams)."""
        return [(r.name, r.method, json.dumps(r.hparams, sort_keys=True)) for r in self.rows]

    def table(self, title: str = "lightning-peft plan"):
        """A rich `Table`: one row per module, then the budget per method."""
        from rich.table import Table

        table = Table(title=title, show_lines=False)
        optim_col = any(r.optim for r in self.rows)
        columns = ("block", "module", "method", "hyper-parameters", "params", "% of model")
        columns = (*columns[:4], "optimizer", *columns[4:]) if optim_col else columns
        # Names, methods and numbers never wrap (a name folded over four lines cannot be read or
        # grepped); the free-text columns take the squeeze on a narrow terminal.
        widest_name = max([len(r.kind) for r in self.rows] + [len("total trainable")])
        for col in columns:
            fixed = col not in ("hyper-parameters", "optimizer")
            table.add_column(
                col,
                justify="right" if col in ("block", "params", "% of model") else "left",
                overflow="fold",
                no_wrap=fixed,
                min_width=widest_name if col == "module" else None,
            )
        for r in self.rows:
            hp = ", ".join(f"{k}={v}" for k, v in sorted(r.hparams.items()))
            optim = [OptimSettings(**r.optim).describe() or "-"] if optim_col else []
            table.add_row(
                "-" if r.block is None else str(r.block),
                r.kind,
                r.method,
                hp,
                *optim,
                f"{r.params:,}",
                f"{100 * r.params / max(self.model_params, 1):.3f}",
            )
        table.add_section()
        pad = [""] if optim_col else []
        for method, params in sorted(self.params_by_method().items()):
            share = f"{100 * params / max(self.model_params, 1):.3f}"
            table.add_row("", f"total {method}", method, "", *pad, f"{params:,}", share)
        table.add_row(
            "",
            "total trainable",
            "",
            "",
            *pad,
            f"{self.trainable_params:,}",
            f"{100 * self.trainable_params / max(self.model_params, 1):.3f}",
        )
        return table

    def summary(self) -> str:
        """A one-paragraph plain-text summary (for logs without rich)."""
        parts = [f"{m}: {p:,}" for m, p in sorted(self.params_by_method().items())]
        return (
            f"{len(self.rows)} modules adapted over {self.num_blocks} blocks ({self.blocks_path}); "
            f"trainable {self.trainable_params:,} of {self.model_params:,} "
            f"({100 * self.trainable_params / max(self.model_params, 1):.3f}%): " + ", ".join(parts)
        )
