"""Plain (unencrypted) CoAP over UDP: aiocoap's udp6 transport, with datagram metrics.

Only used where it is explicitly configured (``ServerConfig.plain_listen``,
``Endpoint(secure=False)``): loopback tooling, libcoap interop, private
networks.
"""

from __future__ import annotations

from typing import Any

from synapse_coap.transport.aiocoap_compat import PlainUDPBase
from synapse_coap.transport.metrics import NullMetrics, TransportMetrics


class PlainUDP(PlainUDPBase):
    """aiocoap's MessageInterfaceUDP6, counting datagrams as kind ``"plain"``."""

    def _metrics(self) -> TransportMetrics:
        metrics = self.context_attribute("metrics")
        return metrics if metrics is not None else NullMetrics()

    def send(self, message: Any) -> None:
        self._metrics().datagram("out", "plain", len(message.encode()))
        super().send(message)

    def datagram_msg_received(self, data: bytes, ancdata: Any, flags: Any, address: Any) -> None:
        self._metrics().datagram("in", "plain", len(data))
        super().datagram_msg_received(data, ancdata, flags, address)
