"""The README's inbound block is what bench/inbound.py renders from the committed CSV
(issue 12: generated figures, never edited by hand; server CPU per request)."""

from __future__ import annotations

from tests.harness.bench import ROOT, generated_block, load_bench


def test_readme_inbound_block_is_rendered_from_the_committed_csv() -> None:
    bench = load_bench("inbound")
    meta, rows = bench.read_dict_rows(bench.RESULTS_CSV)
    assert meta["commit"] and not meta["commit"].endswith("-dirty")
    # every answer encoded (distinct bodies): not a --body-memo run
    assert meta["body_memo"].startswith("off"), meta["body_memo"]
    block = bench.readme_block(meta, rows)
    start = f"<!-- inbound:start (written by {bench.WRITER}; do not edit by hand) -->"
    body = generated_block((ROOT / "README.md").read_text(), start, "<!-- inbound:end -->")
    assert body == block.strip()
    # every cell: at least five rounds, every listener in each, no failed request
    results = bench.cells_of(rows)
    assert set(results) == {"default", "asyncio"}
    for cells in results.values():
        labels = {label for label, _ in cells}
        assert bench.SEND_LABEL in labels and len(labels) == len(bench.ENDPOINTS) + 1
        listeners = bench.present(cells)
        assert listeners[:4] == list(bench.LISTENERS[:4])
        for label in labels:
            counts = {len(cells[(label, listener)]) for listener in listeners}
            assert len(counts) == 1 and counts.pop() >= 5, label
    assert all(int(r["errors"]) == 0 for r in rows)


def test_the_committed_small_cells_measured_a_busy_server() -> None:
    """The table compares busy servers (a server waiting for its client pays more per
    request): the median utilisation of every small-endpoint cell is at least 0.9, and
    the run used the lean client that makes that possible, its loop never sleeping."""
    import statistics

    bench = load_bench("inbound")
    meta, rows = bench.read_dict_rows(bench.RESULTS_CSV)
    assert meta["client"] == "lean"
    assert meta["client_spins"] == "yes"
    for mode, cells in bench.cells_of(rows, "busy").items():
        for (label, listener), values in cells.items():
            assert all(v > 0 for v in values), (mode, label, listener)
            if label != bench.SEND_LABEL and listener != bench.NGINX_OWN:
                # (nginx's own utilisation is not Synapse's: it waits for Synapse)
                assert statistics.median(values) >= 0.9, (mode, label, listener, values)


def test_the_main_thread_figures_follow_a_thread_that_works_and_waits() -> None:
    """``main_thread`` (the CSV's main_cpu_ms and main_switches): a process's main
    thread's CPU grows while it computes, and its context switches while it sleeps."""
    import os
    import time

    bench = load_bench("inbound")
    cpu0, switches0 = bench.main_thread(os.getpid())
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    for _ in range(5):
        time.sleep(0.001)
    cpu1, switches1 = bench.main_thread(os.getpid())
    assert 0.02 < cpu1 - cpu0 < 5  # (schedstat lags a running thread by a tick at most)
    assert switches1 - switches0 >= 5
