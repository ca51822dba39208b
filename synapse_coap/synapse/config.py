"""The module's configuration: frozen attrs classes parsed from the ``config:`` dict.

Every ``from_config`` raises :class:`~synapse_coap.errors.ConfigValueError`
naming the offending field (a dotted path such as ``trust.peers.example.org``)
and what it allows. :meth:`synapse_coap.synapse.module.CoapModule.parse_config`
is the only place that turns that into Synapse's ``ConfigError``.

Example (every field, with its default)::

    listen: ["[::]:5683"]
    private_key_path: null      # default: <signing key directory>/<server_name>.coap.key
    private_key_store: file     # or database: the key in table synapse_coap_keys
    trust:
      peers: {}                 # server name -> pinned Noise static public key (base64)
      tofu: true                # remember first-seen keys in Synapse's database
      accept_unknown_clients: true
    plain_listen: []            # plain (unencrypted) CoAP, loopback only by default
    allow_plain_on_public_interfaces: false
    limits: {}                  # see NoiseLimits
    link: {}                    # see LinkParameters
    transfers: {}               # see TransferLimits (blockwise memory budget)
    worker: null                # instance name that binds the listener; null = main process
    workers: null               # several listener instances + request routing (WorkersConfig)
    payload_dump: false
    federation: {}              # outbound federation over CoAP (see docs/federation.md)
    push: {}                    # /sync push over CoAP Observe (see PushConfig, docs/clients.md)
    asyncio_loop: reactor       # default reactor only: drive aiocoap's loop from Synapse's
                                # reactor thread, or run it in a thread of its own ("thread")
"""

from __future__ import annotations

import base64
import binascii
import importlib
import ipaddress
import re
from collections.abc import Mapping
from typing import Any

import attrs

from synapse_coap.errors import ConfigValueError

DEFAULT_LISTEN: tuple[tuple[str, int], ...] = (("::", 5683),)

_TOP_KEYS = (
    "listen",
    "private_key_path",
    "private_key_store",
    "trust",
    "plain_listen",
    "allow_plain_on_public_interfaces",
    "limits",
    "link",
    "transfers",
    "worker",
    "workers",
    "payload_dump",
    "federation",
    "push",
    "asyncio_loop",
)
_TRUST_KEYS = ("peers", "tofu", "accept_unknown_clients")

#: Where the Noise static private key lives: ``file`` (``private_key_path``) or
#: ``database`` (the ``synapse_coap_keys`` table, shared by every instance).
KEY_STORES = ("file", "database")

#: ``asyncio_loop``: where the module's asyncio loop runs beside Synapse's default
#: reactor (synapse_coap.synapse.bridge.Bridge.create)
ASYNCIO_LOOPS = ("reactor", "thread")


