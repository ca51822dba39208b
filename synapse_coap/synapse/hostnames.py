"""Host names, ports and public keys as the CoAP discovery config and DNS give them: strict
parsing, so a bad entry is a ConfigError naming it, never a lookup of garbage."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re


def split_host_port(text: str, default_port: int | None = None) -> tuple[str, int | None]:
    """Split ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``; a bare IPv6 literal has no port.

    Raises ValueError (with a message) on a malformed string or port.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty host")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unterminated '[' in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"junk after ']' in {text!r}")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None  # hostname, IPv4, or a bare IPv6 literal
    if not host:
        raise ValueError(f"empty host in {text!r}")
    if port_text is None:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r} in {text!r} (1-65535)")
    return host, int(port_text)


def decode_public_key(text: str) -> bytes:
    """A Noise static public key from config text (base64, padded or not; 32 bytes).

    Same format as ``synapse-coap pubkey KEYFILE`` prints (``synapse_coap.noise.keys.encode_public``).
    """
    stripped = text.strip()
    padded = stripped + "=" * (-len(stripped) % 4)
    try:
        key = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        try:
            key = base64.urlsafe_b64decode(padded)
        except (binascii.Error, ValueError) as e:
            raise ValueError("not base64") from e
    if len(key) != 32:
        raise ValueError(f"a public key is 32 bytes, this is {len(key)}")
    return key


_HOSTNAME_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


#: What an endpoint's host may be, for error messages.
HOST_FORM = (
    "an IP literal (IPv6 in brackets with a port: [::1]:5683) or a DNS hostname "
    "(dot-separated labels of 1-63 letters, digits and hyphens, not starting or "
    "ending with a hyphen; at most 253 characters)"
)


def is_valid_host(host: str) -> bool:
    """True for an IPv4/IPv6 literal or a syntactically valid DNS hostname (RFC 1123)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    if labels[-1].isdigit():  # a top-level label is never numeric: a malformed IPv4 address
        return False
    return all(_HOSTNAME_LABEL.fullmatch(label) for label in labels)
