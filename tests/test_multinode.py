"""Two "nodes" of one process each on this machine, started together: DDP through torchrun, FSDP2 through
the environment Lightning reads on a cluster without a scheduler (docs/multinode.md).

Each launch (`tests/scripts/multinode_fit.py`) builds the built-in UUID continual task, whose cached
base both nodes ask for at once, trains the hybrid policy with MergeRestart, diagnostics and
checkpoints, and resumes from the last checkpoint. Checked: the ranks and paths every process saw,
every file written once, the cache built once, and DDP and FSDP2 ending with the same adapters.
"""

import csv
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "multinode_fit.py"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_command(strategy: str, out: Path, port: int, node: int) -> tuple[list[str], dict[str, str]]:
    """The command and environment of node `node`: what a cluster's launcher would run on each machine."""
    env = {**os.environ, "LIGHTNING_PEFT_CACHE": str(out / "cache"), "OMP_NUM_THREADS": "1"}
    if strategy == "ddp":
        rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "multinode"]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
        return [*torchrun, *rendezvous, str(SCRIPT), str(out), strategy], env
    env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node), "WORLD_SIZE": "2"})
    return [sys.executable, str(SCRIPT), str(out), strategy], env


def launch(strategy: str, out: Path) -> str:
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd, env = node_command(strategy, out, port, node)
        log = (out / f"node{node}.log").open("w")
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        proc.wait(timeout=900)
        log.close()
    logs = "\n".join((out / f"node{node}.log").read_text() for node in (0, 1))
    assert all(proc.returncode == 0 for proc, _ in procs), logs[-6000:]
    return logs


@pytest.fixture(scope="module", params=["ddp", "fsdp2"])
def run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    logs = launch(request.param, out)
    ranks = [json.loads((out / f"rank{k}.json").read_text()) for k in (0, 1)]
    return request.param, out, logs, ranks


def test_ranks_and_paths(run):
    strategy, out, _, ranks = run
    cluster = "TorchElasticEnvironment" if strategy == "ddp" else "LightningEnvironment"
    for k, seen in enumerate(ranks):
        for phase, version, step in (("fit", 0, 4), ("resume", 1, 6)):
            assert seen[f"{phase}_global_rank"] == k and seen[f"{phase}_world_size"] == 2
            assert seen[f"{phase}_node_rank"] == int(seen["node_rank_env"]) == k and seen[f"{phase}_local_rank"] == 0
            assert seen[f"{phase}_cluster"] == cluster
            log_dir = out / "logs" / f"version_{version}"
            assert seen[f"{phase}_log_dir"] == str(log_dir)  # every rank agrees on one folder per run
            assert seen[f"{phase}_ckpt_dir"] == str(log_dir / "checkpoints")
            assert seen[f"{phase}_last"] == str(log_dir / "checkpoints" / "last.ckpt")
            assert seen[f"{phase}_step"] == step


def expected_files(strategy: str) -> set[str]:
    checkpoints = {
        0: ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "last.ckpt"],
        1: ["epoch=2-step=6.ckpt", "last.ckpt"],
    }
    shards = [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]  # one shard per rank, metadata once
    files = set()
    for version, names in checkpoints.items():
        folder = f"logs/version_{version}"
        files |= {f"{folder}/{name}" for name in ("hparams.yaml", "metrics.csv", "update_diagnostics.csv")}
        for name in names:
            path = f"{folder}/checkpoints/{name}"
            files |= {f"{path}/{shard}" for shard in shards} if strategy == "fsdp2" else {path}
    return files


def test_every_file_written_once_where_expected(run):
    strategy, out, logs, _ = run
    written = {str(p.relative_to(out)) for p in (out / "logs").rglob("*") if p.is_file()}
    assert written == expected_files(strategy)
    for version, steps in ((0, {"0", "2", "4"}), (1, {"4", "6"})):
        with (out / "logs" / f"version_{version}" / "update_diagnostics.csv").open() as f:
            rows = Counter((r["step"], r["module"]) for r in csv.DictReader(f))
        assert set(rows.values()) == {1} and len(rows) == 28 * len(steps)  # no rank wrote a second row
        assert {step for step, _ in rows} == steps
    assert logs.count("modules adapted over 4 blocks") == 2  # the plan: once per fit, by rank zero
    assert logs.count("MergeRestart: merged and restarted 28 modules") == 2  # steps 2 and 4 (after the resume)


def test_task_cache_built_once_by_nodes_starting_together(run):
    _, out, logs, _ = run
    assert logs.count("lightning-peft: building a base (once, cached)") == 1
    entries = sorted(p.name for p in (out / "cache" / "uuid-base").iterdir())
    assert len(entries) == 2 and entries[0] == f".{entries[1]}.lock"  # the base and its lock, no temporaries
    assert (out / "cache" / "uuid-base" / entries[1] / "lightning_peft_base.json").is_file()


def test_ranks_agree_and_ddp_equals_fsdp2(run, tmp_path_factory):
    strategy, out, _, _ = run
    rank0, rank1 = (torch.load(out / f"rank{k}.pt", weights_only=True) for k in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) == 84  # 14 MoRA (M, base), 14 DoRA (A, B, m, base)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    RESULTS[strategy] = rank0
    if len(RESULTS) == 2:  # the second launch: the same training under the other strategy
        ddp, fsdp2 = RESULTS["ddp"], RESULTS["fsdp2"]
        for key in ddp:
            torch.testing.assert_close(fsdp2[key], ddp[key], rtol=1e-4, atol=1e-5, msg=key)


RESULTS: dict[str, dict] = {}
