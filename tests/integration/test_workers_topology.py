"""A worker deployment on PostgreSQL and Redis: the main process and two generic
workers, each with its own CoAP listener; clients talk only to the workers' listeners.

What generic2's routes claim (here /sync and /messages, as a reverse proxy would
send them to a generic worker) runs in-process on generic2; everything else
(register, createRoom, send) is forwarded over HTTP to the main process. Synapse's
access logs tell where each request ran. generic1 only listens (it forwards
everything): matrix-nio through the sidecar, given both workers' listeners, keeps
going when generic1 is killed mid-stream.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from synapse_coap_lab.services import (
    PG_HOST,
    PG_PORT,
    PG_USER,
    REDIS_HOST,
    REDIS_PORT,
    redis_unavailable,
)
from tests.harness.synapse_proc import SynapseProcess, free_port
from tests.integration.test_module import Client, Homeserver, run
from tests.integration.test_module_store import fresh_pg_database

pytestmark = pytest.mark.integration

SERVER_NAME = "workers.test"  # also the Redis channel prefix: unique to this test
READY = r"synapse-coap: CoAP listener ready"
REDIS = (REDIS_HOST, REDIS_PORT)


def _redis_or_skip() -> None:
    why = redis_unavailable()
    if why:
        pytest.skip(f"Redis is not reachable on {REDIS[0]}:{REDIS[1]} ({why}): worker test skipped")


class Deployment:
    def __init__(
        self,
        main: SynapseProcess,
        worker: SynapseProcess,
        coap: Homeserver,
        front: SynapseProcess,
        front_coap: int,
        main_coap: int,
        media: SynapseProcess,
        sender: SynapseProcess,
        local: Any,
        remote: Any,
    ) -> None:
        self.sender = sender  # fedsender1: the federation sender
        self.local = local  # this homeserver as the federation harness sees it (generic2)
        self.remote = remote  # remote.test: a second homeserver with the module
        self.media = media  # media1: the media repository, no CoAP listener
        self.main = main
        self.worker = worker  # generic2: serves /sync and /messages
        self.coap = coap  # generic2's CoAP listener
        self.front = front  # generic1: a listener only (killed by a test)
        self.front_coap = front_coap
        self.main_coap = main_coap  # the main process's CoAP listener


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    _redis_or_skip()
    root = tmp_path_factory.mktemp("workers")
    from tests.harness.federation import Homeserver as FedServer
    from tests.integration.test_federation import Node

    main_http, replication, worker_http, front_http, media_http = (free_port() for _ in range(5))
    main_coap, worker_coap, front_coap = (free_port("udp") for _ in range(3))
    remote = Node(root, "remote.test")
    ports = {
        "REDIS_HOST": REDIS[0],
        "REDIS_PORT": REDIS[1],
        "MAIN_REPLICATION_PORT": replication,
        "MAIN_COAP_PORT": main_coap,
        "MAIN_HTTP_PORT": main_http,
        "GENERIC1_COAP_PORT": front_coap,
        "GENERIC1_HTTP_PORT": front_http,
        "GENERIC2_COAP_PORT": worker_coap,
        "GENERIC2_HTTP_PORT": worker_http,
        "MEDIA1_HTTP_PORT": media_http,
    }
    # the module entry and worker files of docs/deployment.md, verbatim (but the ports)
    module = example("coap_module.yaml", **ports)
    module["config"]["trust"] = {"peers": {remote.server_name: remote.public_b64}}
    module["config"]["federation"] = {
        "fallback": "never",
        "discovery": False,
        "peers": {
            remote.server_name: {
                "endpoints": [f"127.0.0.1:{remote.coap_port}"],
                "public_key": remote.public_b64,
            }
        },
    }
    with fresh_pg_database() as dbname:
        main = SynapseProcess(
            root / "main",
            SERVER_NAME,
            http_port=main_http,
            http_resources=("client", "federation"),
            modules=[module],
            extra_config={
                "database": {
                    "name": "psycopg2",
                    "args": {
                        "user": PG_USER,
                        "host": PG_HOST,
                        "port": PG_PORT,
                        "database": dbname,
                        "cp_min": 1,
                        "cp_max": 5,
                    },
                },
                **example("homeserver.yaml", **ports),
                # the address book: the workers' listeners, published for sidecars
                # (Synapse serves /.well-known/matrix/client when public_baseurl is set)
                "public_baseurl": f"https://{SERVER_NAME}/",
                "extra_well_known_client_content": {
                    "io.synapse_coap": {
                        "listeners": [
                            f"coap://127.0.0.1:{front_coap}",
                            f"coap://127.0.0.1:{worker_coap}",
                        ]
                    }
                },
            },
        )
        main.extra_config["listeners"] = [
            *main.build_config()["listeners"],
            {
                "port": replication,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "resources": [{"names": ["replication"]}],
            },
        ]
        main.start(ready_log_pattern=READY)
        # private_key_store: database: the main process generated the one Noise key
        # of every instance into the module's table; no instance has a key file. The
        # test's own copy (for its clients and remote.test's pin) comes from there.
        key_path = _key_from_database(dbname, root / "keys" / "coap.key")
        # this homeserver as federation peers see it: generic2's listener, one key for all
        local = FedServer(root / "keys", SERVER_NAME, coap_port=worker_coap)
        assert local.key_path == key_path
        worker = _worker(root, main, "generic_worker.yaml", "generic2", worker_http)
        front = _worker(root, main, "generic_worker.yaml", "generic1", front_http)
        media = _worker(root, main, "media_worker.yaml", "media1", media_http)
        sender = _worker(root, main, "federation_sender.yaml", "fedsender1", None)
        remote.make(
            {
                "fallback": "never",
                "discovery": False,
                "peers": {
                    SERVER_NAME: {
                        "endpoints": [f"127.0.0.1:{worker_coap}"],
                        "public_key": local.public_b64,
                    }
                },
            },
            {SERVER_NAME: local.public_b64},
        )
        try:
            worker.start(ready_log_pattern=READY)
            front.start(ready_log_pattern=READY)
            media.start()
            sender.start(ready_log_pattern=r"federation over CoAP installed")
            remote.start()
            yield Deployment(
                main,
                worker,
                Homeserver(worker, worker_coap, 0, key_path),
                front,
                front_coap,
                main_coap,
                media,
                sender,
                local,
                remote,
            )
        finally:
            if remote.proc is not None:
                remote.proc.stop()
            sender.stop()
            media.stop()
            front.stop()
            worker.stop()
            main.stop()


def _key_from_database(dbname: str, path: Path) -> Path:
    """The Noise key the instances share (table synapse_coap_keys), as a key file
    for the test's clients only."""
    import base64

    import psycopg2

    from synapse_coap.noise import keys

    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT private_key FROM synapse_coap_keys WHERE key_name = 'noise_static'")
            (text,) = cur.fetchone()
    finally:
        conn.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    keys.write_key_file(str(path), base64.b64decode(text + "=" * (-len(text) % 4)))
    return path


EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples" / "workers"


def example(name: str, **values: Any) -> Any:
    """A file of docs/examples/workers with its ``${...}`` placeholders filled in."""
    text = (EXAMPLES / name).read_text()
    # (safe_substitute: a regex's "$" is not a placeholder)
    filled = string.Template(text).safe_substitute({k: str(v) for k, v in values.items()})
    assert "${" not in filled, f"{name}: a placeholder was not given"
    return yaml.safe_load(filled)


def _worker(
    root: Path, main: SynapseProcess, example_file: str, name: str, http_port: int | None
) -> SynapseProcess:
    return SynapseProcess(
        root / name,
        SERVER_NAME,
        http_port=http_port,
        worker_of=main,
        worker=example(example_file, WORKER_NAME=name, WORKER_HTTP_PORT=http_port),
    )


def _ran(proc: SynapseProcess, method: str, path_start: str, tag: str) -> bool:
    """Whether ``proc``'s access log shows ``method path_start...`` under ``tag``."""
    return any(
        tag in line and f"{method} {path_start}" in line
        for line in proc.log_text().splitlines()
        if "synapse.access." in line
    )


def test_client_on_the_workers_listener_reaches_everything_each_served_where_http_would(
    deployment: Deployment,
) -> None:
    import asyncio
    import secrets

    user = f"w{secrets.token_hex(4)}"

    async def scenario(c: Client) -> tuple[str, list[str]]:
        reg = await c.json(
            "POST",
            "/_matrix/client/v3/register",
            {"username": user, "password": "pw-123456", "auth": {"type": "m.login.dummy"}},
        )
        c.token = reg["access_token"]
        room = (await c.json("POST", "/_matrix/client/v3/createRoom", {}))["room_id"]
        sent = set()
        for i in range(3):
            r = await c.json(
                "PUT",
                f"/_matrix/client/v3/rooms/{room}/send/m.room.message/t{i}",
                {"msgtype": "m.text", "body": f"hello {i}"},
            )
            sent.add(r["event_id"])
        # the sends ran on the main process; generic2 (which serves /sync) has them
        # once Redis replication reaches it: read until it has (30 s at most)
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            sync = await c.json("GET", "/_matrix/client/v3/sync?timeout=0")
            joined = sync.get("rooms", {}).get("join", {})
            events = joined[room]["timeline"]["events"] if room in joined else []
            if sent <= {e["event_id"] for e in events}:
                break
            assert asyncio.get_running_loop().time() < deadline, sync
            await asyncio.sleep(0.2)
        msgs = await c.json("GET", f"/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=10")
        bodies = [e["content"]["body"] for e in events if e["type"] == "m.room.message"]
        assert [e["content"].get("body") for e in msgs["chunk"] if e["type"] == "m.room.message"]
        return room, bodies

    room, bodies = run(deployment.coap, scenario)
    assert bodies == ["hello 0", "hello 1", "hello 2"], bodies
    main, worker = deployment.main, deployment.worker
    # routed to generic1: in-process on the worker (its CoAP listener received them)
    assert _ran(worker, "GET", "/_matrix/client/v3/sync", "synapse.access.coap")
    assert _ran(worker, "GET", f"/_matrix/client/v3/rooms/{room}/messages", "synapse.access.coap")
    # everything else: forwarded over HTTP to the main process's listener
    for method, path in [
        ("POST", "/_matrix/client/v3/register"),
        ("POST", "/_matrix/client/v3/createRoom"),
        ("PUT", f"/_matrix/client/v3/rooms/{room}/send/m.room.message/t0"),
    ]:
        assert _ran(main, method, path, "synapse.access.http"), (method, path)
        assert not _ran(worker, method, path, "synapse.access"), (method, path)
    assert not _ran(main, "GET", "/_matrix/client/v3/sync", "synapse.access")
    for proc in (main, worker):
        text = proc.log_text()
        assert "Traceback" not in text, json.dumps(text[-2000:])
        # forwarded requests keep Synapse's logcontext rules
        assert "Expected logging context" not in text, json.dumps(text[-2000:])


