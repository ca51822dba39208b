"""synapse-coap: Matrix over CoAP + CBOR + DEFLATE + Noise for constrained links.

``synapse_coap.CoapModule`` is the Synapse module (load it from ``modules:`` in
homeserver.yaml). It is imported lazily so that the sans-I/O layers and the
proxy never pull in Synapse or Twisted.
"""

from __future__ import annotations

from typing import Any

from synapse_coap import native as _native

# before any module of the native build is imported: its extensions, or (stale build,
# SYNAPSE_COAP_PURE=1) its sources (synapse_coap.native)
_native.install()

__version__ = "0.1.0"
__all__ = ["CoapModule", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "CoapModule":
        from synapse_coap.synapse.module import CoapModule

        return CoapModule
    raise AttributeError(name)
