"""CoAP conformance of every listener, from the ETSI CoAP plugtest test descriptions.

Each case is named by the TD id it was written from (the public CoAP#4 plugtest
descriptions: TD_COAP_CORE, TD_COAP_BLOCK, TD_COAP_OBS, TD_COAP_LINK), or by the RFC section
it checks; docs/wire.md has the table of every TD, applicable or not, and why.
The cases are ours: the TDs' stimuli adapted to Matrix resources (``/test``
becomes ``/_matrix/client/versions``, a PUT is a message send, a DELETE removes
a room alias, the observable resource is a push registration of ``/sync``), checked
byte-level with a raw socket.

Every case runs against four listeners of one real Synapse:

* ``module-plain``: the module's plain CoAP listener;
* ``module-noise``: the module's Noise listener (the same bytes inside records);
* ``gateway-plain`` / ``gateway-noise``: ``synapse-coap gateway`` in front of the
  same Synapse's HTTP client listener.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from synapse_coap.mapping import numbers as n
from synapse_coap.mapping.coap import decode_coap, encode_coap
from synapse_coap.mapping.messages import CoapMessage, CoapOption
from tests.harness.synapse_proc import SynapseProcess, free_port

pytestmark = pytest.mark.integration

SERVER = "conf.test"
READY = r"synapse-coap: CoAP listener ready"
SYNAPSE_COAP = str(Path(sys.executable).parent / "synapse-coap")
COAP_CLIENT = shutil.which("coap-client-notls")
AIOCOAP_CLIENT = str(Path(sys.executable).parent / "aiocoap-client")
TARGETS = ("module-plain", "module-noise", "gateway-plain", "gateway-noise")
CON, NON, ACK, RST = 0, 1, 2, 3
JSON_CF = b"\x32"
VERSIONS = "/_matrix/client/versions"
#: The listeners' link: two retransmissions (RFC 7252's default is 4), so that an
#: unacknowledged notification ends its registration in seconds (TD_COAP_OBS_05).
LINK = {"max_retransmit": 2}
#: Each /sync the server issues for a push registration waits at most this long, so
#: a logout ends an observation quickly (TD_COAP_OBS_07).
PUSH_POLL = 2.0
#: An unacknowledged notification is parked; a client silent this long loses its
#: registration (TD_COAP_OBS_05; the default is an hour).
PARK_TIMEOUT = 3.0
#: The news each TD_COAP_OBS case waits for is sent with the observer's own access token
#: (its own device's echo), which the server would otherwise hold for the next news.
ECHO_HOLD = 0


# -- a raw CoAP peer, plain or inside a Noise session -------------------------------------


class Peer:
    """Sends and receives whole CoAP messages as bytes (inside Noise records if keyed)."""

    def __init__(self, addr: tuple[str, int], key: bytes | None = None) -> None:
        self.addr = addr
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.inbox: deque[bytes] = deque()
        self.endpoint: Any = None
        if key is not None:
            from synapse_coap.noise.endpoint import NoiseEndpoint
            from synapse_coap.noise.keys import generate_private_key
            from synapse_coap.noise.trust import TrustPolicy
            from synapse_coap.transport.convert import supported_profile_offers

            self.endpoint = NoiseEndpoint(
                generate_private_key(),
                trust=TrustPolicy(pinned={SERVER: key}),
                profiles=supported_profile_offers(),
                clock=time.monotonic,
            )
            self.channel, events = self.endpoint.connect(addr, peer_name=SERVER, peer_static=key)
            self._process(events)

    def close(self) -> None:
        self.sock.close()

    def _process(self, events: list[Any]) -> None:
        from synapse_coap.noise.events import Received, Transmit

        for ev in events:
            if isinstance(ev, Transmit):
                self.sock.sendto(ev.data, ev.addr)
            elif isinstance(ev, Received):
                self.inbox.append(ev.plaintext)

    def send(self, data: bytes) -> None:
        if self.endpoint is None:
            self.sock.sendto(data, self.addr)
        else:
            self._process(self.endpoint.send(self.channel, data))

    def recv(self, timeout: float = 10.0) -> bytes | None:
        deadline = time.monotonic() + timeout
        while not self.inbox:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self.endpoint is not None:
                timer = self.endpoint.next_timer()
                if timer is not None:
                    left = min(left, max(0.005, timer - time.monotonic()))
            self.sock.settimeout(left)
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                if self.endpoint is not None:
                    self._process(self.endpoint.handle_timers())
                continue
            if self.endpoint is None:
                return data
            self._process(self.endpoint.datagram_received(data, addr))
        return self.inbox.popleft()

    def exchange(self, data: bytes, timeout: float = 10.0) -> Reply:
        """Send a request; its response (a separate one is waited for and acknowledged)."""
        self.send(data)
        got = self.recv(timeout)
        assert got is not None, "no answer"
        reply = Reply(got)
        if reply.mtype == ACK and reply.msg.code == 0 and decode_coap(data)[0] == CON:
            later = self.recv(timeout)
            assert later is not None, "empty ACK, then no separate response"
            reply = Reply(later)
            if reply.mtype == CON:
                self.send(ack(reply))
        return reply


class Reply:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.mtype, self.mid, self.token, self.msg = decode_coap(data)
        #: the whole payload (a notification's other blocks appended, see Observer)
        self.full: bytes = self.msg.payload

    @property
    def code(self) -> str:
        return n.code_str(self.msg.code)

    def uint(self, number: int) -> int | None:
        value = self.msg.first(number)
        return None if value is None else int.from_bytes(value, "big")

    def json(self) -> Any:
        assert self.uint(n.CONTENT_FORMAT) == n.CF_JSON, (self.code, self.msg.options)
        return json.loads(self.msg.payload)

    def __repr__(self) -> str:
        return f"<{self.code} type={self.mtype} mid={self.mid} {self.msg.options} {self.msg.payload[:80]!r}>"


_mids = iter(range(random.randrange(1, 30000), 65536))


def request(
    code: int,
    target: str,
    *,
    mtype: int = CON,
    token: bytes = b"\x5a\x01",
    mid: int | None = None,
    accept: bytes | None = JSON_CF,
    payload: Any = None,
    options: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """A CoAP request as a standard tool sends it: plain Uri-Path / Uri-Query values."""
    path, _, query = target.partition("?")
    opts = [CoapOption(n.URI_PATH, seg.encode()) for seg in path.strip("/").split("/") if seg]
    opts += [CoapOption(n.URI_QUERY, q.encode()) for q in query.split("&") if q]
    if accept is not None:
        opts.append(CoapOption(n.ACCEPT, accept))
    body = b""
    if payload is not None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        opts.append(CoapOption(n.CONTENT_FORMAT, JSON_CF))
    opts += [CoapOption(num, value) for num, value in options]
    opts.sort(key=lambda o: o.number)
    return encode_coap(
        CoapMessage(code, tuple(opts), body),
        mtype=mtype,
        mid=next(_mids) if mid is None else mid,
        token=token,
    )


def block(num: int, more: bool, szx: int) -> bytes:
    value = (num << 4) | (8 if more else 0) | szx
    return value.to_bytes((value.bit_length() + 7) // 8, "big") if value else b""


def parse_block(value: bytes) -> tuple[int, bool, int]:
    v = int.from_bytes(value, "big")
    return v >> 4, bool(v & 8), v & 7


def with_option(data: bytes, number: int, value: bytes) -> bytes:
    mtype, _mid, token, msg = decode_coap(data)
    opts = sorted(
        [o for o in msg.options if o.number != number] + [CoapOption(number, value)],
        key=lambda o: o.number,
    )
    return encode_coap(
        CoapMessage(msg.code, tuple(opts), msg.payload), mtype=mtype, mid=next(_mids), token=token
    )


def ack(reply: Reply) -> bytes:
    return bytes([0x60, 0]) + reply.mid.to_bytes(2, "big")


# -- the servers ------------------------------------------------------------------------------


class World:
    def __init__(self, root: Path) -> None:
        from synapse_coap.noise.keys import generate_private_key, public_key, write_key_file

        self.ports = {t: free_port("udp") for t in TARGETS}
        key_path = root / "module.key"
        self.synapse = SynapseProcess(
            root / "hs",
            SERVER,
            http_port=free_port(),
            modules=[
                {
                    "module": "synapse_coap.CoapModule",
                    "config": {
                        "listen": [f"127.0.0.1:{self.ports['module-noise']}"],
                        "plain_listen": [f"127.0.0.1:{self.ports['module-plain']}"],
                        "private_key_path": str(key_path),
                        "link": LINK,
                        "push": {
                            "poll_timeout": PUSH_POLL,
                            "park_timeout": PARK_TIMEOUT,
                            "echo_hold": ECHO_HOLD,
                        },
                    },
                }
            ],
        )
        self.gateway_private = generate_private_key()
        gw_key = root / "gateway.key"
        write_key_file(gw_key, self.gateway_private)
        self.keys: dict[str, bytes] = {"gateway-noise": public_key(self.gateway_private)}
        self.key_path = key_path
        self.gateway_cmd = [
            SYNAPSE_COAP,
            "gateway",
            "--listen",
            f"127.0.0.1:{self.ports['gateway-noise']}",
            "--plain-listen",
            f"127.0.0.1:{self.ports['gateway-plain']}",
            "--http-target",
            "",
            "--key",
            str(gw_key),
            "--server-name",
            SERVER,
            "--push-poll-timeout",
            str(PUSH_POLL),
            "--push-park-timeout",
            str(PARK_TIMEOUT),
            "--push-echo-hold",
            str(ECHO_HOLD),
            *(arg for k, v in LINK.items() for arg in ("--link", f"{k}={v}")),
        ]
        self.gateway: subprocess.Popen[bytes] | None = None
        self.gateway_log = root / "gateway.log"
        self.accounts: dict[str, tuple[str, str]] = {}

    def start(self) -> None:
        from synapse_coap.noise.keys import public_key, read_key_file

        (self.synapse.workdir).mkdir(parents=True, exist_ok=True)
        self.synapse.start(ready_log_pattern=READY)
        self.keys["module-noise"] = public_key(read_key_file(self.key_path))
        cmd = list(self.gateway_cmd)
        cmd[cmd.index("--http-target") + 1] = self.synapse.base_url
        with open(self.gateway_log, "ab") as log:
            self.gateway = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL
            )
        assert self.gateway.stdout is not None
        line = self.gateway.stdout.readline()
        assert line, self.gateway_log.read_text()[-2000:]

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.terminate()
            try:
                self.gateway.wait(15)
            except subprocess.TimeoutExpired:
                self.gateway.kill()
                self.gateway.wait()
        self.synapse.stop()

    def peer(self, target: str) -> Peer:
        return Peer(("127.0.0.1", self.ports[target]), self.keys.get(target))

    def account(self, target: str) -> tuple[str, str]:
        """(access token, room id) of a user registered through ``target``."""
        if target not in self.accounts:
            peer = self.peer(target)
            try:
                name = f"td{target.replace('-', '')}{random.randrange(10**6)}"
                reg = peer.exchange(
                    request(
                        n.POST,
                        "/_matrix/client/v3/register",
                        payload={
                            "username": name,
                            "password": "correct horse battery",
                            "auth": {"type": "m.login.dummy"},
                        },
                    )
                )
                assert reg.code == "2.04", reg
                token = reg.json()["access_token"]
                room = peer.exchange(
                    request(
                        n.POST, f"/_matrix/client/v3/createRoom?access_token={token}", payload={}
                    )
                )
                assert room.code == "2.04", room
                self.accounts[target] = (token, room.json()["room_id"])
            finally:
                peer.close()
        return self.accounts[target]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("conformance"))
    try:
        w.start()
        yield w
    finally:
        w.stop()
    log = w.synapse.log_text()
    bad = [line for line in log.splitlines() if " - ERROR - " in line or "Traceback" in line]
    assert not bad, "\n".join(bad[:10])


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def peer(world: World, target: str) -> Iterator[Peer]:
    p = world.peer(target)
    yield p
    p.close()


# -- TD_COAP_CORE -----------------------------------------------------------------------------


@pytest.mark.parametrize("mtype", [CON, NON], ids=["TD_COAP_CORE_01", "TD_COAP_CORE_05"])
def test_get(peer: Peer, mtype: int) -> None:
    """GET (CON: piggybacked ACK, same MID; NON: a NON response) -> 2.05, labelled."""
    data = request(n.GET, VERSIONS, mtype=mtype)
    reply = peer.exchange(data)
    assert reply.code == "2.05" and reply.token == b"\x5a\x01"
    if mtype == CON:
        assert reply.mtype == ACK and reply.mid == decode_coap(data)[1]
    else:
        assert reply.mtype == NON
    assert reply.uint(n.CONTENT_FORMAT) == n.CF_JSON  # (the rest comes in Block2 blocks)
    assert reply.msg.payload.startswith(b'{"versions":["')
    compact = peer.exchange(request(n.GET, VERSIONS, mtype=mtype, accept=None))
    assert compact.code == "2.05" and compact.uint(n.CONTENT_FORMAT) == n.CF_COMPACT


@pytest.mark.parametrize("mtype", [CON, NON], ids=["TD_COAP_CORE_02", "TD_COAP_CORE_06"])
def test_delete(world: World, target: str, peer: Peer, mtype: int) -> None:
    """DELETE -> 2.02 Deleted (an HTTP 200 to a DELETE, no HTTP-Status option)."""
    token, room = world.account(target)
    alias = f"#del{random.randrange(10**9)}:{SERVER}"
    made = peer.exchange(
        request(
            n.PUT,
            f"/_matrix/client/v3/directory/room/{alias}?access_token={token}",
            payload={"room_id": room},
        )
    )
    assert made.code == "2.04", made
    reply = peer.exchange(
        request(
            n.DELETE, f"/_matrix/client/v3/directory/room/{alias}?access_token={token}", mtype=mtype
        )
    )
    assert reply.code == "2.02" and reply.mtype in ((ACK, CON) if mtype == CON else (NON,)), reply
    assert reply.msg.first(n.OPT_HTTP_STATUS) is None
    gone = peer.exchange(request(n.GET, f"/_matrix/client/v3/directory/room/{alias}"))
    assert gone.code == "4.04", gone


@pytest.mark.parametrize("mtype", [CON, NON], ids=["TD_COAP_CORE_03", "TD_COAP_CORE_07"])
def test_put(world: World, target: str, peer: Peer, mtype: int) -> None:
    """PUT -> 2.04 Changed with the result, labelled."""
    token, room = world.account(target)
    txn = f"td{random.randrange(10**9)}"
    reply = peer.exchange(
        request(
            n.PUT,
            f"/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}?access_token={token}",
            mtype=mtype,
            payload={"msgtype": "m.text", "body": "TD_COAP_CORE_03"},
        )
    )
    assert reply.code == "2.04" and reply.mtype in ((ACK, CON) if mtype == CON else (NON,)), reply
    assert reply.json()["event_id"].startswith("$")


@pytest.mark.parametrize("mtype", [CON, NON], ids=["TD_COAP_CORE_04", "TD_COAP_CORE_08"])
def test_post(world: World, target: str, peer: Peer, mtype: int) -> None:
    """POST -> 2.04 Changed (RFC 7252 5.8.2: 2.01 or 2.04; Matrix answers 200)."""
    token, _room = world.account(target)
    reply = peer.exchange(
        request(
            n.POST, f"/_matrix/client/v3/createRoom?access_token={token}", mtype=mtype, payload={}
        )
    )
    assert reply.code == "2.04" and reply.mtype in ((ACK, CON) if mtype == CON else (NON,)), reply
    assert reply.json()["room_id"].startswith("!")


def _since(peer: Peer, token: str) -> str:
    reply = peer.exchange(request(n.GET, _sync(token, None, 0)))
    assert reply.code == "2.05", reply
    return str(reply.json()["next_batch"])


def _sync(token: str, since: str | None, timeout_ms: int) -> str:
    empty = (
        '{"room":{"rooms":[]},"presence":{"not_types":["*"]},"account_data":{"not_types":["*"]}}'
    )
    out = f"/_matrix/client/v3/sync?timeout={timeout_ms}&filter={empty}&access_token={token}"
    return out + (f"&since={since}" if since else "")


@pytest.mark.parametrize(
    ("tok", "mtype"),
    [(b"\x09\x08", CON), (b"12345678", CON), (b"\x17", NON)],
    ids=["TD_COAP_CORE_09", "TD_COAP_CORE_11", "TD_COAP_CORE_17"],
)
def test_separate_response(world: World, target: str, peer: Peer, tok: bytes, mtype: int) -> None:
    """A long-poll: CON -> empty ACK, then a CON 2.05 with the token (ACKed by us);
    NON -> a NON 2.05 later."""
    token, _room = world.account(target)
    since = _since(peer, token)
    data = request(n.GET, _sync(token, since, 700), mtype=mtype, token=tok)
    peer.send(data)
    first = Reply(peer.recv() or b"")
    if mtype == CON:
        assert (first.mtype, first.msg.code, first.mid) == (ACK, 0, decode_coap(data)[1]), first
        first = Reply(peer.recv() or b"")
        assert first.mtype == CON, first
        peer.send(ack(first))
    else:
        assert first.mtype == NON, first
    assert first.code == "2.05" and first.token == tok, first
    assert first.json()["next_batch"]


def test_TD_COAP_CORE_10_token(peer: Peer) -> None:
    """An 8-byte token comes back unchanged."""
    reply = peer.exchange(request(n.GET, VERSIONS, token=b"\x00\xffTD_10"))
    assert reply.code == "2.05" and reply.token == b"\x00\xffTD_10"


def test_TD_COAP_CORE_12_no_token(peer: Peer) -> None:
    reply = peer.exchange(request(n.GET, VERSIONS, token=b""))
    assert reply.code == "2.05" and reply.token == b"" and reply.mtype == ACK


def test_TD_COAP_CORE_13_several_uri_path(world: World, target: str, peer: Peer) -> None:
    token, room = world.account(target)
    path = f"/_matrix/client/v3/rooms/{room}/state?access_token={token}"
    state, _ = _get_blocks(peer, None, path)
    assert any(ev["type"] == "m.room.create" for ev in json.loads(state))


def test_TD_COAP_CORE_14_several_uri_query(world: World, target: str, peer: Peer) -> None:
    token, _room = world.account(target)
    reply = peer.exchange(
        request(n.GET, f"/_matrix/client/v3/publicRooms?limit=1&access_token={token}")
    )
    assert reply.code == "2.05", reply
    assert "chunk" in reply.json()


def test_TD_COAP_CORE_15_lossy_con_processed_once(world: World, target: str, peer: Peer) -> None:
    """The first transmission's answer is "lost": the retransmitted CON (same MID) is
    recognised as a duplicate and the request is processed once (one room, not two)."""
    token, _room = world.account(target)
    data = request(n.POST, f"/_matrix/client/v3/createRoom?access_token={token}", payload={})
    peer.send(data)
    got = [Reply(peer.recv() or b"")]
    peer.send(data)  # the retransmission
    while True:
        more = peer.recv(timeout=1.5)
        if more is None:
            break
        got.append(Reply(more))
    for r in got:
        if r.mtype == CON:
            peer.send(ack(r))
    answers = [r for r in got if r.msg.code != 0]
    assert answers and all(r.code == "2.04" for r in answers), got
    assert len({r.json()["room_id"] for r in answers}) == 1, got
    piggybacked = [r for r in answers if r.mtype == ACK]
    assert len({r.data for r in piggybacked}) <= 1  # a duplicate gets the cached bytes


def test_TD_COAP_CORE_16_lossy_separate(world: World, target: str, peer: Peer) -> None:
    """The separate CON response is not acknowledged: it is retransmitted (same MID)."""
    token, _room = world.account(target)
    since = _since(peer, token)
    peer.send(request(n.GET, _sync(token, since, 300), token=b"\x16"))
    empty = Reply(peer.recv() or b"")
    assert empty.mtype == ACK and empty.msg.code == 0
    sep = Reply(peer.recv() or b"")
    assert sep.mtype == CON and sep.code == "2.05"
    again = Reply(peer.recv(timeout=20) or b"")
    assert again.mid == sep.mid and again.data == sep.data
    peer.send(ack(again))


def test_TD_COAP_CORE_20_accept(peer: Peer) -> None:
    """Accept: JSON (50) -> JSON; the compact format (65300) -> compact; else 4.06."""
    as_json = peer.exchange(request(n.GET, VERSIONS, accept=JSON_CF))
    assert as_json.code == "2.05" and as_json.uint(n.CONTENT_FORMAT) == 50
    compact = peer.exchange(request(n.GET, VERSIONS, accept=n.CF_COMPACT.to_bytes(2, "big")))
    assert compact.code == "2.05" and compact.uint(n.CONTENT_FORMAT) == n.CF_COMPACT
    for other in (b"", b"\x29", b"\x3c", b"\x03\xe8"):  # text/plain, xml, cbor, 1000
        reply = peer.exchange(request(n.GET, VERSIONS, accept=other))
        assert reply.code == "4.06" and not reply.msg.payload, (other, reply)
    core = peer.exchange(request(n.GET, "/.well-known/core", accept=JSON_CF))
    assert core.code == "4.06", core


def test_TD_COAP_CORE_21_etag_in_request_is_harmless(peer: Peer) -> None:
    """No Matrix resource validates (no 2.03): a request ETag is elective, ignored."""
    reply = peer.exchange(request(n.GET, VERSIONS, options=((n.ETAG, b"etag1"),)))
    assert reply.code == "2.05", reply


@pytest.mark.parametrize(
    "option", [n.IF_MATCH, n.IF_NONE_MATCH], ids=["TD_COAP_CORE_22", "TD_COAP_CORE_23"]
)
def test_conditional_requests_are_bad_options(peer: Peer, option: int) -> None:
    """If-Match / If-None-Match are critical and not implemented: 4.02 (RFC 7252 5.4.1)."""
    reply = peer.exchange(
        request(n.PUT, VERSIONS, options=((option, b"x" if option == 1 else b""),))
    )
    assert reply.code == "4.02", reply


def test_TD_COAP_CORE_31_ping(peer: Peer) -> None:
    mid = next(_mids)
    reply = peer.exchange(bytes([0x40, 0]) + mid.to_bytes(2, "big"))
    assert (
        reply.mtype == RST
        and reply.mid == mid
        and reply.data == bytes([0x70, 0]) + mid.to_bytes(2, "big")
    )


# -- TD_COAP_BLOCK ----------------------------------------------------------------------------


def _get_blocks(peer: Peer, szx: int | None, target: str = VERSIONS) -> tuple[bytes, list[Reply]]:
    base = request(n.GET, target)
    replies: list[Reply] = []
    body = b""
    num = 0
    data = base if szx is None else with_option(base, n.BLOCK2, block(0, False, szx))
    while True:
        reply = peer.exchange(data)
        assert reply.code == "2.05", reply
        replies.append(reply)
        b2 = reply.msg.first(n.BLOCK2)
        body += reply.msg.payload
        if b2 is None:
            return body, replies
        got_num, more, got_szx = parse_block(b2)
        assert got_num == num
        if szx is not None:
            assert got_szx == szx
        if not more:
            return body, replies
        assert len(reply.msg.payload) == 16 << got_szx
        num += 1
        data = with_option(base, n.BLOCK2, block(num, False, got_szx))


@pytest.mark.parametrize("szx", [2, 0], ids=["TD_COAP_BLOCK_01", "TD_COAP_BLOCK_06"])
def test_block2_early_negotiation(peer: Peer, szx: int) -> None:
    """The client asks for 64-byte (16-byte) blocks from the first request on."""
    body, replies = _get_blocks(peer, szx)
    assert len(replies) > 1
    assert "v1.1" in json.loads(body)["versions"]
    assert all(r.uint(n.CONTENT_FORMAT) == n.CF_JSON for r in replies)
    etags = {r.msg.first(n.ETAG) for r in replies}
    assert len(etags) == 1  # the same (or no) ETag on every block


def test_TD_COAP_BLOCK_02_late_negotiation(peer: Peer) -> None:
    """No Block2 in the request; a response over the listener's block size comes in blocks."""
    body, replies = _get_blocks(peer, None)
    assert "v1.1" in json.loads(body)["versions"]
    if len(body) > 1024:
        assert len(replies) > 1 and replies[0].msg.first(n.BLOCK2) is not None


