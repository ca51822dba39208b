"""The README's inbound block is what bench/inbound.py renders from the committed CSV
(issue 12: generated figures, never edited by hand; server CPU per request)."""

from __future__ import annotations

from tests.harness.bench import ROOT, generated_block, load_bench


def test_readme_inbound_block_is_rendered_from_the_committed_csv() -> None:
    bench = load_bench("inbound")
    meta, rows = bench.read_dict_rows(bench.RESULTS_CSV)
    assert meta["commit"] and not meta["commit"].endswith("-dirty")
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
        for label in labels:
            counts = {len(cells[(label, listener)]) for listener in bench.LISTENERS}
            assert len(counts) == 1 and counts.pop() >= 5, label
    assert all(int(r["errors"]) == 0 for r in rows)
