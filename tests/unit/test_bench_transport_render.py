"""docs/benchmarks.md's transport-cpu block is what bench/transport_cpu.py renders from
the committed CSV (issue 12: generated figures, never edited by hand; the listener's
own CPU per request against Twisted's HTTP/1.1 server)."""

from __future__ import annotations

from tests.harness.bench import ROOT, generated_block, load_bench


def test_docs_transport_block_is_rendered_from_the_committed_csv() -> None:
    bench = load_bench("transport_cpu")
    meta, rows = bench.read_dict_rows(bench.CSV)
    assert meta["commit"] and not meta["commit"].endswith("-dirty")
    block = bench.docs_block(meta, rows)
    start = f"<!-- transport-cpu:start (written by {bench.WRITER}; do not edit by hand) -->"
    body = generated_block(
        (ROOT / "docs" / "benchmarks.md").read_text(), start, "<!-- transport-cpu:end -->"
    )
    assert body == block.strip()
    # every listener in every round (the plain-Python one beside the native build),
    # at least five rounds (a spread, not one sample)
    by_listener: dict[str, int] = {}
    for r in rows:
        by_listener[r["listener"]] = by_listener.get(r["listener"], 0) + 1
    assert set(by_listener) - {bench.PURE} == set(bench.LISTENERS)
    if "native build" in meta.get("build", ""):
        assert bench.PURE in by_listener
    assert len(set(by_listener.values())) == 1 and by_listener["HTTP/1.1"] >= 5


def test_the_committed_rounds_measured_busy_listeners() -> None:
    """A listener waiting for its client pays more per request: the committed run used the
    lean client with its event loop never sleeping, and every listener's median
    utilisation in its turns is at least 0.8 (the listeners alone are cheap enough that
    neither client quite saturates them, aiohttp's HTTP/1.1 one the least, more so
    with the client's loop polling without sleeping; the docs show the figures)."""
    import statistics

    bench = load_bench("transport_cpu")
    meta, rows = bench.read_dict_rows(bench.CSV)
    assert meta["client"] == "lean"
    assert meta["client_spins"] == "yes"
    busy: dict[str, list[float]] = {}
    for r in rows:
        busy.setdefault(r["listener"], []).append(float(r["busy"]))
    for listener, values in busy.items():
        assert statistics.median(values) >= 0.8, (listener, values)