def _put_blocks(peer: Peer, code: int, target: str, body: bytes, szx: int = 2) -> Reply:
    size = 16 << szx
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    last: Reply | None = None
    for num, chunk in enumerate(chunks):
        more = num < len(chunks) - 1
        data = with_option(request(code, target, payload=chunk), n.BLOCK1, block(num, more, szx))
        last = peer.exchange(data)
        if more:
            assert last.code == "2.31", last
            assert parse_block(last.msg.first(n.BLOCK1) or b"") == (num, True, szx)
    assert last is not None
    return last


def test_TD_COAP_BLOCK_03_put_block1(world: World, target: str, peer: Peer) -> None:
    token, room = world.account(target)
    text = "TD_COAP_BLOCK_03 " * 30
    body = json.dumps({"msgtype": "m.text", "body": text}).encode()
    txn = f"b3{random.randrange(10**9)}"
    reply = _put_blocks(
        peer,
        n.PUT,
        f"/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}?access_token={token}",
        body,
    )
    assert reply.code == "2.04", reply
    event_id = reply.json()["event_id"]
    event, _ = _get_blocks(
        peer, 6, f"/_matrix/client/v3/rooms/{room}/event/{event_id}?access_token={token}"
    )
    assert json.loads(event)["content"]["body"] == text


