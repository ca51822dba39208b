"""Committed bench results: CSV (+ JSON for what is not a table row) and their provenance.

A bench run writes its results into ``bench/results/`` (committed) with the command,
commit, machine and Synapse version that produced them; the Markdown tables in
docs/benchmarks.md and the README are rendered from these files only, by the bench
(``bench/lab.py --render`` re-renders from the committed files without running
anything).  Generic over attrs classes: a new result type or a new field of the
run flows into the files and back without changes here.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


#: What benches write (results, profiles, rendered tables): a change there does not make
#: a run's source "dirty" (several runs of one commit write side by side).
OUTPUTS = ("bench/results", "bench/profiles", "README.md", "docs")


def source_commit() -> str:
    """The commit the code comes from, ``-dirty`` if any file other than the benches'
    own outputs (:data:`OUTPUTS`) differs from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--", "."]
            + [f":(exclude){p}" for p in OUTPUTS],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        return ""
    return f"{head}-dirty" if head and changed else head


def _process_cpu_clock(pid: int) -> int:
    """The Linux CPU-time clock of process ``pid`` (all its threads, living and exited):
    ``MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)``, what ``clock_getcpuclockid(3)``
    returns for it, and which ``time.clock_gettime`` reads."""
    return ((~pid) << 3) | 2


#: a results file's ``cpu_clock`` header when :func:`cpu_seconds` read the CPU-time clock
CPU_CLOCK = "the process CPU-time clock (clock_getcpuclockid, nanoseconds)"


def cpu_clock_source(pid: int) -> str:
    """Which clock :func:`cpu_seconds` reads for ``pid`` (for a results file's header)."""
    try:
        time.clock_gettime(_process_cpu_clock(pid))
    except (OSError, OverflowError):
        return f"/proc/PID/stat utime + stime ({os.sysconf('SC_CLK_TCK')} Hz ticks)"
    return CPU_CLOCK


def read_cpu_clock(meta: dict[str, str]) -> bool:
    """True if a results file's CPU times came from the CPU-time clock (a file from
    before the ``cpu_clock`` header was read from ``/proc/PID/stat``)."""
    return meta.get("cpu_clock") == CPU_CLOCK


def cpu_clock_words(meta: dict[str, str]) -> str:
    """How a results file's CPU times were read, for its rendered table."""
    if read_cpu_clock(meta):
        return "its process CPU-time clock, all threads, in nanoseconds"
    return "user + system, `/proc/PID/stat`"


def steal_seconds(core: int | None) -> float:
    """The time the hypervisor has taken from CPU ``core`` (all CPUs: None) since boot,
    in seconds (``/proc/stat``'s steal column, in clock ticks): on a virtual machine a
    server can be runnable and still not run, which is not its client's doing."""
    prefix = "cpu " if core is None else f"cpu{core} "
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            if line.startswith(prefix):
                fields = line.split()
                return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0
    return 0.0


def unstolen(wall: float, core: int | None, steal_before: float) -> float:
    """``wall`` seconds less what the hypervisor took from ``core`` since its
    :func:`steal_seconds` was ``steal_before``: the time a server pinned there could run
    (the denominator of a bench's busy figure)."""
    return max(wall - (steal_seconds(core) - steal_before), 1e-6)


#: how long :func:`settle` waits at most for a process to stop running
SETTLE_TIMEOUT = 0.05


def running_threads(pid: int) -> int:
    """How many threads of process ``pid`` are running or runnable (state ``R``) now."""
    running = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:  # (a thread that ended meanwhile)
            continue
        # the state is the first field after the command name, which may hold spaces
        if stat.rpartition(")")[2].split(None, 1)[:1] == ["R"]:
            running += 1
    return running


def settle(pid: int, timeout: float = SETTLE_TIMEOUT) -> bool:
    """Wait (up to ``timeout`` seconds) until no thread of process ``pid`` runs; False if
    one still did when the time ran out.

    Why: Linux adds a running thread's CPU time to what another process reads
    (:func:`cpu_seconds`, ``/proc``) only at the scheduler's tick (every 4 ms here: a
    process spinning on one core reads as 0 ms after 1 ms, then 4 ms at once) or when it
    stops running; a reading taken while the measured server still runs misses up to a
    tick of its CPU, which the next reading then counts. Between two benches' turns that
    moved CPU from one listener's cell to the next one's: a server whose answer leaves
    before it has finished with the request (the CoAP listener sends from inside
    Synapse's ``finish``; Twisted's HTTP channel writes after) was still running at the
    end of its turn and lost up to 4 ms of every turn to the listener after it: with
    turns of 100 requests of 0.13 ms, 15-20% of its cell. A reading taken once every
    thread is asleep is exact."""
    deadline = time.monotonic() + timeout
    while running_threads(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0002)
    return True


def settle_all(pids: Iterable[int], timeout: float = SETTLE_TIMEOUT) -> int:
    """:func:`settle` each of ``pids`` in turn; how many still ran when their wait ran out
    (their readings may miss up to a scheduler tick each)."""
    return sum(not settle(pid, timeout) for pid in pids)


