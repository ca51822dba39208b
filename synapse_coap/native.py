"""The native build: the hot path's modules compiled to C extensions by mypyc.

The same source is both: every module in :data:`MODULES` is plain, mypy --strict
Python (the reference, and what runs where nothing was compiled), and
``synapse-coap build-native`` (run by ``scripts/setup``) compiles them with mypyc into
extension modules beside their sources, which Python's import system then prefers.
That takes the interpretation out of the codec, the CoAP mapping and the Noise record
path; nothing else changes (``bench/transport_cpu.py`` and ``bench/inbound.py`` say
what it saves, and which build they measured).

The build writes :data:`MANIFEST` (the SHA-256 of each compiled source). When the
package is imported, :func:`install` compares it with the sources: a source edited
since the build would run stale compiled code, so then every module of the build runs
from its source instead (a warning names the modules; ``synapse-coap build-native``
rebuilds). ``SYNAPSE_COAP_PURE=1`` runs the sources too, on purpose: the test suite
checks the reference that way (``scripts/test``).

Beside them, :data:`C_MODULES`: hand-written C for what mypyc cannot make fast enough
(``wire/_cbody.c``, the body decoder in one pass; ``wire/body_fast.py`` uses it only
when it imports, and falls back to its cbor2 path for what it does not take;
``wire/_cenc.c``, a JSON body's text to the profile CBOR in one pass, used by
``wire/body_encode.py`` the same way, and an answer's identifiers for the session string
table (``wire/strings.py``); ``wire/_cdeflate.c``, zlib's DEFLATE with a
profile dictionary and its inflate without zlib's per-body allocations, same library and
bytes, and the proof that a short body's DEFLATE cannot win, used by ``wire/deflate.py``; ``noise/_caead.c``, the records' ChaCha20-Poly1305 through
libsodium, the same construction and bytes as cryptography's, used by
``noise/records.py``; ``transport/_crecv.c``, the listener socket's datagrams read in
one ``recvmmsg`` call, used by ``transport/batch.py``). The
build compiles them with the mypyc modules, the manifest holds their digests too, and
when the sources run (a stale build, ``SYNAPSE_COAP_PURE=1``) they cannot be imported.

Left out of :data:`MODULES`, and why: classes built on aiocoap's or asyncio's
(``transport.noise_udp``, ``transport.batch``, ``transport.datagram``: mypyc's native
classes cannot derive from them), attrs classes with field converters or factories
(``mapping.messages``, whose CoAP message classes live in the compiled
``mapping.coap_message`` for that reason, ``wire.body_tables``, ``wire.profile``,
``mapping.push``, ``noise.limits``, ``noise.trust``), and ``noise.handshake`` (mypyc 2.4 stops on one
of its closures; it runs once per session anyway).

Writing code for these modules: mypyc checks the annotations at run time (a value that
is not of its declared type is a TypeError, not silently passed on: the reason the
body decoders no longer let a bare CBOR byte string through), and keeps a class
attribute of an exception class only when it is declared ``ClassVar``
(``mapping.coap_rules``). ``tests/unit/test_native.py`` compares the two builds on the
held-out corpus; ``scripts/test`` runs the suite on the native build and the unit
tests again on the sources.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

logger = logging.getLogger(__name__)

#: the package directory (the sources and, after a build, the extensions beside them)
PACKAGE_DIR = Path(__file__).resolve().parent

#: written by ``synapse-coap build-native``: ``{"modules": {name: sha256 of its source}}``
MANIFEST = PACKAGE_DIR / "native-build.json"

#: the environment variable that runs every module from its source
PURE_ENV = "SYNAPSE_COAP_PURE"

#: the modules the native build compiles (the codec, the CoAP mapping, the Noise
#: record path and sessions, the fast path's exchange bookkeeping)
MODULES: tuple[str, ...] = (
    "synapse_coap.wire.body",
    "synapse_coap.wire.body_decode",
    "synapse_coap.wire.body_encode",
    "synapse_coap.wire.deflate",
    "synapse_coap.wire.body_fast",
    "synapse_coap.wire.cbor",
    "synapse_coap.wire.context",
    "synapse_coap.wire.dns",
    "synapse_coap.wire.push_base",
    "synapse_coap.wire.routes",
    "synapse_coap.wire.strings",
    "synapse_coap.mapping.authorization",
    "synapse_coap.mapping.coap",
    "synapse_coap.mapping.coap_message",
    "synapse_coap.mapping.coap_rules",
    "synapse_coap.mapping.codec",
    "synapse_coap.mapping.dispatch",
    "synapse_coap.mapping.jsonbody",
    "synapse_coap.mapping.numbers",
    "synapse_coap.mapping.redact",
    "synapse_coap.mapping.samples",
    "synapse_coap.mapping.text",
    "synapse_coap.mapping.tokens",
    "synapse_coap.noise.badinput",
    "synapse_coap.noise.endpoint",
    "synapse_coap.noise.events",
    "synapse_coap.noise.initiator",
    "synapse_coap.noise.keys",
    "synapse_coap.noise.lost",
    "synapse_coap.noise.ratelimit",
    "synapse_coap.noise.recordpath",
    "synapse_coap.noise.records",
    "synapse_coap.noise.responder",
    "synapse_coap.noise.retry",
    "synapse_coap.noise.sessions",
    "synapse_coap.noise.timers",
    "synapse_coap.transport.fastpath",
    "synapse_coap.transport.replay_state",
)

#: hand-written C extensions of the build (source ``<name>.c``; no Python source):
#: importable only while the native build runs
C_MODULES: tuple[str, ...] = (
    "synapse_coap.noise._caead",
    "synapse_coap.transport._crecv",
    "synapse_coap.wire._cbody",
    "synapse_coap.wire._cdeflate",
    "synapse_coap.wire._cenc",
)

#: the libraries a C module of :data:`C_MODULES` links with (zlib and libsodium: their
#: headers come with Debian's ``zlib1g-dev`` and ``libsodium-dev``, which
#: ``scripts/setup`` installs)
C_LIBRARIES: dict[str, tuple[str, ...]] = {
    "synapse_coap.noise._caead": ("sodium",),
    "synapse_coap.wire._cdeflate": ("z",),
}

#: every module the build compiles, and the manifest lists
BUILT: tuple[str, ...] = MODULES + C_MODULES


@attrs.frozen
class NativeStatus:
    """Which build runs: ``mode`` is ``native`` (every module of :data:`MODULES` from its
    extension) or ``pure`` (every one from its source); ``reason`` says why."""

    mode: str
    compiled: tuple[str, ...]
    reason: str

    def describe(self) -> str:
        if self.mode == "native":
            return (
                f"native build ({len(self.compiled)} modules compiled by mypyc, "
                f"{len(C_MODULES)} in C)"
            )
        return f"{self.mode} Python ({self.reason})"


def source_path(module: str) -> Path:
    """The source file of one of :data:`BUILT` (``.c`` for :data:`C_MODULES`)."""
    parts = module.split(".")
    return PACKAGE_DIR.joinpath(*parts[1:]).with_suffix(".c" if module in C_MODULES else ".py")


def source_digest(module: str) -> str:
    return hashlib.sha256(source_path(module).read_bytes()).hexdigest()


def extension_path(module: str) -> Path | None:
    """The compiled extension of ``module`` beside its source, if there is one."""
    src = source_path(module)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = src.with_name(src.stem + suffix)
        if candidate.exists():
            return candidate
    return None


def read_manifest() -> dict[str, Any]:
    """The build's manifest (``{}`` if there is none, or it is not one)."""
    try:
        manifest = json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def build_fault() -> str | None:
    """Why the extensions beside the sources must not run (None: they are a complete
    build of :data:`MODULES` from the sources as they are now)."""
    if not MANIFEST.exists():
        # (not a build of ours: nothing says which sources it was compiled from)
        return f"extensions without {MANIFEST.name}"
    built = read_manifest().get("modules")
    if not isinstance(built, dict):
        built = {}
    # every module of the list, compiled or not: one whose extension is missing still
    # has its code in the build's shared library, where the compiled modules import it
    # from; and a build of another module list holds other modules' code there
    stale = [m for m in BUILT if built.get(m) != source_digest(m)]
    stale += sorted(set(built) - set(BUILT))
    if stale:
        return f"stale build: {', '.join(stale)} changed"
    missing = [m for m in BUILT if extension_path(m) is None]
    if missing:
        return f"incomplete build: no {', '.join(missing)}"
    return None


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Finds :data:`MODULES` from their source files, never their extensions; a module
    of :data:`C_MODULES` (no source) cannot be imported."""

    def __init__(self, modules: Sequence[str]) -> None:
        self._modules = frozenset(modules)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self._modules:
            return None
        if fullname in C_MODULES:
            raise ModuleNotFoundError(f"{fullname}: the native build is not running", name=fullname)
        return importlib.util.spec_from_file_location(fullname, source_path(fullname))


_status: NativeStatus | None = None


def _decide() -> tuple[NativeStatus, bool]:
    """What runs, and whether the sources must be preferred to the extensions."""
    compiled = tuple(m for m in MODULES if extension_path(m) is not None)
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return NativeStatus("pure", (), f"{PURE_ENV} is set"), bool(compiled)
    if not compiled:
        return NativeStatus("pure", (), "not compiled: synapse-coap build-native builds it"), False
    fault = build_fault()
    if fault is not None:
        logger.warning(
            "synapse-coap: not running the native build (%s): every module runs from its "
            "source (synapse-coap build-native rebuilds it)",
            fault,
        )
        return NativeStatus("pure", (), fault), True
    return NativeStatus("native", compiled, "built by synapse-coap build-native"), False


def orphans() -> list[str]:
    """Modules with an extension beside their source that :data:`MODULES` does not
    list (left by a build of another version): they always run from source."""
    listed = set(BUILT)
    out = []
    for ext in PACKAGE_DIR.rglob("*.so"):
        if ext.name.startswith("native__mypyc"):
            continue
        rel = ext.relative_to(PACKAGE_DIR.parent)
        name = ".".join((*rel.parts[:-1], ext.name.split(".", 1)[0]))
        if name not in listed:
            out.append(name)
    return sorted(out)


def install() -> NativeStatus:
    """Decide once per process which build runs (called when the package is imported,
    before any module of the build is)."""
    global _status
    if _status is None:
        _status, source_first = _decide()
        from_source = [*(BUILT if source_first else ()), *orphans()]
        if from_source:
            sys.meta_path.insert(0, _SourceFirst(from_source))
    return _status


def status() -> NativeStatus:
    """Which build this process runs."""
    return install()
