"""The Synapse compat module: every piece present here, and a missing one named at start."""

from __future__ import annotations

from typing import Any

import pytest
import synapse
import synapse.app._base
import synapse.app.homeserver  # imported before a test deletes a name it imports
from synapse.module_api.errors import ConfigError

from synapse_coap.synapse import compat
from synapse_coap.synapse.module import CoapModule


def test_every_static_piece_is_present_in_this_synapse() -> None:
    compat.check_static()
    assert all(compat._run(p) for p in compat.PIECES if not p.needs_homeserver)


def test_a_piece_monkeypatched_away_stops_parse_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(synapse.app._base, "max_request_body_size")
    with pytest.raises(ConfigError) as e:
        CoapModule.parse_config({})
    message = str(e.value)
    assert f"Synapse {synapse.__version__}" in message
    assert "synapse.app._base.max_request_body_size" in message
    assert compat.CHECKED_RANGE in message


class _NoHomeServer:
    """A ModuleApi whose HomeServer moved (a release without ``_hs``)."""

    worker_name: Any = None


def test_a_missing_homeserver_piece_is_named() -> None:
    with pytest.raises(ConfigError, match=r"lacks synapse\.module_api\.ModuleApi\._hs"):
        compat.check_homeserver(_NoHomeServer())


def test_server_name_label_is_synapses() -> None:
    from synapse.metrics import SERVER_NAME_LABEL

    assert compat.server_name_label() == SERVER_NAME_LABEL


def test_aiocoap_piece_monkeypatched_away_stops_parse_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import aiocoap.messagemanager

    from synapse_coap.transport import aiocoap_compat

    aiocoap_compat.check()
    monkeypatch.delattr(aiocoap.messagemanager.MessageManager, "_continue_backlog")
    with pytest.raises(ConfigError) as e:
        CoapModule.parse_config({})
    message = str(e.value)
    from importlib.metadata import version

    assert f"aiocoap {version('aiocoap')}" in message
    assert "MessageManager._continue_backlog(remote)" in message
