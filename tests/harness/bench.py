"""Load a ``bench/*.py`` script as a module, and read a generated block of a document.

The benches are scripts, not a package: tests that check a generated block (README,
docs/benchmarks.md) against the render of its committed CSV, or that reuse a
bench's message builders, load them from their file.  ``sys.path`` is restored
afterwards (the scripts put ``bench/`` on it).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent.parent


def load_bench(script: str) -> ModuleType:
    """``bench/<script>.py`` as a module named ``bench_<script>`` (also in sys.modules)."""
    name = f"bench_{script}"
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{script}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def generated_block(text: str, start: str, end: str) -> str:
    """What ``text`` holds between the marker lines ``start`` and ``end`` (stripped)."""
    assert start in text, f"no {start!r} in the document"
    assert end in text.partition(start)[2], f"no {end!r} after {start!r}"
    return text.partition(start)[2].partition(end)[0].strip()