def parse_address(text: object, path: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``; host must be an IP literal."""
    allowed = 'a string "IPv4:port" or "[IPv6]:port" with port 0-65535, e.g. "[::]:5683"'
    if not isinstance(text, str):
        raise ConfigValueError(path, f"expected {allowed}, got {text!r}")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigValueError(path, f"expected {allowed}, got {text!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ConfigValueError(path, f"expected {allowed}, got {text!r}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigValueError(path, f"{host!r} is not an IP address; expected {allowed}") from None
    if isinstance(ip, ipaddress.IPv6Address) and not text.startswith("["):
        raise ConfigValueError(path, f"IPv6 addresses need brackets; expected {allowed}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigValueError(path, f"bad port {port_text!r}; expected {allowed}")
    return (str(ip), int(port_text))


def format_address(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _address_list(value: object, path: str, default: tuple[tuple[str, int], ...]) -> Any:
    if value is None:
        return default
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ConfigValueError(path, f"expected a list of addresses, got {type(value).__name__}")
    return tuple(parse_address(v, f"{path}[{i}]") for i, v in enumerate(value))


def _bool(value: object, path: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigValueError(path, f"expected true or false, got {value!r}")
    return value


def _check_keys(raw: Mapping[str, Any], allowed: tuple[str, ...], path: str) -> None:
    for key in raw:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigValueError(where, f"unknown option; allowed: {', '.join(allowed)}")


def decode_key(text: object, path: str) -> bytes:
    """A 32-byte Curve25519 public key in (padded or unpadded) standard or URL-safe base64."""
    allowed = (
        "a 32-byte Curve25519 public key in base64 (as printed by `synapse-coap pubkey KEYFILE`)"
    )
    if not isinstance(text, str):
        raise ConfigValueError(path, f"expected {allowed}, got {text!r}")
    s = text.strip().replace("-", "+").replace("_", "/").rstrip("=")
    try:
        key = base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigValueError(path, f"not valid base64; expected {allowed}") from None
    if len(key) != 32:
        raise ConfigValueError(path, f"decodes to {len(key)} bytes; expected {allowed}")
    return key


@attrs.frozen
class TrustConfig:
    """Which Noise static keys the module accepts for which server names.

    ``peers``: pinned keys (server name -> key); a pinned peer presenting any
    other key is refused. ``tofu``: remember the first key seen for an
    unpinned server name in Synapse's database and refuse a changed key
    afterwards. ``accept_unknown_clients``: accept initiators that claim no
    server name (client sidecars; they authenticate with access tokens).
    """

    peers: Mapping[str, bytes] = attrs.field(factory=dict)
    tofu: bool = True
    accept_unknown_clients: bool = True

    @classmethod
    def from_config(cls, raw: object, path: str = "trust") -> TrustConfig:
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ConfigValueError(path, f"expected a mapping with keys {', '.join(_TRUST_KEYS)}")
        _check_keys(raw, _TRUST_KEYS, path)
        peers_raw = raw.get("peers") or {}
        if not isinstance(peers_raw, Mapping):
            raise ConfigValueError(
                f"{path}.peers", "expected a mapping of server name -> base64 public key"
            )
        peers: dict[str, bytes] = {}
        for name, key in peers_raw.items():
            if not isinstance(name, str) or not name or any(c.isspace() for c in name):
                raise ConfigValueError(f"{path}.peers", f"bad server name {name!r}")
            peers[name] = decode_key(key, f"{path}.peers.{name}")
        return cls(
            peers=peers,
            tofu=_bool(raw.get("tofu"), f"{path}.tofu", True),
            accept_unknown_clients=_bool(
                raw.get("accept_unknown_clients"), f"{path}.accept_unknown_clients", True
            ),
        )


MAIN_INSTANCE = "main"
_WORKERS_KEYS = ("instances", "routes", "default", "forward_timeout")
_INSTANCE_KEYS = ("listen", "plain_listen", "http")


@attrs.frozen
class InstanceConfig:
    """One Synapse instance as the module sees it: its CoAP addresses (none: it binds
    no listener) and the base URL of its HTTP listener (for forwarded requests)."""

    name: str
    listen: tuple[tuple[str, int], ...] = ()
    plain_listen: tuple[tuple[str, int], ...] = ()
    http: str | None = None

    @property
    def binds(self) -> bool:
        return bool(self.listen or self.plain_listen)


@attrs.frozen
class WorkersConfig:
    """A worker deployment (docs/deployment.md, "Workers").

    ``instances``: Synapse instance name (``main`` for the main process, else a
    ``worker_name``) -> ``listen`` / ``plain_listen`` (CoAP listeners on that
    instance; any number of instances may bind) and ``http`` (its HTTP listener's
    base URL, ``http://host:port``, where requests routed to it are forwarded).
    ``routes``: instance -> path regexes, Synapse's worker routing as a reverse
    proxy states it. A listener serves a request itself when one of its own
    regexes matches (so a pool of workers may list the same ones); otherwise
    the first instance, in order, with a matching regex serves it.
    ``default``: the instance for paths no regex matches.
    ``forward_timeout``: seconds a forwarded request may take before it is
    answered 504 (long-poll /sync waits up to its own timeout first).
    """

    instances: Mapping[str, InstanceConfig]
    routes: tuple[tuple[str, tuple[re.Pattern[str], ...]], ...] = ()
    default: str = MAIN_INSTANCE
    forward_timeout: float = 90.0

    @classmethod
    def from_config(cls, raw: object, path: str = "workers") -> WorkersConfig:
        if not isinstance(raw, Mapping):
            raise ConfigValueError(path, f"expected a mapping with keys {', '.join(_WORKERS_KEYS)}")
        _check_keys(raw, _WORKERS_KEYS, path)
        inst_raw = raw.get("instances")
        if not isinstance(inst_raw, Mapping) or not inst_raw:
            raise ConfigValueError(
                f"{path}.instances",
                "expected a mapping of instance name (main or a worker_name) -> "
                "{listen, plain_listen, http}",
            )
        instances: dict[str, InstanceConfig] = {}
        for name, body in inst_raw.items():
            where = f"{path}.instances.{name}"
            if not isinstance(name, str) or not name or any(c.isspace() for c in name):
                raise ConfigValueError(f"{path}.instances", f"bad instance name {name!r}")
            body = {} if body is None else body
            if not isinstance(body, Mapping):
                raise ConfigValueError(
                    where, "expected a mapping with keys listen, plain_listen, http"
                )
            _check_keys(body, _INSTANCE_KEYS, where)
            http = body.get("http")
            if http is not None and (
                not isinstance(http, str) or not re.fullmatch(r"https?://[^/\s]+/?", http)
            ):
                raise ConfigValueError(
                    f"{where}.http",
                    f"expected a base URL such as http://127.0.0.1:8008, got {http!r}",
                )
            instances[name] = InstanceConfig(
                name=name,
                listen=_address_list(body.get("listen"), f"{where}.listen", ()),
                plain_listen=_address_list(body.get("plain_listen"), f"{where}.plain_listen", ()),
                http=http.rstrip("/") if isinstance(http, str) else None,
            )
        known = ", ".join(instances)

        def instance(name: object, where: str) -> str:
            if not isinstance(name, str) or name not in instances:
                raise ConfigValueError(
                    where, f"unknown instance {name!r}; the instances are: {known}"
                )
            return name

        routes_raw = raw.get("routes") or {}
        if not isinstance(routes_raw, Mapping):
            raise ConfigValueError(
                f"{path}.routes", "expected a mapping of instance -> [path regex]"
            )
        routes: list[tuple[str, tuple[re.Pattern[str], ...]]] = []
        for name, patterns in routes_raw.items():
            where = f"{path}.routes.{name}"
            instance(name, where)
            if isinstance(patterns, str):
                patterns = [patterns]
            if not isinstance(patterns, list):
                raise ConfigValueError(where, "expected a list of path regexes")
            compiled = []
            for i, pattern in enumerate(patterns):
                try:
                    if not isinstance(pattern, str):
                        raise TypeError
                    compiled.append(re.compile(pattern))
                except (re.error, TypeError):
                    raise ConfigValueError(
                        f"{where}[{i}]", f"not a regular expression: {pattern!r}"
                    ) from None
            routes.append((name, tuple(compiled)))
        default = instance(raw.get("default", MAIN_INSTANCE), f"{path}.default")
        timeout = raw.get("forward_timeout", 90.0)
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not 0 < timeout <= 3600
        ):
            raise ConfigValueError(
                f"{path}.forward_timeout", f"expected seconds, 0 < t <= 3600, got {timeout!r}"
            )
        if not any(i.binds for i in instances.values()):
            raise ConfigValueError(
                f"{path}.instances", "no instance has a listen or plain_listen address"
            )
        # every instance a listener may forward to needs an HTTP address
        targets = {default} | {name for name, _ in routes}
        for name in sorted(targets):
            listeners_elsewhere = any(i.binds and i.name != name for i in instances.values())
            if listeners_elsewhere and instances[name].http is None:
                raise ConfigValueError(
                    f"{path}.instances.{name}.http",
                    "requests are routed to this instance from listeners on other "
                    "instances: give its HTTP listener's base URL, e.g. http://10.0.0.2:8008",
                )
        return cls(
            instances=instances,
            routes=tuple(routes),
            default=default,
            forward_timeout=float(timeout),
        )

    def instance_for(self, path: str, receiving: str | None = None) -> str:
        """The instance that serves ``path`` (the request target without its query).

        ``receiving``: the instance the request arrived on. If one of its own
        regexes matches, it serves the request itself (several instances may
        list the same regexes, as a pool of generic workers does); otherwise the
        first instance with a matching regex; otherwise ``default``."""
        first: str | None = None
        for name, patterns in self.routes:
            if any(pattern.search(path) for pattern in patterns):
                if name == receiving:
                    return name
                if first is None:
                    first = name
        if first is not None:
            return first
        return self.default


def _sub_config(module: str, cls_name: str, raw: object, path: str) -> Any:
    """``cls.from_config(raw or {}, path)`` for a class owned by a lower layer."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigValueError(path, "expected a mapping")
    cls = getattr(importlib.import_module(module), cls_name)
    return cls.from_config(dict(raw), path)


def _default_limits() -> Any:
    return _sub_config("synapse_coap.noise.endpoint", "NoiseLimits", {}, "limits")


def _default_link() -> Any:
    return _sub_config("synapse_coap.transport.link", "LinkParameters", {}, "link")


def _default_transfers() -> Any:
    return _sub_config("synapse_coap.transport.transfers", "TransferLimits", {}, "transfers")


def _default_push() -> Any:
    return _sub_config("synapse_coap.mapping.push", "PushConfig", {}, "push")


def _default_federation() -> Any:
    return _federation_config(None)


def _federation_config(raw: object) -> Any:
    from synapse_coap.synapse.discovery import FederationConfig

    return FederationConfig.from_config(raw, "federation")


@attrs.frozen
class CoapModuleConfig:
    """Everything the module's ``config:`` section can say (see the module docstring)."""

    listen: tuple[tuple[str, int], ...] = DEFAULT_LISTEN
    private_key_path: str | None = None
    private_key_store: str = "file"
    trust: TrustConfig = attrs.field(factory=TrustConfig)
    plain_listen: tuple[tuple[str, int], ...] = ()
    allow_plain_on_public_interfaces: bool = False
    limits: Any = attrs.field(factory=_default_limits)
    link: Any = attrs.field(factory=_default_link)
    transfers: Any = attrs.field(factory=_default_transfers)
    worker: str | None = None
    workers: WorkersConfig | None = None
    payload_dump: bool = False
    federation: Any = attrs.field(factory=_default_federation)
    push: Any = attrs.field(factory=_default_push)
    #: with Synapse's default (epoll) reactor: ``reactor`` drives the module's asyncio
    #: loop from the reactor's thread, ``thread`` runs it in a thread of its own
    #: (ignored with the asyncio reactor, whose loop the module shares)
    asyncio_loop: str = "reactor"

    @classmethod
    def from_config(cls, raw: object) -> CoapModuleConfig:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigValueError("config", "the module's config must be a mapping")
        _check_keys(raw, _TOP_KEYS, "")

        listen = _address_list(raw.get("listen"), "listen", DEFAULT_LISTEN)
        plain = _address_list(raw.get("plain_listen"), "plain_listen", ())
        allow_public = _bool(
            raw.get("allow_plain_on_public_interfaces"), "allow_plain_on_public_interfaces", False
        )
        if not allow_public:
            for i, (host, _port) in enumerate(plain):
                if not ipaddress.ip_address(host).is_loopback:
                    raise ConfigValueError(
                        f"plain_listen[{i}]",
                        f"{host} is not a loopback address: plain (unencrypted) CoAP is "
                        "allowed only on 127.0.0.0/8 or ::1 unless "
                        "allow_plain_on_public_interfaces is true",
                    )
        key_path = raw.get("private_key_path")
        if key_path is not None and (not isinstance(key_path, str) or not key_path):
            raise ConfigValueError("private_key_path", "expected a file path (string) or null")
        key_store = raw.get("private_key_store") or "file"
        if key_store not in KEY_STORES:
            raise ConfigValueError(
                "private_key_store", f"expected one of {', '.join(KEY_STORES)}, got {key_store!r}"
            )
        worker = raw.get("worker")
        if worker is not None and (not isinstance(worker, str) or not worker):
            raise ConfigValueError(
                "worker", "expected a worker instance name (string) or null for the main process"
            )
        workers = None
        if raw.get("workers") is not None:
            workers = WorkersConfig.from_config(raw.get("workers"))
            for key in ("worker", "listen", "plain_listen"):
                if raw.get(key) is not None:
                    raise ConfigValueError(
                        key,
                        "with workers, each instance's addresses go in workers.instances "
                        "(leave this out)",
                    )
            listen, plain = (), ()
            for inst in workers.instances.values():
                for i, (host, _port) in enumerate(inst.plain_listen):
                    if not allow_public and not ipaddress.ip_address(host).is_loopback:
                        raise ConfigValueError(
                            f"workers.instances.{inst.name}.plain_listen[{i}]",
                            f"{host} is not a loopback address: plain (unencrypted) CoAP is "
                            "allowed only on 127.0.0.0/8 or ::1 unless "
                            "allow_plain_on_public_interfaces is true",
                        )
        elif not listen and not plain:
            raise ConfigValueError("listen", "at least one of listen / plain_listen is needed")
        asyncio_loop = raw.get("asyncio_loop")
        if asyncio_loop is None:
            asyncio_loop = "reactor"
        if asyncio_loop not in ASYNCIO_LOOPS:
            raise ConfigValueError(
                "asyncio_loop",
                f"expected one of {', '.join(ASYNCIO_LOOPS)}, got {asyncio_loop!r}",
            )
        return cls(
            listen=listen,
            private_key_path=key_path,
            private_key_store=key_store,
            trust=TrustConfig.from_config(raw.get("trust")),
            plain_listen=plain,
            allow_plain_on_public_interfaces=allow_public,
            limits=_sub_config(
                "synapse_coap.noise.endpoint", "NoiseLimits", raw.get("limits"), "limits"
            ),
            link=_sub_config(
                "synapse_coap.transport.link", "LinkParameters", raw.get("link"), "link"
            ),
            transfers=_sub_config(
                "synapse_coap.transport.transfers",
                "TransferLimits",
                raw.get("transfers"),
                "transfers",
            ),
            worker=worker,
            workers=workers,
            payload_dump=_bool(raw.get("payload_dump"), "payload_dump", False),
            federation=_federation_config(raw.get("federation")),
            push=_sub_config("synapse_coap.mapping.push", "PushConfig", raw.get("push"), "push"),
            asyncio_loop=asyncio_loop,
        )

    def pinned_keys(self) -> dict[str, bytes]:
        """``trust.peers`` plus the keys given with ``federation.peers`` (trust wins)."""
        pinned = {
            p.server_name: p.public_key for p in self.federation.peers if p.public_key is not None
        }
        pinned.update(self.trust.peers)
        return pinned

    def binds_here(self, worker_name: str | None) -> bool:
        """Whether the process called ``worker_name`` (None = main) binds a listener."""
        if self.workers is not None:
            inst = self.workers.instances.get(worker_name or MAIN_INSTANCE)
            return inst is not None and inst.binds
        return self.worker == worker_name

    def addresses_for(
        self, worker_name: str | None
    ) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]:
        """(listen, plain_listen) of the process called ``worker_name`` (None = main)."""
        if self.workers is not None:
            inst = self.workers.instances.get(worker_name or MAIN_INSTANCE)
            return (inst.listen, inst.plain_listen) if inst is not None else ((), ())
        if self.worker == worker_name:
            return self.listen, self.plain_listen
        return (), ()
