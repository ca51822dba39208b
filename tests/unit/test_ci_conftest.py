"""tests/conftest.py's CI rules, run on a tiny suite in a subprocess: an unexpected
skip fails the run, an expected one does not; the random order keeps a module's
parametrized module-scoped fixture to one set-up per parameter."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

SUITE = """
import pytest

SETUPS = []

@pytest.fixture(scope="module", params=["a", "b"])
def server(request):
    SETUPS.append(request.param)
    return request.param

@pytest.mark.parametrize("i", range(6))
def test_uses_server(server, i):
    # one set-up per parameter, however the tests are shuffled
    assert SETUPS.count(server) == 1

def test_skipped():
    pytest.skip("no frobnicator here")
"""


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_suite.py").write_text(SUITE)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            *args,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
    )


def test_unexpected_skip_fails_expected_one_passes(tmp_path: Path) -> None:
    (tmp_path / "none.txt").write_text("# nothing expected\n")
    out = run(tmp_path, "--expected-skips=none.txt", "--random-seed=5")
    assert out.returncode == 1, out.stdout
    assert "test_suite.py::test_skipped: no frobnicator here" in out.stdout
    assert "skips: 1 (0 expected, 1 unexpected" in out.stdout
    (tmp_path / "some.txt").write_text("test_suite.py::test_skipped | no frob*\n")
    out = run(tmp_path, "--expected-skips=some.txt", "--random-seed=5")
    assert out.returncode == 0, out.stdout
    assert "skips: 1 (1 expected, 0 unexpected" in out.stdout
    assert "--random-seed=5 repeats it" in out.stdout


def test_random_order_depends_on_the_seed_and_keeps_fixture_groups(tmp_path: Path) -> None:
    orders = set()
    for seed in ("1", "2", "off"):
        out = run(tmp_path, f"--random-seed={seed}", "-v", "-v")
        assert "12 passed, 1 skipped" in out.stdout, out.stdout
        orders.add(tuple(line.split()[0] for line in out.stdout.splitlines() if "::" in line))
    assert len(orders) == 3