def cpu_seconds(pid: int) -> float:
    """The CPU time of process ``pid`` (all its threads), in seconds: its scheduler
    run time from the process CPU-time clock (nanoseconds), or, where that cannot be
    read, user + system time from ``/proc/PID/stat``, which counts in clock ticks
    (10 ms here: over 1000 requests of 0.2 ms, one tick is 5 % of a cell)."""
    try:
        return time.clock_gettime(_process_cpu_clock(pid))
    except (OSError, OverflowError):
        pass
    return _stat_cpu_seconds(f"/proc/{pid}/stat")


def _stat_cpu_seconds(path: str) -> float:
    """user + system time, in seconds, from a ``/proc/.../stat`` file (clock ticks)."""
    with open(path, encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main_thread(pid: int) -> tuple[float, int]:
    """(CPU seconds, context switches) of process ``pid``'s main thread so far: its
    scheduler run time from ``/proc/PID/task/PID/schedstat`` (nanoseconds; where there is
    none, user + system ticks from its ``stat``), and its voluntary and involuntary
    context switches (how often it waited: for work, for a thread pool's result)."""
    task = f"/proc/{pid}/task/{pid}"
    try:
        with open(f"{task}/schedstat", encoding="ascii") as f:
            cpu = int(f.read().split()[0]) / 1e9
    except OSError:
        cpu = _stat_cpu_seconds(f"{task}/stat")
    with open(f"{task}/status", encoding="ascii") as f:
        switches = sum(int(line.split()[1]) for line in f if "ctxt_switches:" in line)
    return cpu, switches


#: Synapse's ``background_updates`` setting for a bench's Synapse: the schema's one-off
#: background updates run back to back instead of one a second, so that they are
#: over before the first measured cell (:func:`settle_background_updates`)
BACKGROUND_UPDATES_AT_ONCE = {"background_updates": {"sleep_enabled": False}}


def settle_background_updates(database: Path | dict[str, Any], timeout: float = 120.0) -> float:
    """Wait until a Synapse has no background update left (its ``background_updates``
    table empty); the seconds waited. ``database``: the path of its SQLite database, or
    the psycopg2 connection arguments of its PostgreSQL one.

    A new database has dozens of them (index builds, backfills), which Synapse runs
    one every second or so after it starts: CPU spent in whichever cells run in its
    first minute, not by the listener they measure.
    """
    import time

    start = time.monotonic()
    while True:
        left = _background_updates_left(database)
        if left == 0:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"{left} background updates still pending after {timeout:.0f} s")
        time.sleep(0.2)


