"""aiocoap's message layer, tuned by :class:`~synapse_coap.transport.link.LinkParameters`.

aiocoap (pinned ``>=0.4.17,<0.5``) hard-wires RFC 7252's fixed timers in
``MessageManager``. This subclass replaces exactly the timer and backlog
decisions:

* the first wait of a confirmable message comes from the peer's
  :class:`RttEstimator` (RFC 7252 defaults until the first sample, then
  CoCoA-like), and backoff is bounded by ``max_rto``;
* ACKs feed RTT samples (Karn's rule: never from retransmitted exchanges), but
  only where the ACK's timing is the link's: an empty ACK to one of our
  requests may have been held by the server (RFC 7252 §5.2.2, hoping to
  piggyback), so it gives no sample unless the request was flagged
  ``prompt_ack`` (a long-poll, which servers acknowledge at once, see
  :meth:`LinkMessageManager.acknowledge_now`). The server's think time thus
  never inflates the SRTT or lowers the measured rate that NSTART grows on;
* ``EMPTY_ACK_DELAY`` of each incoming request is derived per peer, so a
  response rides on the ACK whenever it is ready before the peer's timer
  would fire, and slow handlers get an empty ACK then a separate response;
  a handler that knows it will wait (a long-poll) acknowledges at once with
  :meth:`LinkMessageManager.acknowledge_now`, so it never holds the peer's
  NSTART slot;
* NSTART is per peer and adaptive (aiocoap only implements a fixed 1): the
  backlog lets ``RttEstimator.allowed_outstanding()`` exchanges out at once,
  ``nstart`` until the link is measured fast enough, back to ``nstart`` on any
  retransmission (see :mod:`synapse_coap.transport.link`);
* the first retransmission of an exchange is reported to the transport
  (the Noise transport uses it to detect a peer that lost its session).

It is attached with :func:`attach_transport`. aiocoap's private steps are
reached through :mod:`synapse_coap.transport.aiocoap_compat` only.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, cast

from aiocoap import interfaces
from aiocoap.numbers.codes import EMPTY
from aiocoap.numbers.constants import TransportTuning
from aiocoap.numbers.types import ACK, CON

from synapse_coap.transport.aiocoap_compat import HookedMessageManager, attach_message_interface
from synapse_coap.transport.link import LinkParameters, RttEstimator
from synapse_coap.transport.metrics import NullMetrics, TransportMetrics

logger = logging.getLogger(__name__)

#: Called with (remote, time the exchange was first sent) on the first
#: retransmission of a confirmable message.
RetransmitHook = Callable[[Any, float], None]
#: Called with (remote, time the exchange was first sent, retransmission number
#: starting at 1) on every retransmission of a confirmable message.
EveryRetransmitHook = Callable[[Any, float, int], None]


class LinkTuning(TransportTuning):  # type: ignore[misc]
    """A per-message aiocoap ``transport_tuning`` built from LinkParameters and an estimator."""

    def __init__(
        self,
        params: LinkParameters,
        *,
        ack_timeout: float | None = None,
        empty_ack_delay: float | None = None,
        early_data: bool = False,
        prompt_ack: bool = False,
        on_acknowledged: Callable[[bool], None] | None = None,
        confirmable: bool | None = None,
        keep_on_timeout: bool = False,
    ) -> None:
        self.params = params
        #: set by the server on an Observe notification: when its retransmissions run
        #: out, only this exchange ends (``on_acknowledged(False)``), not every exchange
        #: with the peer as aiocoap does; the observation parks it (transport/push.py)
        self.keep_on_timeout = keep_on_timeout
        #: aiocoap's message type choice: True sends CON (an Observe notification,
        #: whatever the registration's type), False NON, None follows the request.
        self.reliability = confirmable
        self.ACK_TIMEOUT = params.ack_timeout if ack_timeout is None else ack_timeout
        self.ACK_RANDOM_FACTOR = params.ack_random_factor
        self.MAX_RETRANSMIT = params.max_retransmit
        self.NSTART = params.nstart
        self.MAX_LATENCY = params.max_latency
        self.DEFAULT_BLOCK_SIZE_EXP = params.block_size_exp
        if empty_ack_delay is None:
            empty_ack_delay = (
                params.empty_ack_delay
                if params.empty_ack_delay is not None
                else params.piggyback_fraction * min(params.ack_timeout, params.min_rto)
            )
        self.EMPTY_ACK_DELAY = empty_ack_delay
        #: set by the client for requests that are safe to replay: the Noise
        #: transport may then send them as 0-RTT early data.
        self.early_data = early_data
        #: set by the client for a request the server acknowledges at once (a
        #: long-poll): its empty ACK is then a valid RTT sample.
        self.prompt_ack = prompt_ack
        #: set by the server on an Observe notification: called once with True when
        #: the message is acknowledged (or went out piggybacked / non-confirmable),
        #: False when it was rejected (RST) or its retransmissions ran out.
        self.on_acknowledged = on_acknowledged

    @property
    def EXCHANGE_LIFETIME(self) -> float:
        return self.params.exchange_lifetime


class _Backlogs(dict):  # type: ignore[type-arg]
    """aiocoap's per-remote backlog, reporting "must queue" only when the peer's NSTART
    (:meth:`LinkMessageManager.allowed_outstanding`) is reached."""

    def __init__(self, manager: LinkMessageManager) -> None:
        super().__init__()
        self._manager = manager

    def __contains__(self, remote: object) -> bool:
        if not dict.__contains__(self, remote):
            return False
        if dict.__getitem__(self, remote):
            return True
        manager = self._manager
        return manager.active_count(remote) >= manager.allowed_outstanding(remote)


class LinkMessageManager(HookedMessageManager):
    MAX_ESTIMATORS = 4096
    #: bytes a message adds to its payload in the size estimates fed to the estimator
    MESSAGE_OVERHEAD = 32

    def __init__(
        self,
        token_manager: Any,
        params: LinkParameters,
        metrics: TransportMetrics | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(token_manager)
        self.params = params
        self.metrics: TransportMetrics = metrics or NullMetrics()
        self._clock = clock or self.loop.time
        self._estimators: OrderedDict[Hashable, RttEstimator] = OrderedDict()
        self.backlogs = _Backlogs(self)
        # exchanges of our requests whose empty ACK the peer may have held: no RTT sample
        self._held_ack: set[Hashable] = set()
        self.on_first_retransmit: RetransmitHook | None = None
        self.on_retransmit: EveryRetransmitHook | None = None
        #: (remote, mid) -> callback of a confirmable message whose sender wants its outcome
        self._ack_hooks: dict[Hashable, Callable[[bool], None]] = {}
        #: called with the remote whose exchanges all fail (its session ended): the
        #: server's fast path cancels that remote's dispatches
        self.on_remote_error: Callable[[Any], None] | None = None

    # -- per-peer state ---------------------------------------------------------

    def estimator(self, remote: Hashable) -> RttEstimator:
        est = self._estimators.get(remote)
        if est is None:
            est = RttEstimator(self.params, clock=self._clock)
            self._estimators[remote] = est
            while len(self._estimators) > self.MAX_ESTIMATORS:
                self._estimators.popitem(last=False)
        else:
            self._estimators.move_to_end(remote)
        return est

    def forget_remote(self, remote: Hashable) -> None:
        self._estimators.pop(remote, None)

    def tuning_for(
        self,
        remote: Hashable,
        *,
        early_data: bool = False,
        prompt_ack: bool = False,
        on_acknowledged: Callable[[bool], None] | None = None,
        confirmable: bool | None = None,
        keep_on_timeout: bool = False,
    ) -> LinkTuning:
        est = self.estimator(remote)
        return LinkTuning(
            self.params,
            ack_timeout=est.rto,
            empty_ack_delay=est.empty_ack_delay(),
            early_data=early_data,
            prompt_ack=prompt_ack,
            on_acknowledged=on_acknowledged,
            confirmable=confirmable,
            keep_on_timeout=keep_on_timeout,
        )

    def answer_delays(self, remote: Hashable) -> tuple[float, float]:
        """(EMPTY_ACK_DELAY, EXCHANGE_LIFETIME) of a request from ``remote`` now: what
        :meth:`tuning_for` gives an incoming message, without building the tuning."""
        return self.estimator(remote).empty_ack_delay(), self.params.exchange_lifetime

    def allowed_outstanding(self, remote: Hashable) -> int:
        """The peer's current NSTART (``nstart`` for a peer not measured yet)."""
        est = self._estimators.get(remote)
        if est is None:
            return self.params.nstart
        return est.allowed_outstanding()

    def active_count(self, remote: object) -> int:
        active = self.active_exchanges
        if active is None:
            return 0
        return sum(1 for (r, _mid) in active if r == remote)

    # -- incoming ------------------------------------------------------------------

    def dispatch_message(self, message: Any) -> None:
        if message.remote is not None:
            message.transport_tuning = self.tuning_for(message.remote)
        super().dispatch_message(message)

    def dispatch_error(self, error: Exception, remote: Any) -> None:
        if self.on_remote_error is not None:
            self.on_remote_error(remote)
        active = self.active_exchanges
        if active is not None:
            est = self._estimators.get(remote)
            for r, mid in list(active):
                if r == remote:
                    self._held_ack.discard((r, mid))
                    self._ack_outcome((r, mid), False)
                    if est is not None:
                        est.forget((r, mid))
        super().dispatch_error(error, remote)

    def acknowledge_now(self, remote: Any, token: bytes) -> bool:
        """Send the empty ACK of the pending confirmable request ``(remote, token)`` now
        instead of holding it for a piggybacked response (RFC 7252 §5.2.2: a server
        that knows it cannot answer soon, such as a long-poll, acknowledges at once).
        The response then goes as a separate confirmable message. False if there is
        nothing to acknowledge (NON request, already acknowledged or answered)."""
        return self.send_empty_ack_now(remote, token, "the request will wait (long-poll)")

    # -- timers ----------------------------------------------------------------------

    def add_exchange(self, message: Any, messageerror_monitor: Callable[[], None]) -> None:
        key = (message.remote, message.mid)
        if not dict.__contains__(self.backlogs, message.remote):
            dict.__setitem__(self.backlogs, message.remote, [])
        est = self.estimator(message.remote)
        size = len(message.payload) + self.MESSAGE_OVERHEAD
        est.started(key, size)
        tuning = message.transport_tuning
        if message.code.is_request() and not getattr(tuning, "prompt_ack", False):
            self._held_ack.add(key)
        else:
            self._held_ack.discard(key)
        timeout = est.first_timeout(size)
        handle = self.schedule_retransmit(message, timeout, 0)
        active = self.active_exchanges
        if active is not None:
            active[key] = (messageerror_monitor, handle)
        hook = getattr(message.transport_tuning, "on_acknowledged", None)
        if hook is not None:
            self._ack_hooks[key] = hook

    def schedule_retransmit(self, message: Any, timeout: float, retransmission_counter: int) -> Any:
        if retransmission_counter > 0:
            # aiocoap doubled it; bound it (the first wait may exceed max_rto only
            # by the message's serialization time on a known slow link)
            timeout = max(min(timeout, self.params.max_rto), timeout / 2)
        return super().schedule_retransmit(message, timeout, retransmission_counter)

    def retransmit(self, message: Any, timeout: float, retransmission_counter: int) -> None:
        key = (message.remote, message.mid)
        est = self.estimator(message.remote)
        if retransmission_counter < message.transport_tuning.MAX_RETRANSMIT:
            sent_at = est.sent_at(key)
            first = est.retransmitted(key)
            self.metrics.retransmission()
            if first and self.on_first_retransmit is not None and sent_at is not None:
                try:
                    self.on_first_retransmit(message.remote, sent_at)
                except Exception:
                    logger.exception("retransmission hook failed")
            if self.on_retransmit is not None and sent_at is not None:
                try:
                    self.on_retransmit(message.remote, sent_at, retransmission_counter + 1)
                except Exception:
                    logger.exception("retransmission hook failed")
        else:
            est.gave_up(key)
            self._held_ack.discard(key)
            self._ack_outcome(key, False)
            if getattr(message.transport_tuning, "keep_on_timeout", False):
                # a parked notification: the peer's other exchanges are not failed with it
                self.end_exchange_quietly(message)
                return
        super().retransmit(message, timeout, retransmission_counter)

    def _ack_outcome(self, key: Hashable, ok: bool) -> None:
        hook = self._ack_hooks.pop(key, None)
        if hook is not None:
            try:
                hook(ok)
            except Exception:
                logger.exception("acknowledgement hook failed")

    def remove_exchange(self, message: Any) -> None:
        key = (message.remote, message.mid)
        active = self.active_exchanges
        if active is not None and key in active:
            held = key in self._held_ack
            self._held_ack.discard(key)
            # an empty ACK to a request the peer may have held is its think time, not the link's
            measure = not (held and message.mtype == ACK and message.code == EMPTY)
            self.estimator(message.remote).acknowledged(
                key, len(message.payload) + self.MESSAGE_OVERHEAD, measure=measure
            )
            self._ack_outcome(key, message.mtype == ACK)
        super().remove_exchange(message)

    def continue_backlog(self, remote: Any) -> None:
        if not dict.__contains__(self.backlogs, remote):
            return
        backlog = dict.__getitem__(self.backlogs, remote)
        allowed = self.allowed_outstanding(remote)
        while backlog and self.active_count(remote) < allowed:
            next_message, monitor = backlog.pop(0)
            self.send_initially(next_message, monitor)
        if not backlog and self.active_count(remote) == 0:
            dict.__delitem__(self.backlogs, remote)

    # -- outgoing ------------------------------------------------------------------

    def send_message(self, message: Any, messageerror_monitor: Any) -> Any:
        tuning = message.transport_tuning
        hook = None
        if message.remote is not None and not isinstance(tuning, LinkTuning):
            message.transport_tuning = self.tuning_for(message.remote)
        elif isinstance(tuning, LinkTuning) and message.remote is not None:
            # refresh the RTO from the estimator, keep the caller's flags
            hook = tuning.on_acknowledged
            message.transport_tuning = self.tuning_for(
                message.remote,
                early_data=tuning.early_data,
                prompt_ack=tuning.prompt_ack,
                on_acknowledged=hook,
                confirmable=tuning.reliability,
                keep_on_timeout=tuning.keep_on_timeout,
            )
        result = super().send_message(message, messageerror_monitor)
        if hook is not None and message.mtype != CON:
            # piggybacked on the request's ACK (resent by deduplication if lost) or NON
            message.transport_tuning.on_acknowledged = None
            hook(True)
        return result

    def is_confirmable(self, message: Any) -> bool:
        return bool(message.mtype == CON)


async def attach_transport(
    context: Any,
    params: LinkParameters,
    metrics: TransportMetrics | None,
    constructor: Callable[[LinkMessageManager], Awaitable[interfaces.MessageInterface]],
) -> tuple[LinkMessageManager, Any]:
    """Add a message interface to an aiocoap Context under a LinkMessageManager."""
    mman, transport = await attach_message_interface(
        context, lambda tman: LinkMessageManager(tman, params, metrics), constructor
    )
    return cast(LinkMessageManager, mman), transport