def test_both_instances_bind_their_own_listener(deployment: Deployment) -> None:
    for proc, name in [
        (deployment.main, "main"),
        (deployment.worker, "generic2"),
        (deployment.front, "generic1"),
    ]:
        text = proc.log_text()
        line = next((x for x in text.splitlines() if "CoAP listener ready" in x), "")
        assert f"instance {name}, routing by workers.routes" in line, line
        # the one key, read from the database: no key file anywhere in the instance
        assert f"Noise public key {deployment.local.public_b64} (from database" in line, line
        assert not list(proc.workdir.rglob("*.coap.key")), name
        # a listener on a worker with its own HTTP client listener reuses that
        # listener's resources: no second copy of the servlets' cache metrics
        assert "already registered" not in text, name
        assert "serving client" in text or name == "main", name
        # no ERROR (nor Traceback) at start: up to the listener's ready line
        start = text[: text.index("CoAP listener ready")].splitlines()
        bad = [x for x in start if " - ERROR - " in x or "Traceback" in x]
        assert not bad, (name, bad[:5])


def _sidecar(
    deployment: Deployment, tmp_path: Path, *listeners: int, extra: tuple[str, ...] = ()
) -> Any:
    """A running ``synapse-coap sidecar`` given ``listeners`` (CoAP ports, in order)."""
    from synapse_coap.noise.keys import encode_public
    from tests.integration.test_sidecar_nio import Proc

    homeservers = [a for port in listeners for a in ("--homeserver", f"coap://127.0.0.1:{port}")]
    sidecar = Proc(
        [
            "sidecar",
            "--listen",
            f"127.0.0.1:{free_port()}",
            *homeservers,
            "--server-key",
            encode_public(deployment.coap.public_key),
            "--server-name",
            SERVER_NAME,
            "--state-dir",
            str(tmp_path / "state"),
            *extra,
        ],
        tmp_path / "sidecar.log",
    )
    sidecar.start()
    return sidecar


