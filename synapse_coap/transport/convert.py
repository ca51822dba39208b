"""Conversions between the mapping layer's value objects and aiocoap messages, and codec glue."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from aiocoap.message import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber

from synapse_coap.errors import LocalProtocolError, RemoteProtocolError
from synapse_coap.mapping.messages import CoapMessage, CoapOption, HttpRequest, HttpResponse
from synapse_coap.wire.context import WireContext

logger = logging.getLogger(__name__)

#: Private, critical option (65000-65535 is the experimental range; odd = critical):
#: "the request with this token is abandoned". Sent by CoapClient in a NON with
#: the abandoned request's token and No-Response (suppress all); the server's
#: token layer then cancels the old request's handler. A server that does not
#: know the option rejects it (critical) and does nothing.
ABANDON_OPTION = 65005
NO_RESPONSE_ALL = 26  # RFC 7967: suppress 2.xx, 4.xx and 5.xx


#: Blockwise options: they belong to the transfer, not to the message the codec sees.
BLOCKWISE_OPTIONS = frozenset(
    {
        int(OptionNumber.BLOCK1),
        int(OptionNumber.BLOCK2),
        int(OptionNumber.SIZE1),
        int(OptionNumber.SIZE2),
    }
)


def to_aiocoap(msg: CoapMessage) -> Message:
    """A mapping-layer CoapMessage as an outgoing aiocoap Message (no type, mid, token)."""
    out = Message(code=Code(msg.code), payload=msg.payload)
    for opt in msg.options:
        try:
            out.opt.add_option(OptionNumber(opt.number).create_option(decode=opt.value))
        except Exception as e:  # aiocoap rejects a few malformed fixed-format values
            raise LocalProtocolError(f"option {opt.number} cannot be carried: {e}") from e
    return out


#: the answer to a request whose response cannot be encoded (or carried)
NOT_ENCODABLE = CoapMessage(int(Code.INTERNAL_SERVER_ERROR), (), b"response not encodable")


def carried(answer: CoapMessage, route: str) -> Message:
    """``answer`` as the aiocoap Message that carries it (5.00 if it cannot be carried)."""
    try:
        return to_aiocoap(answer)
    except LocalProtocolError as e:
        logger.error("cannot encode the response to %s: %s", route, e)
        return to_aiocoap(NOT_ENCODABLE)


class RejectNon(Exception):
    """The Non-confirmable request is rejected (RFC 7252 4.3): a Reset, no response."""


def from_aiocoap(msg: Any) -> CoapMessage:
    """An aiocoap Message as a mapping-layer CoapMessage (block options included)."""
    options = []
    try:
        for opt in msg.opt.option_list():
            options.append(CoapOption(int(opt.number), bytes(opt.encode())))
    except Exception as e:
        raise RemoteProtocolError(f"malformed option: {e}") from e
    return CoapMessage(code=int(msg.code), options=tuple(options), payload=bytes(msg.payload))


class Codec(Protocol):
    """The part of ``synapse_coap.mapping.codec.WireCodec`` the transport uses."""

    def encode_request(
        self, req: HttpRequest, tokens: Any = None, *, observe: bool = False
    ) -> CoapMessage: ...

    def decode_request(self, msg: CoapMessage, tokens: Any = None) -> HttpRequest: ...

    def encode_response(
        self,
        resp: HttpResponse,
        *,
        want_json: bool = False,
        method: int = ...,
        strings: Any = None,
        seq: int | None = None,
        references: Any = None,
        base: Any = None,
    ) -> CoapMessage: ...

    def decode_response(
        self,
        msg: CoapMessage,
        *,
        method: int = ...,
        strings: Any = None,
        seq: int | None = None,
        bases: Any = None,
    ) -> HttpResponse: ...

    def notification_kept(self, msg: CoapMessage, base: Any) -> Any: ...

    def notification_template(self, target: bytes) -> bytes | None: ...

    def route_name(self, msg: CoapMessage) -> str: ...

    def is_replay_safe(self, req: HttpRequest) -> bool: ...

    def wants_json(self, msg: CoapMessage) -> bool: ...


#: (profile id, wire context) -> codec
CodecFactory = Callable[[int, WireContext], Codec]


def default_codec_factory(profile_id: int, context: WireContext) -> Codec:
    from synapse_coap.mapping.codec import WireCodec  # type: ignore
    from synapse_coap.wire.profile import load_profile  # type: ignore

    codec: Codec = WireCodec(load_profile(profile_id), context)
    return codec


def supported_profile_offers() -> list[tuple[int, bytes]]:
    """(id, content hash) of every profile this installation ships, highest first."""
    try:
        from synapse_coap.wire.profile import (  # type: ignore
            supported_profiles,
        )
    except ImportError:  # wire layer not installed yet: the base profile only
        return [(0, b"")]
    offers = [(int(p.id), bytes(p.content_hash)) for p in supported_profiles()]
    return offers or [(0, b"")]


def server_name_payload(name: str | None) -> bytes:
    """Handshake app payload: our Matrix server name, UTF-8 (empty = none)."""
    return b"" if not name else name.encode("utf-8")


def parse_server_name(payload: bytes) -> str | None:
    if not payload or len(payload) > 255:
        return None
    try:
        name = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return name if name.isprintable() else None


def session_context(responder: str | None, initiator: str | None) -> WireContext:
    """Shared server names of a session: the responder's first, then the initiator's."""
    names: list[str] = []
    for n in (responder, initiator):
        if n and n not in names:
            names.append(n)
    return WireContext(server_names=tuple(names))
