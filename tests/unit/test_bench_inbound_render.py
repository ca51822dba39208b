"""The README's inbound block is what bench/inbound.py renders from the committed CSV
(issue 12: generated figures, never edited by hand; server CPU per request)."""

from __future__ import annotations

import pytest

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


def test_the_thread_split_is_the_main_thread_and_the_rest_of_each_cell() -> None:
    """The README's per-thread split: per cell the medians of the rounds' main-thread
    CPU, the rest of the cell's CPU (never below 0: schedstat's lag), and the main
    thread's context switches; nginx's own rows left out; nothing for a run from before
    the columns."""
    bench = load_bench("inbound")

    def row(listener: str, rnd: int, cpu: str, main: str, sw: str) -> dict[str, str]:
        return {
            "mode": "default",
            "endpoint": "whoami (auth)",
            "listener": listener,
            "round": str(rnd),
            "cpu_ms": cpu,
            "errors": "0",
            "busy": "0.95",
            "main_cpu_ms": main,
            "main_switches": sw,
        }

    rows = [
        row("CoAP+Noise", 0, "0.500", "0.480", "0.02"),
        row("CoAP+Noise", 1, "0.400", "0.410", "0.04"),  # main over cpu: the rest is 0
        row("CoAP+Noise", 2, "0.450", "0.440", "0.03"),
        row("HTTP/1.1", 0, "0.470", "0.430", "2.9"),
        row("HTTP/1.1", 1, "0.480", "0.420", "2.8"),
        row("HTTP/1.1", 2, "0.460", "0.430", "3.0"),
        row(bench.NGINX_OWN, 0, "0.150", "", ""),
    ]
    split = bench.thread_split(rows)
    assert list(split) == ["default"]
    [(label, per)] = split["default"]
    assert label == "whoami (auth)"
    (cm, co, cw), (hm, ho, hw) = per
    assert (round(cm), round(co), cw) == (440, 10, 0.03)
    assert (round(hm), round(ho), hw) == (430, 40, 2.9)
    lines = bench.thread_split_lines(rows)
    assert "| default | whoami (auth) | 440 | 10 | 430 | 40 | 0.03 / 2.90 |" in lines
    old = [{k: v for k, v in r.items() if not k.startswith("main_")} for r in rows]
    assert bench.thread_split(old) == {} and bench.thread_split_lines(old) == []


def test_the_block_names_how_the_send_cells_took_turns() -> None:
    """The `/send` cells' turns (``--send-turn``, recorded in the CSV) are in the block;
    a run from before the setting read as one turn per cell."""
    bench = load_bench("inbound")
    meta, rows = bench.read_dict_rows(bench.RESULTS_CSV)
    turned = bench.readme_block({**meta, "turn": "100", "send_turn": "10"}, rows)
    assert "the `/send` in turns of 10 transactions)" in turned
    old = {k: v for k, v in meta.items() if k != "send_turn"}
    assert "the `/send` one turn per cell)" in bench.readme_block({**old, "turn": "100"}, rows)
    whole = bench.readme_block({**meta, "turn": "100", "send_turn": "0"}, rows)
    assert "the `/send` one turn per cell)" in whole


def test_a_partial_run_is_refused_for_the_readme(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--only``/``--listeners`` (quick A/B runs) name what they allow, and neither
    writes the README's table (it has every endpoint and listener)."""
    bench = load_bench("inbound")
    for argv, words in [
        (["--only", "nothing"], "--only: unknown ['nothing']"),
        (["--listeners", "gopher"], "--listeners: unknown ['gopher']"),
        (["--only", "client versions", "--readme"], "--only: not with --readme"),
        (["--listeners", "none", "--readme"], "--listeners: not with --readme"),
        (["--send-turn", "-1"], "--send-turn: -1 (allowed: 0"),
    ]:
        monkeypatch.setattr("sys.argv", ["inbound.py", *argv])
        with pytest.raises(SystemExit) as exit_:
            bench.main()
        assert exit_.value.code == 2
        assert words in capsys.readouterr().err