def test_TD_COAP_BLOCK_04_post_block1(world: World, target: str, peer: Peer) -> None:
    token, _room = world.account(target)
    name = "TD_COAP_BLOCK_04 " * 20
    reply = _put_blocks(
        peer,
        n.POST,
        f"/_matrix/client/v3/createRoom?access_token={token}",
        json.dumps({"name": name}).encode(),
    )
    assert reply.code == "2.04", reply
    assert reply.json()["room_id"].startswith("!")


def test_TD_COAP_BLOCK_05_post_block1_with_a_block2_response(
    world: World, target: str, peer: Peer
) -> None:
    """A POST sent in Block1 blocks whose response is larger than a block: the last
    Block1 exchange answers 2.04 with the first Block2 block; the client fetches the
    others with the same POST (same options, no payload, no Block1) and Block2."""
    token, room = world.account(target)
    term = f"blk{random.randrange(10**9)}"
    for i in range(4):
        txn = f"b5{random.randrange(10**9)}"
        sent = peer.exchange(
            request(
                n.PUT,
                f"/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}?access_token={token}",
                payload={"msgtype": "m.text", "body": f"{term} {i} " + "TD_COAP_BLOCK_05 " * 12},
            )
        )
        assert sent.code == "2.04", sent
    search = f"/_matrix/client/v3/search?access_token={token}"
    query = {
        "search_categories": {
            "room_events": {
                "search_term": term,
                "keys": ["content.body"],
                "filter": {"rooms": [room]},
            }
        }
    }
    first = _put_blocks(peer, n.POST, search, json.dumps(query).encode(), szx=2)
    assert first.code == "2.04", first
    assert parse_block(first.msg.first(n.BLOCK1) or b"")[1] is False, first
    b2 = first.msg.first(n.BLOCK2)
    assert b2 is not None, first
    num, more, szx = parse_block(b2)
    assert (num, more) == (0, True), first
    body = first.msg.payload
    again = request(n.POST, search, options=((n.CONTENT_FORMAT, JSON_CF),))
    while more:
        num += 1
        part = peer.exchange(with_option(again, n.BLOCK2, block(num, False, szx)))
        assert part.code == "2.04", part
        got, more, _ = parse_block(part.msg.first(n.BLOCK2) or b"")
        assert got == num, part
        body += part.msg.payload
    results = json.loads(body)["search_categories"]["room_events"]["results"]
    assert sorted(r["result"]["content"]["body"].split()[1] for r in results) == [
        "0",
        "1",
        "2",
        "3",
    ]


