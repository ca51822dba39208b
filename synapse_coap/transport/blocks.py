"""Blockwise transfer state of the CoAP server (RFC 7959): Block1 request reassembly, linear and
capped, and the Block2 representations a response or a push notification is served from,
all within the transfer store's byte budget."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiocoap.blockwise import IncompleteException
from aiocoap.message import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.optiontypes import BlockOption

from synapse_coap.transport.aiocoap_compat import block_key, extract_block
from synapse_coap.transport.transfers import ENTRY_OVERHEAD, TransferStore


class _Block1Reply(Exception):
    def __init__(self, message: Message) -> None:
        self.message = message


class _Assembly:
    __slots__ = ("body", "request")

    def __init__(self, request: Message) -> None:
        self.request = request
        self.body = bytearray()


class Block1Assembler:
    """RFC 7959 Block1 server side: O(n) reassembly, capped size; partial bodies live in
    a :class:`TransferStore` (one byte budget with cached Block2 responses, a count
    per session, a timeout)."""

    def __init__(self, max_body_size: int, store: TransferStore) -> None:
        self.max_body_size = max_body_size
        self._store = store

    @property
    def effective_max(self) -> int:
        """The largest body that can be reassembled (the size cap, within the budget)."""
        return min(self.max_body_size, self._store.budget - ENTRY_OVERHEAD)

    @staticmethod
    def _key(req: Message) -> Any:
        return (
            "b1",
            req.remote.blockwise_key,
            req.code,
            req.get_cache_key(
                [
                    OptionNumber.BLOCK1,
                    OptionNumber.BLOCK2,
                    OptionNumber.OBSERVE,
                    OptionNumber.SIZE1,
                ]
            ),
        )

    def _too_large(self) -> _Block1Reply:
        m = Message(code=Code.REQUEST_ENTITY_TOO_LARGE)
        m.opt.size1 = self.effective_max
        return _Block1Reply(m)

    def feed(self, req: Message) -> Message:
        """The complete request, or raise _Block1Reply with 2.31 / 4.08 / 4.13."""
        block1 = req.opt.block1
        if block1 is None:
            if len(req.payload) > self.max_body_size:
                raise self._too_large()
            return req
        if req.opt.size1 is not None and req.opt.size1 > self.effective_max:
            raise self._too_large()
        key = self._key(req)
        size = 2 ** (block1.size_exponent + 4) if block1.size_exponent < 7 else 1024
        offset = block1.block_number * size
        if block1.more and len(req.payload) % 16:
            m = Message(code=Code.BAD_REQUEST, payload=b"Block1 payload not a block multiple")
            raise _Block1Reply(m)
        if block1.block_number == 0:
            asm = _Assembly(req)
        else:
            found = self._store.get(key)
            if not isinstance(found, _Assembly) or offset > len(found.body):
                self._store.pop(key)
                raise _Block1Reply(Message(code=Code.REQUEST_ENTITY_INCOMPLETE))
            asm = found
            if offset < len(asm.body):
                # a repeated block (its ACK was lost after dedup expired): restart from it
                del asm.body[offset:]
        if offset + len(req.payload) > self.effective_max:
            self._store.pop(key)
            raise self._too_large()
        asm.body += req.payload
        if block1.more:
            self._store.put(key, req.remote.blockwise_key, asm, len(asm.body))
            m = Message(code=Code.CONTINUE)
            m.opt.block1 = block1
            raise _Block1Reply(m)
        self._store.pop(key)
        full = asm.request.copy(payload=bytes(asm.body))
        full.opt.block1 = block1
        full.remote = req.remote
        full.token = req.token
        full.mid = req.mid
        full.mtype = req.mtype
        return full


class Block2Responses:
    """RFC 7959 Block2 server side: a response too large for one message is kept (in the
    shared :class:`TransferStore`) for the blocks that follow block 0.

    Pushed representations (Observe notifications larger than one block, see
    :mod:`synapse_coap.transport.push`) are kept the same way under their
    registration request's key; serving their last block is reported to the pusher.
    """

    MAX_PUSHED = 4096

    def __init__(self, store: TransferStore) -> None:
        self._store = store
        self._on_last: dict[Any, Callable[[], None]] = {}

    def put_pushed(self, request: Message, full: Message, on_last: Callable[[], None]) -> None:
        key = ("b2", block_key(request))
        self._store.put(key, request.remote.blockwise_key, full, len(full.payload))
        self._on_last[key] = on_last
        while len(self._on_last) > self.MAX_PUSHED:
            self._on_last.pop(next(iter(self._on_last)))

    async def extract_or_insert(
        self, req: Message, build: Callable[[], Awaitable[Message]]
    ) -> Message:
        block2 = req.opt.block2
        if block2 is None or block2.block_number == 0:
            assembled = await build()
        else:
            found = self._store.get(("b2", block_key(req)))
            if not isinstance(found, Message):
                raise IncompleteException
            assembled = found
        limit = req.remote.maximum_payload_size
        if len(assembled.payload) > limit or (
            block2 is not None and len(assembled.payload) > block2.size
        ):
            key = ("b2", block_key(req))  # (computed only for a response cut in blocks)
            self._store.put(key, req.remote.blockwise_key, assembled, len(assembled.payload))
            block2 = block2 or BlockOption.BlockwiseTuple(0, 0, req.remote.maximum_block_size_exp)
            part: Message = extract_block(
                assembled, block2.block_number, block2.size_exponent, limit
            )
            if block2.block_number > 0 and part.opt.block2 is not None and not part.opt.block2.more:
                hook = self._on_last.pop(key, None)
                if hook is not None:
                    hook()
            return part
        return assembled
