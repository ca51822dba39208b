"""The module's config: defaults, good values, and a ConfigError naming the field for bad ones."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from synapse.config._base import ConfigError

from synapse_coap.errors import ConfigValueError
from synapse_coap.synapse.config import (
    CoapModuleConfig,
    TrustConfig,
    format_address,
    parse_address,
)
from synapse_coap.synapse.module import CoapModule

KEY = bytes(range(32))
KEY_B64 = base64.b64encode(KEY).decode().rstrip("=")


def parse(raw: Any) -> CoapModuleConfig:
    return CoapModule.parse_config(raw)


def test_defaults() -> None:
    cfg = parse({})
    assert cfg.listen == (("::", 5683),)
    assert cfg.plain_listen == ()
    assert cfg.private_key_path is None
    assert cfg.private_key_store == "file"
    assert cfg.trust == TrustConfig(peers={}, tofu=True, accept_unknown_clients=True)
    assert cfg.worker is None
    assert cfg.payload_dump is False
    assert cfg.binds_here(None)
    assert not cfg.binds_here("worker1")
    # None (an empty `config:` section in YAML) means the same
    assert parse(None) == cfg


def test_full_config() -> None:
    cfg = parse(
        {
            "listen": ["0.0.0.0:5683", "[::1]:6000"],
            "private_key_path": "/data/hs.coap.key",
            "trust": {
                "peers": {"other.example": KEY_B64, "padded.example": KEY_B64 + "="},
                "tofu": False,
                "accept_unknown_clients": False,
            },
            "plain_listen": ["127.0.0.1:5684", "[::1]:5684"],
            "limits": {"max_sessions": 10},
            "link": {"ack_timeout": 5, "max_retransmit": 6},
            "worker": "coap_worker",
            "payload_dump": True,
        }
    )
    assert cfg.listen == (("0.0.0.0", 5683), ("::1", 6000))
    assert cfg.plain_listen == (("127.0.0.1", 5684), ("::1", 5684))
    assert cfg.trust.peers == {"other.example": KEY, "padded.example": KEY}
    assert cfg.trust.tofu is False
    assert cfg.limits.max_sessions == 10
    assert cfg.link.ack_timeout == 5.0
    assert cfg.link.max_retransmit == 6
    assert cfg.binds_here("coap_worker") and not cfg.binds_here(None)
    assert cfg.payload_dump is True


def test_plain_on_public_interface_needs_opt_in() -> None:
    raw = {"plain_listen": ["0.0.0.0:5684"]}
    with pytest.raises(ConfigError) as e:
        parse(raw)
    assert "plain_listen[0]" in e.value.msg
    assert "allow_plain_on_public_interfaces" in e.value.msg
    cfg = parse({**raw, "allow_plain_on_public_interfaces": True})
    assert cfg.plain_listen == (("0.0.0.0", 5684),)


@pytest.mark.parametrize(
    "raw, field, hint",
    [
        ({"listen": "localhost:5683"}, "listen[0]", "IP address"),
        ({"listen": ["::1:5683"]}, "listen[0]", "[IPv6]:port"),
        ({"listen": ["127.0.0.1:70000"]}, "listen[0]", "port"),
        ({"listen": ["127.0.0.1"]}, "listen[0]", "IPv4:port"),
        ({"listen": [5683]}, "listen[0]", "IPv4:port"),
        ({"listen": {"a": 1}}, "listen", "list"),
        ({"listen": [], "plain_listen": []}, "listen", "at least one"),
        ({"private_key_path": 7}, "private_key_path", "file path"),
        ({"private_key_path": ""}, "private_key_path", "file path"),
        ({"private_key_store": "postgres"}, "private_key_store", "file, database"),
        ({"private_key_store": ["file"]}, "private_key_store", "file, database"),
        ({"asyncio_loop": "threads"}, "asyncio_loop", "reactor, thread"),
        ({"asyncio_loop": True}, "asyncio_loop", "reactor, thread"),
        ({"trust": []}, "trust", "mapping"),
        ({"trust": {"peers": ["a"]}}, "trust.peers", "mapping"),
        ({"trust": {"peers": {"x.example": "!!!"}}}, "trust.peers.x.example", "base64"),
        ({"trust": {"peers": {"x.example": "AAAA"}}}, "trust.peers.x.example", "32-byte"),
        ({"trust": {"peers": {"bad name": KEY_B64}}}, "trust.peers", "server name"),
        ({"trust": {"tofu": "yes"}}, "trust.tofu", "true or false"),
        ({"trust": {"accept_unknown_clients": 1}}, "trust.accept_unknown_clients", "true or false"),
        ({"trust": {"pinned": {}}}, "trust.pinned", "allowed: peers"),
        ({"plain_listen": ["10.0.0.1:5684"]}, "plain_listen[0]", "loopback"),
        ({"plain_listen": ["127.0.0.1:x"]}, "plain_listen[0]", "port"),
        ({"allow_plain_on_public_interfaces": "no"}, "allow_plain_on_public_interfaces", "true"),
        ({"limits": 3}, "limits", "mapping"),
        ({"limits": {"max_sessions": -1}}, "limits.max_sessions", ""),
        ({"limits": {"bogus": 1}}, "limits.bogus", ""),
        ({"link": []}, "link", "mapping"),
        ({"link": {"ack_timeout": -1}}, "link.ack_timeout", ""),
        ({"link": {"bogus": 1}}, "link.bogus", "allowed"),
        ({"worker": 5}, "worker", "instance name"),
        ({"payload_dump": "on"}, "payload_dump", "true or false"),
        ({"lsiten": []}, "lsiten", "allowed: listen"),
        ({"federation": []}, "federation", "mapping"),
        ({"federation": {"fallback": "maybe"}}, "federation.fallback", "https"),
        (
            {"federation": {"peers": {"a.test": {"endpoints": ["bad host!:5683"]}}}},
            "federation.peers.a.test.endpoints[0]",
            "IP literal",
        ),
        (
            {"federation": {"peers": {"a.test": "bad host!"}}},
            "federation.peers.a.test",
            "DNS hostname",
        ),
        ([], "config", "mapping"),
    ],
)
def test_bad_value_names_the_field(raw: Any, field: str, hint: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(raw)
    msg = e.value.msg
    assert f"config: {field}:" in msg, msg
    assert hint in msg, msg
    # the path points into the modules section
    assert e.value.path is not None
    assert list(e.value.path)[:3] == ["modules", "synapse_coap.CoapModule", "config"]


def test_federation_peer_keys_are_pinned() -> None:
    other = base64.b64encode(bytes(32)).decode()
    cfg = parse(
        {
            "federation": {
                "peers": {
                    "a.example": {"endpoints": "127.0.0.1:5683", "public_key": KEY_B64},
                    "b.example": {"endpoints": ["127.0.0.1:5684"], "public_key": KEY_B64},
                }
            },
            "trust": {"peers": {"b.example": other}},
        }
    )
    # trust.peers wins over a key given with a federation peer
    assert cfg.pinned_keys() == {"a.example": KEY, "b.example": bytes(32)}


def test_from_config_raises_value_error_not_config_error() -> None:
    # Only parse_config turns ConfigValueError into ConfigError.
    with pytest.raises(ConfigValueError) as e:
        CoapModuleConfig.from_config({"payload_dump": 1})
    assert e.value.path == "payload_dump"


@pytest.mark.parametrize(
    "text, addr",
    [
        ("0.0.0.0:5683", ("0.0.0.0", 5683)),
        ("[::]:5683", ("::", 5683)),
        ("[::1]:0", ("::1", 0)),
        ("127.0.0.1:65535", ("127.0.0.1", 65535)),
    ],
)
def test_address_round_trip(text: str, addr: tuple[str, int]) -> None:
    assert parse_address(text, "x") == addr
    assert format_address(addr) == text


def test_asyncio_loop() -> None:
    assert parse({}).asyncio_loop == "reactor"
    assert parse({"asyncio_loop": None}).asyncio_loop == "reactor"
    assert parse({"asyncio_loop": "thread"}).asyncio_loop == "thread"


def test_private_key_store() -> None:
    assert parse({"private_key_store": "database"}).private_key_store == "database"
    assert parse({"private_key_store": None}).private_key_store == "file"
    # with the database, private_key_path names a key file to import on first start
    cfg = parse({"private_key_store": "database", "private_key_path": "/data/old.coap.key"})
    assert (cfg.private_key_store, cfg.private_key_path) == ("database", "/data/old.coap.key")
