"""The README's session block is what bench/session.py renders from the committed CSV
(issue 12: generated figures, never edited by hand)."""

from __future__ import annotations

from tests.harness.bench import ROOT, generated_block, load_bench


def test_readme_session_block_is_rendered_from_the_committed_csv() -> None:
    bench = load_bench("session")
    meta, rows = bench.read_dict_rows(bench.RESULTS_CSV)
    assert meta["commit"] and not meta["commit"].endswith("-dirty")
    block = bench.readme_block(meta, rows)
    start = f"<!-- session:start (written by {bench.WRITER}; do not edit by hand) -->"
    body = generated_block((ROOT / "README.md").read_text(), start, "<!-- session:end -->")
    assert body == block.strip()
    # every time figure has at least five samples
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["measure"]] = counts.get(r["measure"], 0) + 1
    for key, (_label, unit) in bench.MEASURES.items():
        if unit not in ("B", "datagrams"):
            assert counts.get(key, 0) >= 5, key