def test_push_sync_through_a_listener_that_forwards_sync_to_its_worker(
    deployment: Deployment, tmp_path: Path
) -> None:
    """Push on a worker deployment: the sidecar registers for /sync push at the main
    process's listener, which does not serve /sync itself; the listener's own /sync
    long-polls go to generic2 over HTTP (workers.routes), and a message sent meanwhile
    reaches nio's waiting long-poll from the push."""
    import asyncio

    from tests.integration.test_sidecar_nio import nio, sidecar_url

    sidecar = _sidecar(deployment, tmp_path, deployment.main_coap)

    async def scenario() -> list[str]:
        import secrets

        client = nio.AsyncClient(sidecar_url(sidecar), f"p{secrets.token_hex(4)}")
        try:
            r = await client.register(client.user, "push-password-1")
            assert isinstance(r, nio.RegisterResponse), r
            r = await client.room_create(name="pushed through a worker")
            assert isinstance(r, nio.RoomCreateResponse), r
            room = r.room_id
            first = await client.sync(timeout=0)
            assert isinstance(first, nio.SyncResponse), first
            # the first incremental long-poll registers the push; let it settle
            await client.sync(timeout=3000, since=first.next_batch)
            waiting = asyncio.ensure_future(client.sync(timeout=30000))
            await asyncio.sleep(1.0)
            r = await client.room_send(
                room, "m.room.message", {"msgtype": "m.text", "body": "pushed"}
            )
            assert isinstance(r, nio.RoomSendResponse), r
            sync = await waiting
            assert isinstance(sync, nio.SyncResponse), sync
            events = sync.rooms.join[room].timeline.events if room in sync.rooms.join else []
            return [getattr(e, "body", "") for e in events]
        finally:
            await client.close()

    try:
        bodies = asyncio.run(scenario())
    finally:
        sidecar.stop()
    log = (tmp_path / "sidecar.log").read_text()
    assert "push: registering /sync" in log, log[-2000:]
    assert "does not push" not in log, log[-2000:]
    assert bodies == ["pushed"], bodies
    # every incremental long-poll was answered from the push, none crossed the link
    polls = [x for x in log.splitlines() if "GET /_matrix/client/v3/sync?" in x and "since=" in x]
    assert len(polls) >= 2 and all(x.endswith(", push)") for x in polls), polls
    # the listener that took the registration issued its /sync on generic2 over HTTP
    assert _ran(deployment.worker, "GET", "/_matrix/client/v3/sync", "synapse.access.http")


