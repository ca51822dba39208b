"""sample_homeserver.yaml: the module's documented config parses, and its "defaults shown" are the defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from synapse_coap.synapse.config import CoapModuleConfig
from synapse_coap.synapse.module import CoapModule

SAMPLE = Path(__file__).resolve().parents[2] / "sample_homeserver.yaml"


def module_config() -> Any:
    doc = yaml.safe_load(SAMPLE.read_text())
    entries = [m for m in doc["modules"] if m["module"] == "synapse_coap.CoapModule"]
    assert len(entries) == 1, doc["modules"]
    return entries[0]["config"]


def test_sample_module_config_parses() -> None:
    raw = module_config()
    cfg = CoapModule.parse_config(raw)
    assert cfg.listen == (("::", 5683),)
    assert cfg.private_key_path == raw["private_key_path"]
    assert cfg.plain_listen == ()
    assert cfg.payload_dump is False


def test_sample_shows_the_real_defaults() -> None:
    """Where the sample says "defaults shown", the values are the parser's defaults."""
    sample = CoapModule.parse_config(module_config())
    defaults = CoapModuleConfig.from_config({})
    assert sample.limits == defaults.limits
    assert sample.link == defaults.link
    assert sample.transfers == defaults.transfers
    assert sample.trust == defaults.trust
    assert sample.worker == defaults.worker
    assert sample.allow_plain_on_public_interfaces == defaults.allow_plain_on_public_interfaces
