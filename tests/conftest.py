"""Suite-wide: random test order (with a printed seed) and the expected-skips check.

* **Random order.** Modules are shuffled, and so are the tests inside each group
  of a module that shares its module- and class-scoped fixture parameters
  (a module's Synapse is still started once per parameter). The seed is printed
  in the header; ``--random-seed=N`` repeats an order, ``--random-seed=off``
  keeps file order. Tests must pass in any order.
* **Expected skips.** With ``--expected-skips=FILE`` (scripts/test passes
  ``tests/expected-skips.txt``), a skipped test whose node id and reason do
  not match a line of the file fails the run.
"""

from __future__ import annotations

import fnmatch
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

_unexpected: list[str] = []
_skipped: list[str] = []
_expected: list[tuple[str, str]] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("synapse-coap")
    group.addoption(
        "--random-seed",
        default=os.environ.get("SYNAPSE_COAP_TEST_SEED", ""),
        help="seed of the random test order ('off' = file order; default: a fresh seed, "
        "printed in the header; also SYNAPSE_COAP_TEST_SEED)",
    )
    group.addoption(
        "--expected-skips",
        default=None,
        metavar="FILE",
        help="fail the run on a skip not listed in FILE (lines: NODEID-GLOB | REASON-GLOB)",
    )


def _seed(config: pytest.Config) -> int | None:
    value = str(config.getoption("--random-seed") or "")
    if value == "off":
        return None
    if not value:
        value = str(random.SystemRandom().randrange(1, 10**6))
        config.option.random_seed = value
    return int(value)


def pytest_configure(config: pytest.Config) -> None:
    _seed(config)
    path = config.getoption("--expected-skips")
    if path:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            node, _, reason = line.partition("|")
            _expected.append((node.strip(), reason.strip() or "*"))


def pytest_report_header(config: pytest.Config) -> str:
    seed = _seed(config)
    if seed is None:
        return "test order: file order (--random-seed=off)"
    return f"test order: random, --random-seed={seed} repeats it"


def _group_key(item: pytest.Item) -> tuple[Any, ...]:
    """Items sharing module/class-scoped fixture parameters and class stay together."""
    callspec = getattr(item, "callspec", None)
    params: list[tuple[str, str]] = []
    if callspec is not None:
        defs = item._fixtureinfo.name2fixturedefs  # type: ignore[attr-defined]
        for name, index in sorted(callspec.indices.items()):
            fixturedefs = defs.get(name)
            if fixturedefs and fixturedefs[-1].scope in ("module", "class", "package", "session"):
                params.append((name, str(index)))
    cls = item.cls.__name__ if getattr(item, "cls", None) is not None else ""
    return (tuple(params), cls)


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    seed = _seed(config)
    if seed is None:
        return
    rng = random.Random(seed)
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    order = list(modules)
    rng.shuffle(order)
    out: list[pytest.Item] = []
    for mod in order:
        groups: dict[tuple[Any, ...], list[pytest.Item]] = {}
        for item in modules[mod]:
            groups.setdefault(_group_key(item), []).append(item)
        keys = list(groups)
        rng.shuffle(keys)
        for key in keys:
            members = groups[key]
            rng.shuffle(members)
            out += members
    items[:] = out


def _matches(nodeid: str, reason: str, patterns: Iterable[tuple[str, str]]) -> bool:
    return any(
        fnmatch.fnmatchcase(nodeid, node) and fnmatch.fnmatchcase(reason, why)
        for node, why in patterns
    )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail") or not _expected_active():
        return
    reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else ""
    reason = reason.removeprefix("Skipped: ")
    _skipped.append(report.nodeid)
    if not _matches(report.nodeid, reason, _expected):
        _unexpected.append(f"{report.nodeid}: {reason}")


_active: list[bool] = []


def _expected_active() -> bool:
    return bool(_active)


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    if session.config.getoption("--expected-skips"):
        _active.append(True)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    terminalreporter.write_line(pytest_report_header(config))
    if _expected_active():
        terminalreporter.write_line(
            f"skips: {len(_skipped)} ({len(_skipped) - len(_unexpected)} expected, "
            f"{len(_unexpected)} unexpected; expected ones: --expected-skips, reasons: -rs)"
        )
    if _unexpected:
        terminalreporter.section("unexpected skips (not in --expected-skips)", sep="=", red=True)
        for line in _unexpected:
            terminalreporter.line(line)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
