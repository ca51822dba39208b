"""X25519 static keys and their on-disk format.

Key file format (documented in docs/security.md)::

    # synapse-coap X25519 private key. Keep it secret (mode 0600).
    # public: <unpadded base64 of the 32-byte public key>
    <unpadded standard base64 of the 32 raw private key bytes>

Lines starting with ``#`` and blank lines are ignored; exactly one data line
must remain. The public key line is informative only (it is recomputed).
"""

from __future__ import annotations

import base64
import binascii
import errno
import logging
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from synapse_coap.errors import ConfigValueError

logger = logging.getLogger(__name__)

KEY_LEN = 32
HEADER = "# synapse-coap X25519 private key. Keep it secret (mode 0600)."


def generate_private_key() -> bytes:
    """A fresh X25519 private key (32 raw bytes) from the OS CSPRNG."""
    return x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def public_key(private: bytes) -> bytes:
    """The 32-byte X25519 public key of ``private``."""
    if len(private) != KEY_LEN:
        raise ConfigValueError("private_key", f"must be {KEY_LEN} bytes, got {len(private)}")
    return (
        x25519.X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def encode_public(pub: bytes) -> str:
    """Unpadded standard base64 (43 characters for a 32-byte key)."""
    return base64.b64encode(pub).decode("ascii").rstrip("=")


def decode_public(text: str, path: str = "public_key") -> bytes:
    """Parse a base64 public key (padded or not, standard or URL-safe alphabet).

    Raises ConfigValueError naming ``path`` unless the result is 32 bytes.
    """
    cleaned = text.strip().rstrip("=")
    if not cleaned or len(cleaned) > 64:
        raise ConfigValueError(path, "expected 43 characters of base64 (a 32-byte X25519 key)")
    alphabet = cleaned.replace("-", "+").replace("_", "/")
    try:
        raw = base64.b64decode(alphabet + "=" * (-len(alphabet) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigValueError(path, f"not valid base64: {exc}") from None
    if len(raw) != KEY_LEN:
        raise ConfigValueError(path, f"must decode to {KEY_LEN} bytes, got {len(raw)}")
    return raw


def write_key_file(path: str | os.PathLike[str], private: bytes) -> None:
    """Write ``private`` to a new file with mode 0600. Refuses to overwrite."""
    pub = public_key(private)
    text = (
        f"{HEADER}\n# public: {encode_public(pub)}\n"
        f"{base64.b64encode(private).decode('ascii').rstrip('=')}\n"
    )
    target = Path(path)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise ConfigValueError(
            str(target), "refusing to overwrite an existing key file; remove it first"
        ) from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    """Read a private key file written by :func:`write_key_file`.

    Refuses (ConfigValueError naming the file) a symbolic link (it is not
    followed), anything but a regular file, a file owned by another user than
    the one running, a file readable or writable by group or others, a missing
    file, or one that does not hold exactly one 32-byte key.
    """
    target = Path(path)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigValueError(
                str(target), "key file is a symbolic link; give the real path"
            ) from None
        raise ConfigValueError(str(target), f"cannot read key file: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigValueError(str(target), "key file is not a regular file")
        if st.st_uid != os.geteuid():
            raise ConfigValueError(
                str(target),
                f"key file is owned by uid {st.st_uid}, not by the user running (uid "
                f"{os.geteuid()}); run: chown {os.geteuid()} {target}",
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise ConfigValueError(
                str(target),
                f"key file is accessible by group/others (mode {mode:04o}); "
                f"run: chmod 600 {target}",
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(65536)
    finally:
        os.close(fd)
    try:
        raw_text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigValueError(str(target), "key file is not ASCII text") from None
    lines = [
        line.strip() for line in raw_text.splitlines() if line.strip() and not line.startswith("#")
    ]
    if len(lines) != 1:
        raise ConfigValueError(str(target), "expected exactly one base64 key line")
    return decode_private(lines[0], str(target))


def decode_private(text: str, path: str = "private_key") -> bytes:
    """Parse the base64 data line of a key file (32 raw bytes)."""
    return decode_public(text, path)
