"""A client's day on the link (issue 11): the ``day`` suite, and the idle-cost table.

``day``: matrix-nio logs in, does its initial sync, then runs its sync loop (long-poll
``/sync?timeout=30000``, like ``sync_forever``) for ``--day-seconds`` (an hour by
default) while 10 messages are sent by alice and 10 received from bob, evenly spread,
alternating; otherwise idle. Every byte from the login to the end of the period is
counted, over CoAP+Noise (relay, the sidecar's keep-alive included) and over HTTPS
(tshark), side by side at the same profile. Each received message's latency (bob's
send -> alice's sync returning it) is recorded too.

``--day-compress K`` runs the period K times faster: the period, the spacing of the
messages, nio's long-poll timeout and the sidecar's keep-alive interval are all
divided by K, so each periodic cost happens as often per period as in real time and
the bytes of a compressed period equal those of a real one *as long as nothing else
on either stack has a timer of its own that matters within the period* (the report
says when a run was compressed; the figures of record are real-time runs).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from lab_scenarios.client import (
    PASSWORD,
    CoapStack,
    ScenarioFailed,
    Stack,
    _expect,
    make_stack,
    send_like_a_client,
)
from lab_scenarios.common import ScenarioResult, progress
from synapse_coap.lab.model import LinkProfile
from synapse_coap.mapping.push import PushConfig
from synapse_coap_lab.names import NAMES

DAY_SENDS = 10
DAY_RECEIVES = 10
#: characters of each message's text
DAY_TEXT_LENGTH = 27
#: nio's (and Element's) long-poll timeout, ms
SYNC_TIMEOUT_MS = 30000


async def run_day(
    stack: Stack, seconds: float, compress: float, sends: int, receives: int
) -> ScenarioResult:
    import nio

    assert stack.bob is not None
    bob = stack.bob
    room_id = stack.room_id
    alice = stack.new_nio()
    # fresh random sentences (words and spaces, as people write), one per message
    texts: list[str] = []
    while len(texts) < sends + receives:
        text = NAMES.text(DAY_TEXT_LENGTH)
        if text not in texts:
            texts.append(text)
    sent_at: dict[str, float] = {}
    got_at: dict[str, float] = {}
    errors: list[str] = []
    await stack.quiet()
    await stack.mark()
    t0 = time.monotonic()
    loop_task: asyncio.Task[None] | None = None
    ok, note = True, ""
    try:
        await _expect("login", alice.login(PASSWORD, device_name="lab-day"), "LoginResponse")
        await _expect("initial sync", alice.sync(timeout=0, full_state=True), "SyncResponse")
        poll_ms = max(1000, int(SYNC_TIMEOUT_MS / compress))

        async def sync_loop() -> None:
            while True:
                r = await alice.sync(timeout=poll_ms)
                now = time.monotonic()
                if not isinstance(r, nio.SyncResponse):
                    errors.append(type(r).__name__)
                    await asyncio.sleep(5.0 / compress)  # as a client backs off
                    continue
                room = r.rooms.join.get(room_id)
                for ev in room.timeline.events if room is not None else ():
                    body = getattr(ev, "body", None)
                    if isinstance(body, str) and body in sent_at and body not in got_at:
                        got_at[body] = now

        loop_task = asyncio.ensure_future(sync_loop())
        n = sends + receives
        for k in range(n):
            at = t0 + (k + 0.5) * seconds / n
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            receive = (k % 2 == 0 and k // 2 < receives) or k // 2 >= sends
            if receive:
                text = texts[k]
                sent_at[text] = time.monotonic()
                await bob.send(room_id, text)
            else:
                await send_like_a_client(alice, room_id, texts[k], "day send")
            progress(f"{stack.tag} day: {k + 1}/{n} messages, {time.monotonic() - t0:.0f} s")
        await asyncio.sleep(max(0.0, t0 + seconds - time.monotonic()))
    except (ScenarioFailed, asyncio.TimeoutError, OSError) as exc:
        ok, note = False, f"FAILED: {exc}"[:300]
    elapsed = time.monotonic() - t0
    await stack.mark()  # the period ends here, whatever is still in flight
    if loop_task is not None:
        loop_task.cancel()
        await asyncio.gather(loop_task, return_exceptions=True)
    await alice.close()
    missing = sorted(set(sent_at) - set(got_at))
    if ok and missing:
        ok, note = False, f"FAILED: {len(missing)} message(s) never reached alice's sync"
    if ok:
        lat = [got_at[t] - sent_at[t] for t in sent_at]
        note = (
            f"{seconds:g} s, {sends} sent + {receives} received; receive latency median "
            f"{statistics.median(lat):.2f} s, max {max(lat):.2f} s"
            + (f"; compressed {compress:g}x" if compress != 1 else "")
            + (f"; sync errors: {', '.join(errors)}" if errors else "")
        )
    windows = await stack.windows()
    w = windows[-1] if windows else None
    return ScenarioResult(
        scenario="day",
        stack=stack.stack,
        profile=stack.profile.name,
        ip_bytes=w.ip_bytes if w else 0,
        packets=w.packets if w else 0,
        round_trips=w.round_trips if w else 0,
        seconds=round(elapsed, 1),
        retransmissions=w.retransmissions if w else 0,
        method=stack.method,
        ok=ok and w is not None and w.ip_bytes > 0,
        note=note,
        up_bytes=w.up_bytes if w else 0,
        down_bytes=w.down_bytes if w else 0,
        time_method="measured",
        server=stack.server,
    )


async def day_suite(
    root: Path,
    profile: LinkProfile,
    seed: int,
    stacks: Sequence[str],
    seconds: float,
    compress: float = 1.0,
    sends: int = DAY_SENDS,
    receives: int = DAY_RECEIVES,
) -> list[ScenarioResult]:
    """Both stacks side by side (concurrently), one ``day`` result each."""
    period = seconds / compress

    async def one(name: str) -> ScenarioResult:
        stack = make_stack(name, root / "day", profile, seed)
        if isinstance(stack, CoapStack):
            stack.keepalive_scale = 1.0 / compress
            # the module's default echo hold, scaled like the other periodic costs
            stack.echo_hold = None if compress == 1 else PushConfig().echo_hold / compress
        try:
            await stack.start()
            progress(f"{stack.tag} day: {period:.0f} s ({seconds:g} s compressed {compress:g}x)")
            return await run_day(stack, period, compress, sends, receives)
        except Exception as exc:
            progress(f"[{name}] day FAILED: {type(exc).__name__}: {exc}")
            return ScenarioResult(
                "day", name, profile.name, 0, 0, 0, 0.0, ok=False, note=f"FAILED: {exc}"[:300]
            )
        finally:
            await stack.close()
            stack.kill()

    return list(await asyncio.gather(*(one(s) for s in stacks)))


def _rates(profile: LinkProfile) -> tuple[float | None, float | None]:
    return profile.uplink.rate, profile.downlink.rate


def idle_table(results: Sequence[ScenarioResult], profiles: dict[str, LinkProfile]) -> str:
    """Idle cost per minute and the share of the link's airtime it takes, per profile."""
    rows = [r for r in results if r.scenario == "idle" and r.ok and r.seconds > 0]
    if not rows:
        return ""
    out = [
        "Idle cost per minute, and the share of the link's capacity (airtime) it uses in "
        "each direction at the profile's bit rate.",
        "",
        "| scenario | profile | stack | B/min | up airtime | down airtime | note |",
        "|---|---|---|--:|--:|--:|---|",
    ]
    for r in sorted(rows, key=lambda r: (r.scenario, r.profile, r.stack)):
        per_min = r.ip_bytes * 60.0 / r.seconds
        prof = profiles.get(r.profile)
        up_rate, down_rate = _rates(prof) if prof is not None else (None, None)

        def air(nbytes: int, rate: float | None, r: ScenarioResult = r) -> str:
            if not rate:
                return "—"
            return f"{100.0 * 8.0 * nbytes / (rate * r.seconds):.2f} %"

        out.append(
            f"| {r.scenario} | {r.profile} | {r.stack} | {per_min:,.1f} "
            f"| {air(r.up_bytes, up_rate)} | {air(r.down_bytes, down_rate)} | {r.note} |"
        )
    return "\n".join(out)