def _background_updates_left(database: Path | dict[str, Any]) -> int:
    """Rows in ``background_updates``; -1 while the schema is still being written."""
    query = "SELECT COUNT(*) FROM background_updates"
    if isinstance(database, dict):
        import psycopg2  # type: ignore[import-untyped]

        try:
            pg = psycopg2.connect(**database)
        except psycopg2.Error:
            return -1
        try:
            with pg.cursor() as cur:
                cur.execute(query)
                row = cur.fetchone()
            return int(row[0]) if row else -1
        except psycopg2.Error:
            return -1
        finally:
            pg.close()
    import sqlite3

    try:
        db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)
        try:
            return int(db.execute(query).fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return -1


class Spinner:
    """Keeps this (the client's) event loop from ever sleeping: a callback that is always
    ready makes every poll of its sockets a zero-timeout one.

    On loopback the kernel delivers an answer in the sender's system call, and a client
    asleep on the other core is woken from there: an inter-processor wake-up charged to
    the server, 5 to 20 us of its CPU per answer in this machine's ``perf`` profiles
    (``sock_def_readable`` under ``sendto``), more for a lighter client, which sleeps more
    often. On a real link the client's own machine pays for that. A client that never
    sleeps leaves every listener's figure without it."""

    def __init__(self, loop: Any) -> None:
        self._loop = loop
        self._handle: Any = None

    def start(self) -> None:
        self._handle = self._loop.call_soon(self._spin)

    def _spin(self) -> None:
        self._handle = self._loop.call_soon(self._spin)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def add_spin_argument(parser: Any) -> None:
    """``--no-spin`` (``args.spin``, on by default): whether the bench's client loop runs
    with a :class:`Spinner`."""
    parser.add_argument(
        "--no-spin",
        dest="spin",
        action="store_false",
        help="let the client's event loop sleep between answers (the server it measures "
        "then pays for waking it on the other core, see results_store.Spinner)",
    )


def native_build() -> str:
    """Which build of synapse_coap the run measured (synapse_coap.native)."""
    try:
        from synapse_coap.native import status
    except ImportError:  # pragma: no cover - a tree from before the native build
        return "pure Python"
    return status().describe()


def build_suffix(meta: dict[str, str]) -> str:
    """``", <the build>"`` for a results footer (runs from before the native build
    recorded none: nothing)."""
    return f", {meta['build']}" if meta.get("build") else ""


def provenance(command: str) -> dict[str, str]:
    """Command, commit, machine, Synapse version and time of a run."""
    commit = source_commit()
    try:
        synapse = importlib.metadata.version("matrix-synapse")
    except importlib.metadata.PackageNotFoundError:
        synapse = "?"
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "command": command,
        "commit": commit or "?",
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {cpu}".strip(
            ", "
        ),
        "python": platform.python_version(),
        "synapse": synapse,
        "build": native_build(),
        "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write_rows(path: Path, rows: Sequence[Any], meta: dict[str, str]) -> None:
    """attrs instances as CSV rows, preceded by ``# key: value`` provenance lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        for k, v in meta.items():
            fh.write(f"# {k}: {v}\n")
        if not rows:
            return
        fields = [f.name for f in attrs.fields(type(rows[0]))]
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(attrs.asdict(r))


def read_rows(path: Path, cls: type[Any]) -> tuple[dict[str, str], list[Any]]:
    """(provenance, rows as ``cls``) from a file written by :func:`write_rows`."""
    meta: dict[str, str] = {}
    lines = path.read_text().splitlines()
    body = []
    for line in lines:
        if line.startswith("# ") and ": " in line and not body:
            k, _, v = line[2:].partition(": ")
            meta[k] = v
        else:
            body.append(line)
    hints = typing.get_type_hints(cls)
    rows = [
        cls(**{k: _convert(hints[k], v) for k, v in rec.items()}) for rec in csv.DictReader(body)
    ]
    return meta, rows


def _convert(tp: Any, text: str) -> Any:
    if tp is bool:
        return text == "True"
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    return text


def to_json(obj: Any) -> Any:
    if attrs.has(type(obj)):
        return {f.name: to_json(getattr(obj, f.name)) for f in attrs.fields(type(obj))}
    if isinstance(obj, (list, tuple)):
        return [to_json(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    return obj


def from_json(tp: Any, data: Any) -> Any:
    """Rebuild a value of type ``tp`` (attrs classes, tuples, lists, Optional) from JSON."""
    if data is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return from_json(arg, data)
            except (TypeError, ValueError, KeyError):
                continue
        return data
    if attrs.has(tp):
        hints = typing.get_type_hints(tp)
        return tp(**{k: from_json(hints[k], v) for k, v in data.items() if k in hints})
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item = args[0] if args else Any
        seq = [from_json(item, x) for x in data]
        return tuple(seq) if origin is tuple else seq
    return data


def write_json(path: Path, obj: Any, meta: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"provenance": meta, "run": to_json(obj)}, indent=1) + "\n")


def read_json(path: Path, tp: Any) -> tuple[dict[str, str], Any]:
    data = json.loads(path.read_text())
    return data["provenance"], from_json(tp, data["run"])


def spread(values: Sequence[float], fmt: str) -> str:
    """``median (min-max, n=N)`` of ``values``, each formatted with ``fmt``."""
    return (
        f"{fmt.format(statistics.median(values))} "
        f"({fmt.format(min(values))}-{fmt.format(max(values))}, n={len(values)})"
    )


def replace_block(path: Path, name: str, body: str, writer: str) -> None:
    """Replace ``<!-- NAME:start ... -->`` .. ``<!-- NAME:end -->`` in ``path`` with ``body``."""
    start = f"<!-- {name}:start (written by {writer}; do not edit by hand) -->"
    end = f"<!-- {name}:end -->"
    doc = path.read_text()
    if start not in doc or end not in doc:
        raise SystemExit(f"{path}: no {name} markers")
    head, _, rest = doc.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{start}\n\n{body.strip()}\n\n{end}{tail}")


def rounds_calls_args(
    ap: argparse.ArgumentParser, argv: Sequence[str] | None, *, calls_help: str, out: Path
) -> argparse.Namespace:
    """A timing bench's ``--rounds`` (at least 5), ``--calls`` (at least 1) and ``--out``
    (``out`` by default), added to ``ap`` and parsed from ``argv``."""
    ap.add_argument("--rounds", type=int, default=5, help="rounds (at least 5)")
    ap.add_argument("--calls", type=int, default=200, help=calls_help)
    ap.add_argument("--out", type=Path, default=out, help="CSV")
    args = ap.parse_args(argv)
    if args.rounds < 5:
        ap.error(f"--rounds: {args.rounds} (allowed: 5 or more)")
    if args.calls < 1:
        ap.error(f"--calls: {args.calls} (allowed: 1 or more)")
    return args


def write_dict_rows(path: Path, rows: Sequence[dict[str, Any]], meta: dict[str, str]) -> None:
    """Plain dict rows as CSV, preceded by ``# key: value`` provenance lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        for k, v in meta.items():
            fh.write(f"# {k}: {v}\n")
        if rows:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def read_dict_rows(path: Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(provenance, rows as dicts of text) from a file written by :func:`write_dict_rows`."""
    meta: dict[str, str] = {}
    body: list[str] = []
    for line in path.read_text().splitlines():
        if line.startswith("# ") and ": " in line and not body:
            k, _, v = line[2:].partition(": ")
            meta[k] = v
        else:
            body.append(line)
    return meta, list(csv.DictReader(body))
