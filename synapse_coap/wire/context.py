"""Per-session knowledge both ends share, used to shorten identifiers."""

from __future__ import annotations

import attrs


@attrs.frozen
class WireContext:
    """Strings both ends of a session have agreed on (from the handshake).

    ``server_names`` are Matrix server names both peers know (typically the
    responder's own server name first, then the initiator's, if any). An
    identifier whose server part is one of them is sent with a one-byte
    reference instead of the name. The empty context is always valid: it
    only makes identifiers longer.
    """

    server_names: tuple[str, ...] = ()

    def server_index(self, name: str) -> int | None:
        try:
            return self.server_names.index(name)
        except ValueError:
            return None
