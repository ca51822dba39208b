"""Large body decodes off the event loop.

The body codec (``wire/body*.py`` via ``mapping/codec.py``) is sans-I/O and pure
Python past cbor2's parser: about 3 us per JSON item. On the event loop (with
Synapse's asyncio reactor, that loop is Synapse's reactor) a large body would
hold up every other request for the whole decode, so a message whose payload is
over :data:`INLINE_DECODE_MAX` bytes is decoded on a small thread pool instead;
smaller ones are decoded inline, where the hop to a thread and back would cost
more than the decode. The codec's caps, its errors and the order in which a
caller gets its results are the same either way: the caller awaits the decode.
Under the GIL the loop still runs between the worker's time slices
(``sys.getswitchinterval()``, 5 ms), except while the worker is inside one
native call that holds the GIL throughout (cbor2's parse of the whole body, the
JSON dump of the result): a very large body still stalls the loop for that
part of its decode, a fraction of the whole.

Used by :class:`~synapse_coap.transport.client.CoapClient` (responses and push
notifications: the sidecar, the module's federation agent) and
:class:`~synapse_coap.transport.server.CoapServer` (request bodies: the module's
listener, the gateway; and the encoding of response bodies over
:data:`INLINE_ENCODE_MAX` bytes of JSON, such as an initial ``/sync``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: Payloads up to this many bytes are decoded on the event loop. Under the codec's
#: proportional caps (at most ``max(4096, 8 n)`` items for ``n`` bytes, about 3 us
#: each) such a body costs at most ~25 ms even when crafted, and a real one well
#: under 1 ms.
INLINE_DECODE_MAX = 1024

#: Response bodies (JSON) up to this many bytes are encoded on the event loop, larger
#: ones on the pool: the encoder costs about 0.15 us per JSON byte (two DEFLATE
#: attempts at most), so this keeps an inline encode near a millisecond.
INLINE_ENCODE_MAX = 8192

#: Worker threads per pool. The decoder is pure Python, so more threads buy no speed
#: under the GIL; two let one slow body not hold up another while bounding how many
#: bodies are being expanded at once.
DECODE_WORKERS = 2


class DecodePool:
    """A lazily started thread pool for the decodes of large payloads."""

    def __init__(self, inline_max: int = INLINE_DECODE_MAX, workers: int = DECODE_WORKERS) -> None:
        self.inline_max = inline_max
        self.workers = workers
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False

    def inline(self, size: int) -> bool:
        """True when a payload of ``size`` bytes is decoded on the loop."""
        return size <= self.inline_max or self._closed

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        """``fn(*args, **kwargs)`` on a worker thread, as a future of the running loop."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.workers, thread_name_prefix="synapse-coap-decode"
            )
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def run(self, size: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``: inline when ``size`` is small, else on a worker thread."""
        if self.inline(size):
            return fn(*args, **kwargs)
        return await self.submit(fn, *args, **kwargs)

    def close(self) -> None:
        """Stop the pool; a decode still running finishes on its thread, unawaited."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
