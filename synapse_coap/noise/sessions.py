"""The endpoint's per-handshake session state and per-peer channel state."""

from __future__ import annotations

from synapse_coap.noise import records
from synapse_coap.noise.events import (
    Address,
)
from synapse_coap.noise.handshake import (
    Driver,
    Payload,
    State,
)
from synapse_coap.noise.limits import (
    AMPLIFICATION_FACTOR,
    CTRL_PATH_CHALLENGE,
    CTRL_PATH_RESPONSE,
    CTRL_PING,
)


class _Session:
    """Keys, record state and handshake progress of one session id.

    Slotted (a listener holds thousands). Setting a field that can bring the
    session's next timer earlier (``state``, ``send``, ``hs_next``,
    ``hs_deadline``, ``reply_due``, ``retired_until``) puts its id in the
    endpoint's ``dirty`` set, so the endpoint's timer heap needs no full scan.
    """

    __slots__ = (
        "_dirty",
        "_hs_deadline",
        "_hs_next",
        "_reply_due",
        "_retired_until",
        "_send",
        "_state",
        "addr",
        "budget_in",
        "budget_out",
        "challenge",
        "channel",
        "created",
        "driver",
        "ephemeral_id",
        "hs_interval",
        "hs_message",
        "hs_retransmits",
        "initiator",
        "last_recv",
        "last_sealed",
        "last_sent",
        "local_sid",
        "pattern",
        "peer_app",
        "peer_echo",
        "peer_name",
        "peer_static",
        "pn_floor",
        "profile_id",
        "queue",
        "recv",
        "remote_sid",
        "replaces",
        "replay",
        "reply_payload",
        "retries",
        "serial",
        "validated",
    )

    def __init__(
        self,
        *,
        local_sid: int,
        initiator: bool,
        pattern: str,
        addr: Address,
        now: float,
        dirty: set[int] | None = None,
        serial: int = 0,
    ):
        self.local_sid = local_sid
        self._dirty: set[int] = set() if dirty is None else dirty
        self.serial = serial
        self.remote_sid: int | None = None
        self.initiator = initiator
        self.pattern = pattern
        self.state = State.START
        self.driver: Driver | None = None
        self.addr = addr
        self.channel: int | None = None
        self.created = now
        # handshake retransmission / caching
        self.hs_message: bytes | None = None
        self.hs_next: float | None = None
        self.hs_interval = 0.0
        self.hs_deadline = now
        self.ephemeral_id: bytes | None = None  # responder: the initiator's e
        self.reply_due: float | None = None  # responder IK: IK2 held for piggyback
        self.reply_payload: Payload | None = None
        # keys
        self.send: records.SendKeys | None = None
        self.recv: records.RecvKeys | None = None
        self.replay = records.ReplayWindow()
        self.last_recv = now
        self.last_sent = now
        self.last_sealed = now  # the last record sealed (last_sent counts pings too)
        self.pn_floor = 0
        self.peer_echo = 0
        # path validation / anti-amplification
        self.validated = initiator
        self.budget_in = 0
        self.budget_out = 0
        self.challenge: bytes | None = None
        # (a list, not a deque: it is nearly always empty, and an empty deque is 600 bytes)
        self.queue: list[tuple[bool, bytes]] = []
        # outcome
        self.peer_static: bytes | None = None
        self.peer_name: str | None = None
        self.profile_id = 0
        self.peer_app = b""
        self.retired_until: float | None = None
        self.replaces: int | None = None  # initiator: the responder sid this session replaces
        self.hs_retransmits = 0
        self.retries = 0  # initiator: retry cookies received for this handshake

    # -- fields that move the session's next timer: setting one marks it dirty

    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, value: State) -> None:
        self._state = value
        self._dirty.add(self.local_sid)

    @property
    def send(self) -> records.SendKeys | None:
        return self._send

    @send.setter
    def send(self, value: records.SendKeys | None) -> None:
        self._send = value
        self._dirty.add(self.local_sid)

    @property
    def hs_next(self) -> float | None:
        return self._hs_next

    @hs_next.setter
    def hs_next(self, value: float | None) -> None:
        self._hs_next = value
        self._dirty.add(self.local_sid)

    @property
    def hs_deadline(self) -> float:
        return self._hs_deadline

    @hs_deadline.setter
    def hs_deadline(self, value: float) -> None:
        self._hs_deadline = value
        self._dirty.add(self.local_sid)

    @property
    def reply_due(self) -> float | None:
        return self._reply_due

    @reply_due.setter
    def reply_due(self, value: float | None) -> None:
        self._reply_due = value
        self._dirty.add(self.local_sid)

    @property
    def retired_until(self) -> float | None:
        return self._retired_until

    @retired_until.setter
    def retired_until(self, value: float | None) -> None:
        self._retired_until = value
        self._dirty.add(self.local_sid)

    def budget_left(self) -> int:
        if self.validated:
            return 1 << 62
        return AMPLIFICATION_FACTOR * self.budget_in - self.budget_out

    def snapshot(self) -> tuple[object, ...]:
        return (
            self.local_sid,
            self.remote_sid,
            self.state,
            self.addr,
            self.channel,
            self.hs_message,
            self.hs_next,
            self.hs_deadline,
            self.reply_due,
            None if self.send is None else (self.send.key, self.send.generation, self.send.next_pn),
            None if self.recv is None else (self.recv.key, self.recv.snapshot()),
            self.replay.snapshot(),
            self.last_recv,
            self.pn_floor,
            self.peer_echo,
            self.validated,
            self.budget_in,
            self.budget_out,
            self.challenge,
            tuple(self.queue),
            self.peer_static,
            self.retired_until,
        )


