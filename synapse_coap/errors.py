"""The one exception tree of synapse-coap.

Modelled on h11: :class:`LocalProtocolError` is raised when *we* misuse an API
or try to send something the wire cannot carry; :class:`RemoteProtocolError`
is raised when a *peer* sent something malformed, oversized or unauthentic.
Fuzz invariant for every decoder: any input either parses or raises
:class:`RemoteProtocolError` (never ``MemoryError``, ``RecursionError``,
``KeyError`` ...).
"""

from __future__ import annotations


class SynapseCoapError(Exception):
    """Base of every exception this package raises on purpose."""


class LocalProtocolError(SynapseCoapError):
    """We tried to do something the protocol does not allow (our bug or misuse)."""


class RemoteProtocolError(SynapseCoapError):
    """A peer sent bytes we cannot accept: malformed, over a limit, or unauthentic."""


class LimitExceeded(RemoteProtocolError):
    """A decoded size, depth or count went over a named limit."""


class HandshakeError(RemoteProtocolError):
    """A Noise handshake failed (bad message, failed decryption, bad payload)."""


class TrustError(SynapseCoapError):
    """A peer's static key is not trusted for the identity it claims."""


class KeyChangedError(TrustError):
    """A pinned or trust-on-first-use key changed.

    The message names the peer and both fingerprints, so an operator can see
    at once what happened.
    """

    def __init__(self, peer: str, expected: str, presented: str) -> None:
        self.peer = peer
        self.expected = expected
        self.presented = presented
        super().__init__(
            f"REFUSED: static key of peer {peer!r} changed: trusted key is {expected}, "
            f"peer presented {presented}. If this change is legitimate, remove the old "
            f"entry from the trust store (or update the pinned key) and retry."
        )


class ConfigValueError(SynapseCoapError, ValueError):
    """A configuration value is invalid. ``path`` names the field."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


class LibraryVersionError(SynapseCoapError):
    """An installed library lacks a private piece synapse-coap needs (checked at start).

    The message names the library's version and the missing piece.
    """


class TransportError(SynapseCoapError):
    """A request could not be carried over the link."""


class LinkDown(TransportError):
    """No session could be established, or the peer stopped answering (a proxy answers 502)."""


class RequestTimeout(TransportError):
    """The request was sent but its response did not arrive in time (a proxy answers 504)."""
