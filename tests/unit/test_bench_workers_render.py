"""docs/benchmarks.md's workers block is what bench/workers.py renders from the
committed CSV (issue 13: inbound throughput with one and two listener workers;
generated figures, never edited by hand)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent.parent


def _bench_workers() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_workers", ROOT / "bench" / "workers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_workers_block_is_rendered_from_the_committed_csv() -> None:
    saved = list(sys.path)
    try:
        bench = _bench_workers()
    finally:
        sys.path[:] = saved
    meta, rows = bench.read_dict_rows(bench.RESULTS_CSV)
    assert meta["commit"] and not meta["commit"].endswith("-dirty")
    block = bench.block(meta, rows, "bench/results/workers.csv")
    start = f"<!-- {bench.BLOCK}:start (written by {bench.WRITER}; do not edit by hand) -->"
    doc = bench.DOC.read_text()
    assert start in doc
    body = doc.partition(start)[2].partition(f"<!-- {bench.BLOCK}:end -->")[0]
    assert body.strip() == block.strip()
    # both configurations in every round, at least five rounds, no failed request
    figures = bench.figures(rows)
    assert len(figures["ratio"]["rps"]) >= bench.MIN_ROUNDS
    for config in bench.CONFIGS:
        assert len(figures[config]["rps"]) == len(figures["ratio"]["rps"])
    assert all(int(r["errors"]) == 0 for r in rows)
