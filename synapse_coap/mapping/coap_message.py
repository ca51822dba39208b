"""The CoAP message as the codec sees it: a code, options and a payload.

Apart from :mod:`synapse_coap.mapping.messages` (which re-exports both classes, and
whose HTTP value objects' header converters the native build cannot compile) so that
the native build compiles them: the codec reads a request's options, and builds an
answer's, through these classes on every request (``synapse_coap/native.py``).
"""

from __future__ import annotations

import attrs


@attrs.frozen
class CoapOption:
    number: int
    value: bytes


@attrs.frozen
class CoapMessage:
    """A CoAP request or response without the transport fields (type, message id, token).

    ``code`` is the 8-bit code, ``(class << 5) | detail``: GET is 1, 2.05 is 69.
    ``options`` are kept in ascending option-number order (stable for repeats).
    """

    code: int
    options: tuple[CoapOption, ...] = ()
    payload: bytes = b""
    #: option number -> its values, built on the first lookup (a request's options are
    #: looked up a dozen times on its way through the codec)
    _by_number: dict[int, list[bytes]] | None = attrs.field(
        default=None, init=False, eq=False, repr=False
    )

    def _index(self) -> dict[int, list[bytes]]:
        index: dict[int, list[bytes]] = {}
        for o in self.options:
            values = index.get(o.number)
            if values is None:
                index[o.number] = [o.value]
            else:
                values.append(o.value)
        object.__setattr__(self, "_by_number", index)
        return index

    def options_index(self) -> dict[int, list[bytes]]:
        """Option number -> its values, in order: the message's own index, to be read,
        never modified (the compiled codec reads a request's options through it, one
        call instead of one :meth:`get` per option)."""
        index = self._by_number
        return self._index() if index is None else index

    def get(self, number: int) -> list[bytes]:
        """The values of every option ``number``, in order (a new list)."""
        index = self._by_number
        if index is None:
            index = self._index()
        values = index.get(number)
        return [] if values is None else values.copy()

    def first(self, number: int) -> bytes | None:
        index = self._by_number
        if index is None:
            index = self._index()
        values = index.get(number)
        return None if values is None else values[0]


__all__ = ["CoapMessage", "CoapOption"]
