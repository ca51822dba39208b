"""The sidecar's address book: every CoAP listener a homeserver publishes.

A homeserver with several listeners (workers, docs/deployment.md) publishes them
in its client ``/.well-known/matrix/client`` document, under
:data:`WELL_KNOWN_KEY`::

    "io.synapse_coap": {"listeners": ["coap://203.0.113.4:5683", "coap://203.0.113.5"]}

(Synapse serves that from ``extra_well_known_client_content`` in homeserver.yaml,
with ``serve_client_wellknown: true``.) With ``--learn-listeners`` the sidecar asks
the listener it was given for that document, over CoAP, at start, and adds
every listener it did not know yet to those it moves to when its current one
stops answering (:class:`~synapse_coap.proxy.failover.FailoverSender`).

Listeners also come from DNS: ``--homeserver coap://NAME`` (no port) resolves
``_matrix-coap._udp.NAME`` SRV (:mod:`synapse_coap.proxy.resolver`). And the book is
kept current: whenever a listener stops answering (:class:`AddressBook`), the
sidecar asks the new current listener for the document again, and resolves SRV
again where the answer's TTL ran out or every known listener failed, so a listener
added or moved later is found. Listeners are only ever added (a moved one's old
address stays, and fails over quickly).

What a learned listener cannot change: it is reached with the same server name
and the same pinned (or trust-on-first-use) key as the given one, so a forged or
stale document can at worst point the sidecar at addresses that fail the
handshake, never at another server; and only ``coap://`` (Noise) entries are
taken, never ``coap+plain://``. At most :data:`MAX_LEARNED` listeners are ever
learned, from all documents and SRV answers together.

:func:`listeners_from_well_known` is sans-I/O; :func:`fetch_listeners` does the one
request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from synapse_coap.errors import ConfigValueError, LinkDown, RequestTimeout
from synapse_coap.mapping.messages import HttpRequest

logger = logging.getLogger(__name__)

#: The key of ``/.well-known/matrix/client`` whose ``listeners`` list the CoAP listeners.
WELL_KNOWN_KEY = "io.synapse_coap"
#: Where the document is asked for (over CoAP, at the current listener).
WELL_KNOWN_PATH = b"/.well-known/matrix/client"
#: Bound on the listeners taken from one document.
MAX_LEARNED = 16


def listeners_from_well_known(body: bytes) -> list[Any]:
    """The ``coap://`` listeners (as ``HomeserverAddress``) a client well-known document
    publishes, in its order; malformed entries are skipped (and logged), never raised."""
    from synapse_coap.proxy.runner import HomeserverAddress

    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        logger.warning("address book: /.well-known/matrix/client is not JSON; nothing learned")
        return []
    section = doc.get(WELL_KNOWN_KEY) if isinstance(doc, dict) else None
    entries = section.get("listeners") if isinstance(section, dict) else None
    if not isinstance(entries, list):
        return []
    found: list[Any] = []
    for i, entry in enumerate(entries[:MAX_LEARNED]):
        where = f"{WELL_KNOWN_KEY}.listeners[{i}]"
        if not isinstance(entry, str):
            logger.warning("address book: %s is not a string; skipped", where)
            continue
        try:
            address = HomeserverAddress.parse(entry, where)
        except ConfigValueError as e:
            logger.warning("address book: %s; skipped", e)
            continue
        if not address.secure:
            logger.warning("address book: %s is not coap:// (Noise); skipped", where)
            continue
        if address not in found:
            found.append(address)
    return found


async def fetch_listeners(sender: Any, *, timeout: float = 60.0) -> list[Any]:
    """Ask the current listener for the well-known document: the listeners it publishes
    (``HomeserverAddress``), [] when it does not answer or publishes none."""
    request = HttpRequest("GET", WELL_KNOWN_PATH, (("accept", "application/json"),))
    try:
        response = await sender.request(None, request, timeout=timeout)
    except (LinkDown, RequestTimeout) as e:
        logger.warning("address book: %s unanswered (%s); nothing learned", WELL_KNOWN_PATH, e)
        return []
    if response.status != 200:
        logger.info(
            "address book: %s answered %d; nothing learned",
            WELL_KNOWN_PATH.decode(),
            response.status,
        )
        return []
    return listeners_from_well_known(response.body)


def _log_learned(new: Sequence[Any], where: str) -> None:
    logger.info(
        "address book: %d listener(s) learned from %s: %s",
        len(new),
        where,
        ", ".join(str(a) for a in new) or "none new",
    )


class AddressBook:
    """Keeps the sidecar's listeners current (see the module doc).

    ``sender``: the :class:`~synapse_coap.proxy.failover.FailoverSender`; ``known``: the
    listeners it was built with; ``make_endpoint``: address -> its endpoint;
    ``well_known``: ask /.well-known/matrix/client (``--learn-listeners``); ``srv``:
    the SRV names the listeners came from (:class:`~synapse_coap.proxy.resolver.SrvSource`
    and whether their listeners speak Noise). At most :data:`MAX_LEARNED` listeners
    are ever added beyond ``known``; a new lookup is started at most once every
    ``min_interval`` seconds.
    """

    def __init__(
        self,
        sender: Any,
        known: Sequence[Any],
        make_endpoint: Callable[[Any], Any],
        *,
        well_known: bool,
        srv: Sequence[tuple[Any, bool]] = (),
        timeout: float = 60.0,
        min_interval: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sender = sender
        self.known: list[Any] = list(known)
        self._make_endpoint = make_endpoint
        self._well_known = well_known
        self._srv = tuple(srv)
        self._timeout = timeout
        self._min_interval = min_interval
        self._clock = clock
        self._last = float("-inf")
        #: listeners added beyond those given (bounded by MAX_LEARNED)
        self.learned = 0
        #: lookups run after the one at start (for logs and tests)
        self.relearns = 0
        self.task: asyncio.Task[None] | None = None
        sender.on_give_up.append(self.on_give_up)

    def add(self, addresses: Sequence[Any], where: str, *, switch: bool = False) -> list[Any]:
        """Add the addresses not known yet (within the bound); those added."""
        new = [a for a in dict.fromkeys(addresses) if a not in self.known]
        room = MAX_LEARNED - self.learned
        if len(new) > room:
            logger.warning(
                "address book: %d more listener(s) from %s not used (at most %d are learned)",
                len(new) - max(room, 0),
                where,
                MAX_LEARNED,
            )
            new = new[: max(room, 0)]
        if new:
            self._sender.add_endpoints([self._make_endpoint(a) for a in new], switch=switch)
            self.known.extend(new)
            self.learned += len(new)
        _log_learned(new, where)
        return new

    async def start(self) -> None:
        """The lookup at start: the well-known document (SRV was resolved already)."""
        self._last = self._clock()
        if self._well_known:
            await self._learn_well_known()

    def on_give_up(self) -> None:
        """A listener stopped answering: look again (once at a time, rate-limited)."""
        if self.task is not None and not self.task.done():
            return
        if self._clock() - self._last < self._min_interval:
            return
        self._last = self._clock()
        self.task = asyncio.ensure_future(self.relearn())

    async def relearn(self) -> None:
        """SRV again where its TTL ran out or every known listener failed, and the
        well-known document at the (new) current listener."""
        self.relearns += 1
        resolved = await self._resolve_srv()
        if self._well_known:
            await self._learn_well_known()
        if not resolved:
            await self._resolve_srv()  # (every listener may have failed meanwhile)

    async def _learn_well_known(self) -> None:
        found = await fetch_listeners(self._sender, timeout=self._timeout)
        self.add(found, WELL_KNOWN_PATH.decode())

    async def _resolve_srv(self) -> bool:
        from synapse_coap.proxy.runner import HomeserverAddress

        all_failed = bool(getattr(self._sender, "all_failed", False))
        resolved = False
        for source, secure in self._srv:
            if not (source.expired or all_failed):
                continue
            resolved = True
            listeners = await source.resolve()
            found = [HomeserverAddress(h, p, secure) for h, p in listeners.addresses]
            self.add(found, f"SRV {source.host}", switch=all_failed)
        return resolved

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
