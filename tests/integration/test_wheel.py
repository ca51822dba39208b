"""The built wheel: it ships the maps and loads them from its own site-packages, it
declares exactly the distributions its code imports, and installed beside the oldest
supported Synapse it leaves that Synapse alone and loads as a module."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from synapse_coap_lab import homeserver
from tests.harness import synapse_proc

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent.parent
#: The oldest Synapse release synapse-coap supports (README, pyproject.toml).
OLDEST_SYNAPSE = "1.120.0"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(REPO)],
        check=True,
        capture_output=True,
    )
    wheels = list(dist.glob("synapse_coap-*.whl"))
    assert len(wheels) == 1
    yield wheels[0]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_wheel_holds_the_runtime_only(wheel: Path) -> None:
    """What a homeserver, sidecar or gateway runs, and no tooling: no demo, capture,
    homeserver harness or attack generator (they live in synapse_coap_lab, beside the
    package), no tests, no benches."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"synapse_coap"}, sorted(tops)
    tooling = {
        f"synapse_coap/{m}.py"
        for m in (
            "lab/demo",
            "lab/capture",
            "lab/homeserver",
            "lab/attack",
            "lab/names",
            "cli/demo",
        )
    }
    assert tooling.isdisjoint(names), sorted(tooling & set(names))
    assert any(name.startswith("synapse_coap/maps/") for name in names)


def test_wheel_declares_exactly_what_its_code_imports(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        metadata = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        requires = {
            _norm(re.split(r"[\s;<>=!~\[(]", line.split(":", 1)[1].strip())[0])
            for line in zf.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line
        }
        imported: set[str] = set()
        for name in zf.namelist():
            if not name.endswith(".py"):
                continue
            for node in ast.walk(ast.parse(zf.read(name))):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
    third_party = {
        m for m in imported if m not in sys.stdlib_module_names and m not in ("synapse_coap",)
    }
    providers = importlib.metadata.packages_distributions()
    unknown = sorted(m for m in third_party if m not in providers)
    assert unknown == [], f"imported but installed by no distribution: {unknown}"
    needed = {_norm(providers[m][0]) for m in third_party}
    assert needed == requires, {
        "imported, not declared": sorted(needed - requires),
        "declared, not imported": sorted(requires - needed),
    }


def test_wheel_beside_the_oldest_synapse_keeps_it_and_loads(wheel: Path, tmp_path: Path) -> None:
    """pip install of the wheel into a venv holding Synapse 1.120.0 (as an operator has it)."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")

    def pip(*args: str) -> None:
        subprocess.run([py, "-m", "pip", "install", "-q", *args], check=True, capture_output=True)

    pip(f"matrix-synapse=={OLDEST_SYNAPSE}", "prometheus-client<0.23")
    pip(f"{wheel}[synapse-before-1-140]")
    have = subprocess.run(
        [py, "-c", "import synapse; print(synapse.__version__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout.strip()
    assert have == OLDEST_SYNAPSE
    # the module loads: a real Synapse from this venv starts it, with its CoAP listener
    proc = synapse_proc.SynapseProcess(
        tmp_path / "hs",
        "wheel.test",
        http_port=None,
        modules=[
            {
                "module": "synapse_coap.CoapModule",
                "config": {"listen": [f"127.0.0.1:{synapse_proc.free_port('udp')}"]},
            }
        ],
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(homeserver, "SYNAPSE_PYTHON", py)
        proc.start(ready_log_pattern=r"synapse-coap: CoAP listener ready")
    try:
        log = proc.log_text()
    finally:
        proc.stop()
    assert "Loaded module <CoapModule listen=['127.0.0.1:" in log
    # and the module Synapse loaded is the wheel's, in that venv
    where = subprocess.run(
        [py, "-c", "import synapse_coap; print(synapse_coap.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path / "hs",
    ).stdout.strip()
    assert Path(where).is_relative_to(env_dir), where


def test_wheel_ships_and_loads_maps(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    # System site-packages give the fresh venv cbor2/attrs/... without downloads;
    # the package itself only comes from the wheel (the editable install is not visible:
    # the venv's python runs with -I from /, and its own site-packages come first).
    venv.EnvBuilder(with_pip=False, system_site_packages=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    probe = (
        "import json, synapse_coap.wire.profile as p, synapse_coap.wire.body as b;"
        "pr = p.load_profile(1);"
        "v = {'msgtype': 'm.text', 'body': 'Hello world'};"
        "ok = b.decode_body(b.encode_body(v, pr), pr) == v;"
        "print(json.dumps({'maps': str(p.maps_dir()), 'module': p.__file__,"
        " 'hash': pr.content_hash.hex(), 'dict': len(pr.dictionary), 'ok': ok,"
        " 'ids': [x.id for x in p.supported_profiles()]}))"
    )
    out = subprocess.run(
        [str(py), "-I", "-c", probe], check=True, capture_output=True, text=True, cwd="/"
    )
    info = json.loads(out.stdout)
    site = subprocess.run(
        [str(py), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        cwd="/",
    ).stdout.strip()
    assert Path(info["module"]).is_relative_to(site), info
    assert Path(info["maps"]) == Path(site) / "synapse_coap" / "maps"
    manifest = json.loads((REPO / "maps" / "profile-1" / "manifest.json").read_text())
    assert info["hash"] == manifest["content_hash"]
    assert info["dict"] > 0 and info["ok"] is True
    assert info["ids"][-1] == 0 and 1 in info["ids"]
