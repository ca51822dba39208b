"""Every piece of Synapse that synapse-coap reaches beyond Synapse's module API, in one place.

Synapse's documented module API (``ModuleApi``) does not offer what this
module needs: the HomeServer object (to build Synapse's own resource trees and
to put an agent under the federation HTTP client), Synapse's request and site
classes (to run a request in-process), its request-size rule, and its metrics
label. Those pieces are private or undocumented, so they are reached **only
here** (``tests/unit/test_private_access.py`` keeps the rest of the package
off them), each with the release range it was checked on, and
:func:`check_static` / :func:`check_homeserver` check at start that every one
exists: a Synapse that moved one stops at start with a ``ConfigError`` naming
its version and the missing piece, not with an AttributeError deep in a
request.

Supported range: Synapse 1.120.0 to the newest release (CI runs the module,
federation and sidecar integration tests on 1.120.0 and on the newest; see
README "Supported Synapse releases"). Where a piece changed inside that range
the accessor below carries the fallback, and its entry in :data:`PIECES` says
from which release each form exists.

Twisted's and prometheus_client's private pieces, as Synapse runs them, are
kept here too (this is the only layer that imports Twisted).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import synapse
from synapse.module_api.errors import ConfigError

#: The running Synapse's version, as it names itself.
SYNAPSE_VERSION: str = str(getattr(synapse, "__version__", "unknown"))
#: The release range every entry of :data:`PIECES` was checked on.
CHECKED_RANGE = "1.120.0 to 1.163.2"
#: The metrics label Synapse uses for the homeserver name (its own constant from 1.135).
DEFAULT_SERVER_NAME_LABEL = "server_name"


@attrs.frozen
class Piece:
    """One private or undocumented thing synapse-coap uses.

    ``name`` is what the error message says; ``checked`` the releases it was
    checked on; ``probe`` returns True if the running Synapse has it (static
    pieces take no argument, homeserver pieces take the ModuleApi).
    """

    name: str
    checked: str
    why: str
    probe: Callable[..., bool]
    needs_homeserver: bool = False
    #: the module runs without it (the work it saves is done Synapse's own way, and
    #: a line at start says so): not a reason to refuse to start
    optional: bool = False


def _import(module: str, name: str | None = None) -> Any:
    mod = __import__(module, fromlist=["_"])
    return mod if name is None else getattr(mod, name)


def _has(module: str, name: str) -> bool:
    try:
        _import(module, name)
    except (ImportError, AttributeError):
        return False
    return True


def _params(fn: Any) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


#: what Synapse's ``respond_with_json`` runs to encode and write a JSON answer
_JSON_WRITER = "_async_write_json_to_request_in_thread"


def _json_writer() -> bool:
    server = _import("synapse.http.server")
    params = list(inspect.signature(getattr(server, _JSON_WRITER)).parameters)
    return params == ["request", "json_encoder", "json_object"] and callable(
        getattr(server, "respond_with_json", None)
    )


#: what Synapse's servlets call (through ``parse_json_object_from_request``) to parse a
#: request's JSON body
_JSON_PARSER = "parse_json_value_from_request"


def _json_parser() -> bool:
    servlet = _import("synapse.http.servlet")
    params = list(inspect.signature(getattr(servlet, _JSON_PARSER)).parameters)
    by_object = getattr(servlet, "parse_json_object_from_request", None)
    # (the object parser looks the value parser up in the module when it runs)
    return params == ["request", "allow_empty_body"] and _JSON_PARSER in getattr(
        getattr(by_object, "__code__", None), "co_names", ()
    )


def _site_takes_keywords() -> bool:
    from synapse.http.site import SynapseSite

    wanted = {
        "logger_name",
        "site_tag",
        "config",
        "resource",
        "server_version_string",
        "max_request_body_size",
        "reactor",
        "hs",
    }
    return wanted <= _params(SynapseSite.__init__)


def _request_takes_size() -> bool:
    from synapse.http.site import SynapseRequest

    return {"channel", "site", "max_request_body_size"} <= _params(SynapseRequest.__init__)


def _listener_config() -> bool:
    from synapse.config.server import HttpListenerConfig, TCPListenerConfig

    fields = {f.name for f in attrs.fields(TCPListenerConfig)}
    http_fields = {f.name for f in attrs.fields(HttpListenerConfig)}
    return {"port", "bind_addresses", "type", "tls", "http_options"} <= fields and {
        "x_forwarded",
        "tag",
    } <= http_fields


def _module_api_homeserver(api: Any) -> bool:
    return getattr(api, "_hs", None) is not None


def _module_web_resources(api: Any) -> bool:
    return isinstance(getattr(api._hs, "_module_web_resources", None), dict)


def _listening_services(api: Any) -> bool:
    return isinstance(getattr(api._hs, "_listening_services", None), list)


def _federation_agent(api: Any) -> bool:
    client = api._hs.get_federation_http_client()
    return hasattr(client, "agent")


def _db_pool(api: Any) -> bool:
    pool = getattr(api._hs.get_datastores().main, "db_pool", None)
    return pool is not None and hasattr(pool, "runInteraction") and hasattr(pool, "engine")


def _asyncio_loop_attr(api: Any) -> bool:
    try:
        from twisted.internet.asyncioreactor import AsyncioSelectorReactor
    except ImportError:  # pragma: no cover - always present in supported Twisted
        return True
    reactor = api._hs.get_reactor()
    if not isinstance(reactor, AsyncioSelectorReactor):
        return True  # only needed under SYNAPSE_ASYNC_IO_REACTOR=1
    return hasattr(reactor, "_asyncioEventloop")


def _registry_names() -> bool:
    from prometheus_client import REGISTRY

    return isinstance(getattr(REGISTRY, "_names_to_collectors", None), dict)


_ALL = CHECKED_RANGE

#: Everything synapse-coap reaches in Synapse (and Twisted/prometheus_client under it)
#: beyond the module API. ``check_static`` and ``check_homeserver`` probe every entry.
PIECES: tuple[Piece, ...] = (
    Piece(
        "synapse.module_api.ModuleApi._hs (the HomeServer)",
        _ALL,
        "resource trees, federation client, datastore, reactor",
        _module_api_homeserver,
        needs_homeserver=True,
    ),
    Piece(
        "synapse.app.homeserver.SynapseHomeServer._configure_named_resource",
        _ALL,
        "the client and federation resource trees, as an HTTP listener gets them",
        lambda: hasattr(
            _import("synapse.app.homeserver", "SynapseHomeServer"), "_configure_named_resource"
        ),
    ),
    Piece(
        "synapse.server.HomeServer._module_web_resources",
        _ALL,
        "web resources other modules registered",
        _module_web_resources,
        needs_homeserver=True,
    ),
    Piece(
        "synapse.server.HomeServer._listening_services",
        _ALL,
        "reusing the resources of a running HTTP listener",
        _listening_services,
        needs_homeserver=True,
    ),
    Piece(
        "synapse.app._base.max_request_body_size",
        _ALL,
        "Synapse's own request body limit",
        lambda: callable(_import("synapse.app._base", "max_request_body_size")),
    ),
    Piece(
        "synapse.http.site.SynapseSite(logger_name=, site_tag=, config=, resource=, "
        "server_version_string=, max_request_body_size=, reactor=, hs=)",
        _ALL,
        "the site in-process requests run in",
        _site_takes_keywords,
    ),
    Piece(
        "synapse.http.site.SynapseRequest(channel, site, max_request_body_size=)",
        _ALL + " (our_server_name= from 1.136, passed when present)",
        "the request object of an in-process request",
        _request_takes_size,
    ),
    Piece(
        "synapse.config.server.TCPListenerConfig / HttpListenerConfig fields",
        _ALL,
        "the listener config of the in-process site",
        _listener_config,
    ),
    Piece(
        "synapse.util.httpresourcetree.create_resource_tree",
        _ALL,
        "the resource tree of the in-process site",
        lambda: _has("synapse.util.httpresourcetree", "create_resource_tree"),
    ),
    Piece(
        "synapse.http.server.OptionsResource",
        _ALL,
        "the resource tree root",
        lambda: _has("synapse.http.server", "OptionsResource"),
    ),
    Piece(
        "synapse.rest.health.HealthResource",
        _ALL,
        "/health over CoAP",
        lambda: _has("synapse.rest.health", "HealthResource"),
    ),
    Piece(
        "synapse.logging.context.PreserveLoggingContext / make_deferred_yieldable",
        _ALL,
        "logcontext rules when crossing between asyncio and the reactor",
        lambda: (
            _has("synapse.logging.context", "PreserveLoggingContext")
            and _has("synapse.logging.context", "make_deferred_yieldable")
        ),
    ),
    Piece(
        "synapse.metrics.background_process_metrics.run_as_background_process",
        _ALL + " (server_name argument from 1.136, passed when present)",
        "entering Synapse from the asyncio side",
        lambda: _has("synapse.metrics.background_process_metrics", "run_as_background_process"),
    ),
    Piece(
        "synapse.metrics.SERVER_NAME_LABEL",
        "1.135.0 to 1.163.2 (before 1.135: the label 'server_name')",
        "the homeserver label on our metrics",
        lambda: True,  # has a fallback
    ),
    Piece(
        "HomeServer.get_federation_http_client().agent",
        _ALL,
        "the seam the outbound CoAP federation agent replaces",
        _federation_agent,
        needs_homeserver=True,
    ),
    Piece(
        "HomeServer.get_datastores().main.db_pool (runInteraction, engine)",
        _ALL,
        "the trust-on-first-use key table",
        _db_pool,
        needs_homeserver=True,
    ),
    Piece(
        "synapse.storage.engines.PostgresEngine",
        _ALL,
        "the trust table's creation lock on PostgreSQL",
        lambda: _has("synapse.storage.engines", "PostgresEngine"),
    ),
    Piece(
        "twisted.internet.asyncioreactor.AsyncioSelectorReactor._asyncioEventloop",
        "Twisted 26.10 (what pip installs with Synapse 1.120.0 and 1.163.2 today)",
        "sharing Synapse's asyncio loop under SYNAPSE_ASYNC_IO_REACTOR=1",
        _asyncio_loop_attr,
        needs_homeserver=True,
    ),
    Piece(
        f"synapse.http.server.{_JSON_WRITER}(request, json_encoder, json_object)",
        _ALL,
        "a CoAP request's JSON answer written to its channel at once (without it: "
        "through Synapse's thread pool hop and byte producer, as before)",
        _json_writer,
        optional=True,
    ),
    Piece(
        f"synapse.http.servlet.{_JSON_PARSER}(request, allow_empty_body), called by "
        "parse_json_object_from_request",
        _ALL,
        "a CoAP request's JSON body handed to Synapse as the value the codec decoded "
        "(without it: Synapse parses the JSON text the codec wrote, as before)",
        _json_parser,
        optional=True,
    ),
    Piece(
        "prometheus_client.REGISTRY._names_to_collectors",
        "prometheus_client 0.22.1 (with Synapse 1.120.0) and 0.26.0 (with 1.163.2)",
        "reusing our counters when the module is loaded twice in one process",
        _registry_names,
    ),
)

#: The private attribute names above: the rest of the package never uses them
#: (tests/unit/test_private_access.py; imports from private modules such as
#: ``synapse.app._base`` are refused there too).
PRIVATE_NAMES = frozenset(
    {
        "_hs",
        "_configure_named_resource",
        "_module_web_resources",
        "_listening_services",
        "_asyncioEventloop",
        "_names_to_collectors",
        _JSON_WRITER,
    }
)


def _missing(piece: Piece) -> ConfigError:
    return ConfigError(
        f"synapse-coap cannot run on Synapse {SYNAPSE_VERSION}: it lacks {piece.name} "
        f"(used for {piece.why}; checked on {piece.checked}). This synapse-coap was "
        f"checked on Synapse {CHECKED_RANGE}: run one of those, or a synapse-coap "
        f"release that supports Synapse {SYNAPSE_VERSION}."
    )


def _run(piece: Piece, *args: Any) -> bool:
    try:
        return bool(piece.probe(*args))
    except Exception:
        return False


def check_static() -> None:
    """Check every piece that needs no homeserver; raise ConfigError naming the first missing.

    aiocoap's private pieces (:mod:`synapse_coap.transport.aiocoap_compat`) are checked too.
    """
    from synapse_coap.errors import LibraryVersionError
    from synapse_coap.transport import aiocoap_compat

    try:
        aiocoap_compat.check()
    except LibraryVersionError as e:
        raise ConfigError(str(e)) from e
    for piece in PIECES:
        if not piece.needs_homeserver and not piece.optional and not _run(piece):
            raise _missing(piece)


def check_homeserver(api: Any, *, tofu: bool = True, federation: bool = True) -> None:
    """Check the pieces reached through the running HomeServer (from the module's __init__)."""
    for piece in PIECES:
        if not piece.needs_homeserver:
            continue
        if piece.probe is _db_pool and not tofu:
            continue
        if piece.probe is _federation_agent and not federation:
            continue
        if not piece.optional and not _run(piece, api):
            raise _missing(piece)


# --------------------------------------------------------------------------- accessors


def homeserver(api: Any) -> Any:
    """The HomeServer behind a ModuleApi."""
    return api._hs


def configure_named_resource(hs: Any) -> Callable[[str, bool], dict[str, Any]] | None:
    """``hs._configure_named_resource`` on the main process, None on a worker."""
    return getattr(hs, "_configure_named_resource", None)  # type: ignore[no-any-return]


def module_web_resources(hs: Any) -> dict[str, Any]:
    """Web resources registered by modules (``ModuleApi.register_web_resource``)."""
    return dict(getattr(hs, "_module_web_resources", {}))


def listener_configs(hs: Any) -> list[Any]:
    """The process's listener configs: ``listeners`` on the main process and a
    worker's ``worker_listeners`` (config attributes, public)."""
    main = list(getattr(hs.config.server, "listeners", ()) or ())
    worker = getattr(getattr(hs.config, "worker", None), "worker_listeners", ()) or ()
    return main + [w for w in worker if w not in main]


def reactor_listening_ports(hs: Any) -> list[Any]:
    """The listening ports registered with the reactor (Twisted's public
    ``IReactorFDSet.getReaders``). A worker's HTTP listeners are not kept in
    ``_listening_services``; their ports are found here."""
    readers = getattr(hs.get_reactor(), "getReaders", None)
    if readers is None:
        return []
    return [r for r in readers() if getattr(r, "factory", None) is not None]


def listening_services(hs: Any) -> list[Any]:
    """The ports of the process's running listeners (a copy)."""
    return list(getattr(hs, "_listening_services", ()))


def max_request_body_size(config: Any) -> int:
    """Synapse's own limit on an HTTP request body, from its config."""
    from synapse.app._base import max_request_body_size as synapse_max

    return int(synapse_max(config))


def asyncio_loop_of(reactor: Any) -> Any:
    """The asyncio loop under Twisted's asyncio reactor (None if it has none)."""
    return getattr(reactor, "_asyncioEventloop", None)


def registered_collector(name: str) -> Any:
    """The Prometheus collector registered under ``name`` in the default registry, if any."""
    from prometheus_client import REGISTRY

    return REGISTRY._names_to_collectors.get(name)


def write_json_first(
    direct: Callable[[Any, Callable[[Any], bytes], Any], bool],
) -> bool:
    """Have Synapse's ``respond_with_json`` offer every JSON answer to ``direct``
    (``request``, the encoder it chose, the JSON value) before its own writer (its
    thread pool, then a producer): True when ``direct`` wrote the answer and finished
    the request, False to leave it to Synapse's writer. See :func:`_wrap_once`."""

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def write_json(request: Any, json_encoder: Callable[[Any], bytes], json_object: Any) -> Any:
            # (a plain function: run_in_background takes its None as a result at once,
            # and Synapse's own coroutine, returned for any other request, as before)
            if direct(request, json_encoder, json_object):
                return None
            return original(request, json_encoder, json_object)

        return write_json

    return _wrap_once(_json_writer, "synapse.http.server", _JSON_WRITER, wrap)


def _wrap_once(
    probe: Callable[..., bool],
    module: str,
    name: str,
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> bool:
    """Replace ``module.name`` with ``wrap(Synapse's function)``, once per process (a
    second install wraps Synapse's function again, kept as ``synapse_coap_original``,
    never a wrapper); False, nothing changed, where ``probe``'s piece is missing."""
    piece = next(p for p in PIECES if p.probe is probe)
    if not _run(piece):
        return False
    mod = _import(module)
    current = getattr(mod, name)
    original = getattr(current, "synapse_coap_original", current)
    wrapper = wrap(original)
    wrapper.synapse_coap_original = original  # type: ignore[attr-defined]
    setattr(mod, name, wrapper)
    return True


def parse_json_first(direct: Callable[[Any], Any], nothing: object) -> bool:
    """Have Synapse's ``parse_json_value_from_request`` (its servlets' parse of a JSON
    body, directly or through ``parse_json_object_from_request``) ask
    ``direct(request)`` first: the body's value, or ``nothing`` to leave the parse to
    Synapse's function, which reads ``request.content`` (as it still does for a module
    that imported the function by name before). See :func:`_wrap_once`."""

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def parse_json_value(request: Any, allow_empty_body: bool = False) -> Any:
            value = direct(request)
            if value is nothing:
                return original(request, allow_empty_body)
            return value

        return parse_json_value

    return _wrap_once(_json_parser, "synapse.http.servlet", _JSON_PARSER, wrap)


def federation_http_client(hs: Any) -> Any:
    """Synapse's federation HTTP client (its ``agent`` is the outbound seam)."""
    return hs.get_federation_http_client()


def database_pool(hs: Any) -> Any:
    """The main datastore's DatabasePool."""
    return hs.get_datastores().main.db_pool


@functools.cache
def server_name_label() -> str:
    """``synapse.metrics.SERVER_NAME_LABEL`` (1.135+), else the same label name."""
    try:
        from synapse.metrics import SERVER_NAME_LABEL
    except ImportError:
        return DEFAULT_SERVER_NAME_LABEL
    return str(SERVER_NAME_LABEL)


@functools.cache
def _bg_takes_server_name() -> bool:
    from synapse.metrics.background_process_metrics import run_as_background_process

    return "server_name" in _params(run_as_background_process)


def run_as_background_process(
    desc: str,
    server_name: str,
    func: Callable[..., Awaitable[Any]],
    *args: Any,
    **kwargs: Any,
) -> Any:
    """Synapse's ``run_as_background_process``; ``server_name`` is passed from 1.136 on."""
    from synapse.metrics import background_process_metrics

    synapse_run: Any = background_process_metrics.run_as_background_process
    if _bg_takes_server_name():
        return synapse_run(desc, server_name, func, *args, **kwargs)
    return synapse_run(desc, func, *args, **kwargs)


@functools.cache
def _request_takes_server_name() -> bool:
    from synapse.http.site import SynapseRequest

    return "our_server_name" in _params(SynapseRequest.__init__)


def make_request(site: Any, channel: Any, *, server_name: str, max_request_body_size: int) -> Any:
    """A SynapseRequest for ``site`` on ``channel``.

    ``SynapseSite.request_class`` and ``request_id_header`` exist from 1.136;
    before, the site's class is always SynapseRequest (no X-Forwarded-For here)
    and it has no ``our_server_name`` argument. What a site needs is worked out once
    (per site, server name and size limit): this runs for every request.
    """
    key = (site, server_name, max_request_body_size)
    make = _REQUEST_MAKERS.get(key)
    if make is None:
        make = _request_maker(site, server_name, max_request_body_size)
        if len(_REQUEST_MAKERS) >= 16:
            _REQUEST_MAKERS.clear()
        _REQUEST_MAKERS[key] = make
    return make(channel, site)


#: (site, server name, body limit) -> what makes the site's requests (sites hash by
#: identity; a handful per process)
_REQUEST_MAKERS: dict[tuple[Any, str, int], Callable[[Any, Any], Any]] = {}


def _request_maker(
    site: Any, server_name: str, max_request_body_size: int
) -> Callable[[Any, Any], Any]:
    from synapse.http.site import SynapseRequest

    request_class = getattr(site, "request_class", SynapseRequest)
    kwargs: dict[str, Any] = {
        "max_request_body_size": max_request_body_size,
        "request_id_header": getattr(site, "request_id_header", None),
    }
    if _request_takes_server_name():
        kwargs["our_server_name"] = server_name
    return functools.partial(request_class, **kwargs)
