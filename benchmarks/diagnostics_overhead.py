"""Benchmarks for `UpdateDiagnostics` (not a test; results go to benchmarks/DIAGNOSTICS.md).

    python benchmarks/diagnostics_overhead.py overhead   # training time with vs without diagnostics
    python benchmarks/diagnostics_overhead.py ranks      # effective rank of dW: rope-MoRA vs LoRA

`overhead` trains a small Llama (hybrid policy: LoRA, DoRA, rope- and sharing-MoRA) with and
without the callback at the default interval, interleaving the runs in one process, and
also times the callback's own hooks, so the periodic cost and the one-off fit-end report
(figures, rich table) are reported apart.

`ranks` trains the same small Llama on random-token memorisation twice with the same
per-module budget (every linear: LoRA r=8, or rope-MoRA r=8) and compares the effective
rank, r90 and stable rank of each module's update, plus a hybrid run (MoRA on attention,
LoRA on the MLP).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft.core.inject import inject_adapters
from lightning_peft.diagnostics import UpdateDiagnostics

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
POLICIES = {
    "all-lora": {"rules": [{"method": "lora", "modules": ["*_proj"], "hparams": {"r": 8, "alpha": 16}}]},
    "all-dora": {"rules": [{"method": "dora", "modules": ["*_proj"], "hparams": {"r": 8, "alpha": 16}}]},
}
HYBRID = {
    "rules": [
        {"method": "lora", "modules": ["q_proj", "v_proj"], "hparams": {"r": 8, "alpha": 16}},
        {"method": "dora", "modules": ["k_proj", "o_proj"], "hparams": {"r": 8, "alpha": 16}},
        {"method": "mora", "modules": ["up_proj", "down_proj"], "hparams": {"r": 8, "mora_type": "rope"}},
        {"method": "mora", "modules": ["gate_proj"], "hparams": {"r": 8, "mora_type": "sharing"}},
    ]
}


class LlamaModule(L.LightningModule):
    """A small `LlamaForCausalLM` with adapters injected at the end of `__init__`."""

    def __init__(self, policy: dict, hidden: int, layers: int, vocab: int, lr: float, seed: int = 0) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(hidden * 2.6875),  # Llama-7B's 11008 / 4096
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
        self.model = LlamaForCausalLM(cfg)
        self.lr = lr
        self.losses: list[float] = []
        inject_adapters(self, policy)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def loader(n: int, seq: int, batch: int, vocab: int, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randint(0, vocab, (n, seq), generator=g)), batch_size=batch, shuffle=True)


def trainer(root: Path, max_steps: int, callbacks: list[Callback], logger) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
        log_every_n_steps=50,
    )


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import lightning
    import transformers

    return (
        f"python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}, "
        f"transformers {transformers.__version__}; {cpu}, {torch.get_num_threads()} intra-op thread(s)"
    )


# -- overhead ---------------------------------------------------------------------------------


class HookTimer(UpdateDiagnostics):
    """`UpdateDiagnostics` that adds up the wall time spent inside its own hooks, per phase."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seconds = {"start": 0.0, "periodic": 0.0, "end": 0.0}
        self.counts = {"start": 0, "periodic": 0, "end": 0}
        self._phase = "start"

    def _timed(self, phase: str, hook, *args) -> None:
        self._phase = phase
        t = time.perf_counter()
        hook(*args)
        self.seconds[phase] += time.perf_counter() - t

    def on_train_start(self, trainer, pl_module):
        self._timed("start", super().on_train_start, trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._timed("periodic", super().on_train_batch_end, trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer, pl_module):
        self._timed("end", super().on_train_end, trainer, pl_module)

    def _record(self, trainer, step):
        self.counts[self._phase] += 1
        super()._record(trainer, step)


def overhead(args: argparse.Namespace) -> None:
    print(machine())
    policy = POLICIES.get(args.policy, HYBRID)
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, batch {args.batch}x{args.seq}; {args.steps} steps")
    print(f"policy: {args.policy}; every_n_steps={args.every}; {args.rounds} interleaved rounds")
    data = loader(args.batch * 8, args.seq, args.batch, args.vocab)
    results: dict[str, list[dict]] = {"off": [], "on": []}
    for rnd in range(args.rounds):
        order = ["off", "on"] if rnd % 2 == 0 else ["on", "off"]
        for mode in order:
            module = LlamaModule(policy, args.hidden, args.layers, args.vocab, lr=1e-3)
            with tempfile.TemporaryDirectory() as tmp:
                callbacks = [HookTimer(every_n_steps=args.every)] if mode == "on" else []
                tr = trainer(Path(tmp), args.steps, callbacks, TensorBoardLogger(tmp, name="tb"))
                t = time.perf_counter()
                tr.fit(module, data)
                wall = time.perf_counter() - t
            entry = {"wall": wall}
            if callbacks:
                diag = callbacks[0]
                entry.update(diag.seconds, n=diag.counts["periodic"])
            results[mode].append(entry)
            hooks = ", ".join(f"{k} {entry[k]:.2f}s" for k in ("start", "periodic", "end") if k in entry)
            extra = f" (time in the callback: {hooks})" if hooks else ""
            print(f"round {rnd} {mode:>3}: fit {wall:.2f}s{extra}", flush=True)
    off = statistics.median(r["wall"] for r in results["off"])
    on = statistics.median(r["wall"] for r in results["on"])
    start = statistics.median(r["start"] for r in results["on"])
    periodic = statistics.median(r["periodic"] for r in results["on"])
    end = statistics.median(r["end"] for r in results["on"])
    n = results["on"][0]["n"]  # measurements made in on_train_batch_end
    step = off / args.steps  # includes fit start-up: errs towards a larger step, a smaller %
    per_measure = periodic / max(n, 1)
    print(f"median fit: without {off:.2f}s, with {on:.2f}s -> {100 * (on - off) / off:+.1f}% (whole fit)")
    print(f"time in the callback: train start (probes, W0 norms, step-0 row) {start:.3f}s")
    print(f"                      periodic {periodic:.3f}s over {n} measurements ({1000 * per_measure:.1f} ms each)")
    print(f"                      fit end (final measurement, CSV, figures, rich table) {end:.2f}s")
    print(
        f"steady state at every_n_steps={args.every}: {1000 * per_measure:.1f} ms per {args.every} steps of "
        f"{1000 * step:.0f} ms = {100 * per_measure / (args.every * step):.2f}% of training time"
    )


# -- effective rank: rope-MoRA vs LoRA --------------------------------------------------------


def ranks(args: argparse.Namespace) -> None:
    print(machine())
    runs = {
        "all-lora": {"rules": [{"method": "lora", "modules": LINEARS, "hparams": {"r": 8, "alpha": 16}}]},
        "all-mora": {"rules": [{"method": "mora", "modules": LINEARS, "hparams": {"r": 8, "mora_type": "rope"}}]},
        "hybrid": {
            "rules": [
                {"method": "mora", "modules": LINEARS[:4], "hparams": {"r": 8, "mora_type": "rope"}},
                {"method": "lora", "modules": LINEARS[4:], "hparams": {"r": 8, "alpha": 16}},
            ]
        },
    }
    data = loader(args.sequences, args.seq, args.batch, args.vocab)
    final: dict[str, list[dict]] = {}
    for name, policy in runs.items():
        module = LlamaModule(policy, args.hidden, args.layers, args.vocab, lr=args.lr)
        budget = sum(p.numel() for p in module.parameters() if p.requires_grad)
        with tempfile.TemporaryDirectory() as tmp:
            diag = UpdateDiagnostics(every_n_steps=args.every, plots=False, log_dir=tmp)
            tr = trainer(Path(tmp), args.steps, [diag], False)
            tr.fit(module, data)
        rows = [r for r in diag.rows if r["step"] == args.steps]
        final[name] = rows
        loss = statistics.mean(module.losses[-10:])
        print(f"\n{name}: trainable {budget:,} params, final loss (mean of last 10 steps) {loss:.3f}")
        for method in sorted({r["method"] for r in rows}):
            rs = [r for r in rows if r["method"] == method]
            cols = ("effective_rank", "r90", "stable_rank", "rel_norm")
            stats = ", ".join(f"{c} {statistics.mean(r[c] for r in rs):.2f}" for c in cols)
            low = min(r["effective_rank"] for r in rs)
            print(f"  {method:5} ({len(rs)} modules): mean {stats}; min effective_rank {low:.2f}")
        by_kind: dict[str, list[float]] = {}
        for r in rows:
            by_kind.setdefault(f"{r['method']:4} {r['kind']}", []).append(r["effective_rank"])
        for kind, vals in sorted(by_kind.items()):
            print(f"    {kind:24} effective rank by depth: " + " ".join(f"{v:6.2f}" for v in vals))
    pairs = [
        (a["effective_rank"], b["effective_rank"])
        for a, b in zip(final["all-mora"], final["all-lora"], strict=True)
        if a["module"] == b["module"]
    ]
    wins = sum(m > lo for m, lo in pairs)
    print(f"\nsame module, all-mora vs all-lora: MoRA's effective rank is higher in {wins}/{len(pairs)} modules")
    random_baseline(args.hidden)


def random_baseline(hidden: int, seeds: int = 5) -> None:
    """Effective rank of rope-MoRA / LoRA updates with *random* factors: what the structure alone gives."""
    from lightning_peft.adapters import AdapterLinear, LoRA, MoRA
    from lightning_peft.diagnostics import UpdateProbe

    inter = int(hidden * 2.6875)
    print("structural baseline (random Gaussian M / B, mean of 5 seeds):")
    for in_f, out_f in [(hidden, hidden), (hidden, hidden // 2), (hidden, inter), (inter, hidden)]:
        adapters = {"mora": (MoRA, {"mora_type": "rope"}), "lora": (LoRA, {})}
        values = {}
        for name, (cls, kwargs) in adapters.items():
            ranks = []
            for seed in range(seeds):
                torch.manual_seed(seed)
                layer = AdapterLinear(torch.nn.Linear(in_f, out_f, bias=False), cls(in_f, out_f, r=8, **kwargs))
                with torch.no_grad():
                    for p in layer.adapter.parameters():
                        p.normal_()
                ranks.append(float(UpdateProbe("m", 0, "m", name, layer).measure()["effective_rank"]))
            values[name] = statistics.mean(ranks)
        print(f"  {in_f:4} -> {out_f:4}: rope-MoRA {values['mora']:.1f}, LoRA {values['lora']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["overhead", "ranks"])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policy", choices=["hybrid", *POLICIES], default="hybrid", help="overhead: adapters")
    parser.add_argument("--sequences", type=int, default=64, help="ranks: how many random sequences to memorise")
    parser.add_argument("--lr", type=float, default=2e-3, help="ranks: AdamW learning rate for every run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overhead(args) if args.mode == "overhead" else ranks(args)


if __name__ == "__main__":
    main()
