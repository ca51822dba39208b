"""Wire profiles: versioned tables (routes, query keys, JSON keys, values) + a dictionary.

A profile lives in ``maps/profile-<id>/``.  Its ``manifest.json`` records the
sha256 of every file and a content hash over all of them; peers negotiate a
profile by ``(id, content_hash)``, so two nodes only use a profile when their
copies are byte-identical.  Profile 0 is profile 1's tables without the
dictionary (the fallback every node has).

Content hash (hex in the manifest, 32 raw bytes in :attr:`Profile.content_hash`)::

    sha256( for name in PROFILE_FILES:  name + "\\n" + sha256(file bytes) )

with a missing file hashed as empty.  Profile 0's content hash uses the same
formula over the same files, except ``dictionary.bin`` counts as empty.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import attrs

from synapse_coap.errors import LocalProtocolError
from synapse_coap.wire.routes import RouteTable

logger = logging.getLogger(__name__)

#: The files of a profile, in the order the content hash covers them.
PROFILE_FILES = ("routes.json", "query_keys.json", "keys.json", "values.json", "dictionary.bin")
MANIFEST = "manifest.json"
#: The profile whose tables profile 0 reuses.
BASE_TABLES_PROFILE = 1
#: Value-table entries beyond this have no CBOR simple value.
MAX_VALUES = 244


@attrs.frozen
class Profile:
    """One wire profile; see the module docstring."""

    id: int
    content_hash: bytes = attrs.field(repr=lambda h: h.hex()[:16])
    routes: RouteTable = attrs.field(repr=False)
    query_keys: tuple[str, ...] = attrs.field(repr=False)
    keys: tuple[str, ...] = attrs.field(repr=False)
    values: tuple[str, ...] = attrs.field(repr=False)
    dictionary: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")
    path: Path | None = attrs.field(default=None, eq=False)


def maps_dir() -> Path:
    """Where the maps are: ``synapse_coap/maps`` in a wheel, else the checkout's ``maps/``."""
    package = Path(__file__).resolve().parent.parent
    installed = package / "maps"
    if installed.is_dir():
        return installed
    return package.parent / "maps"


def file_hashes(directory: Path, *, with_dictionary: bool = True) -> dict[str, str]:
    """sha256 (hex) of each profile file; missing files hash as empty."""
    out = {}
    for name in PROFILE_FILES:
        p = directory / name
        data = p.read_bytes() if p.is_file() else b""
        if name == "dictionary.bin" and not with_dictionary:
            data = b""
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def content_hash_of(hashes: dict[str, str]) -> bytes:
    h = hashlib.sha256()
    for name in PROFILE_FILES:
        h.update(name.encode() + b"\n" + bytes.fromhex(hashes[name]))
    return h.digest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LocalProtocolError(f"cannot read profile file {path}: {e}") from e


def _string_list(obj: Any, field: str, path: Path) -> tuple[str, ...]:
    items = obj.get(field) if isinstance(obj, dict) else obj
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise LocalProtocolError(f"{path}: expected a list of strings under {field!r}")
    if len(set(items)) != len(items):
        raise LocalProtocolError(f"{path}: duplicate entries in {field!r}")
    return tuple(items)


def load_profile_from(directory: Path, profile_id: int) -> Profile:
    """Load profile ``profile_id`` from a maps directory (not cached); verifies hashes."""
    if profile_id < 0:
        raise LocalProtocolError(f"no such profile: {profile_id}")
    tables_id = BASE_TABLES_PROFILE if profile_id == 0 else profile_id
    pdir = Path(directory) / f"profile-{tables_id}"
    if not pdir.is_dir():
        raise LocalProtocolError(f"no such profile: {profile_id} ({pdir} does not exist)")
    hashes = file_hashes(pdir)
    manifest_path = pdir / MANIFEST
    if manifest_path.is_file():
        manifest = _read_json(manifest_path)
        recorded = manifest.get("files", {}) if isinstance(manifest, dict) else {}
        bad = [n for n in PROFILE_FILES if recorded.get(n) != hashes[n]]
        if bad or manifest.get("content_hash") != content_hash_of(hashes).hex():
            raise LocalProtocolError(
                f"profile {tables_id} in {pdir} does not match its manifest "
                f"(changed: {', '.join(bad) or 'content_hash'}); the maps are corrupt or were "
                f"edited without running scripts/build-maps --manifest-only"
            )
        if manifest.get("id") != tables_id:
            raise LocalProtocolError(f"{manifest_path}: id is not {tables_id}")
    else:
        logger.warning("profile %d has no manifest; computing its hash", tables_id)

    keys = _string_list(_read_json(pdir / "keys.json"), "keys", pdir / "keys.json")
    values = _string_list(_read_json(pdir / "values.json"), "values", pdir / "values.json")
    if len(values) > MAX_VALUES:
        raise LocalProtocolError(f"{pdir / 'values.json'}: more than {MAX_VALUES} values")
    qk_path = pdir / "query_keys.json"
    query_keys = (
        _string_list(_read_json(qk_path), "query_keys", qk_path) if qk_path.is_file() else ()
    )
    routes_path = pdir / "routes.json"
    if not routes_path.is_file():
        raise LocalProtocolError(f"profile {tables_id}: {routes_path} is missing")
    routes = RouteTable.from_json(_read_json(routes_path))
    dict_path = pdir / "dictionary.bin"
    dictionary = dict_path.read_bytes() if dict_path.is_file() else b""
    if profile_id == 0:
        dictionary = b""
        chash = content_hash_of(file_hashes(pdir, with_dictionary=False))
    else:
        chash = content_hash_of(hashes)
    return Profile(
        id=profile_id,
        content_hash=chash,
        routes=routes,
        query_keys=query_keys,
        keys=keys,
        values=values,
        dictionary=dictionary,
        path=pdir,
    )


@functools.cache
def load_profile(profile_id: int) -> Profile:
    """The installed profile ``profile_id`` (cached). LocalProtocolError if absent or corrupt."""
    return load_profile_from(maps_dir(), profile_id)


def profile_ids(directory: Path | None = None) -> tuple[int, ...]:
    """Ids of the profiles present in a maps directory (always including 0), highest first."""
    d = maps_dir() if directory is None else directory
    ids = {0}
    for p in d.glob("profile-*"):
        suffix = p.name.removeprefix("profile-")
        if p.is_dir() and suffix.isdigit():
            ids.add(int(suffix))
    return tuple(sorted(ids, reverse=True))


def supported_profiles() -> tuple[Profile, ...]:
    """Every installed profile, highest id first (profile 0 last)."""
    return tuple(load_profile(i) for i in profile_ids())
