"""`build_once`: a cache several processes ask for at once is built by one of them, never seen half built."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_peft.core import io

# Each process imports the library, says it is ready, waits for the start signal (so that all
# ask within milliseconds of each other), then asks for the same folder.
WORKER = """
import os, sys, time
from pathlib import Path
from lightning_peft.core.io import build_once
root = Path(sys.argv[1])
(root / f"ready-{os.getpid()}").touch()
while not (root / "go").exists():
    time.sleep(0.001)

def build(tmp):
    with open(root / "builds.log", "a") as log:
        log.write(f"{os.getpid()}\\n")
    tmp.mkdir()
    (tmp / "part1").write_text("a")
    time.sleep(0.3)  # a slow build: the others must wait, not see a half-built folder
    (tmp / "part2").write_text("b")

folder = build_once(root / "cache" / "base", build)
print(folder, sorted(p.name for p in folder.iterdir()))
"""


@pytest.mark.slow  # three processes import torch and lightning
def test_processes_starting_together_build_once(tmp_path):
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    deadline = time.monotonic() + 600
    while len(list(tmp_path.glob("ready-*"))) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.05)  # every process at the start line
    (tmp_path / "go").touch()
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err.decode() for _, err in outputs]
    assert len((tmp_path / "builds.log").read_text().split()) == 1  # one builder
    expected = f"{tmp_path / 'cache' / 'base'} ['part1', 'part2']"
    assert [out.decode().strip() for out, _ in outputs] == [expected] * 3  # every process saw it whole
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".base.lock", "base"]  # no temporaries left


def test_failed_build_leaves_nothing_and_the_next_call_builds(tmp_path):
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
    with pytest.raises(FileNotFoundError, match="wrote nothing"):
        io.build_once(tmp_path / "base", lambda tmp: None)
