"""The corpus's JSON bodies, for the tests and harnesses that run the codec over all of
them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).resolve().parents[1] / "corpus"


def json_bodies() -> list[Any]:
    """Every JSON object or array under a ``body`` key in the corpus (training and
    held-out: requests, responses, and bodies nested in them), in file order."""
    found: list[Any] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            body = x.get("body")
            if isinstance(body, (dict, list)):
                found.append(body)
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for path in sorted(CORPUS.rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                walk(json.loads(line))
    return found


def json_requests() -> list[tuple[str, str, Any]]:
    """(method, target, JSON body) of every corpus request with a JSON body (training
    and held-out), in file order."""
    found: list[tuple[str, str, Any]] = []
    for path in sorted(CORPUS.rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            request = json.loads(line).get("request") or {}
            if isinstance(request.get("body"), (dict, list)):
                found.append((request["method"], request["target"], request["body"]))
    return found
