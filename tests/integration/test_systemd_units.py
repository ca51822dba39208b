"""The systemd units in contrib/systemd pass ``systemd-analyze verify`` and are hardened.

The units name the command where docs/deployment.md installs it
(/opt/synapse-coap/bin/synapse-coap); verify checks that the command exists,
so the copies verified here point at this environment's ``synapse-coap``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent.parent
UNITS = sorted((REPO / "contrib" / "systemd").glob("*.service"))
INSTALLED = "/opt/synapse-coap/bin/synapse-coap"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian: apt-get install systemd)"
)


def _local_copies(tmp_path: Path) -> list[Path]:
    command = Path(sys.executable).parent / "synapse-coap"
    assert command.exists(), command
    out = []
    for unit in UNITS:
        text = unit.read_text()
        assert INSTALLED in text
        copy = tmp_path / unit.name
        copy.write_text(text.replace(INSTALLED, str(command)))
        out.append(copy)
    return out


def test_both_units_exist() -> None:
    assert [u.name for u in UNITS] == [
        "synapse-coap-gateway.service",
        "synapse-coap-sidecar.service",
    ]


@needs_analyze
def test_units_verify_cleanly(tmp_path: Path) -> None:
    copies = _local_copies(tmp_path)
    out = subprocess.run(
        [str(ANALYZE), "verify", "--man=no", *map(str, copies)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    # an unknown or misspelt directive is only a warning: any output is a failure
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


@needs_analyze
def test_units_are_hardened(tmp_path: Path) -> None:
    for copy in _local_copies(tmp_path):
        text = copy.read_text()
        for directive in (
            "DynamicUser=yes",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "CapabilityBoundingSet=\n",
            "StateDirectory=",
        ):
            assert directive in text, (copy.name, directive)
        out = subprocess.run(
            [str(ANALYZE), "security", "--offline=yes", "--no-pager", str(copy)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout + out.stderr)
        assert level is not None, out.stdout + out.stderr
        # systemd's scale: 0 (fully hardened) to 10; under 2 is rated "OK"
        assert float(level.group(1)) < 2.0, (copy.name, level.group(0))
