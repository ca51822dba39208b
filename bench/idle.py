"""What an idle homeserver pays for the module: Synapse's CPU and wake-ups per second
with no traffic, with and without ``synapse_coap.CoapModule``, under both reactors.

The project's users run homeservers on small, sometimes battery- or solar-powered
machines behind slow links, where most of the time nothing happens. Each
configuration starts a fresh Synapse (SQLite, no users, no rooms; with the module: one
CoAP+Noise listener, nothing connecting), waits ``--settle`` seconds (past the
loop-lag probe's idle time, ``LOOP_LAG_IDLE_AFTER``, and Synapse's start-up work),
then reads, over ``--windows`` windows of ``--window`` seconds each:

* CPU: Synapse's process CPU time (all threads), milliseconds per second;
* wake-ups: the voluntary context switches of all its threads (a thread that blocks
  in ``epoll_wait`` or on a lock and is woken again counts one), per second.

Each cell is the median (min-max) over the windows. ``--write`` writes the CSV
(``bench/results/idle.csv``) and the block of docs/benchmarks.md; ``--render``
re-renders the block from the committed CSV without running anything.

Usage::

    python bench/idle.py [--windows 5] [--window 10] [--settle 40] [--write]
    python bench/idle.py --render
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from results_store import (  # noqa: E402
    BACKGROUND_UPDATES_AT_ONCE,
    build_suffix,
    cpu_seconds,
    provenance,
    read_dict_rows,
    replace_block,
    settle_background_updates,
    spread,
    write_dict_rows,
)

RESULTS_CSV = ROOT / "bench" / "results" / "idle.csv"
DOC = ROOT / "docs" / "benchmarks.md"
WRITER = "bench/idle.py"
REACTORS = ("default", "asyncio")
SETUPS = ("Synapse alone", "Synapse + CoapModule")


def wakeups(pid: int) -> int:
    """The voluntary context switches of every thread of ``pid`` so far."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except OSError:  # the thread ended meanwhile
            pass
    return total


def measure(setup: str, reactor: str, args: argparse.Namespace) -> list[dict[str, object]]:
    from synapse_coap.noise.keys import generate_private_key, write_key_file
    from tests.harness.synapse_proc import SynapseProcess, free_port

    workdir = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    modules = []
    if setup != SETUPS[0]:
        key = workdir / "coap.key"
        write_key_file(key, generate_private_key())
        modules.append(
            {
                "module": "synapse_coap.CoapModule",
                "config": {
                    "listen": [f"127.0.0.1:{free_port('udp')}"],
                    "private_key_path": str(key),
                },
            }
        )
    env = {"PYTHONPATH": str(ROOT)}
    if reactor == "asyncio":
        env["SYNAPSE_ASYNC_IO_REACTOR"] = "1"
    proc = SynapseProcess(
        workdir,
        "idle.test",
        http_port=free_port(),
        modules=modules,
        extra_config=BACKGROUND_UPDATES_AT_ONCE,
        env=env,
    )
    proc.start(ready_log_pattern=r"CoAP listener ready" if modules else r"Synapse now listening on")
    rows: list[dict[str, object]] = []
    try:
        settle_background_updates(proc.database_path)
        pid = proc.pid
        assert pid is not None
        print(f"  [{reactor}] {setup}: settling {args.settle:g} s", file=sys.stderr)
        time.sleep(args.settle)
        for window in range(args.windows):
            cpu0, woke0, t0 = cpu_seconds(pid), wakeups(pid), time.monotonic()
            time.sleep(args.window)
            cpu1, woke1, t1 = cpu_seconds(pid), wakeups(pid), time.monotonic()
            seconds = t1 - t0
            rows.append(
                {
                    "reactor": reactor,
                    "setup": setup,
                    "window": window,
                    "seconds": round(seconds, 3),
                    "cpu_ms_per_s": round((cpu1 - cpu0) * 1000 / seconds, 3),
                    "wakeups_per_s": round((woke1 - woke0) / seconds, 2),
                }
            )
            print(
                f"  [{reactor}] {setup}: window {window + 1}/{args.windows}: "
                f"{rows[-1]['cpu_ms_per_s']} ms CPU/s, {rows[-1]['wakeups_per_s']} wake-ups/s",
                file=sys.stderr,
            )
    except BaseException:
        print(f"  [{reactor}] {setup}: Synapse's directory kept: {workdir}", file=sys.stderr)
        raise
    finally:
        proc.stop()
    # (once Synapse has stopped: it writes its log and database there until then)
    shutil.rmtree(workdir, ignore_errors=True)
    return rows


