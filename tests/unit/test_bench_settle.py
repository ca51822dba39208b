"""bench/results_store.py: CPU readings taken once the measured process is asleep
(issue 12: a reading of a running process misses up to a scheduler tick of its CPU,
which moved CPU between the listeners' turns of bench/inbound.py)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.harness.bench import load_bench


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    """A child that says "waiting", blocks reading a line, then sleeps until killed; yielded
    once it has said so (its interpreter's start reads files and may sleep on the way,
    which a settled reading would take for the wait: a clean-clone CI run caught that)."""
    code = (
        "import sys, time\nsys.stdout.write('waiting\\n')\nsys.stdout.flush()\n"
        "while not sys.stdin.readline(): pass\ntime.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"waiting\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def test_a_process_asleep_is_settled(
    child: subprocess.Popen[bytes],
) -> None:
    rs = load_bench("results_store")
    # (blocked reading its stdin, or about to be)
    assert rs.settle(child.pid, timeout=10.0)
    assert rs.running_threads(child.pid) == 0
    assert rs.settle_all([child.pid], timeout=1.0) == 0
    assert child.stdin is not None
    child.stdin.write(b"\n")  # it sleeps in time.sleep now
    child.stdin.flush()
    assert rs.settle(child.pid, timeout=10.0)


def test_a_process_that_keeps_running_is_reported() -> None:
    rs = load_bench("results_store")
    code = "import sys\nsys.stdout.write('spinning\\n')\nsys.stdout.flush()\nwhile True: pass\n"
    spin = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        # (once it spins, not while the interpreter starts, which reads files and may
        # sleep: from then on it never sleeps, so the wait ends with the timeout)
        assert spin.stdout is not None and spin.stdout.readline() == b"spinning\n"
        assert not rs.settle(spin.pid, timeout=0.2)
        assert rs.running_threads(spin.pid) == 1
        assert rs.settle_all([spin.pid, spin.pid], timeout=0.05) == 2
    finally:
        spin.kill()
        spin.wait()
        if spin.stdout is not None:
            spin.stdout.close()


def test_a_process_that_is_gone_reads_as_settled() -> None:
    rs = load_bench("results_store")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert rs.running_threads(proc.pid) == 0
    assert rs.settle(proc.pid, timeout=0.0)
