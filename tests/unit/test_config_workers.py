"""The ``workers`` section: instances, routes in the shape of Synapse's worker routing."""

from __future__ import annotations

from typing import Any

import pytest

from synapse_coap.errors import ConfigValueError
from synapse_coap.synapse.config import CoapModuleConfig

BASE: dict[str, Any] = {
    "instances": {
        "main": {"listen": ["[::]:5683"], "http": "http://127.0.0.1:8080"},
        "generic1": {"listen": ["0.0.0.0:5684"], "http": "http://127.0.0.1:8081"},
        "media1": {"http": "http://127.0.0.1:8085/"},
    },
    "routes": {
        "generic1": ["^/_matrix/client/(r0|v3)/sync$", "^/_matrix/federation/v1/send/"],
        "media1": ["^/_matrix/media/", "^/_matrix/client/v1/media/"],
    },
}


def parse(workers: Any, **top: Any) -> CoapModuleConfig:
    return CoapModuleConfig.from_config({"workers": workers, **top})


def test_each_listener_instance_binds_its_own_addresses_and_others_bind_none() -> None:
    cfg = parse(BASE)
    assert cfg.binds_here(None) and cfg.binds_here("generic1")
    assert not cfg.binds_here("media1") and not cfg.binds_here("federation_sender1")
    assert cfg.addresses_for(None) == ((("::", 5683),), ())
    assert cfg.addresses_for("generic1") == ((("0.0.0.0", 5684),), ())
    assert cfg.addresses_for("media1") == ((), ())
    assert cfg.workers is not None
    assert cfg.workers.instances["media1"].http == "http://127.0.0.1:8085"


@pytest.mark.parametrize(
    ("path", "instance"),
    [
        ("/_matrix/client/v3/sync", "generic1"),
        ("/_matrix/federation/v1/send/123", "generic1"),
        ("/_matrix/media/v3/upload", "media1"),
        ("/_matrix/client/v1/media/download/a/b", "media1"),
        ("/_matrix/client/v3/rooms/!r:x/send/m.room.message/1", "main"),
        ("/_matrix/client/v3/sync/extra", "main"),
    ],
)
def test_first_matching_route_wins_and_the_rest_goes_to_the_default(
    path: str, instance: str
) -> None:
    workers = parse(BASE).workers
    assert workers is not None and workers.instance_for(path) == instance


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"routes": {"generic9": ["^/"]}}, "workers.routes.generic9"),
        ({"default": "generic9"}, "workers.default"),
    ],
)
def test_an_unknown_instance_is_refused_naming_the_field(
    change: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigValueError) as e:
        parse({**BASE, **change})
    assert e.value.path == field
    assert "unknown instance 'generic9'" in str(e.value) and "main, generic1, media1" in str(
        e.value
    )


@pytest.mark.parametrize(
    ("workers", "top", "field"),
    [
        ({**BASE, "routes": {"media1": ["^/_matrix/(media"]}}, {}, "workers.routes.media1[0]"),
        (
            {**BASE, "instances": {**BASE["instances"], "media1": {}}},
            {},
            "workers.instances.media1.http",
        ),
        (
            {"instances": {"media1": {"http": "http://x:1"}}, "default": "media1"},
            {},
            "workers.instances",
        ),
        (
            {**BASE, "instances": {**BASE["instances"], "main": {"http": "ftp://x"}}},
            {},
            "workers.instances.main.http",
        ),
        (
            {"instances": {"main": {"plain_listen": ["10.0.0.1:5683"]}}},
            {},
            "workers.instances.main.plain_listen[0]",
        ),
        ({**BASE, "instances": {"main": {"port": 1}}}, {}, "workers.instances.main.port"),
        ({**BASE, "forward_timeout": 0}, {}, "workers.forward_timeout"),
        (BASE, {"worker": "generic1"}, "worker"),
        (BASE, {"listen": ["[::]:5683"]}, "listen"),
    ],
)
def test_bad_workers_config_names_the_field(
    workers: dict[str, Any], top: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigValueError) as e:
        parse(workers, **top)
    assert e.value.path == field, str(e.value)


def test_without_workers_the_single_worker_option_still_works() -> None:
    cfg = CoapModuleConfig.from_config({"worker": "generic1"})
    assert cfg.binds_here("generic1") and not cfg.binds_here(None)
    assert cfg.addresses_for("generic1") == ((("::", 5683),), ())
    assert cfg.addresses_for(None) == ((), ())


def test_a_pool_member_serves_what_its_own_routes_claim_others_go_to_the_first() -> None:
    pool = {
        **BASE,
        "routes": {
            "generic1": ["^/_matrix/client/(r0|v3)/sync$"],
            "main": ["^/_matrix/client/(r0|v3)/sync$", "^/_matrix/client/v3/login$"],
        },
    }
    workers = parse(pool).workers
    assert workers is not None
    sync = "/_matrix/client/v3/sync"
    assert workers.instance_for(sync, "main") == "main"  # served where it arrived
    assert workers.instance_for(sync, "generic1") == "generic1"
    assert workers.instance_for(sync, "media1") == "generic1"  # the first in order
    assert workers.instance_for("/_matrix/client/v3/login", "generic1") == "main"
    assert workers.instance_for("/_matrix/client/v3/createRoom", "generic1") == "main"


def test_the_routing_dispatcher_hands_kept_answers_to_the_local_dispatcher() -> None:
    """(synapse/routing.py) ``answer_later`` goes to the local in-process dispatcher
    where it has one (the answers of the requests this instance serves), else the
    caller answers at once."""
    from collections.abc import Callable

    from synapse_coap.synapse.routing import RoutingDispatcher

    cfg = parse(BASE)
    assert cfg.workers is not None
    kept: list[Callable[[], None]] = []

    class _Local:
        max_request_body_size = 1

        def answer_later(self, answer: Callable[[], None]) -> bool:
            kept.append(answer)
            return True

    class _Plain:
        max_request_body_size = 1

    def routing(local: Any) -> RoutingDispatcher:
        return RoutingDispatcher(
            local=local,
            workers=cfg.workers,
            instance="main",
            bridge=None,
            forwarder=None,  # type: ignore[arg-type]
        )

    def answer() -> None:
        pass

    assert routing(_Local()).answer_later(answer) and kept == [answer]
    assert not routing(_Plain()).answer_later(answer)