# -- TD_COAP_OBS: push of /sync (RFC 7641) ----------------------------------------------------


class Observer:
    """One registration for push of ``/sync`` on a fresh room, with a second peer sending."""

    def __init__(self, world: World, target: str, peer: Peer, tok: bytes = b"\x0b\x5e") -> None:
        self.world, self.target, self.peer, self.tok = world, target, peer, tok
        self.token, _room = world.account(target)
        self.sender = world.peer(target)
        created = self.sender.exchange(
            request(n.POST, f"/_matrix/client/v3/createRoom?access_token={self.token}", payload={})
        )
        assert created.code == "2.04", created
        self.room = created.json()["room_id"]
        since = _since(peer, self.token)
        only_this_room = json.dumps(
            {
                "room": {
                    "rooms": [self.room],
                    "state": {"types": []},
                    "ephemeral": {"types": []},
                    "account_data": {"not_types": ["*"]},
                },
                "presence": {"not_types": ["*"]},
                "account_data": {"not_types": ["*"]},
            },
            separators=(",", ":"),
        )
        self.target_url = f"/_matrix/client/v3/sync?since={since}&filter={only_this_room}"
        self.auth = bytes([0x80]) + f"Bearer {self.token}".encode()  # literal Authorization

    def register(self, observe: bytes = b"", mtype: int = CON) -> bytes:
        data = request(
            n.GET,
            self.target_url,
            mtype=mtype,
            token=self.tok,
            options=((n.OBSERVE, observe), (n.OPT_AUTHORIZATION, self.auth)),
        )
        self.peer.send(data)
        return data

    def registered(self, mtype: int = CON) -> None:
        """Register; a CON registration is acknowledged at once with an empty ACK."""
        data = self.register(mtype=mtype)
        if mtype == CON:
            first = Reply(self.peer.recv() or b"")
            assert (first.mtype, first.msg.code, first.mid) == (ACK, 0, decode_coap(data)[1]), first

    def say(self, text: str) -> None:
        txn = f"obs{random.randrange(10**9)}"
        sent = self.sender.exchange(
            request(
                n.PUT,
                f"/_matrix/client/v3/rooms/{self.room}/send/m.room.message/{txn}"
                f"?access_token={self.token}",
                payload={"msgtype": "m.text", "body": text},
            )
        )
        assert sent.code == "2.04", sent

    def notification(self, timeout: float = 15.0, *, acknowledge: bool = True) -> Reply:
        """The next notification: CON 2.05, the registration's token, JSON, Observe. One
        larger than a block is acknowledged and its other blocks fetched (RFC 7641 with
        RFC 7959: GETs of the registration without Observe, served from the pushed
        representation, the ETag on every block); ``full`` holds the whole payload."""
        got = self.peer.recv(timeout)
        assert got is not None, "no notification"
        note = Reply(got)
        assert note.mtype == CON and note.code == "2.05" and note.token == self.tok, note
        assert note.uint(n.CONTENT_FORMAT) == n.CF_JSON, note
        assert note.msg.first(n.OBSERVE) is not None, note
        b2 = note.msg.first(n.BLOCK2)
        if acknowledge:
            self.peer.send(ack(note))
        if acknowledge and b2 is not None:
            etag = note.msg.first(n.ETAG)
            assert etag, note
            num, more, szx = parse_block(b2)
            base = request(
                n.GET,
                self.target_url,
                token=b"\x0b\x5f",
                options=((n.OPT_AUTHORIZATION, self.auth),),
            )
            while more:
                num += 1
                part = self.peer.exchange(with_option(base, n.BLOCK2, block(num, False, szx)))
                assert part.code == "2.05" and part.msg.first(n.ETAG) == etag, part
                assert part.msg.first(n.OBSERVE) is None, part
                got_num, more, _ = parse_block(part.msg.first(n.BLOCK2) or b"")
                assert got_num == num, part
                note.full += part.msg.payload
        return note

    def texts(self, note: Reply) -> list[str]:
        body = json.loads(note.full)
        room = body.get("rooms", {}).get("join", {}).get(self.room)
        if room is None:
            return []
        events = room["timeline"]["events"]
        return [e["content"]["body"] for e in events if e["type"] == "m.room.message"]

    def wait_for(self, text: str) -> Reply:
        """Acknowledge notifications until one carries ``text`` (the first may carry
        other news, such as the user's own new device)."""
        while True:
            note = self.notification()
            found = self.texts(note)
            if found:
                assert found == [text], found
                return note

    def settled(self) -> None:
        """Registered, with the news of the moment (own devices ...) already pushed."""
        self.registered()
        self.say("ready")
        self.wait_for("ready")

    def quiet(self, seconds: float) -> bool:
        """Nothing arrives for ``seconds`` (a retransmission would)."""
        return self.peer.recv(timeout=seconds) is None

    def cancel(self) -> Reply:
        """TD_COAP_OBS_12: GET with Observe 1 and the registration's token."""
        self.register(observe=b"\x01")
        while True:
            got = self.peer.recv()
            assert got is not None, "no answer to the cancelling GET"
            reply = Reply(got)
            if reply.mtype == CON and reply.msg.first(n.OBSERVE) is not None:
                self.peer.send(ack(reply))  # a notification already under way
                continue
            if reply.mtype == ACK and reply.msg.code == 0:
                continue  # acknowledged; the response follows
            if reply.mtype == CON:
                self.peer.send(ack(reply))
            return reply

    def close(self) -> None:
        self.sender.close()