def block(meta: dict[str, str], rows: list[dict[str, str]]) -> str:
    """The docs/benchmarks.md block for ``rows`` (as read back from the CSV)."""
    lines = [
        "| reactor | setup | Synapse CPU (ms per s) | wake-ups per s | module / alone (CPU) |",
        "|---|---|--:|--:|--:|",
    ]
    for reactor in REACTORS:
        cpu: dict[str, list[float]] = {}
        woke: dict[str, list[float]] = {}
        for r in rows:
            if r["reactor"] == reactor:
                cpu.setdefault(r["setup"], []).append(float(r["cpu_ms_per_s"]))
                woke.setdefault(r["setup"], []).append(float(r["wakeups_per_s"]))
        for setup in SETUPS:
            if setup not in cpu:
                continue
            ratio = ""
            if setup != SETUPS[0] and SETUPS[0] in cpu:
                ratio = f"{statistics.median(cpu[setup]) / statistics.median(cpu[SETUPS[0]]):.2f}x"
            lines.append(
                f"| {reactor} | {setup} | {spread(cpu[setup], '{:.1f}')} | "
                f"{spread(woke[setup], '{:.0f}')} | {ratio} |"
            )
    lines.append("")
    lines.append(
        f"_`{meta.get('command', '?')}`, commit `{meta.get('commit', '?')[:12]}`, "
        f"{meta.get('time', '?')}, {meta.get('machine', '?')}, Synapse "
        f"{meta.get('synapse', '?')}{build_suffix(meta)} (the machine may be shared with "
        f"other work); windows of {meta.get('window', '?')} s after {meta.get('settle', '?')} s "
        "idle, median (min-max, n) over the windows; every window in `bench/results/idle.csv`._"
    )
    return "\n".join(lines)


def render(csv_path: Path = RESULTS_CSV) -> None:
    meta, rows = read_dict_rows(csv_path)
    replace_block(DOC, "idle", block(meta, rows), WRITER)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Synapse's CPU and wake-ups per second while idle, with and without "
        "the CoAP module, under both reactors (see the module docstring)."
    )
    parser.add_argument("--windows", type=int, default=5, help="windows per cell (default 5)")
    parser.add_argument(
        "--window", type=float, default=10.0, help="seconds per window (default 10)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=40.0,
        help="seconds of idleness before the first window (default 40: past the "
        "loop-lag probe's 30 s idle time)",
    )
    parser.add_argument(
        "--reactors",
        default=",".join(REACTORS),
        help="comma-separated: default, asyncio (default both)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS_CSV, help="CSV to write")
    parser.add_argument(
        "--write", action="store_true", help="write the CSV and the block of docs/benchmarks.md"
    )
    parser.add_argument(
        "--render", action="store_true", help="only re-render the block from the committed CSV"
    )
    args = parser.parse_args()
    if args.render:
        render()
        print(f"re-rendered {DOC.relative_to(ROOT)} from {RESULTS_CSV.relative_to(ROOT)}")
        return
    reactors = [r for r in args.reactors.split(",") if r]
    bad = [r for r in reactors if r not in REACTORS]
    if bad or args.windows < 1 or args.window <= 0 or args.settle < 0:
        parser.error(
            f"--reactors takes {', '.join(REACTORS)}; --windows >= 1, --window > 0, --settle >= 0"
        )
    rows: list[dict[str, object]] = []
    for reactor in reactors:
        for setup in SETUPS:
            rows += measure(setup, reactor, args)
    meta = provenance("python bench/idle.py " + " ".join(sys.argv[1:]))
    meta.update({"window": f"{args.window:g}", "settle": f"{args.settle:g}"})
    text_rows = [{k: str(v) for k, v in r.items()} for r in rows]
    print(block(meta, text_rows))
    if args.write:
        write_dict_rows(args.results, rows, meta)
        if args.results == RESULTS_CSV:
            render()
            print(f"wrote {args.results} and {DOC.relative_to(ROOT)}", file=sys.stderr)
        else:
            print(f"wrote {args.results}", file=sys.stderr)


if __name__ == "__main__":
    main()
