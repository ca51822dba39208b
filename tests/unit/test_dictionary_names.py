"""The newest profile's dictionary holds no name, id or text of the corpus or the lab.

scripts/build-maps neutralises the corpus before training (docs: maps/README.md);
this greps the dictionary it wrote for every user localpart, server name, key id,
room alias, display name and message text of tests/corpus (training, held-out and
the spec's examples) and for the names the lab and the demo used before they drew
random ones.  Profile 1's dictionary fails it ("alice" 39 times, "a_test" 30).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from synapse_coap.wire.profile import load_profile, profile_ids

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
#: names the lab and the demo used before each run drew its own (bench/lab_scenarios, lab/demo)
LAB_NAMES = ("alice", "bob", "Alice Liddell", "Bob", "scene message", "a_test")
_USER = re.compile(r"[@#]([^:\s\"]+):([A-Za-z0-9.-]+(?::[0-9]+)?)")
_KEY_ID = re.compile(r"ed25519:([A-Za-z0-9_]+)")
_TEXT_KEYS = ("body", "displayname", "topic")  # "name" is also Matrix vocabulary


def _strings(value: Any, key: str, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            out.append(("", k))
            _strings(v, k, out)
    elif isinstance(value, list):
        for v in value:
            _strings(v, key, out)
    elif isinstance(value, str):
        out.append((key, value))


def corpus_names() -> set[str]:
    names: set[str] = set()
    for path in sorted(CORPUS.rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            names.update(rec.get("servers") or ())
            strings: list[tuple[str, str]] = []
            _strings(rec, "", strings)
            for key, s in strings:
                for local, server in _USER.findall(s):
                    names.update((local, server))
                names.update(_KEY_ID.findall(s))
                if key in ("origin", "destination", "server_name", "device_id"):
                    names.add(s)
                if key in _TEXT_KEYS and len(s) >= 4:
                    names.add(s)
    return {n for n in names if len(n) >= 3}


def test_newest_dictionary_holds_no_corpus_or_lab_name() -> None:
    newest = max(profile_ids())
    dictionary = load_profile(newest).dictionary
    assert dictionary  # a dictionary-less profile would pass trivially
    names = corpus_names() | set(LAB_NAMES)
    assert {"alice", "bob", "a_test", "corpus.example.org"} <= names  # the corpus is read
    found = sorted(n for n in names if n.encode("utf-8") in dictionary)
    assert found == [], f"profile {newest}'s dictionary contains {found}"