@pytest.fixture
def observer(world: World, target: str, peer: Peer) -> Iterator[Observer]:
    obs = Observer(world, target, peer)
    try:
        yield obs
    finally:
        obs.close()


def test_TD_COAP_OBS_01_09_confirmable_notifications(observer: Observer) -> None:
    """Register (empty ACK at once), then each change of the resource (a new message) is a
    CON 2.05 with the registration's token, the same Content-Format, a growing Observe
    number and the new value; each is acknowledged."""
    observer.settled()
    observer.say("TD_COAP_OBS_01 first")
    first = observer.wait_for("TD_COAP_OBS_01 first")
    observer.say("TD_COAP_OBS_09 second")
    second = observer.wait_for("TD_COAP_OBS_09 second")
    assert (second.uint(n.OBSERVE) or 0) > (first.uint(n.OBSERVE) or 0), (first, second)
    assert observer.cancel().msg.first(n.OBSERVE) is None


def test_TD_COAP_OBS_02_non_registration_gets_confirmable_notifications(
    observer: Observer,
) -> None:
    """A NON registration is served too; its notifications are Confirmable all the same
    (RFC 7641 4.5 lets the server choose; a notification here is never lost on the link,
    and the next /sync waits for its ACK)."""
    observer.registered(mtype=NON)
    observer.say("TD_COAP_OBS_02")
    observer.wait_for("TD_COAP_OBS_02")
    assert observer.cancel().msg.first(n.OBSERVE) is None


