"""BadInputLog: every bad input counted, logged once per source per interval, no traceback."""

from __future__ import annotations

import logging

import pytest

from synapse_coap.noise.badinput import BadInputLog


def test_once_per_source_per_interval_counted_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    counted: list[str] = []
    log = BadInputLog(
        logging.getLogger("t.bad"), interval=60.0, clock=lambda: now[0], count=counted.append
    )
    caplog.set_level(logging.DEBUG, "t.bad")
    for i in range(1000):
        log.report("192.0.2.1", "bad_coap", UnicodeDecodeError("utf-8", b"\xff", 0, 1, "x" * 500))
        log.report(f"198.51.100.{i % 2}", "bad_coap_code")
    assert log.counts == {"bad_coap": 1000, "bad_coap_code": 1000}
    assert len(counted) == 2000
    assert len(caplog.records) == 3  # one line per source
    assert all(r.levelno == logging.WARNING and not r.exc_info for r in caplog.records)
    assert len(caplog.records[0].getMessage()) < 250  # attacker text is truncated
    now[0] = 61.0
    log.report("192.0.2.1", "bad_coap")
    assert "999 more" in caplog.records[-1].getMessage()
