"""Server push of ``/sync`` (RFC 7641 Observe, as MSC3079 proposes): the sans-I/O part.

Both ends use it: the CoAP server (module or gateway) decides with it which
requests may be observed, rewrites the ``/sync`` it issues on the client's
behalf, and tells an empty result (not pushed) from one worth pushing; the
sidecar uses it to recognise the long-polls it can answer from the push and
to build the empty response a long-poll gets when its own timeout runs out.

What makes a ``/sync`` result "empty" mirrors Synapse's own
``SyncResult.__bool__`` (the test its notifier uses to keep a long-poll
waiting): no presence, no room changes (join, invite, knock, leave), no
account data, no to-device messages and no device-list changes. The one-time
key counts are always present in a response; a change in them is pushed too.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

import attrs

from synapse_coap.confmap import from_mapping
from synapse_coap.errors import ConfigValueError

#: The observable resource: the client-server ``/sync`` (GET).
SYNC_PATH = re.compile(rb"^/_matrix/client/(?:v3|r0)/sync$")

#: MSC3079's unstable ``/versions`` key (stable: ``m.low_bandwidth``).
LOW_BANDWIDTH_KEY = "org.matrix.msc3079.low_bandwidth"

#: The ``/versions`` path.
VERSIONS_PATH = b"/_matrix/client/versions"

#: Keys of a sync response that never make it worth pushing on their own.
_COUNTER_KEYS = (
    "device_one_time_keys_count",
    "device_unused_fallback_key_types",
    "org.matrix.msc2732.device_unused_fallback_key_types",
)

#: Query parameters that are not part of what a registration observes.
_POSITION_PARAMS = frozenset({"since", "timeout"})


def _non_negative_int(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigValueError(f"push.{attribute.name}", f"must be an integer >= 0, got {value!r}")


def _positive_number(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigValueError(f"push.{attribute.name}", f"must be a number > 0, got {value!r}")


def _non_negative_number(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigValueError(
            f"push.{attribute.name}", f"must be a number of seconds >= 0, got {value!r}"
        )


def _boolean(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigValueError(f"push.{attribute.name}", f"must be true or false, got {value!r}")


@attrs.frozen
class PushConfig:
    """How a CoAP server serves Observe registrations of ``/sync``.

    Attributes:
        enabled: accept registrations (advertised in ``/versions`` and
            ``/.well-known/core``). When off, an Observe request gets a normal
            response without Observe.
        max_per_session: registrations one Noise session (one device link)
            may hold at once; more are refused with 4.29 ``M_LIMIT_EXCEEDED``.
        max_per_source: registrations one source address may hold at once
            across all its sessions.
        poll_timeout: seconds of each ``/sync`` long-poll the server issues on
            the client's behalf while nothing happens (local, never on the link).
        retry_delay: first wait (s) after the homeserver failed such a
            ``/sync`` (5xx, unreachable); doubled on each failure up to
            ``max_retry_delay``.
        max_retry_delay: upper bound of that wait (s).
        fetch_timeout: seconds a notification too large for one block waits
            for its last block to be fetched; past it the notification is
            parked like an unacknowledged one.
        park_retry: a notification whose retransmissions ran out (the link is
            down) is *parked*: sent again as soon as anything authentic is heard
            from the peer (a request, a keep-alive), else after this many
            seconds, doubling up to ten times that.
        park_timeout: seconds a notification may stay parked before the
            registration is dropped and its resources freed.
        echo_hold: seconds a result holding nothing but the client's own echoes
            (timeline events it sent itself, which carry its ``transaction_id``;
            see :func:`only_own_echoes`) is held back instead of pushed. The
            next result with anything else in it ends the hold: ``/sync`` is
            then issued again from the position before the held result, so
            the homeserver itself merges both into one notification. Past
            ``echo_hold`` the held result is pushed on its own. 0 pushes every
            echo at once. A client learns its event id from its own send's
            response; what the hold delays is only the echo in ``/sync``.
    """

    enabled: bool = attrs.field(default=True, validator=_boolean)
    max_per_session: int = attrs.field(default=4, validator=_non_negative_int)
    max_per_source: int = attrs.field(default=16, validator=_non_negative_int)
    poll_timeout: float = attrs.field(default=30.0, validator=_positive_number)
    retry_delay: float = attrs.field(default=1.0, validator=_positive_number)
    max_retry_delay: float = attrs.field(default=30.0, validator=_positive_number)
    fetch_timeout: float = attrs.field(default=120.0, validator=_positive_number)
    park_retry: float = attrs.field(default=30.0, validator=_positive_number)
    park_timeout: float = attrs.field(default=3600.0, validator=_positive_number)
    echo_hold: float = attrs.field(default=300.0, validator=_non_negative_number)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None, path: str = "push") -> PushConfig:
        """Build from a config mapping; unknown keys and bad values raise ConfigValueError."""
        return from_mapping(cls, config, path)


@attrs.frozen
class SyncQuery:
    """A ``/sync`` request target taken apart (the raw parameters keep their order and bytes)."""

    path: bytes
    params: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, target: bytes) -> SyncQuery | None:
        """The parsed target if it is a ``/sync`` request, else None."""
        path, _sep, query = target.partition(b"?")
        if not SYNC_PATH.match(path):
            return None
        try:
            text = query.decode("ascii")
        except UnicodeDecodeError:
            return None
        params: list[tuple[str, str]] = []
        for item in text.split("&") if text else []:
            name, _eq, value = item.partition("=")
            params.append((urllib.parse.unquote(name), value))
        return cls(path, tuple(params))

    def get(self, name: str) -> str | None:
        """The (still percent-encoded) value of the first parameter ``name``."""
        for k, v in self.params:
            if k == name:
                return v
        return None

    @property
    def since(self) -> str | None:
        value = self.get("since")
        return None if value is None else urllib.parse.unquote(value)

    @property
    def timeout_ms(self) -> int:
        value = self.get("timeout")
        try:
            return max(0, int(value)) if value is not None else 0
        except ValueError:
            return 0

    @property
    def full_state(self) -> bool:
        return self.get("full_state") == "true"

    @property
    def observed(self) -> tuple[tuple[str, str], ...]:
        """What a registration is *about*: every parameter but ``since`` and ``timeout``."""
        return tuple((k, v) for k, v in self.params if k not in _POSITION_PARAMS)

    def target(self, *, since: str | None, timeout_ms: int, full_state: bool = False) -> bytes:
        """This request's target at another position (``since``), with ``timeout``.

        The other parameters keep their order; ``full_state`` is dropped
        unless asked for (only the first sync of a registration may carry it).
        """
        out: list[str] = []
        for k, v in self.params:
            if k in _POSITION_PARAMS or (k == "full_state" and not full_state):
                continue
            out.append(f"{urllib.parse.quote(k, safe='')}={v}")
        if since is not None:
            out.append("since=" + urllib.parse.quote(since, safe=""))
        out.append(f"timeout={timeout_ms}")
        return self.path + b"?" + "&".join(out).encode("ascii")


def is_observable(method: str, target: bytes) -> bool:
    """True for the requests a server accepts Observe registrations on (``GET /sync``)."""
    return method == "GET" and SyncQuery.parse(target) is not None


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, dict):
        return all(_is_empty(v) for v in value.values())
    if isinstance(value, list):
        return not value
    return False


def sync_counters(body: dict[str, Any]) -> dict[str, Any]:
    """The always-present key counts of a sync response (kept by the sidecar for empty answers)."""
    return {k: body[k] for k in _COUNTER_KEYS if k in body}


def sync_has_updates(body: dict[str, Any], previous_counters: dict[str, Any] | None) -> bool:
    """Whether a ``/sync`` result is worth pushing (see the module docstring)."""
    for key, value in body.items():
        if key == "next_batch":
            continue
        if key in _COUNTER_KEYS:
            if previous_counters is not None and previous_counters.get(key) != value:
                return True
            continue
        if not _is_empty(value):
            return True
    return False


#: Parts of a joined room that describe the room as it is, not what changed in it.
_ROOM_DESCRIPTIVE = frozenset(
    {
        "unread_notifications",
        "unread_thread_notifications",
        "summary",
        "org.matrix.msc2654.unread_count",
    }
)
#: Parts of a timeline that describe its position, not what changed.
_TIMELINE_POSITION = frozenset({"prev_batch", "limited"})


def _own_echo(event: Any) -> bool:
    unsigned = event.get("unsigned") if isinstance(event, dict) else None
    return isinstance(unsigned, dict) and isinstance(unsigned.get("transaction_id"), str)


def only_own_echoes(body: dict[str, Any], previous_counters: dict[str, Any] | None) -> bool:
    """True when a ``/sync`` result that :func:`sync_has_updates` would push holds
    nothing but the requesting device's own new timeline events (its echoes).

    Synapse puts ``unsigned.transaction_id`` only on events the requesting
    device sent, so those are the echoes. Anything else makes the result worth
    pushing at once: another event in a timeline, a gapped (``limited``)
    timeline, state, room account data, ephemeral events, any section outside
    ``rooms.join`` (presence, to-device, device lists, invites, leaves...),
    or changed key counts. A room's unread counts and summary describe the
    room; they come right in the merged result and are not looked at.
    """
    rooms: Any = None
    for key, value in body.items():
        if key == "next_batch":
            continue
        if key in _COUNTER_KEYS:
            if previous_counters is None or previous_counters.get(key) != value:
                return False
            continue
        if key == "rooms":
            rooms = value
            continue
        if not _is_empty(value):
            return False
    if not isinstance(rooms, dict):
        return False
    joined: Any = None
    for key, value in rooms.items():
        if key == "join":
            joined = value
        elif not _is_empty(value):
            return False
    if not isinstance(joined, dict) or not joined:
        return False
    for room in joined.values():
        if not isinstance(room, dict):
            return False
        timeline = room.get("timeline")
        if not isinstance(timeline, dict) or timeline.get("limited"):
            return False
        events = timeline.get("events")
        if not isinstance(events, list) or not events or not all(map(_own_echo, events)):
            return False
        if any(k != "events" and k not in _TIMELINE_POSITION for k in timeline):
            return False
        for k, v in room.items():
            if k != "timeline" and k not in _ROOM_DESCRIPTIVE and not _is_empty(v):
                return False
    return True


def parse_sync_body(body: bytes) -> dict[str, Any] | None:
    """The JSON object of a ``/sync`` response with a string ``next_batch``, else None."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("next_batch"), str):
        return None
    return value


