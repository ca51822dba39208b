"""Federation scenarios, and the must-show delivery at 100 bit/s, on the demo's pairs.

The pairs come from :mod:`synapse_coap_lab.demo` (reused, not duplicated):

- ``CoapPair``: two Synapses with the module and no HTTP listener; every datagram
  between them crosses a lab relay (counted exactly there).
- ``HttpsPair``: two stock Synapses federating over TLS; counted with tshark on
  the two federation ports.

The demo's Matrix clients talk to their homeservers directly (uncounted); only
server-to-server traffic is counted here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from pathlib import Path
from typing import Any

import attrs

from lab_scenarios.client import COAP_READY, nio_config, start_sidecar
from lab_scenarios.common import (
    ScenarioResult,
    limits_config,
    link_config,
    modelled_seconds,
    progress,
    scrape_retransmissions,
    synapse_config,
)
from synapse_coap.lab.model import LinkProfile, get_profile
from synapse_coap.lab.relay import Relay, RelayConfig
from synapse_coap_lab import demo
from synapse_coap_lab.homeserver import free_port
from synapse_coap_lab.names import NAMES

FED_SCENARIOS = ("fed-first-contact", "fed-1", "fed-10", "fed-100")
_COUNTS = {"fed-1": 1, "fed-10": 10, "fed-100": 100}


def _q(s: str) -> str:
    return urllib.parse.quote(s, safe="")


async def room_history(client: demo.MatrixClient, room_id: str, prefix: str) -> list[str]:
    """Message bodies starting with ``prefix`` in ``client``'s server's copy of the room,
    oldest first."""
    out: list[str] = []
    token: str | None = None
    for _ in range(50):
        query: dict[str, Any] = {"dir": "f", "limit": 500}
        if token:
            query["from"] = token
        page = await client.call("GET", f"/rooms/{_q(room_id)}/messages", **query)
        for ev in page.get("chunk", []):
            body = ev.get("content", {}).get("body")
            if ev.get("type") == "m.room.message" and str(body).startswith(prefix):
                out.append(str(body))
        token = page.get("end")
        if not page.get("chunk") or not token:
            break
    return out


async def _restart_for_profile(pair: Any, profile: LinkProfile) -> None:
    """Tune the module's link for ``profile``, turn on the metrics listener (retransmission
    counts), restart both homeservers, and move the relays to the profile."""
    link = link_config(profile)
    for proc in pair.procs:
        proc.modules[0]["config"]["link"] = link
        proc.modules[0]["config"]["limits"] = limits_config(profile)
        proc.extra_config = {**proc.extra_config, **synapse_config(profile)}
        if proc.metrics_port is None:
            proc.metrics_port = free_port()
    await asyncio.gather(*(asyncio.to_thread(p.restart, 120.0, COAP_READY) for p in pair.procs))
    for relay in pair.relays:
        relay.set_profile(profile)


def _server_retransmissions(pair: Any) -> int | None:
    if not isinstance(pair, demo.CoapPair):
        return None
    values = [scrape_retransmissions(p.metrics_port) for p in pair.procs]
    if all(v is None for v in values):
        return None
    return sum(v or 0 for v in values)


async def _run_fed(
    pair: Any, scenarios: tuple[str, ...], profile: LinkProfile
) -> list[tuple[str, float, bool, str]]:
    tag = f"[{pair.stack:<5} {profile.name} fed]"
    alice, bob = await pair.clients()
    await alice.register(NAMES.alice)
    await bob.register(NAMES.bob)
    room = await bob.call("POST", "/createRoom", {"preset": "public_chat", "name": NAMES.room})
    room_id = str(room["room_id"])
    await alice.sync()
    await bob.sync()
    if isinstance(pair, demo.CoapPair) and profile.name != "lan":
        progress(f"{tag} restarting the pair with link tuning for {profile.name}")
        await _restart_for_profile(pair, profile)
    out: list[tuple[str, float, bool, str]] = []
    await pair.quiet()
    await pair.mark()
    for name in scenarios:
        t0 = time.monotonic()
        ok, note = True, ""
        try:
            if name == "fed-first-contact":
                await alice.call("POST", f"/join/{_q(room_id)}", {}, server_name=pair.name_b)
                await asyncio.sleep(demo.SETTLE_JOIN)
                t_done = time.monotonic()
            else:
                n = _COUNTS[name]
                prefix = NAMES.text(len(f"{name} #"))
                await bob.sync()
                for i in range(n):
                    await alice.send(room_id, f"{prefix}{i:03d}")
                await bob.wait_for_message(room_id, f"{prefix}{n - 1:03d}", 1800)
                t_done = time.monotonic()
                got = await room_history(bob, room_id, prefix)
                expected = [f"{prefix}{i:03d}" for i in range(n)]
                ok = got == expected
                note = (
                    f"{n} delivered exactly once, in order"
                    if ok
                    else f"FAILED: bob's server has {len(got)} of {n} (order/duplicates wrong)"
                )
        except Exception as exc:  # reported per scenario
            ok, note, t_done = False, f"FAILED: {type(exc).__name__}: {exc}"[:300], time.monotonic()
        elapsed = t_done - t0
        await pair.quiet()
        await pair.mark()
        progress(f"{tag} {name}: {'ok' if ok else note} in {elapsed:.2f} s")
        out.append((name, elapsed, ok, note))
        if not ok and name == "fed-first-contact":
            break
    return out


async def federation_suite(
    root: Path, profile: LinkProfile, stacks: tuple[str, ...], scenarios: tuple[str, ...]
) -> list[ScenarioResult]:
    """The federation scenarios on both pairs, one pair after the other."""
    results: list[ScenarioResult] = []
    for stack in stacks:
        if stack == "https-nginx":
            continue  # the tuned front is measured on the client suite (see the lab's notes)
        pair: Any = (
            demo.CoapPair(root / "fed-coap", progress)
            if stack == "coap"
            else demo.HttpsPair(root / "fed-https", progress)
        )
        runs: list[tuple[str, float, bool, str]] = []
        traffic: list[Any] = []
        error = ""
        try:
            await pair.start()
            runs = await _run_fed(pair, scenarios, profile)
        except Exception as exc:
            error = f"FAILED: {type(exc).__name__}: {exc}"[:300]
            progress(f"[{stack}] federation scenarios {error}")
            tails = pair.log_tails()
            if tails:
                progress(tails)
        finally:
            retrans = _server_retransmissions(pair)
            with contextlib.suppress(Exception):
                traffic = await pair.intervals()
            await pair.close()
            pair.kill_all()
        for i, name in enumerate(scenarios):
            if i >= len(runs):
                results.append(
                    ScenarioResult(name, stack, profile.name, 0, 0, -1, 0.0, ok=False, note=error)
                )
                continue
            _, secs, ok, note = runs[i]
            t = traffic[i] if i < len(traffic) else demo.Traffic(0, 0)
            time_method = "measured"
            if stack == "https" and profile.name != "lan":
                secs, time_method = (
                    modelled_seconds(profile, t.a_to_b_bytes, t.b_to_a_bytes, 1),
                    "model",
                )
            results.append(
                ScenarioResult(
                    scenario=name,
                    stack=stack,
                    profile=profile.name,
                    ip_bytes=t.ip_bytes,
                    packets=t.packets,
                    round_trips=-1,
                    seconds=round(secs, 3),
                    retransmissions=(retrans or 0) if i == len(scenarios) - 1 else 0,
                    method="relay" if stack == "coap" else pair.method.split(" ", 1)[0].lower(),
                    ok=ok and t.ip_bytes > 0,
                    note=note,
                    up_bytes=t.a_to_b_bytes,
                    down_bytes=t.b_to_a_bytes,
                    time_method=time_method,
                    server="module" if stack == "coap" else "stock Synapse, TLS federation",
                )
            )
    return results


# -- the must-show run at 100 bit/s ----------------------------------------------------------


@attrs.frozen
class SlowDelivery:
    """A message from a nio client through the sidecar over a slow link, across federation."""

    profile: str
    event_id: str
    delivered: bool
    seconds_to_event_id: float
    seconds_to_delivery: float
    client_link_bytes: int
    client_link_datagrams: int
    federation_link_bytes: int
    federation_link_datagrams: int
    lost_datagrams: int
    sidecar_retransmissions: int
    server_retransmissions: int | None
    note: str = ""

    @property
    def total_bytes(self) -> int:
        return self.client_link_bytes + self.federation_link_bytes

    def lines(self) -> list[str]:
        return [
            f"profile {self.profile}: nio -> sidecar -> relay -> hs A -> relay -> hs B -> bob",
            f"  event id returned to the sender: {self.event_id or '(none)'} "
            f"after {self.seconds_to_event_id:.1f} s",
            f"  delivered to bob's /sync: {'yes' if self.delivered else 'NO'} "
            f"after {self.seconds_to_delivery:.1f} s",
            f"  client link: {self.client_link_bytes} B in {self.client_link_datagrams} datagrams; "
            f"federation link: {self.federation_link_bytes} B in "
            f"{self.federation_link_datagrams} datagrams (IP level, every datagram)",
            f"  retransmissions: sidecar {self.sidecar_retransmissions}, homeservers "
            f"{'n/a' if self.server_retransmissions is None else self.server_retransmissions}; "
            f"datagrams lost on the links: {self.lost_datagrams}",
        ] + ([f"  {self.note}"] if self.note else [])


def _sum_relays(relays: list[Relay]) -> tuple[int, int, int]:
    b = n = lost = 0
    for r in relays:
        s = r.stats
        b += s.uplink.transmitted_ip_bytes + s.downlink.transmitted_ip_bytes
        n += sum(d.offered_datagrams - d.queue_dropped_datagrams for d in (s.uplink, s.downlink))
        lost += s.uplink.lost_datagrams + s.downlink.lost_datagrams
    return b, n, lost


async def slow_federated_delivery(
    root: Path, profile_name: str = "100bps", seed: int = 1
) -> SlowDelivery:
    """Set the scene at lan speed (registration, room, remote join), then move both links
    (client <-> hs A, hs A <-> hs B) to ``profile_name`` and send one message from a nio
    client through the sidecar."""
    import nio

    from synapse_coap.transport.metrics import CountingMetrics

    profile = get_profile(profile_name)
    pair = demo.CoapPair(root / f"deliver-{profile_name}", progress)
    client_relay: Relay | None = None
    runner: Any = None
    coap_client: Any = None
    nio_client: Any = None
    tag = f"[coap  {profile_name} deliver]"
    try:
        await pair.start()
        alice, bob = await pair.clients()
        await alice.register(NAMES.alice)
        await bob.register(NAMES.bob)
        room = await bob.call("POST", "/createRoom", {"preset": "public_chat", "name": NAMES.room})
        room_id = str(room["room_id"])
        await alice.call("POST", f"/join/{_q(room_id)}", {}, server_name=pair.name_b)
        await bob.sync()
        progress(f"{tag} scene set at lan speed (alice joined bob's room over federation)")
        await _restart_for_profile(pair, profile)
        host_a = pair.name_a
        client_relay = await Relay.start(
            RelayConfig(
                listen=("127.0.0.1", 0),
                upstream=("127.0.0.1", pair.coap_ports[host_a]),
                profile=profile,
                seed=seed,
            )
        )
        metrics = CountingMetrics()
        runner, _sidecar, coap_client, port = await start_sidecar(
            client_relay.address, host_a, pair.keys[host_a], profile, metrics
        )
        nio_client = nio.AsyncClient(
            f"http://127.0.0.1:{port}", alice.user_id, config=nio_config(profile)
        )
        nio_client.restore_login(alice.user_id, "LAB", alice.token or "")
        await bob.sync()
        relays = [client_relay, *pair.relays]
        c0 = _sum_relays([client_relay])
        f0 = _sum_relays(list(pair.relays))
        r0 = _server_retransmissions(pair)
        text = NAMES.text(len(f"hello bob, at {profile_name}"))
        progress(f"{tag} alice sends one message through the sidecar (this takes a while)")
        t0 = time.monotonic()
        r = await nio_client.room_send(
            room_id, "m.room.message", {"msgtype": "m.text", "body": text}
        )
        t_id = time.monotonic() - t0
        event_id = str(getattr(r, "event_id", "") or "")
        progress(f"{tag} event id {event_id or r!r} after {t_id:.1f} s; waiting for bob")
        delivered, note = True, ""
        try:
            await bob.wait_for_message(room_id, text, 1800)
        except demo.DemoError as exc:
            delivered, note = False, str(exc)
        t_deliver = time.monotonic() - t0
        progress(f"{tag} delivered={delivered} after {t_deliver:.1f} s; letting the links settle")
        deadline = time.monotonic() + 120
        last = None
        while time.monotonic() < deadline:
            now = _sum_relays(relays)
            if now == last and not any(x.stats.pending for x in relays):
                break
            last = now
            await asyncio.sleep(3.0)
        c1 = _sum_relays([client_relay])
        f1 = _sum_relays(list(pair.relays))
        r1 = _server_retransmissions(pair)
        return SlowDelivery(
            profile=profile_name,
            event_id=event_id,
            delivered=delivered,
            seconds_to_event_id=round(t_id, 2),
            seconds_to_delivery=round(t_deliver, 2),
            client_link_bytes=c1[0] - c0[0],
            client_link_datagrams=c1[1] - c0[1],
            federation_link_bytes=f1[0] - f0[0],
            federation_link_datagrams=f1[1] - f0[1],
            lost_datagrams=(c1[2] - c0[2]) + (f1[2] - f0[2]),
            sidecar_retransmissions=metrics.retransmissions,
            server_retransmissions=None if r0 is None or r1 is None else r1 - r0,
            note=note,
        )
    finally:
        if nio_client is not None:
            await nio_client.close()
        if runner is not None:
            await runner.cleanup()
        if coap_client is not None:
            await coap_client.close()
        if client_relay is not None:
            await client_relay.close()
        await pair.close()
        pair.kill_all()
