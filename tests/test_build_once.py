"""`build_once`: a cache several processes ask for at once is built by one of them, never seen half built."""

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

IO = Path(__file__).resolve().parents[1] / "lightning_peft" / "core" / "io.py"

# Each process loads io.py by path (stdlib only: no torch import, so the processes start within
# milliseconds of each other), waits for the start signal, then asks for the same folder.
WORKER = """
import importlib.util, os, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("lp_io", sys.argv[1])
io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(io)
root = Path(sys.argv[2])
while not (root / "go").exists():
    time.sleep(0.001)

def build(tmp):
    with open(root / "builds.log", "a") as log:
        log.write(f"{os.getpid()}\\n")
    tmp.mkdir()
    (tmp / "part1").write_text("a")
    time.sleep(0.3)  # a slow build: the others must wait, not see a half-built folder
    (tmp / "part2").write_text("b")

folder = io.build_once(root / "cache" / "base", build)
print(folder, sorted(p.name for p in folder.iterdir()))
"""


def load_io():
    spec = importlib.util.spec_from_file_location("lp_io_test", IO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_processes_starting_together_build_once(tmp_path):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(IO), str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(4)
    ]
    time.sleep(0.5)  # let every process reach the start line
    (tmp_path / "go").touch()
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err.decode() for _, err in outputs]
    assert len((tmp_path / "builds.log").read_text().split()) == 1  # one builder
    expected = f"{tmp_path / 'cache' / 'base'} ['part1', 'part2']"
    assert [out.decode().strip() for out, _ in outputs] == [expected] * 4  # every process saw it whole
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".base.lock", "base"]  # no temporaries left


def test_failed_build_leaves_nothing_and_the_next_call_builds(tmp_path):
    io = load_io()
    target = tmp_path / "base"

    def broken(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "half").write_text("x")
        raise RuntimeError("out of disk")

    with pytest.raises(RuntimeError, match="out of disk"):
        io.build_once(target, broken)
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == [".base.lock"]
    assert io.build_once(target, lambda tmp: tmp.write_text("ok")) == target and target.read_text() == "ok"
    assert io.build_once(target, lambda tmp: pytest.fail("built twice")) == target  # present: reused


def test_builder_that_writes_nothing_is_an_error(tmp_path):
    io = load_io()
    with pytest.raises(FileNotFoundError, match="wrote nothing"):
        io.build_once(tmp_path / "base", lambda tmp: None)