def test_nio_through_the_sidecar_carries_on_when_its_listener_worker_is_killed(
    deployment: Deployment, tmp_path: Path
) -> None:
    """matrix-nio -> sidecar (given generic1's listener; it learns generic2's from the
    homeserver's /.well-known/matrix/client, --learn-listeners) -> generic1;
    nio registers, then logs in with its password (m.login.password) and uses that
    session; generic1 is killed while messages are being sent; the client carries on through
    generic2 with one new handshake, and every message is in the room exactly once.
    The sidecar's push registration (made at generic1) is made again at generic2 as
    soon as the sidecar moves, not at its next renewal."""
    import asyncio
    import io

    from tests.integration.test_sidecar_nio import nio, sidecar_url

    sidecar = _sidecar(
        deployment,
        tmp_path,
        deployment.front_coap,
        extra=("--failover-after", "3", "--learn-listeners"),
    )
    learned = f"address book: 1 listener(s) learned from /.well-known/matrix/client: coap://127.0.0.1:{deployment.coap.port}"
    n_before, n_after = 4, 4

    async def scenario() -> tuple[list[str], str]:
        import secrets

        client = nio.AsyncClient(sidecar_url(sidecar), f"k{secrets.token_hex(4)}")
        try:
            r = await client.register(client.user, "kill-password-1")
            assert isinstance(r, nio.RegisterResponse), r
            registered = client.access_token
            # a real m.login.password login through the sidecar; its session is used below
            r = await client.login("kill-password-1", device_name="over coap")
            assert isinstance(r, nio.LoginResponse), r
            assert client.access_token == r.access_token != registered
            me = await client.whoami()
            assert isinstance(me, nio.WhoamiResponse), me
            assert (me.user_id, me.device_id) == (r.user_id, r.device_id), (me, r)
            r = await client.room_create(name="across a dying listener")
            assert isinstance(r, nio.RoomCreateResponse), r
            room = r.room_id
            await client.sync(timeout=0)
            await client.sync(timeout=0)  # incremental: the sidecar registers for push
            # media goes to the media instance (forwarded from the listener over HTTP)
            data = bytes(range(256)) * 40
            up, _ = await client.upload(
                io.BytesIO(data), content_type="application/octet-stream", filesize=len(data)
            )
            assert isinstance(up, nio.UploadResponse), up
            dl = await client.download(mxc=up.content_uri)
            assert isinstance(dl, nio.DownloadResponse), dl
            assert dl.body == data
            for i in range(n_before):
                r = await client.room_send(
                    room, "m.room.message", {"msgtype": "m.text", "body": f"m{i}"}
                )
                assert isinstance(r, nio.RoomSendResponse), r
            # the sidecar has learned generic2's listener (one request at its start)
            for _ in range(100):
                if "address book:" in (tmp_path / "sidecar.log").read_text():
                    break
                await asyncio.sleep(0.1)
            log = (tmp_path / "sidecar.log").read_text()
            assert learned in log, log[-2000:]
            # generic1 dies mid-stream: a send is in flight while it goes
            send = asyncio.ensure_future(
                client.room_send(
                    room, "m.room.message", {"msgtype": "m.text", "body": f"m{n_before}"}
                )
            )
            await asyncio.sleep(0)
            await asyncio.to_thread(deployment.front.kill)
            results = [await send]
            for i in range(n_before + 1, n_before + n_after):
                results.append(
                    await client.room_send(
                        room, "m.room.message", {"msgtype": "m.text", "body": f"m{i}"}
                    )
                )
            assert all(isinstance(r, nio.RoomSendResponse) for r in results), results
            # The last sends were persisted by the main process (generic2 forwards
            # them); generic2 serves /sync and /messages and sees them once Redis
            # replication reaches it, so a read straight after the write can miss
            # the newest (seen once in CI). Read until every accepted event is
            # there or 30 s pass: a lost or doubled message still fails below.
            sent = {r.event_id for r in results}
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while True:
                sync = await client.sync(timeout=0, full_state=True)
                assert isinstance(sync, nio.SyncResponse), sync
                r = await client.room_messages(room, start=sync.next_batch, limit=50)
                assert isinstance(r, nio.RoomMessagesResponse), r
                if sent <= {e.event_id for e in r.chunk} or loop.time() > deadline:
                    break
                await asyncio.sleep(0.2)
            bodies = [getattr(e, "body", None) for e in reversed(r.chunk)]
            return [b for b in bodies if b is not None], room
        finally:
            await client.close()

    try:
        bodies, _room = asyncio.run(scenario())
    finally:
        sidecar.stop()
    assert bodies == [f"m{i}" for i in range(n_before + n_after)], bodies  # none lost, none twice
    # the push registration followed the client to the surviving listener at once
    log = (tmp_path / "sidecar.log").read_text()
    assert "push: registering again at once" in log, log[-3000:]
    # the login was forwarded from a worker's listener to the main process over HTTP
    assert _ran(deployment.main, "POST", "/_matrix/client/v3/login", "synapse.access.http")
    assert _ran(deployment.media, "POST", "/_matrix/media/v3/upload", "synapse.access.http")
    assert not _ran(deployment.main, "POST", "/_matrix/media/v3/upload", "synapse.access")
    log = (tmp_path / "sidecar.log").read_text()
    assert learned in log, log[-3000:]
    assert "stopped answering" in log and f"moving to 127.0.0.1:{deployment.coap.port}" in log, log[
        -2000:
    ]


def test_federation_over_coap_both_ways_exactly_once_outbound_from_the_federation_sender(
    deployment: Deployment,
) -> None:
    import asyncio
    from collections import Counter

    from tests.harness.federation import CoapMatrix, new_coap_client, q

    async def scenario() -> tuple[Counter[str], Counter[str]]:
        c1, c2 = await new_coap_client(), await new_coap_client()
        try:
            here, there = CoapMatrix(c1, deployment.local), CoapMatrix(c2, deployment.remote)
            await here.register("fedlocal")
            await there.register("fedremote")
            room = await here.call("POST", "/createRoom", {"preset": "public_chat"})
            room_id = room["room_id"]
            await there.call("POST", f"/join/{q(room_id)}?server_name={SERVER_NAME}", {})
            await here.send(room_id, "from workers")
            await there.send(room_id, "from remote")
            want = {"from workers", "from remote"}
            return await here.wait_for(room_id, want), await there.wait_for(room_id, want)
        finally:
            await c1.close()
            await c2.close()

    seen_here, seen_there = asyncio.run(scenario())
    for seen in (seen_here, seen_there):
        assert seen["from workers"] == 1 and seen["from remote"] == 1, seen
    # outbound federation left from the federation sender (its transactions), over
    # CoAP (fallback "never"; remote.test has no HTTP federation listener at all)
    sent = "PUT matrix-federation://remote.test/_matrix/federation/v1/send/"
    assert sent in _log_lines(deployment.sender, "federation_transaction_transmission_loop")
    for proc in (deployment.main, deployment.worker, deployment.front):
        assert sent not in proc.log_text()
    assert any("send" in route for route in deployment.remote.listener_routes())


def _log_lines(proc: SynapseProcess, needle: str) -> str:
    return "\n".join(line for line in proc.log_text().splitlines() if needle in line)
