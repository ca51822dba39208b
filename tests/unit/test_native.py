"""The native build (synapse_coap.native): which build runs, a stale build never does,
and the compiled modules answer exactly what their plain-Python sources answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from synapse_coap import native

ROOT = Path(__file__).resolve().parents[2]

# One process's answers to the corpus, through the modules of the build: every corpus
# body encoded and decoded by the wire codec, every corpus request and response mapped
# to CoAP and back, and Noise records sealed and opened. Printed as one JSON document,
# so two processes (plain Python, native build) can be compared byte for byte.
_PROBE = r"""
import hashlib, json, sys
from pathlib import Path
from synapse_coap import native
from synapse_coap.mapping.codec import WireCodec
from synapse_coap.mapping.coap import decode_coap, encode_coap
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.wire.body import decode_body, encode_body
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.profile import load_profile

def digest(b):
    return hashlib.sha256(b).hexdigest()

def body(part):
    b = part.get("body")
    return b"" if b is None else (b if isinstance(b, str) else json.dumps(b)).encode()

profile = load_profile(1)
ctx = WireContext(server_names=("heldout.test",))
codec = WireCodec(profile, ctx)
out = {"status": native.status().mode, "files": {}, "answers": []}
for name in native.MODULES:
    __import__(name)
    out["files"][name] = Path(sys.modules[name].__file__).suffix
for path in sorted(Path(sys.argv[1]).glob("*.jsonl")):
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        q, r = rec["request"], rec["response"]
        one = [rec["name"]]
        for part in (q, r):
            if isinstance(part.get("body"), (dict, list)):
                enc = encode_body(part["body"], profile, ctx)
                one += [digest(enc), decode_body(enc, profile, ctx) == part["body"]]
        req = HttpRequest(q["method"], q["target"].encode(), tuple(map(tuple, q["headers"])), body(q))
        wire = encode_coap(codec.encode_request(req))
        back = codec.decode_request(decode_coap(wire)[3])
        one += [digest(wire), back.method, back.target.decode(), digest(back.body)]
        resp = HttpResponse(r["status"], tuple(map(tuple, r["headers"])), body(r))
        wire = encode_coap(codec.encode_response(resp))
        got = codec.decode_response(decode_coap(wire)[3])
        one += [digest(wire), got.status, digest(got.body), list(got.headers)]
        out["answers"].append(one)
