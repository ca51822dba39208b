"""The built wheel ships the maps and loads them from its own site-packages."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent.parent


def test_wheel_ships_and_loads_maps(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-w",
            str(dist),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    wheels = list(dist.glob("synapse_coap-*.whl"))
    assert len(wheels) == 1
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
            str(wheels[0]),
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
