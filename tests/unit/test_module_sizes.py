"""No package module over about 600 lines without a reason stated in its docstring
(issue 16, "rooms of a livable size").

A module may pass 600 lines only if its docstring has a line starting ``Size:``
that says why it is one room; every other one is split by responsibility.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent.parent / "synapse_coap"
LIMIT = 600


def _sizes() -> dict[str, int]:
    return {
        str(path.relative_to(PACKAGE)): len(path.read_text().splitlines())
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def _states_a_reason(path: Path) -> bool:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return any(line.startswith("Size:") for line in doc.splitlines())


def test_no_module_over_the_limit_without_a_reason() -> None:
    over = {
        name: lines
        for name, lines in _sizes().items()
        if lines > LIMIT and not _states_a_reason(PACKAGE / name)
    }
    assert over == {}, f"split these, or say why in a 'Size:' docstring line: {over}"


def test_the_noise_endpoint_and_the_body_codec_are_split() -> None:
    sizes = _sizes()
    for part in (
        "endpoint",
        "initiator",
        "responder",
        "recordpath",
        "timers",
        "sessions",
        "limits",
    ):
        assert sizes[f"noise/{part}.py"] <= LIMIT, part
