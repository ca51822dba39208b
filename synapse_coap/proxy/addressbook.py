"""The sidecar's address book: every CoAP listener a homeserver publishes.

A homeserver with several listeners (workers, docs/deployment.md) publishes them
in its client ``/.well-known/matrix/client`` document, under
:data:`WELL_KNOWN_KEY`::

    "io.synapse_coap": {"listeners": ["coap://203.0.113.4:5683", "coap://203.0.113.5"]}

(Synapse serves that from ``extra_well_known_client_content`` in homeserver.yaml,
with ``serve_client_wellknown: true``.) With ``--learn-listeners`` the sidecar asks
the listener it was given for that document, over CoAP, once at start, and adds
every listener it did not know yet to those it moves to when its current one
stops answering (:class:`~synapse_coap.proxy.failover.FailoverSender`).

What a learned listener cannot change: it is reached with the same server name
and the same pinned (or trust-on-first-use) key as the given one, so a forged or
stale document can at worst point the sidecar at addresses that fail the
handshake, never at another server; and only ``coap://`` (Noise) entries are
taken, never ``coap+plain://``. At most :data:`MAX_LEARNED` entries are used.

:func:`listeners_from_well_known` is sans-I/O; :func:`learn_listeners` does the one
request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
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


async def learn_listeners(
    sender: Any, known: Sequence[Any], make_endpoint: Any, *, timeout: float = 60.0
) -> list[Any]:
    """Ask the current listener for the well-known document and add the listeners it
    publishes that are not in ``known`` (``HomeserverAddress``) to ``sender``
    (``FailoverSender.add_endpoints``); the addresses added."""
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
    new = [a for a in listeners_from_well_known(response.body) if a not in known]
    if new:
        sender.add_endpoints([make_endpoint(a) for a in new])
    logger.info(
        "address book: %d listener(s) learned from %s: %s",
        len(new),
        WELL_KNOWN_PATH.decode(),
        ", ".join(str(a) for a in new) or "none new",
    )
    return new
