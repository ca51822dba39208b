"""``synapse_coap.CoapModule``: a CoAP (+ Noise) listener inside Synapse.

Load it from ``modules:`` in homeserver.yaml (see sample_homeserver.yaml and
docs/deployment.md)::

    modules:
      - module: synapse_coap.CoapModule
        config:
          listen: ["[::]:5683"]

Thin glue: the config is parsed by :mod:`synapse_coap.synapse.config`, the
asyncio side runs through :mod:`synapse_coap.synapse.bridge`, requests are
served in-process by :mod:`synapse_coap.synapse.dispatch`, the CoAP server
itself is the transport's :class:`~synapse_coap.transport.server.CoapServer`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from collections.abc import Callable
from typing import Any

from synapse.logging.context import make_deferred_yieldable
from synapse.module_api.errors import ConfigError
from twisted.internet import defer

from synapse_coap.errors import ConfigValueError
from synapse_coap.native import status as native_status
from synapse_coap.synapse import compat
from synapse_coap.synapse.bridge import Bridge
from synapse_coap.synapse.config import MAIN_INSTANCE, CoapModuleConfig, format_address
from synapse_coap.synapse.dispatch import InProcessDispatcher
from synapse_coap.synapse.metrics import SynapseCoapMetrics
from synapse_coap.synapse.store import KEY_TABLE, DatabaseKeyStore, DatabaseTrustStore

logger = logging.getLogger(__name__)


def default_key_path(server_name: str) -> str:
    """``<Synapse's data directory (its working directory)>/<server_name>.coap.key``."""
    return os.path.abspath(f"{server_name}.coap.key")


def load_or_generate_key(path: str) -> bytes:
    """Read the Noise static private key at ``path``; create it (mode 0600) if absent."""
    from synapse_coap.noise import keys

    if os.path.exists(path):
        return keys.read_key_file(path)
    private = keys.generate_private_key()
    keys.write_key_file(path, private)
    logger.info("synapse-coap: generated a new Noise static key at %s (mode 0600)", path)
    return private


