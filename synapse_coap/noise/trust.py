"""Who we trust: pinned keys and trust-on-first-use behind a pluggable store.

- :class:`TrustStore` is the persistence interface (synchronous ``get``/``put``).
  :class:`MemoryTrustStore` for tests, :class:`FileTrustStore` for the sidecar
  (JSON, written atomically, mode 0600). The Synapse module provides a
  database-backed store implementing the same protocol.
- :class:`TrustPolicy` decides: a pinned key wins; otherwise the store is
  consulted and the first key seen is recorded (TOFU); a different key later is
  refused with :class:`KeyChangedError` naming the peer and both fingerprints.
- ``accept_any_initiator``: on a responder, initiators are not checked at all
  (clients authenticate with Matrix access tokens inside the session). Pinned
  initiator keys still give the session a ``peer_name``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import attrs

from synapse_coap.errors import ConfigValueError, KeyChangedError, TrustError

logger = logging.getLogger(__name__)

FILE_FORMAT_VERSION = 1
MAX_STORE_BYTES = 4 * 1024 * 1024


def fingerprint(key: bytes) -> str:
    """``SHA256:<unpadded base64 of sha256(key)>`` (the OpenSSH style)."""
    digest = hashlib.sha256(key).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


class TrustStore(Protocol):
    """Persistent peer name -> static public key mapping (trust on first use)."""

    def get(self, peer: str) -> bytes | None: ...

    def put(self, peer: str, key: bytes) -> None: ...


class MemoryTrustStore:
    """A TrustStore kept in memory (tests, ephemeral tools)."""

    def __init__(self, initial: Mapping[str, bytes] | None = None) -> None:
        self._keys: dict[str, bytes] = dict(initial or {})

    def get(self, peer: str) -> bytes | None:
        return self._keys.get(peer)

    def put(self, peer: str, key: bytes) -> None:
        self._keys[peer] = bytes(key)


class FileTrustStore:
    """A TrustStore in a JSON file: ``{"version": 1, "peers": {name: base64 key}}``.

    The file is loaded once at construction (missing file = empty store) and
    rewritten atomically (temporary file, fsync, rename) with mode 0600 on
    every ``put``. A malformed file raises ConfigValueError naming it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._keys: dict[str, bytes] = self._load()

    def _load(self) -> dict[str, bytes]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigValueError(str(self.path), f"cannot read trust store: {exc}") from None
        if len(raw) > MAX_STORE_BYTES:
            raise ConfigValueError(str(self.path), "trust store is larger than 4 MiB")
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise ConfigValueError(str(self.path), f"not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("version") != FILE_FORMAT_VERSION:
            raise ConfigValueError(
                str(self.path), f'expected an object with "version": {FILE_FORMAT_VERSION}'
            )
        peers = doc.get("peers")
        if not isinstance(peers, dict):
            raise ConfigValueError(str(self.path), 'expected "peers" to be an object')
        keys: dict[str, bytes] = {}
        for name, value in peers.items():
            if not isinstance(value, str):
                raise ConfigValueError(f"{self.path}: peers.{name}", "expected a base64 string")
            try:
                key = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
            except ValueError:
                raise ConfigValueError(f"{self.path}: peers.{name}", "not valid base64") from None
            if len(key) != 32:
                raise ConfigValueError(f"{self.path}: peers.{name}", "expected a 32-byte key")
            keys[name] = key
        return keys

    def get(self, peer: str) -> bytes | None:
        with self._lock:
            return self._keys.get(peer)

    def put(self, peer: str, key: bytes) -> None:
        with self._lock:
            self._keys[peer] = bytes(key)
            self._write()

    def _write(self) -> None:
        doc = {
            "version": FILE_FORMAT_VERSION,
            "peers": {
                name: base64.b64encode(key).decode("ascii").rstrip("=")
                for name, key in sorted(self._keys.items())
            },
        }
        data = json.dumps(doc, indent=1, sort_keys=True).encode("utf-8") + b"\n"
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".trust-", suffix=".tmp", dir=directory)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


@attrs.frozen
class TrustPolicy:
    """Pinned keys first, then TOFU through ``store``; see the module docstring."""

    pinned: Mapping[str, bytes] = attrs.field(factory=dict)
    store: TrustStore | None = None
    accept_any_initiator: bool = False

    def known_key(self, peer: str) -> bytes | None:
        """The key we expect for ``peer`` (pinned, else stored), if any."""
        pinned = self.pinned.get(peer)
        if pinned is not None:
            return pinned
        if self.store is not None:
            return self.store.get(peer)
        return None

    def name_for_key(self, key: bytes) -> str | None:
        """The pinned peer name whose key is ``key``, if any."""
        for name, pinned in self.pinned.items():
            if pinned == key:
                return name
        return None

    def check(self, peer: str, key: bytes) -> None:
        """Accept ``key`` for ``peer`` or raise KeyChangedError / TrustError.

        A first key for a peer that is neither pinned nor stored is recorded in
        the store (trust on first use). Without a store, an unpinned peer is
        refused.
        """
        pinned = self.pinned.get(peer)
        if pinned is not None:
            if pinned != key:
                raise KeyChangedError(peer, fingerprint(pinned), fingerprint(key))
            return
        if self.store is None:
            raise TrustError(
                f"no key is pinned for peer {peer!r} and no trust store is configured; "
                f"presented key {fingerprint(key)}"
            )
        known = self.store.get(peer)
        if known is None:
            logger.info("trust on first use: pinning %s for peer %r", fingerprint(key), peer)
            self.store.put(peer, key)
            return
        if known != key:
            raise KeyChangedError(peer, fingerprint(known), fingerprint(key))