def test_TD_COAP_OBS_06_reset_deregisters(observer: Observer) -> None:
    """A Reset in answer to a notification ends the registration: nothing further is sent."""
    observer.settled()
    observer.say("TD_COAP_OBS_06 before")
    note = observer.notification(acknowledge=False)
    observer.peer.send(bytes([0x70, 0]) + note.mid.to_bytes(2, "big"))
    observer.say("TD_COAP_OBS_06 after")
    assert observer.quiet(2.0)


def test_TD_COAP_OBS_10_get_does_not_cancel(observer: Observer) -> None:
    """A GET of the resource without Observe (another token) is answered without Observe;
    the registration goes on."""
    observer.settled()
    plain = observer.peer.exchange(
        request(n.GET, _sync(observer.token, None, 0), token=b"\x7e\x10")
    )
    assert plain.code == "2.05" and plain.msg.first(n.OBSERVE) is None, plain
    observer.say("TD_COAP_OBS_10")
    observer.wait_for("TD_COAP_OBS_10")
    observer.cancel()


def test_TD_COAP_OBS_11_one_notification_in_flight_when_lossy(observer: Observer) -> None:
    """A notification that is not acknowledged is retransmitted (same MID, same bytes); no
    newer notification is sent while it is outstanding; once it is acknowledged, the next
    one carries what happened meanwhile."""
    observer.settled()
    observer.say("TD_COAP_OBS_11 one")
    lost = observer.notification(acknowledge=False)
    observer.say("TD_COAP_OBS_11 two")
    again = Reply(observer.peer.recv(15.0) or b"")
    assert again.mid == lost.mid and again.msg.payload == lost.msg.payload, (lost, again)
    # acknowledged now (and its other blocks fetched, if any)
    observer.peer.inbox.appendleft(again.data)
    assert observer.texts(observer.notification()) == ["TD_COAP_OBS_11 one"]
    observer.wait_for("TD_COAP_OBS_11 two")
    observer.cancel()


def test_TD_COAP_OBS_12_observe_1_cancels(observer: Observer) -> None:
    """GET with Observe 1 and the registration's token: an ordinary response without
    Observe, and no further notifications."""
    observer.settled()
    reply = observer.cancel()
    assert reply.code == "2.05" and reply.msg.first(n.OBSERVE) is None, reply
    observer.say("TD_COAP_OBS_12 after")
    assert observer.quiet(2.0)


