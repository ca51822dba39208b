"""Trust policy: pinned keys, trust on first use, refusal of a changed key, the file store."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from synapse_coap.errors import ConfigValueError, KeyChangedError, TrustError
from synapse_coap.noise.trust import FileTrustStore, MemoryTrustStore, TrustPolicy, fingerprint

A = bytes(range(32))
B = bytes(range(1, 33))


def test_fingerprint_format() -> None:
    fp = fingerprint(A)
    assert fp.startswith("SHA256:") and len(fp) == 7 + 43
    assert fingerprint(B) != fp


def test_pinned_key_accepts_only_itself() -> None:
    policy = TrustPolicy(pinned={"hs.example": A})
    policy.check("hs.example", A)
    with pytest.raises(KeyChangedError) as info:
        policy.check("hs.example", B)
    msg = str(info.value)
    assert "hs.example" in msg and fingerprint(A) in msg and fingerprint(B) in msg
    assert info.value.expected == fingerprint(A) and info.value.presented == fingerprint(B)


def test_unpinned_without_store_is_refused() -> None:
    with pytest.raises(TrustError, match="no key is pinned"):
        TrustPolicy().check("hs.example", A)


def test_tofu_records_first_key_and_refuses_a_changed_one() -> None:
    store = MemoryTrustStore()
    policy = TrustPolicy(store=store)
    policy.check("hs.example", A)
    assert store.get("hs.example") == A
    policy.check("hs.example", A)
    with pytest.raises(KeyChangedError) as info:
        policy.check("hs.example", B)
    assert fingerprint(A) in str(info.value) and fingerprint(B) in str(info.value)
    assert store.get("hs.example") == A  # the refused key is not stored


def test_pinned_wins_over_store() -> None:
    store = MemoryTrustStore({"hs.example": B})
    policy = TrustPolicy(pinned={"hs.example": A}, store=store)
    policy.check("hs.example", A)
    assert policy.known_key("hs.example") == A
    assert policy.name_for_key(A) == "hs.example"
    assert policy.name_for_key(B) is None


def test_file_store_persists_atomically_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "trust.json"
    store = FileTrustStore(path)
    assert store.get("hs.example") is None
    TrustPolicy(store=store).check("hs.example", A)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["trust.json"]  # no temp file left
    reopened = FileTrustStore(path)
    assert reopened.get("hs.example") == A
    with pytest.raises(KeyChangedError):
        TrustPolicy(store=reopened).check("hs.example", B)
    doc = json.loads(path.read_text())
    assert doc["version"] == 1 and set(doc["peers"]) == {"hs.example"}


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        '{"version": 2, "peers": {}}',
        '{"version": 1, "peers": {"a": 1}}',
        '{"version": 1, "peers": {"a": "AAAA"}}',
    ],
)
def test_file_store_rejects_malformed_files(tmp_path: Path, content: str) -> None:
    path = tmp_path / "trust.json"
    path.write_text(content)
    with pytest.raises(ConfigValueError) as info:
        FileTrustStore(path)
    assert str(path) in str(info.value)
