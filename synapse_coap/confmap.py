"""Build a frozen attrs config class from a config mapping, one way for all of them.

Used by the config classes whose fields take the mapping's values as they are
(:class:`~synapse_coap.noise.endpoint.NoiseLimits`,
:class:`~synapse_coap.transport.transfers.TransferLimits`): unknown keys and
values the attrs validators refuse raise :class:`ConfigValueError` naming
``path.field``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import attrs

from synapse_coap.errors import ConfigValueError

T = TypeVar("T")


def from_mapping(cls: type[T], config: Mapping[str, object] | None, path: str) -> T:
    """``cls(**config)``, with every error re-rooted under ``path``."""
    if config is None:
        return cls()
    if not isinstance(config, Mapping):
        raise ConfigValueError(path, "must be a mapping")
    fields = {f.name for f in attrs.fields(cls)}  # type: ignore[arg-type]
    for key in config:
        if key not in fields:
            raise ConfigValueError(
                f"{path}.{key}", f"unknown field; allowed: {', '.join(sorted(fields))}"
            )
    kwargs: dict[str, Any] = {str(k): v for k, v in config.items()}
    try:
        return cls(**kwargs)
    except ConfigValueError as exc:
        raise ConfigValueError(f"{path}.{exc.path}", str(exc).split(": ", 1)[1]) from None
