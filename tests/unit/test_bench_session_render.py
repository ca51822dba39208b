"""The README's session block is what bench/session.py renders from the committed CSV
(issue 12: generated figures, never edited by hand)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent.parent


def _bench_session() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_session", ROOT / "bench" / "session.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_session_block_is_rendered_from_the_committed_csv() -> None:
    saved = list(sys.path)
    try:
        bench = _bench_session()
    finally:
        sys.path[:] = saved
    meta, rows = bench.read_dict_rows(bench.RESULTS_CSV)
    assert meta["commit"] and not meta["commit"].endswith("-dirty")
    block = bench.readme_block(meta, rows)
    start = f"<!-- session:start (written by {bench.WRITER}; do not edit by hand) -->"
    readme = (ROOT / "README.md").read_text()
    body = readme.partition(start)[2].partition("<!-- session:end -->")[0]
    assert body.strip() == block.strip()
    # every time figure has at least five samples
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["measure"]] = counts.get(r["measure"], 0) + 1
    for key, (_label, unit) in bench.MEASURES.items():
        if unit not in ("B", "datagrams"):
            assert counts.get(key, 0) >= 5, key
