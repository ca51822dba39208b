"""Build a frozen attrs config class from a config mapping, one way for all of them.

Every config class whose fields take the mapping's values (after the number
coercion below) is built here: :class:`~synapse_coap.noise.endpoint.NoiseLimits`,
:class:`~synapse_coap.transport.transfers.TransferLimits`,
:class:`~synapse_coap.transport.link.LinkParameters` (the module's ``link:``,
the gateway's ``--link``) and :class:`~synapse_coap.mapping.push.PushConfig`.
A value that is not a mapping, an unknown key, and a value the attrs validators
refuse all raise :class:`ConfigValueError` naming ``path.field`` and what is
allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import attrs

from synapse_coap.errors import ConfigValueError

T = TypeVar("T")


def _coerce(annotation: Any, value: Any) -> Any:
    """YAML writes ``2`` for a float setting and ``2.0`` for an int one: give the field
    the type it declares (booleans are never numbers here)."""
    if isinstance(value, bool):
        return value
    kind = str(annotation)
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind in ("float", "float | None") and isinstance(value, int):
        return float(value)
    return value


def from_mapping(cls: type[T], config: Mapping[str, object] | None, path: str) -> T:
    """``cls(**config)``, with every error re-rooted under ``path``."""
    if config is None:
        return cls()
    if not isinstance(config, Mapping):
        raise ConfigValueError(path, f"must be a mapping, got {type(config).__name__}")
    fields = {f.name: f for f in attrs.fields(cls)}  # type: ignore[arg-type]
    for key in config:
        if key not in fields:
            raise ConfigValueError(
                f"{path}.{key}", f"unknown setting; allowed: {', '.join(sorted(fields))}"
            )
    kwargs: dict[str, Any] = {str(k): _coerce(fields[str(k)].type, v) for k, v in config.items()}
    try:
        return cls(**kwargs)
    except ConfigValueError as exc:
        # a validator names its field bare ("max_rto") or under its own section's
        # default name ("link.max_rto"): either way it goes under the caller's path
        head, _dot, rest = exc.path.partition(".")
        field = exc.path if head in fields or not rest else rest
        raise ConfigValueError(f"{path}.{field}", str(exc).split(": ", 1)[1]) from None