def day_table(results: Sequence[ScenarioResult]) -> str:
    """The day's bytes on every stack and the HTTPS/CoAP ratios."""
    days = {(r.profile, r.stack): r for r in results if r.scenario == "day"}
    profiles = sorted({p for p, _ in days})
    if not profiles:
        return ""
    out = [
        "A client's day: log in, initial sync, 10 messages sent and 10 received spread over "
        "the period (fresh random sentences of 27 characters), idle otherwise (nio's sync loop, "
        "30 s long-polls; the sidecar's keep-alive and the module's default push.echo_hold "
        "included). Every byte of the period, IP level.",
        "",
        "| profile | CoAP+Noise B | HTTPS stock B | stock/CoAP | HTTPS nginx B | nginx/CoAP "
        "| notes |",
        "|---|--:|--:|--:|--:|--:|---|",
    ]

    def cell(r: ScenarioResult | None) -> str:
        if r is None:
            return "—"
        return "failed" if not r.ok else f"{r.ip_bytes:,}"

    def ratio(c: ScenarioResult | None, h: ScenarioResult | None) -> str:
        if c is None or h is None or not (c.ok and h.ok) or not c.ip_bytes:
            return "—"
        return f"{h.ip_bytes / c.ip_bytes:.1f}x"

    for p in profiles:
        c, h, n = days.get((p, "coap")), days.get((p, "https")), days.get((p, "https-nginx"))
        notes = "; ".join(f"{r.stack}: {r.note}" for r in (c, h, n) if r is not None and r.note)
        out.append(
            f"| {p} | {cell(c)} | {cell(h)} | {ratio(c, h)} | {cell(n)} | {ratio(c, n)} | {notes} |"
        )
    return "\n".join(out)


__all__ = ["DAY_RECEIVES", "DAY_SENDS", "day_suite", "day_table", "idle_table", "run_day"]
