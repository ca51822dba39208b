"""An answered request leaves no reference cycle behind, on either side of the transport.

aiocoap's token layer (server side, plain CoAP and every exchange the fast path leaves
to aiocoap) and its client ``Request`` each build a closure that refers to itself
through a partial; until they were untied (``aiocoap_compat.untie_when_done`` and
``untie_request``), every plain CoAP request left about 17 objects on the server and
every client request about 22 for the cycle collector, which Synapse runs from a timer
and pays for in proportion (the Noise fast path itself never had one).
"""

from __future__ import annotations

import asyncio
import gc

import pytest

from synapse_coap.mapping.messages import HttpRequest
from synapse_coap.noise.keys import generate_private_key, public_key
from synapse_coap.transport.client import Endpoint
from tests.harness.gc_cycles import no_automatic_gc  # noqa: F401 (a fixture)
from tests.integration.test_fastpath import EagerDispatcher
from tests.integration.test_transport import aio, make_client, start_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REQUESTS = 40


@pytest.mark.usefixtures("no_automatic_gc")
@pytest.mark.parametrize(
    ("secure", "eager"),
    [(False, False), (True, False), (True, True)],
    ids=["plain", "noise", "noise-eager"],
)
@aio
async def test_answered_requests_leave_no_cycles(secure: bool, eager: bool) -> None:
    """``noise-eager``: the fast path's exchange with no task (``dispatch_now``, as the
    module's in-process dispatcher): it had left its two halves referring to each
    other (about 10 objects per request, a Synapse request and channel among them
    in the module)."""
    key = generate_private_key()
    server, _d = await start_server(
        key,
        listen=(("127.0.0.1", 0),),
        plain=(("127.0.0.1", 0),),
        dispatcher=EagerDispatcher() if eager else None,
    )
    client = await make_client(bind=("127.0.0.1", 0))
    try:
        if secure:
            port = server.secure_addresses[0][1]
            ep = Endpoint("127.0.0.1", port, "hs.test", public_key(key), True)
        else:
            ep = Endpoint("127.0.0.1", server.plain_addresses[0][1], "hs.test", secure=False)
        for i in range(5):  # the session, its tables, the first timers
            await client.request(ep, HttpRequest("GET", f"/warm/{i}".encode()))
        await asyncio.sleep(0)
        gc.collect()
        for i in range(REQUESTS):
            # (eager: every other one answered at once, the rest on a later turn)
            target = f"/later/{i}" if eager and i % 2 else f"/r/{i}"
            r = await client.request(ep, HttpRequest("GET", target.encode()))
            assert r.status == 200
        found = gc.collect()
        # (was about 39 per request for plain CoAP, 22 through Noise: the client's)
        assert found < REQUESTS // 4, f"{found} objects in cycles after {REQUESTS} requests"
    finally:
        await client.close()
        await server.close()
