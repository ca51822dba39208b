"""Sticky access tokens: a client's ``Authorization: Bearer`` is sent once per session.

Sans-I/O; one :class:`SenderTokens` per client session and one
:class:`ReceiverTokens` per server session (the Noise channel), so a binding
is only ever valid on the session that made it.

Wire (option numbers in :mod:`synapse_coap.mapping.numbers`):

* ``Token-Bind`` (65019, critical): ``index byte + token``.  Sent with every
  request that uses the token until a response to one of them arrived.
* ``Token-Ref`` (65023, critical): ``uint index``, for an acknowledged token
  other than index 0.
* Nothing at all: the token bound at **index 0** (the session's first token).
  This is what makes an ordinary authenticated request cost 0 bytes.
* A request *without* Authorization says so explicitly (a flag in the route id
  suffix, or the ``No-Auth`` option), so the receiver never adds a token the
  client did not send.
* ``Token-Reset`` (65008, elective) in a 4.01 response: the receiver did not
  know a referenced binding (it restarted, or the session was replaced).  The
  sender forgets which bindings were acknowledged and resends the request once,
  binding again.

The same objects carry the session's string table (:mod:`synapse_coap.wire.strings`)
when the transport enables it (Noise sessions only): ``SenderTokens(strings=SenderStrings())``
and ``ReceiverTokens(strings=ReceiverStrings())``.  A ``String-Reset`` or a
``Token-Reset`` means the peer lost its session state: both are forgotten and
the request is resent once.

Indexes are never reused within a session (a reordered old request can never
pick up a newer token); after :data:`MAX_BINDINGS` distinct tokens, further
tokens travel literally in every request.  Tokens are never logged and never
appear in ``repr``.
"""

from __future__ import annotations

from synapse_coap.errors import RemoteProtocolError
from synapse_coap.mapping import numbers
from synapse_coap.mapping.messages import CoapMessage, CoapOption
from synapse_coap.wire.strings import ReceiverStrings, SenderStrings

#: Distinct tokens one session may bind (a sidecar serving a few accounts needs a handful).
MAX_BINDINGS = 16


class UnknownTokenReference(RemoteProtocolError):
    """A request relied on a token binding this receiver does not have (answer 4.01 + Token-Reset)."""


def encode_uint(n: int) -> bytes:
    """CoAP uint option value: big-endian, no leading zero bytes (0 is empty)."""
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


def decode_uint(data: bytes, max_bytes: int = 8) -> int:
    if len(data) > max_bytes:
        raise RemoteProtocolError(f"uint option longer than {max_bytes} bytes")
    return int.from_bytes(data, "big")


class SenderTokens:
    """Client side: which tokens have an index, and which bindings the peer acknowledged."""

    def __init__(
        self, max_bindings: int = MAX_BINDINGS, *, strings: SenderStrings | None = None
    ) -> None:
        self._max = max_bindings
        self._index: dict[str, int] = {}
        self._acked: set[int] = set()
        #: the session string table (None: not used, e.g. plain CoAP)
        self.strings = strings

    def __repr__(self) -> str:
        return f"<SenderTokens bound={len(self._index)} acked={len(self._acked)} {self.strings!r}>"

    def renewed(self) -> SenderTokens:
        """Fresh state for a new session with the same peer (nothing bound or acknowledged).

        The string table's sequence counter continues, so no number is ever reused.
        """
        strings = self.strings
        if strings is not None:
            strings.forget()
        return SenderTokens(self._max, strings=strings)

    def options_for(self, token: str) -> list[CoapOption] | None:
        """Options that convey ``Authorization: Bearer <token>``; None = carry it literally."""
        i = self._index.get(token)
        if i is None:
            if len(self._index) >= self._max:
                return None
            i = len(self._index)
            self._index[token] = i
        if i in self._acked:
            return [] if i == 0 else [CoapOption(numbers.OPT_TOKEN_REF, encode_uint(i))]
        value = bytes([i]) + token.encode("utf-8", "surrogatepass")
        return [CoapOption(numbers.OPT_TOKEN_BIND, value)]

    def acknowledge(self, request: CoapMessage) -> None:
        """A response to ``request`` arrived: the bindings it carried are known to the peer."""
        for value in request.get(numbers.OPT_TOKEN_BIND):
            if value:
                self._acked.add(value[0])

    def forget(self) -> None:
        """The peer lost our bindings (and string table): resend them with the next requests."""
        self._acked.clear()
        if self.strings is not None:
            self.strings.forget()

    def on_response(self, request: CoapMessage, response: CoapMessage) -> bool:
        """Call for every response; True means "the peer lost our session state: resend once"."""
        if (
            response.first(numbers.OPT_TOKEN_RESET) is not None
            or response.first(numbers.OPT_STRING_RESET) is not None
        ):
            self.forget()
            return True
        self.acknowledge(request)
        # (the string table's acknowledgement comes with the decoded response:
        # Codec.decode_response(strings=..., seq=...), which knows its identifiers)
        return False


class ReceiverTokens:
    """Server side: index -> token for one session (bounded by :data:`MAX_BINDINGS`)."""

    def __init__(
        self, max_bindings: int = MAX_BINDINGS, *, strings: ReceiverStrings | None = None
    ) -> None:
        self._max = max_bindings
        self._tokens: dict[int, str] = {}
        #: the session string table (None: not used, e.g. plain CoAP)
        self.strings = strings

    def __repr__(self) -> str:
        return f"<ReceiverTokens bound={len(self._tokens)}>"

    def __len__(self) -> int:
        return len(self._tokens)

    def bind(self, value: bytes) -> str:
        """Apply a Token-Bind option value; returns the token."""
        if len(value) < 2:
            raise RemoteProtocolError("Token-Bind option too short")
        index = value[0]
        if index >= self._max:
            raise RemoteProtocolError(f"Token-Bind index {index} over the limit {self._max}")
        try:
            token = value[1:].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as e:
            raise RemoteProtocolError("Token-Bind token is not UTF-8") from e
        self._tokens[index] = token
        return token

    def lookup(self, index: int) -> str:
        try:
            return self._tokens[index]
        except KeyError:
            raise UnknownTokenReference(f"no token bound at index {index}") from None
