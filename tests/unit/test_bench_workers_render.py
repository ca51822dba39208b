"""docs/benchmarks.md's workers block is what bench/workers.py renders from the
committed CSV (issue 13: inbound throughput with one and two listener workers;
generated figures, never edited by hand)."""

from __future__ import annotations

from tests.harness.bench import generated_block, load_bench


def test_workers_block_is_rendered_from_the_committed_csv() -> None:
    bench = load_bench("workers")
    meta, rows = bench.read_dict_rows(bench.RESULTS_CSV)
    assert meta["commit"] and not meta["commit"].endswith("-dirty")
    block = bench.block(meta, rows, "bench/results/workers.csv")
    start = f"<!-- {bench.BLOCK}:start (written by {bench.WRITER}; do not edit by hand) -->"
    body = generated_block(bench.DOC.read_text(), start, f"<!-- {bench.BLOCK}:end -->")
    assert body == block.strip()
    # both configurations in every round, at least five rounds, no failed request
    figures = bench.figures(rows)
    assert len(figures["ratio"]["rps"]) >= bench.MIN_ROUNDS
    for config in bench.CONFIGS:
        assert len(figures[config]["rps"]) == len(figures["ratio"]["rps"])
    assert all(int(r["errors"]) == 0 for r in rows)