class _Channel:
    __slots__ = (
        "addr",
        "bandwidth_hint",
        "early_data",
        "established",
        "explicit_key",
        "id",
        "initiator",
        "peer_app",
        "peer_name",
        "peer_static",
        "pending",
        "profile_id",
        "queue",
        "rehandshake_after",
        "rehandshake_started",
        "resend",
        "retired",
        "rto_hint",
        "session",
        "useless_rehandshakes",
    )

    def __init__(
        self,
        *,
        cid: int,
        initiator: bool,
        addr: Address,
        peer_name: str | None,
        peer_static: bytes | None,
        explicit_key: bool,
    ) -> None:
        self.id = cid
        self.initiator = initiator
        self.addr = addr
        self.peer_name = peer_name
        self.peer_static = peer_static
        self.explicit_key = explicit_key
        self.session: _Session | None = None
        self.pending: _Session | None = None
        self.retired: list[_Session] = []
        self.queue: list[bytes] = []
        self.early_data: bytes | None = None
        # plaintexts sent on the old session while a re-handshake was pending: sent again
        # on the new session if the old one turns out dead (nothing heard on it meanwhile)
        self.resend: list[bytes] = []
        # re-handshake rate limiting (suspect_lost): not before this time; each
        # re-handshake that proves useless (the old session was alive) doubles the holdoff
        self.rehandshake_after = float("-inf")
        self.useless_rehandshakes = 0
        self.rehandshake_started: float | None = None
        # link hint from the layer above: RTO (s) and bit rate (None = unknown)
        self.rto_hint: float | None = None
        self.bandwidth_hint: float | None = None
        self.established = False
        self.profile_id = 0
        self.peer_app = b""

    def snapshot(self) -> tuple[object, ...]:
        return (
            self.id,
            self.addr,
            self.peer_static,
            None if self.session is None else self.session.local_sid,
            None if self.pending is None else self.pending.local_sid,
            tuple(s.local_sid for s in self.retired),
            tuple(self.queue),
            self.early_data,
            self.established,
            self.profile_id,
        )


_CONTROL_TYPES = frozenset({CTRL_PING, CTRL_PATH_CHALLENGE, CTRL_PATH_RESPONSE})


def _norm(addr: Address) -> Address:
    return (str(addr[0]), int(addr[1]))


def _xx2_matches(driver: Driver, message: bytes) -> bool:
    """True if ``message`` is the XX2 already in ``driver``'s transcript."""
    for op, data in driver.transcript:
        if op == "r":
            return data == message
    return False