def test_TD_COAP_OBS_07_logout_ends_the_observation(observer: Observer) -> None:
    """Adapted from "server cleans the observers list on DELETE": /sync cannot be deleted,
    but its access token can. After a logout the server's next /sync fails, and that error
    is the last notification: a CON 4.01 without Observe; nothing follows."""
    observer.settled()
    out = observer.sender.exchange(
        request(n.POST, f"/_matrix/client/v3/logout?access_token={observer.token}", payload={})
    )
    assert out.code == "2.04", out
    observer.world.accounts.pop(observer.target, None)  # the token is gone for other tests
    while True:
        got = observer.peer.recv(timeout=15.0)
        assert got is not None, "no final notification"
        last = Reply(got)
        observer.peer.send(ack(last))
        if last.code != "2.05":  # news of the logout itself may come first
            break
    assert last.mtype == CON and last.code == "4.01" and last.token == observer.tok, last
    assert last.msg.first(n.OBSERVE) is None, last
    assert observer.quiet(2.0)


def test_TD_COAP_OBS_05_unacknowledged_notifications_end_the_registration(
    world: World,
) -> None:
    """The client is switched off: the server retransmits its notification up to the link's
    max_retransmit (2 here), then drops the registration and sends nothing more. The four
    listeners run side by side (each waits out its retransmissions)."""
    peers = {t: world.peer(t) for t in TARGETS}
    observers = {t: Observer(world, t, peers[t]) for t in TARGETS}
    errors: list[str] = []

    def run(t: str) -> None:
        obs = observers[t]
        try:
            obs.settled()
            obs.say("TD_COAP_OBS_05")
            first = obs.notification(acknowledge=False)
            sent = 1
            while True:
                got = obs.peer.recv(timeout=12.0)
                if got is None:
                    break
                again = Reply(got)
                assert again.mid == first.mid, (t, again)
                sent += 1
            assert sent == 3, f"{t}: {sent} transmissions (1 + max_retransmit 2)"
            obs.say("TD_COAP_OBS_05 after")
            assert obs.quiet(2.0), t
        except AssertionError as e:
            errors.append(f"{t}: {e}")

    threads = [threading.Thread(target=run, args=(t,)) for t in TARGETS]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(90)
    finally:
        for t in TARGETS:
            observers[t].close()
            peers[t].close()
    assert not errors, errors


# -- RFC 7252 / 7959 / 7641 rules -------------------------------------------------------------


def test_RFC7252_5_4_1_unknown_critical_option_is_4_02_elective_ignored(peer: Peer) -> None:
    bad = peer.exchange(request(n.GET, VERSIONS, options=((65001, b"x"),)))
    assert bad.code == "4.02", bad
    fine = peer.exchange(request(n.GET, VERSIONS, options=((65100, b"x"),)))
    assert fine.code == "2.05", fine


def test_RFC7252_5_4_1_unknown_critical_option_in_a_non_is_rejected(peer: Peer) -> None:
    """A NON with an unrecognized critical option is rejected (RFC 7252 5.4.1, 4.3): no
    response, a matching Reset (same MID); an elective one is ignored and answered."""
    mid = next(_mids)
    peer.send(request(n.GET, VERSIONS, mtype=NON, mid=mid, options=((65001, b"x"),)))
    got = peer.recv()
    assert got is not None, "no Reset"
    reply = Reply(got)
    assert reply.mtype == RST and reply.mid == mid and len(reply.data) == 4, reply
    assert peer.recv(timeout=0.3) is None, "a response followed the Reset"
    fine = request(n.GET, VERSIONS, mtype=NON, mid=next(_mids), options=((65100, b"x"),))
    peer.send(fine)
    got = peer.recv()
    assert got is not None and Reply(got).code == "2.05" and Reply(got).mtype == NON, got


def test_RFC7252_5_8_unknown_method_is_4_05(peer: Peer) -> None:
    """An unknown method code, and a method the resource does not have: 4.05."""
    reply = peer.exchange(request(31, VERSIONS))
    assert reply.code == "4.05", reply
    reply = peer.exchange(request(n.DELETE, VERSIONS))
    assert reply.code == "4.05", reply


@pytest.mark.parametrize("option", [n.PROXY_URI, n.PROXY_SCHEME], ids=["Proxy-Uri", "Proxy-Scheme"])
def test_RFC7252_5_7_2_not_a_proxy_is_5_05(peer: Peer, option: int) -> None:
    value = b"coap://example.org/x" if option == n.PROXY_URI else b"http"
    reply = peer.exchange(request(n.GET, VERSIONS, options=((option, value),)))
    assert reply.code == "5.05", reply


@pytest.mark.parametrize(
    "raw",
    [
        bytes([0x49, 1, 0, 0]) + b"123456789" + b"\xb1_",  # TKL 9
        bytes([0x41, 1, 0, 0]) + b"t\xb8_matrix\xff",  # payload marker, no payload
        bytes([0x41, 1, 0, 0]) + b"t\xb1\xff",  # Uri-Path 0xff: not UTF-8
        bytes([0x41, 1, 0, 0]) + b"t\xf0",  # reserved option delta 15
    ],
    ids=["tkl-9", "marker-no-payload", "uri-path-not-utf8", "delta-15"],
)
def test_RFC7252_3_message_format_errors(peer: Peer, raw: bytes) -> None:
    """A malformed CON is rejected with a Reset (same MID), a malformed NON is silently
    dropped; the listener keeps working."""
    mid = next(_mids)
    con = raw[:2] + mid.to_bytes(2, "big") + raw[4:]
    reply = peer.exchange(con)
    assert reply.mtype == RST and reply.mid == mid and len(reply.data) == 4, reply
    non = bytes([raw[0] | 0x10]) + raw[1:2] + next(_mids).to_bytes(2, "big") + raw[4:]
    peer.send(non)
    assert peer.recv(timeout=0.3) is None
    assert peer.exchange(request(n.GET, VERSIONS)).code == "2.05"


def test_RFC7959_block1_out_of_order_is_4_08_too_large_is_4_13(
    world: World, target: str, peer: Peer
) -> None:
    token, _room = world.account(target)
    target_url = f"/_matrix/client/v3/createRoom?access_token={token}"
    reply = peer.exchange(
        with_option(request(n.POST, target_url, payload=b"x" * 64), n.BLOCK1, block(2, True, 2))
    )
    assert reply.code == "4.08", reply
    big = with_option(request(n.POST, target_url, payload=b"x" * 64), n.BLOCK1, block(0, True, 2))
    big = with_option(big, n.SIZE1, (1 << 30).to_bytes(4, "big"))
    reply = peer.exchange(big)
    assert reply.code == "4.13" and (reply.uint(n.SIZE1) or 0) > 0, reply


