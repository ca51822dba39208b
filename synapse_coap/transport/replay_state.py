"""The 0-RTT anti-replay watermark kept across restarts in a small file (docs/security.md)."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("synapse_coap.transport.server")

#: Seconds between writes of the 0-RTT anti-replay watermark.
REPLAY_STATE_INTERVAL = 30.0


def read_replay_state(path: str | None, *, now: float, window: float) -> float:
    """``early_data_not_before`` for a starting responder: the watermark its previous run
    wrote (0 if there was none). An unreadable file refuses 0-RTT for two windows."""
    if path is None:
        return 0.0
    try:
        with open(path, encoding="ascii") as f:
            return float(f.read().strip())
    except FileNotFoundError:
        return 0.0
    except (OSError, ValueError) as e:
        logger.warning(
            "0-RTT replay state %s unreadable (%s): no 0-RTT for %.0f s", path, e, 2 * window
        )
        return now + 2 * window


def write_replay_state(path: str, value: float) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(f"{value:.0f}\n")
    os.replace(tmp, path)
