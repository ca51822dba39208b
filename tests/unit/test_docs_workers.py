"""docs/deployment.md shows the worker configs the topology test runs, verbatim."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "docs" / "examples" / "workers").glob("*.yaml"))


def test_there_are_examples() -> None:
    assert {p.name for p in EXAMPLES} >= {
        "homeserver.yaml",
        "coap_module.yaml",
        "generic_worker.yaml",
        "media_worker.yaml",
        "federation_sender.yaml",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_each_example_is_in_the_deployment_doc_verbatim(path: Path) -> None:
    doc = (ROOT / "docs" / "deployment.md").read_text()
    assert f"```yaml\n{path.read_text()}```" in doc, path.name
    test = (ROOT / "tests" / "integration" / "test_workers_topology.py").read_text()
    assert f'"{path.name}"' in test, f"{path.name} is not used by the topology test"