def test_RFC7959_4_size2_on_request(peer: Peer) -> None:
    full = peer.exchange(
        request(n.GET, VERSIONS, options=((n.BLOCK2, block(0, False, 2)), (n.SIZE2, b"")))
    )
    assert full.code == "2.05", full
    total, _ = _get_blocks(peer, 6)
    assert full.uint(n.SIZE2) == len(total), full


def test_RFC7641_4_1_observe_on_a_non_observable_resource(peer: Peer) -> None:
    reply = peer.exchange(request(n.GET, VERSIONS, options=((n.OBSERVE, b""),)))
    assert reply.code == "2.05" and reply.msg.first(n.OBSERVE) is None, reply


def test_RFC7252_5_10_3_every_payload_is_labelled(world: World, target: str, peer: Peer) -> None:
    token, _room = world.account(target)
    for data in (
        request(n.GET, VERSIONS, accept=None),
        request(n.GET, "/_matrix/client/v3/account/whoami", accept=None),  # 4.01, compact JSON
        request(n.GET, f"/_matrix/client/v3/account/whoami?access_token={token}", accept=None),
        request(n.GET, "/.well-known/core", accept=None),
    ):
        reply = peer.exchange(data)
        assert reply.msg.payload and reply.uint(n.CONTENT_FORMAT) is not None, reply


# -- TD_COAP_LINK (RFC 6690) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expect"),
    [
        ("", None),
        ("rt=matrix.client", ["</_matrix/client>"]),
        ("rt=*", "every link with an rt"),
        ("href=/_matrix/key", ["</_matrix/key>"]),
        ("href=/_matrix/m*", ["</_matrix/media>"]),
    ],
    ids=[
        "TD_COAP_LINK_01",
        "TD_COAP_LINK_02",
        "TD_COAP_LINK_03",
        "TD_COAP_LINK_07",
        "TD_COAP_LINK_08",
    ],
)
def test_link_format(peer: Peer, query: str, expect: list[str] | str | None) -> None:
    reply = peer.exchange(
        request(n.GET, "/.well-known/core" + (f"?{query}" if query else ""), accept=None)
    )
    assert reply.code == "2.05" and reply.uint(n.CONTENT_FORMAT) == n.CF_LINK_FORMAT, reply
    hrefs = [link.split(";")[0] for link in reply.msg.payload.decode().split(",") if link]
    if expect is None:
        assert "</.well-known/core>" in hrefs and "</_matrix/client>" in hrefs
    elif isinstance(expect, str):  # rt=*: every link that has an rt at all
        full = peer.exchange(request(n.GET, "/.well-known/core", accept=None)).msg.payload
        with_rt = [link.split(";")[0] for link in full.decode().split(",") if ";rt=" in link]
        assert hrefs == with_rt and "</_matrix/federation>" in hrefs
        assert "</.well-known/core>" not in hrefs
    else:
        assert hrefs == expect


# -- foreign tools: libcoap's coap-client and aiocoap-client ----------------------------------


@pytest.mark.skipif(COAP_CLIENT is None, reason="libcoap3-bin's coap-client-notls is not installed")
@pytest.mark.parametrize("where", ["module-plain", "gateway-plain"])
def test_libcoap_client_gets_4_02_4_06_and_json(world: World, where: str) -> None:
    assert COAP_CLIENT is not None
    url = f"coap://127.0.0.1:{world.ports[where]}{VERSIONS}"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [COAP_CLIENT, "-m", "get", "-B", "10", *args, url],
            capture_output=True,
            text=True,
            timeout=30,
        )

    as_json = run("-A", "50")
    assert "v1.1" in json.loads(as_json.stdout)["versions"], as_json
    bad_option = run("-O", "65001,x")
    assert "4.02" in bad_option.stdout + bad_option.stderr, bad_option
    not_acceptable = run("-A", "41")
    assert "4.06" in not_acceptable.stdout + not_acceptable.stderr, not_acceptable


@pytest.mark.parametrize("where", ["module-plain", "gateway-plain"])
def test_aiocoap_client_gets_4_06_5_05_and_json(world: World, where: str) -> None:
    base = f"coap://127.0.0.1:{world.ports[where]}"

    def run(*args: str) -> str:
        out = subprocess.run(
            [AIOCOAP_CLIENT, "--no-color", "--no-pretty-print", *args],
            capture_output=True,
            timeout=30,
        )
        return (out.stdout + out.stderr).decode("utf-8", "replace")

    as_json = run("--accept", "application/json", base + VERSIONS)
    assert "v1.1" in json.loads(as_json)["versions"], as_json
    not_acceptable = run("--accept", "application/xml", base + VERSIONS)
    assert "4.06" in not_acceptable, not_acceptable
    # aiocoap-client cannot add an arbitrary option (4.02: see the next test); its
    # --proxy sends Proxy-Scheme, answered 5.05: this listener is not a proxy
    proxied = run("--proxy", base, base + VERSIONS)
    assert "5.05" in proxied, proxied


@pytest.mark.parametrize("where", ["module-plain", "gateway-plain"])
def test_aiocoap_library_gets_4_02_for_an_unknown_critical_option(world: World, where: str) -> None:
    """aiocoap-client cannot add an arbitrary option; the aiocoap library it is built on can."""
    import asyncio

    from aiocoap import GET, Context, Message
    from aiocoap.optiontypes import OpaqueOption

    async def main() -> tuple[str, str]:
        ctx = await Context.create_client_context()
        try:
            msg = Message(code=GET, uri=f"coap://127.0.0.1:{world.ports[where]}{VERSIONS}")
            msg.opt.add_option(OpaqueOption(65001, b"x"))
            bad = await asyncio.wait_for(ctx.request(msg).response, 30)
            ok = Message(code=GET, uri=f"coap://127.0.0.1:{world.ports[where]}{VERSIONS}")
            ok.opt.accept = 50
            good = await asyncio.wait_for(ctx.request(ok).response, 30)
            return str(bad.code), good.payload.decode()
        finally:
            await ctx.shutdown()

    bad, good = asyncio.run(main())
    assert bad.startswith("4.02"), bad
    assert "v1.1" in json.loads(good)["versions"]
