"""Key files and the keygen / pubkey commands."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from synapse_coap.cli import main
from synapse_coap.errors import ConfigValueError
from synapse_coap.noise.keys import (
    decode_public,
    encode_public,
    generate_private_key,
    public_key,
    read_key_file,
    write_key_file,
)


def test_key_file_round_trip_mode_0600_and_no_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    key = generate_private_key()
    write_key_file(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_key_file(path) == key
    text = path.read_text()
    assert text.startswith("# synapse-coap X25519 private key")
    assert f"# public: {encode_public(public_key(key))}" in text
    with pytest.raises(ConfigValueError, match="refusing to overwrite"):
        write_key_file(path, generate_private_key())
    assert read_key_file(path) == key


def test_group_readable_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    write_key_file(path, generate_private_key())
    os.chmod(path, 0o640)
    with pytest.raises(ConfigValueError, match="chmod 600"):
        read_key_file(path)


def test_bad_key_files(tmp_path: Path) -> None:
    path = tmp_path / "bad.key"
    path.write_text("# comment\nAAAA\n")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigValueError, match="32 bytes"):
        read_key_file(path)
    with pytest.raises(ConfigValueError, match="cannot read"):
        read_key_file(tmp_path / "missing.key")


def test_public_key_encoding() -> None:
    pub = public_key(generate_private_key())
    text = encode_public(pub)
    assert len(text) == 43 and "=" not in text
    assert decode_public(text) == pub
    assert decode_public(text + "=") == pub
    assert decode_public(text.replace("+", "-").replace("/", "_")) == pub
    with pytest.raises(ConfigValueError) as info:
        decode_public("not base64!", "peers.example")
    assert info.value.path == "peers.example"
    with pytest.raises(ConfigValueError, match="32 bytes"):
        decode_public("AAAA")


def test_cli_keygen_and_pubkey(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "k"
    assert main(["keygen", "--out", str(path)]) == 0
    printed = capsys.readouterr().out.strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert printed == encode_public(public_key(read_key_file(path)))
    assert main(["pubkey", str(path)]) == 0
    out = capsys.readouterr().out
    assert out == printed + "\n"  # exactly one line
    before = path.read_bytes()
    assert main(["keygen", "--out", str(path)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_key_file_symlink_and_foreign_owner_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # issue 14: the key file check tested the mode but not the owner, and followed symlinks.
    real = tmp_path / "real.key"
    write_key_file(real, generate_private_key())
    link = tmp_path / "link.key"
    link.symlink_to(real)
    with pytest.raises(ConfigValueError, match="symbolic link"):
        read_key_file(link)
    with pytest.raises(ConfigValueError, match="refusing to overwrite"):
        write_key_file(link, generate_private_key())
    assert len(read_key_file(real)) == 32
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(real).st_uid + 1)
    with pytest.raises(ConfigValueError, match="owned by uid"):
        read_key_file(real)
