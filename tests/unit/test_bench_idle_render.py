"""docs/benchmarks.md's idle block is what bench/idle.py renders from the committed CSV
(generated figures, never edited by hand)."""

from __future__ import annotations

from tests.harness.bench import ROOT, generated_block, load_bench


def test_docs_idle_block_is_rendered_from_the_committed_csv() -> None:
    bench = load_bench("idle")
    meta, rows = bench.read_dict_rows(bench.RESULTS_CSV)
    assert meta["commit"] and not meta["commit"].endswith("-dirty")
    start = f"<!-- idle:start (written by {bench.WRITER}; do not edit by hand) -->"
    body = generated_block(
        (ROOT / "docs" / "benchmarks.md").read_text(), start, "<!-- idle:end -->"
    )
    assert body == bench.block(meta, rows).strip()
    # every cell: both reactors, both setups, at least five windows, each past the
    # loop-lag probe's idle time
    cells: dict[tuple[str, str], int] = {}
    for r in rows:
        cells[(r["reactor"], r["setup"])] = cells.get((r["reactor"], r["setup"]), 0) + 1
    assert set(cells) == {(r, s) for r in bench.REACTORS for s in bench.SETUPS}
    assert min(cells.values()) >= 5
    from synapse_coap.transport.looplag import LOOP_LAG_IDLE_AFTER

    assert float(meta["settle"]) > LOOP_LAG_IDLE_AFTER


def test_a_window_counts_every_thread_of_the_process() -> None:
    import os

    bench = load_bench("idle")
    assert bench.wakeups(os.getpid()) > 0