def empty_sync_body(next_batch: str, counters: dict[str, Any] | None = None) -> bytes:
    """A valid ``/sync`` response with nothing new, resuming at ``next_batch``."""
    body: dict[str, Any] = {"next_batch": next_batch}
    if counters:
        body.update(counters)
    return json.dumps(body, separators=(",", ":")).encode()


#: the last (body, answer) of :func:`advertise_observe`: a homeserver's ``/versions`` is
#: the same body request after request, and the function is pure (compared, not hashed:
#: each body is a new bytes object, whose hash an lru_cache would compute every time)
_LAST_ADVERTISED: tuple[bytes, bytes | None] = (b"", None)


def advertise_observe(body: bytes) -> bytes | None:
    """``/versions`` with MSC3079's ``observe: 1`` added, or None if the body is not a JSON object."""
    global _LAST_ADVERTISED
    last = _LAST_ADVERTISED
    if body == last[0] and body:
        return last[1]
    answer = _advertise(body)
    _LAST_ADVERTISED = (bytes(body), answer)
    return answer


def _advertise(body: bytes) -> bytes | None:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    entry = value.get(LOW_BANDWIDTH_KEY)
    entry = dict(entry) if isinstance(entry, dict) else {}
    entry["observe"] = 1
    value[LOW_BANDWIDTH_KEY] = entry
    return json.dumps(value, separators=(",", ":")).encode()


__all__ = [
    "LOW_BANDWIDTH_KEY",
    "SYNC_PATH",
    "VERSIONS_PATH",
    "PushConfig",
    "SyncQuery",
    "advertise_observe",
    "empty_sync_body",
    "is_observable",
    "parse_sync_body",
    "sync_counters",
    "sync_has_updates",
]
