"""Subcommand ``build-native``: compile the hot path's modules with mypyc.

Builds a C extension for each module of :data:`synapse_coap.native.MODULES` beside its
source, wherever the package is installed (a checkout, a virtualenv's site-packages),
plus one shared ``synapse_coap/native__mypyc.*.so``, and the hand-written C modules of
:data:`synapse_coap.native.C_MODULES`, and writes
``synapse_coap/native-build.json`` (the SHA-256 of every source it compiled). Nothing is
rebuilt while that manifest matches the sources. Needs mypy (which carries mypyc),
setuptools >= 77, the Python headers, zlib's headers (``wire/_cdeflate.c``), libsodium's
(``noise/_caead.c``) and a C compiler; ``scripts/setup`` runs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from synapse_coap import native

#: the shared library's module (synapse_coap/native__mypyc.*.so)
GROUP = "synapse_coap.native"

#: mypy's settings for compiling (the type check proper is the project's CI, with
#: --strict; here, a third-party package without type information is Any)
_MYPY_CONFIG = """\
[mypy]
python_version = {python}
ignore_missing_imports = True
"""

_SETUP = """\
import sys
from setuptools import setup
from mypyc.build import mypycify
from setuptools import Extension
cut = sys.argv.index("--")
paths = sys.argv[cut + 1:]
del sys.argv[cut:]
c_exts = [
    Extension(name, [path], extra_compile_args=["-O2"], libraries=list(libs))
    for name, path, libs in {c_modules!r}
]
setup(name="synapse-coap-native", version="0", packages=[], py_modules=[],
      ext_modules=mypycify(paths, opt_level="3", group_name={group!r}) + c_exts)
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "build-native",
        help="compile the hot path with mypyc (CPU per request; see synapse_coap/native.py)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    p.add_argument(
        "--clean", action="store_true", help="remove the build (the package runs as plain Python)"
    )
    p.set_defaults(func=_run)


def built_files() -> list[Path]:
    """Everything a build left (every module's extension, also of a module an earlier
    build compiled and this one does not)."""
    out = sorted(native.PACKAGE_DIR.rglob("*.so"))
    if native.MANIFEST.exists():
        out.append(native.MANIFEST)
    return out


def up_to_date() -> bool:
    """A complete build of the module list from the current sources, by this Python,
    with no extension of an earlier build beside it."""
    return (
        native.build_fault() is None
        and native.read_manifest().get("python") == sys.version
        and not native.orphans()
    )


def build() -> float:
    """Compile every module of the build; the seconds it took."""
    digests = {m: native.source_digest(m) for m in native.BUILT}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="synapse-coap-native-") as tmp:
        work = Path(tmp)
        c_modules = [
            (m, str(native.source_path(m)), native.C_LIBRARIES.get(m, ())) for m in native.C_MODULES
        ]
        (work / "setup.py").write_text(_SETUP.format(group=GROUP, c_modules=c_modules))
        (work / "mypy.ini").write_text(
            _MYPY_CONFIG.format(python=f"{sys.version_info[0]}.{sys.version_info[1]}")
        )
        src = native.PACKAGE_DIR
        if {"site-packages", "dist-packages"} & set(src.parts):
            # mypy will not take sources under site-packages as its own: it compiles a
            # copy (tracebacks through compiled code then name the copy's paths)
            src = work / "src" / "synapse_coap"
            shutil.copytree(
                native.PACKAGE_DIR,
                src,
                ignore=shutil.ignore_patterns("*.so", "__pycache__", "maps", "*.json"),
            )
        cmd = [
            sys.executable,
            "setup.py",
            "build_ext",
            "--build-temp",
            str(work / "temp"),
            "--build-lib",
            str(work / "lib"),
            "--parallel",
            str(os.cpu_count() or 1),
            "--",
            f"--config-file={work / 'mypy.ini'}",
            *(
                str(src.parent / native.source_path(m).relative_to(native.PACKAGE_DIR.parent))
                for m in native.MODULES
            ),
        ]
        done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            raise SystemExit(f"build-native: mypyc failed (exit {done.returncode})")
        lib = work / "lib" / "synapse_coap"
        for ext in lib.rglob("*.so"):
            target = native.PACKAGE_DIR / ext.relative_to(lib)
            tmp_target = target.with_name(target.name + ".new")
            shutil.copy2(ext, tmp_target)
            os.replace(tmp_target, target)  # (a running process keeps its old mapping)
    manifest = {"python": sys.version, "modules": digests}
    native.MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return time.monotonic() - started


def _run(args: argparse.Namespace) -> int:
    if args.clean:
        for path in built_files():
            path.unlink()
        print("build-native: removed; synapse-coap runs as plain Python", file=sys.stderr)
        return 0
    if not args.force and up_to_date():
        print(f"build-native: up to date ({native.PACKAGE_DIR})", file=sys.stderr)
        return 0
    missing = [name for name in ("mypyc", "setuptools") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"build-native: needs {' and '.join(missing)}: pip install mypy setuptools")
        return 2
    for path in built_files():
        path.unlink()
    print(
        f"build-native: compiling {len(native.MODULES)} modules with mypyc and "
        f"{len(native.C_MODULES)} in C into "
        f"{native.PACKAGE_DIR} (about a minute or two)",
        file=sys.stderr,
    )
    took = build()
    print(f"build-native: done in {took:.0f} s; restart Synapse to load it", file=sys.stderr)
    return 0
