"""Profiles: loading, hashes, tamper detection."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from synapse_coap.errors import LocalProtocolError
from synapse_coap.wire.profile import (
    PROFILE_FILES,
    content_hash_of,
    file_hashes,
    load_profile,
    load_profile_from,
    maps_dir,
    supported_profiles,
)

REPO_MAPS = Path(__file__).resolve().parent.parent.parent / "maps"


def test_maps_dir_in_checkout_is_the_top_level_maps() -> None:
    assert maps_dir() == REPO_MAPS


def test_profile_1_matches_its_manifest() -> None:
    p = load_profile(1)
    manifest = json.loads((REPO_MAPS / "profile-1" / "manifest.json").read_text())
    assert manifest["id"] == 1
    assert p.content_hash.hex() == manifest["content_hash"]
    assert set(manifest["files"]) == set(PROFILE_FILES)
    assert 1024 <= len(p.dictionary) <= 16384
    assert p.keys[:4] == ("type", "content", "sender", "origin_server_ts")
    assert "m.room.message" in p.values[:20]
    assert load_profile(1) is p  # cached


def test_profile_0_is_profile_1_without_dictionary() -> None:
    p0, p1 = load_profile(0), load_profile(1)
    assert p0.id == 0 and p0.dictionary == b""
    assert (p0.keys, p0.values, p0.query_keys) == (p1.keys, p1.values, p1.query_keys)
    assert p0.content_hash != p1.content_hash


def test_supported_profiles_highest_first() -> None:
    ids = [p.id for p in supported_profiles()]
    assert ids == sorted(ids, reverse=True)
    assert ids[-1] == 0 and 1 in ids


def test_unknown_profile_is_refused() -> None:
    with pytest.raises(LocalProtocolError, match="no such profile"):
        load_profile(99)


def copy_maps(tmp_path: Path) -> Path:
    dst = tmp_path / "maps"
    shutil.copytree(REPO_MAPS, dst)
    return dst


def test_untouched_copy_loads_with_same_hash(tmp_path: Path) -> None:
    maps = copy_maps(tmp_path)
    assert load_profile_from(maps, 1).content_hash == load_profile(1).content_hash


@pytest.mark.parametrize("name", ["keys.json", "values.json", "dictionary.bin", "routes.json"])
def test_tampered_copy_is_refused(tmp_path: Path, name: str) -> None:
    maps = copy_maps(tmp_path)
    target = maps / "profile-1" / name
    data = target.read_bytes()
    target.write_bytes(data.replace(b"m", b"n", 1) if b"m" in data else data + b" ")
    with pytest.raises(LocalProtocolError, match="does not match its manifest"):
        load_profile_from(maps, 1)
    with pytest.raises(LocalProtocolError, match="does not match its manifest"):
        load_profile_from(maps, 0)


def test_tampered_manifest_hash_is_refused(tmp_path: Path) -> None:
    maps = copy_maps(tmp_path)
    mpath = maps / "profile-1" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["content_hash"] = "00" * 32
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(LocalProtocolError):
        load_profile_from(maps, 1)


def test_missing_manifest_computes_the_hash(tmp_path: Path) -> None:
    maps = copy_maps(tmp_path)
    (maps / "profile-1" / "manifest.json").unlink()
    p = load_profile_from(maps, 1)
    assert p.content_hash == content_hash_of(file_hashes(maps / "profile-1"))
    assert p.content_hash == load_profile(1).content_hash