print(json.dumps(out, sort_keys=True))
"""


def _probe(pure: bool) -> dict[str, object]:
    env = dict(os.environ)
    env.pop(native.PURE_ENV, None)
    if pure:
        env[native.PURE_ENV] = "1"
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(ROOT / "tests" / "corpus" / "heldout")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout)
    return result


def _fake_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digests: dict[str, str] | None
) -> Path:
    """A build whose every module has an extension; its manifest holds ``digests``
    (None: no manifest)."""
    manifest = tmp_path / "native-build.json"
    if digests is not None:
        manifest.write_text(json.dumps({"modules": digests}))
    monkeypatch.setattr(native, "MANIFEST", manifest)
    monkeypatch.setattr(native, "extension_path", lambda m: tmp_path / (m + ".so"))
    monkeypatch.delenv(native.PURE_ENV, raising=False)
    return manifest


def test_pure_runs_every_module_from_its_source() -> None:
    got = _probe(pure=True)
    assert got["status"] == "pure"
    assert got["files"] == {name: ".py" for name in native.MODULES}


def test_the_native_build_answers_what_the_sources_answer() -> None:
    compiled = _probe(pure=False)  # (without SYNAPSE_COAP_PURE, whatever this process has)
    if compiled["status"] != "native":
        pytest.skip(f"no native build here ({compiled['status']}): synapse-coap build-native")
    reference = _probe(pure=True)
    assert set(compiled["files"].values()) == {".so"}  # type: ignore[union-attr]
    assert len(compiled["answers"]) > 90  # type: ignore[arg-type]
    assert compiled["answers"] == reference["answers"]


def test_a_source_changed_since_the_build_makes_every_module_run_from_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    digests = {m: native.source_digest(m) for m in native.BUILT}
    edited = "synapse_coap.mapping.codec"
    digests[edited] = "0" * 64
    manifest = _fake_build(tmp_path, monkeypatch, digests)
    status, source_first = native._decide()
    assert (status.mode, source_first) == ("pure", True)
    assert edited in status.reason
    assert edited in caplog.text

    # the same manifest with the true digest: the build runs
    digests[edited] = native.source_digest(edited)
    manifest.write_text(json.dumps({"modules": digests}))
    status, source_first = native._decide()
    assert (status.mode, source_first) == ("native", False)
    assert status.describe() == (
        f"native build ({len(native.MODULES)} modules compiled by mypyc, "
        f"{len(native.C_MODULES)} in C)"
    )


def test_without_a_build_or_with_the_switch_the_sources_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(native, "MANIFEST", tmp_path / "none.json")
    monkeypatch.setattr(native, "extension_path", lambda m: None)
    monkeypatch.delenv(native.PURE_ENV, raising=False)
    status, source_first = native._decide()
    assert (status.mode, source_first) == ("pure", False)
    assert "build-native" in status.reason

    monkeypatch.setattr(native, "extension_path", lambda m: tmp_path / (m + ".so"))
    monkeypatch.setenv(native.PURE_ENV, "1")
    status, source_first = native._decide()
    assert (status.mode, source_first) == ("pure", True)


def test_every_module_of_the_build_exists_and_is_not_a_package() -> None:
    for name in native.MODULES:
        assert native.source_path(name).is_file(), name
        assert native.source_path(name).name != "__init__.py"


def test_the_codes_that_errors_carry_survive_compilation() -> None:
    """The listener reads an error's CoAP code with getattr: a class attribute that the
    native build must keep (mypyc drops a plain one on an exception class)."""
    from synapse_coap.mapping import numbers as n
    from synapse_coap.mapping.coap_rules import (
        ProxyingNotSupported,
        UnsupportedCriticalOption,
        UnsupportedMethod,
    )

    assert getattr(UnsupportedCriticalOption("x"), "coap_code", None) == n.BAD_OPTION
    assert getattr(UnsupportedMethod("x"), "coap_code", None) == n.METHOD_NOT_ALLOWED
    assert getattr(ProxyingNotSupported("x"), "coap_code", None) == n.PROXYING_NOT_SUPPORTED


def test_a_build_of_another_module_list_is_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build that compiled other modules (an upgrade that changed the list without a
    new build): its shared library holds their code, so none of it runs."""
    digests = {m: native.source_digest(m) for m in native.BUILT}
    digests["synapse_coap.transport.gone"] = "0" * 64
    _fake_build(tmp_path, monkeypatch, digests)
    status, source_first = native._decide()
    assert (status.mode, source_first) == ("pure", True)
    assert "synapse_coap.transport.gone" in status.reason


def test_extensions_without_a_manifest_or_a_missing_one_are_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing says what extensions without a manifest were built from; and a module
    whose extension is gone still has its code in the build's shared library."""
    _fake_build(tmp_path, monkeypatch, None)
    status, source_first = native._decide()
    assert (status.mode, source_first) == ("pure", True)
    assert "without native-build.json" in status.reason

    _fake_build(tmp_path, monkeypatch, {m: native.source_digest(m) for m in native.BUILT})
    gone = native.MODULES[0]
    monkeypatch.setattr(
        native, "extension_path", lambda m: None if m == gone else tmp_path / (m + ".so")
    )
    status, source_first = native._decide()
    assert (status.mode, source_first) == ("pure", True)
    assert gone in status.reason


def test_an_extension_the_build_does_not_list_never_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = tmp_path / "synapse_coap"
    (pkg / "transport").mkdir(parents=True)
    (pkg / "transport" / "old.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    (pkg / "native__mypyc.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    monkeypatch.setattr(native, "PACKAGE_DIR", pkg)
    assert native.orphans() == ["synapse_coap.transport.old"]


def test_a_changed_c_source_stops_the_build_and_its_c_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hand-written C modules are part of the build: an edited ``.c`` makes every
    module run from its source, and then the C module cannot be imported at all."""
    assert all(native.source_path(m).suffix == ".c" for m in native.C_MODULES)
    c_module = native.C_MODULES[-1]
    digests = {m: native.source_digest(m) for m in native.BUILT}
    digests[c_module] = "0" * 64
    _fake_build(tmp_path, monkeypatch, digests)
    status, source_first = native._decide()
    assert (status.mode, source_first) == ("pure", True)
    assert c_module in status.reason
    finder = native._SourceFirst(native.BUILT)
    with pytest.raises(ModuleNotFoundError):
        finder.find_spec(c_module, None)
    spec = finder.find_spec(native.MODULES[0], None)
    assert spec is not None and str(spec.origin).endswith(".py")
