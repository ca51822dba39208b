"""The CoAP rules a listener applies before mapping a request (RFC 7252): critical options
it does not implement (4.02), methods it does not have (4.05), proxying it does not do
(5.05), and the Accept option."""

from __future__ import annotations

from typing import ClassVar

from synapse_coap.errors import RemoteProtocolError
from synapse_coap.mapping import numbers as n
from synapse_coap.mapping.messages import CoapMessage
from synapse_coap.mapping.tokens import (
    decode_uint,
)


class UnsupportedCriticalOption(RemoteProtocolError):
    """A request carries a critical option we do not implement (answer 4.02 Bad Option)."""

    coap_code: ClassVar[int] = n.BAD_OPTION


class UnsupportedMethod(RemoteProtocolError):
    """A request's method code names no method we know (answer 4.05, RFC 7252 5.8)."""

    coap_code: ClassVar[int] = n.METHOD_NOT_ALLOWED


class ProxyingNotSupported(RemoteProtocolError):
    """A request carries Proxy-Uri or Proxy-Scheme: we are not a proxy (answer 5.05)."""

    coap_code: ClassVar[int] = n.PROXYING_NOT_SUPPORTED


def accepted_format(msg: CoapMessage) -> int | None:
    """The request's Accept option (a Content-Format number), or None without one.

    Raises RemoteProtocolError for a repeated Accept or a value over two bytes.
    """
    accepts = msg.options_index().get(n.ACCEPT)
    if not accepts:
        return None
    if len(accepts) > 1:
        raise RemoteProtocolError("repeated Accept option")
    return decode_uint(accepts[0], 2)


def _check_critical(msg: CoapMessage) -> None:
    for opt in msg.options:
        if n.is_critical(opt.number) and opt.number not in n.KNOWN_OPTIONS:
            raise UnsupportedCriticalOption(f"unsupported critical option {opt.number}")
