"""What the CoAP client keeps per endpoint and exchange: the endpoint it talks to, its
session (codec, token bindings, string table), push events, and the small steps of its
request path."""

from __future__ import annotations

import logging
from typing import Any

import attrs

from synapse_coap.mapping.messages import CoapMessage, HttpResponse
from synapse_coap.transport.convert import (
    BLOCKWISE_OPTIONS,
    Codec,
)
from synapse_coap.transport.manager import LinkMessageManager

logger = logging.getLogger("synapse_coap.transport.client")

#: Blockwise options: the transfer's, not the message's (the codec never sees them).
_TRANSFER_OPTIONS = BLOCKWISE_OPTIONS


@attrs.frozen
class Endpoint:
    """A CoAP peer: where it is, who it is (``peer_name``: its Matrix server name or
    configured name, the trust-store key), its pinned static public key if
    known, and whether to use Noise (``secure=False`` = plain CoAP, opt-in)."""

    host: str
    port: int
    peer_name: str
    static_key: bytes | None = None
    secure: bool = True


@attrs.define
class _ClientSession:
    endpoint: Endpoint
    remote: Any
    mman: LinkMessageManager
    codec: Codec
    profile_id: int
    tokens: Any
    established_profile: int | None = None


@attrs.frozen
class PushEvent:
    """One event of an Observe registration: a notification, or the ``final`` response.

    A final response carries no Observe option: the server did not accept the
    registration (not observable, refused, an error), or ended it. An event
    with ``response`` None says the server acknowledged the registration
    request (it has it; notifications follow when there is something to push).
    """

    response: HttpResponse | None
    final: bool


def _sender_tokens(*, strings: bool = False) -> Any:
    """Per-session sticky-token state; with ``strings`` also the session string table."""
    try:
        from synapse_coap.mapping.tokens import (  # type: ignore
            SenderTokens,
        )
        from synapse_coap.wire.strings import SenderStrings
    except ImportError:
        return None
    return SenderTokens(strings=SenderStrings() if strings else None)


def _strip_transfer(cm: CoapMessage) -> CoapMessage:
    return CoapMessage(
        cm.code, tuple(o for o in cm.options if o.number not in _TRANSFER_OPTIONS), cm.payload
    )


def _safe_route(codec: Codec, cm: CoapMessage) -> str:
    try:
        return codec.route_name(cm)
    except Exception:
        return "unknown"


def _on_response(tokens: Any, request: CoapMessage, response: CoapMessage) -> bool:
    """Acknowledge the request's token bindings; True if the peer asked us to rebind."""
    try:
        return bool(tokens.on_response(request, response))
    except Exception:
        logger.debug("token bookkeeping failed", exc_info=True)
        return False
