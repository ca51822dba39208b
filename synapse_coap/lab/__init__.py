"""The constrained-link lab: an impairment relay (no root) and its sans-I/O link model.

- :mod:`synapse_coap.lab.model`: link profiles and the deterministic model of
  a link direction (rate with serialization delay, queue, latency, jitter,
  loss, duplication, reordering, NAT rebinding schedule), with exact byte
  accounting at the IP level.
- :mod:`synapse_coap.lab.relay`: the asyncio UDP relay built on it, and the
  ``relay`` command line.
- :mod:`synapse_coap_lab.capture`: IP-level byte counting of loopback traffic
  with tshark, for comparing with HTTPS.

See docs/lab.md.
"""

from __future__ import annotations

from synapse_coap.lab.model import (
    PROFILES,
    Delivery,
    DirectionStats,
    Impairment,
    ImpairmentModel,
    LinkModel,
    LinkProfile,
    LinkStats,
    RebindSchedule,
    get_profile,
)
from synapse_coap.lab.relay import Relay, RelayConfig, RelayStats

__all__ = [
    "PROFILES",
    "Delivery",
    "DirectionStats",
    "Impairment",
    "ImpairmentModel",
    "LinkModel",
    "LinkProfile",
    "LinkStats",
    "RebindSchedule",
    "Relay",
    "RelayConfig",
    "RelayStats",
    "get_profile",
]
