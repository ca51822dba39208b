"""Plain (unencrypted) CoAP over UDP: aiocoap's udp6 transport, with datagram metrics.

Only used where it is explicitly configured (``ServerConfig.plain_listen``,
``Endpoint(secure=False)``): loopback tooling, libcoap interop, private
networks.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from synapse_coap.noise.badinput import BadInputLog
from synapse_coap.transport.aiocoap_compat import PlainUDPBase
from synapse_coap.transport.datagram import (
    MessageFormatError,
    decode_message,
    reset_for,
)
from synapse_coap.transport.metrics import NullMetrics, TransportMetrics

logger = logging.getLogger(__name__)


class PlainUDP(PlainUDPBase):
    """aiocoap's MessageInterfaceUDP6, counting datagrams as kind ``"plain"``.

    A datagram that is not a well-formed CoAP message (RFC 7252 3: token length
    over 8, a payload marker with no payload, an option that does not decode ...)
    never reaches aiocoap: it is counted (``dropped{reason="bad_coap"}``), logged
    without a traceback at most once per source per minute, and a Confirmable one
    is rejected with a Reset.
    """

    _bad_input: BadInputLog | None = None

    def _metrics(self) -> TransportMetrics:
        metrics = self.context_attribute("metrics")
        return metrics if metrics is not None else NullMetrics()

    def send(self, message: Any) -> None:
        self._metrics().datagram("out", "plain", len(message.encode()))
        super().send(message)

    def datagram_msg_received(self, data: bytes, ancdata: Any, flags: Any, address: Any) -> None:
        metrics = self._metrics()
        metrics.datagram("in", "plain", len(data))
        try:
            decode_message(data, None)
        except MessageFormatError as e:
            if self._bad_input is None:
                self._bad_input = BadInputLog(logger, count=lambda r: self._metrics().dropped(r))
            self._bad_input.report(str(address[0]), "bad_coap", e)
            reset = reset_for(data)
            if reset is not None:
                # RFC 7252 4.2: a malformed Confirmable message is rejected with a Reset,
                # sent from the address it came to (the same ancillary data aiocoap uses)
                pktinfo = [
                    (level, kind, value)
                    for level, kind, value in ancdata
                    if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO
                ]
                metrics.datagram("out", "plain", len(reset))
                self.transport.sendmsg(reset, pktinfo, 0, address)
            return
        super().datagram_msg_received(data, ancdata, flags, address)
