"""The CoAP server's configuration (:class:`ServerConfig`): where and how to listen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs

from synapse_coap.errors import (
    ConfigValueError,
)
from synapse_coap.mapping.push import (
    PushConfig,
)
from synapse_coap.noise.trust import TrustPolicy
from synapse_coap.transport.convert import (
    server_name_payload,
    supported_profile_offers,
)
from synapse_coap.transport.link import LinkParameters
from synapse_coap.transport.noise_udp import (
    SessionEndpoint,
)
from synapse_coap.transport.replay_state import (
    read_replay_state,
)
from synapse_coap.transport.transfers import TransferLimits

DEFAULT_RESOURCES: tuple[str, ...] = (
    "/_matrix/client",
    "/_matrix/federation",
    "/_matrix/key",
    "/_matrix/media",
    "/.well-known/matrix",
)


def _limits_default() -> Any:
    from synapse_coap.noise.endpoint import NoiseLimits  # type: ignore

    return NoiseLimits()


def _address_list(value: Any) -> tuple[tuple[str, int], ...]:
    out = []
    for item in value:
        host, port = item
        out.append((str(host), int(port)))
    return tuple(out)


@attrs.frozen
class ServerConfig:
    """Where and how to listen.

    ``listen``: Noise/UDP sockets (``::`` is dual-stack); ``plain_listen``:
    unencrypted CoAP sockets (opt-in, for loopback tooling and private
    networks). ``static_key``: our X25519 private key (required when
    ``listen`` is not empty). ``max_body_size`` caps reassembled (Block1)
    request bodies. ``payload_dump`` logs decrypted requests at DEBUG (never
    on in production). ``resources``: the paths ``/.well-known/core`` lists.
    ``replay_state_path``: a small file where the 0-RTT anti-replay watermark is
    kept across restarts (docs/security.md); None: a restart forgets it.

    ``transfers``: the byte budget of blockwise transfer state and the
    per-session limits (:class:`TransferLimits`).

    ``fast_path``: serve the common exchange (one datagram each way on a Noise
    session) without aiocoap's per-message pipeline
    (:mod:`synapse_coap.transport.fastpath`); off, every request goes through aiocoap.
    """

    listen: tuple[tuple[str, int], ...] = attrs.field(
        default=(("::", 5683),), converter=_address_list
    )
    plain_listen: tuple[tuple[str, int], ...] = attrs.field(default=(), converter=_address_list)
    static_key: bytes | None = None
    trust: TrustPolicy = attrs.field(factory=lambda: TrustPolicy(accept_any_initiator=True))
    limits: Any = attrs.field(factory=_limits_default)
    link: LinkParameters = attrs.field(factory=LinkParameters)
    server_name: str | None = None
    max_body_size: int = 50 * 1024 * 1024
    payload_dump: bool = False
    resources: tuple[str, ...] = DEFAULT_RESOURCES
    replay_state_path: str | None = None
    transfers: TransferLimits = attrs.field(factory=TransferLimits)
    push: PushConfig = attrs.field(factory=PushConfig)
    fast_path: bool = True

    def __attrs_post_init__(self) -> None:
        if self.listen and self.static_key is None:
            raise ConfigValueError("static_key", "a static key is required for Noise listeners")
        if self.static_key is not None and len(self.static_key) != 32:
            raise ConfigValueError("static_key", "must be a 32-byte X25519 private key")
        if self.max_body_size < 1024:
            raise ConfigValueError("max_body_size", "must be at least 1024 bytes")

        for i, (_host, port) in enumerate(self.listen + self.plain_listen):
            if not 0 <= port <= 65535:
                raise ConfigValueError(f"listen[{i}]", f"port {port} out of range 0..65535")


def _default_endpoint(config: ServerConfig, clock: Callable[[], float]) -> SessionEndpoint:
    from synapse_coap.noise.endpoint import NoiseEndpoint  # type: ignore

    if config.static_key is None:
        raise ConfigValueError("static_key", "a static key is required for Noise listeners")
    endpoint: SessionEndpoint = NoiseEndpoint(
        config.static_key,
        trust=config.trust,
        limits=config.limits,
        profiles=supported_profile_offers(),
        app_payload=server_name_payload(config.server_name),
        clock=clock,
        link_bandwidth_bps=config.link.bandwidth_bps,
        early_data_not_before=read_replay_state(
            config.replay_state_path,
            now=time.time(),
            window=float(getattr(config.limits, "early_data_window", 60.0)),
        ),
    )
    return endpoint