class CoapModule:
    """The Synapse module. ``parse_config`` is the only place that raises ConfigError."""

    def __init__(self, config: CoapModuleConfig, api: Any) -> None:
        self._config = config
        self._api = api
        # Every private Synapse piece this module reaches through the HomeServer is
        # there, or Synapse stops here with a ConfigError naming its version and it.
        in_database = config.private_key_store == "database"
        compat.check_homeserver(api, tofu=config.trust.tofu or in_database)
        hs = compat.homeserver(api)
        self._homeserver = hs
        self.server: Any = None
        self.bridge: Bridge | None = None
        self.dispatcher: InProcessDispatcher | None = None
        self.trust_store: DatabaseTrustStore | None = None
        #: set (on the reactor thread) once the Noise key (private_key_store:
        #: database) and the TOFU store are loaded; awaited on the asyncio loop
        #: before the outbound federation client is created
        self._trust_loaded: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.trust: Any = None
        self.public_key: bytes | None = None
        self.federation_agent: Any = None
        self.metrics = SynapseCoapMetrics(hs.hostname)

        worker = api.worker_name
        self.binds = config.binds_here(worker)
        self._private_key: bytes | None = None
        self._key_store: DatabaseKeyStore | None = None
        if in_database:
            # every instance reads the one key from the database at start (_start)
            self._key_store = DatabaseKeyStore.for_homeserver(hs)
            self.key_path = config.private_key_path or ""  # only a key file to import
            self.key_source = f"database table {KEY_TABLE}"
            instance = worker or MAIN_INSTANCE
            self.replay_state_path = os.path.abspath(f"{hs.hostname}.{instance}.coap.replay")
        else:
            key_path = config.private_key_path or default_key_path(hs.hostname)
            self.key_path = key_path
            self.key_source = key_path
            # one watermark per listener instance: instances sharing a key file on
            # one machine must not overwrite each other's
            self.replay_state_path = (
                f"{key_path}.{worker or MAIN_INSTANCE}.replay"
                if config.workers is not None
                else f"{key_path}.replay"
            )
            if self.binds:
                self._private_key = load_or_generate_key(key_path)
            elif os.path.exists(key_path):
                from synapse_coap.noise import keys

                self._private_key = keys.read_key_file(key_path)
            else:
                logger.warning(
                    "synapse-coap: %s does not bind a CoAP listener (configured for %s) and "
                    "cannot read the Noise key at %s: federation over CoAP is off in this "
                    "process",
                    worker or "the main process",
                    ", ".join(n for n, i in config.workers.instances.items() if i.binds)
                    if config.workers is not None
                    else config.worker or "the main process",
                    key_path,
                )
                return

        from synapse_coap.noise import keys
        from synapse_coap.noise.trust import TrustPolicy

        if self._private_key is not None:
            self.public_key = keys.public_key(self._private_key)
        if config.trust.tofu:
            self.trust_store = DatabaseTrustStore.for_homeserver(hs)
        self.trust = TrustPolicy(
            pinned=config.pinned_keys(),
            store=self.trust_store,
            accept_any_initiator=config.trust.accept_unknown_clients,
        )

        self.bridge = Bridge.create(hs.get_reactor(), hs.hostname, config.asyncio_loop)
        self.bridge.install_shutdown()
        self._install_federation_agent()
        # __init__ is synchronous and runs with the reactor already running:
        # schedule the (asynchronous) start.
        compat.run_as_background_process("synapse_coap_start", hs.hostname, self._start)

    def _install_federation_agent(self) -> None:
        from synapse_coap.synapse.agent import install_federation_agent

        bridge = self.bridge
        if bridge is None:  # pragma: no cover
            return
        config = self._config
        trust = self.trust
        metrics = self.metrics

        trust_loaded = self._trust_loaded
        server_name = self._homeserver.hostname

        async def make_client() -> Any:

            from synapse_coap.transport.client import CoapClient

            # Do not check a first-seen key against a TOFU store that has not been
            # loaded from the database yet, nor start without the key (the loads
            # run on the reactor).
            await asyncio.wrap_future(trust_loaded)
            private = self._private_key
            if private is None:
                raise RuntimeError("synapse-coap: the Noise static key was not loaded")
            client = await CoapClient.create(
                static_key=private,
                trust=trust,
                link=config.link,
                limits=config.limits,
                metrics=metrics,
                server_name=server_name,
            )
            bridge.on_stop(client.close)
            return client

        self.federation_agent = install_federation_agent(
            self._api, bridge=bridge, config=config.federation, client_factory=make_client
        )

    @staticmethod
    def parse_config(config: Any) -> CoapModuleConfig:
        # Synapse's private pieces this module needs exist in this release (else ConfigError).
        compat.check_static()
        try:
            return CoapModuleConfig.from_config(config)
        except ConfigValueError as e:
            raise ConfigError(
                f"synapse_coap.CoapModule config: {e}",
                path=("modules", "synapse_coap.CoapModule", "config", *e.path.split(".")),
            ) from e

    def _require_key(self) -> bytes:
        if self._private_key is None:  # pragma: no cover - loaded before the server starts
            raise RuntimeError("synapse-coap: the Noise static key was not loaded")
        return self._private_key

    def __repr__(self) -> str:
        return f"<CoapModule listen={[format_address(a) for a in self._config.listen]}>"

    async def _start(self) -> None:
        # Let Synapse's start() finish first (other modules register their web
        # resources, the listeners start): we serve the same resource trees.
        later: defer.Deferred[None] = defer.Deferred()
        self._homeserver.get_reactor().callLater(0, later.callback, None)
        await make_deferred_yieldable(later)
        try:
            try:
                if self._key_store is not None:
                    await self._load_database_key(self._key_store)
                if self.trust_store is not None:
                    await self.trust_store.load()
            finally:
                if not self._trust_loaded.done():
                    self._trust_loaded.set_result(None)
            if self.binds:
                await self._start_server()
        except Exception:
            logger.critical(
                "synapse-coap: the CoAP listener could not start; stopping Synapse",
                exc_info=True,
            )
            self._homeserver.get_reactor().stop()

    async def _load_database_key(self, store: DatabaseKeyStore) -> None:
        """The shared Noise key from the database (private_key_store: database): a new
        one, or the key file named by ``private_key_path``, stored if there is none."""
        from synapse_coap.noise import keys

        path = self._config.private_key_path
        if path is not None and os.path.exists(path):
            candidate, origin = keys.read_key_file(path), f"imported from {path}"
        else:
            candidate, origin = keys.generate_private_key(), "generated"
        private, stored = await store.load_or_create(candidate)
        if stored:
            logger.info("synapse-coap: Noise static key %s into %s", origin, self.key_source)
        elif path is not None and os.path.exists(path):
            logger.warning(
                "synapse-coap: the key file %s is not the Noise key in %s; using the "
                "database's (public key %s)",
                path,
                self.key_source,
                keys.encode_public(keys.public_key(private)),
            )
        self._private_key = private
        self.public_key = keys.public_key(private)

    async def _start_server(self) -> None:
        from synapse_coap.transport.looplag import LoopLagProbe
        from synapse_coap.transport.server import CoapServer, ServerConfig

        config = self._config
        hs = self._homeserver
        bridge = self.bridge
        if bridge is None:  # pragma: no cover - only called when binding here
            raise RuntimeError("bridge not running")

        dispatcher = InProcessDispatcher(hs, bridge)
        self.dispatcher = dispatcher
        _ = dispatcher.site  # build the resource tree now, on the reactor thread
        serving: Any = dispatcher
        instance = self._api.worker_name or MAIN_INSTANCE
        if config.workers is not None:
            from synapse_coap.synapse.routing import HttpForwarder, RoutingDispatcher

            serving = RoutingDispatcher(
                local=dispatcher,
                workers=config.workers,
                instance=instance,
                bridge=bridge,
                forwarder=HttpForwarder(hs.get_reactor(), config.workers.forward_timeout),
            )
        listen, plain_listen = config.addresses_for(self._api.worker_name)
        server_config = ServerConfig(
            listen=listen,
            plain_listen=plain_listen,
            static_key=self._require_key(),
            trust=self.trust,
            limits=config.limits,
            link=config.link,
            server_name=hs.hostname,
            max_body_size=dispatcher.max_request_body_size,
            payload_dump=config.payload_dump,
            push=config.push,
            replay_state_path=self.replay_state_path,
            transfers=config.transfers,
        )
        metrics = self.metrics

        async def start() -> Any:
            server = await CoapServer.start(server_config, serving, metrics=metrics)
            # the loop's stalls, as synapse_coap_loop_lag_seconds (while there is traffic:
            # an idle listener does not wake the reactor 100 times a second for it). A
            # timer, not a task: with the default reactor the reactor's own (the guest
            # loop runs on its timers; a task's wake-up cost a whole loop iteration)
            loop = asyncio.get_running_loop()
            call_later = bridge.reactor.callLater if bridge.mode == "guest" else loop.call_later

            def on_traffic(resume: Callable[[], None]) -> None:
                metrics.wait_for_traffic(loop).add_done_callback(lambda _: resume())

            probe = LoopLagProbe(
                metrics.loop_lag,
                call_later=call_later,
                activity=lambda: metrics.traffic,
                on_traffic=on_traffic,
            )
            probe.start()

            async def stop_probe() -> None:
                probe.stop()

            bridge.on_stop(stop_probe)
            return server

        server = await make_deferred_yieldable(bridge.submit(start))
        self.server = server
        bridge.on_stop(server.close)

        from synapse_coap.noise.keys import encode_public

        addresses = [format_address(tuple(a)) for a in server.addresses]
        logger.info(
            "synapse-coap: CoAP listener ready on %s (Noise on %s, plain on %s; %s reactor "
            "mode%s; instance %s%s; %s); Noise public key %s (from %s)",
            ", ".join(addresses),
            ", ".join(format_address(a) for a in listen) or "-",
            ", ".join(format_address(a) for a in plain_listen) or "-",
            bridge.mode,
            (
                ", Noise sockets read by the reactor"
                if any(iface.read_by_driver for iface in server.noise_interfaces)
                else ""
            ),
            instance,
            ", routing by workers.routes" if config.workers is not None else "",
            native_status().describe(),
            encode_public(self.public_key or b""),
            self.key_source,
        )
