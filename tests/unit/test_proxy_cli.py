"""The sidecar/gateway command lines and their configuration helpers."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from synapse_coap.cli import build_parser
from synapse_coap.errors import ConfigValueError
from synapse_coap.proxy.gateway import parse_http_target
from synapse_coap.proxy.runner import HomeserverAddress, ensure_state_dir, load_server_key


def test_help_texts_are_complete(capsys: pytest.CaptureFixture[str]) -> None:
    for command, words in {
        "sidecar": [
            "--homeserver",
            "--server-key",
            "--trust-on-first-use",
            "--state-dir",
            "--dns-server",
            "--no-srv",
            "_matrix-coap._udp",
            "502",
            "504",
        ],
        "gateway": ["--http-target", "--key", "--plain-listen", "X-Forwarded-For", "504"],
    }.items():
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args([command, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        for word in [*words, "--dump-payloads", "--debug-log", "SYNAPSE_COAP_DUMP_PAYLOADS"]:
            assert word in out, (command, word)


def test_sidecar_requires_a_trust_choice(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sidecar", "--homeserver", "coap://127.0.0.1"])
    assert "--server-key" in capsys.readouterr().err
    args = build_parser().parse_args(
        ["sidecar", "--homeserver", "coap://127.0.0.1", "--trust-on-first-use"]
    )
    assert args.listen == "127.0.0.1:8008" and args.trust_on_first_use


def test_homeserver_address() -> None:
    assert HomeserverAddress.parse("coap://hs.example") == HomeserverAddress(
        "hs.example", 5683, True
    )
    assert HomeserverAddress.parse("coap://[::1]:6000") == HomeserverAddress("::1", 6000, True)
    assert HomeserverAddress.parse("coap+plain://127.0.0.1:7") == HomeserverAddress(
        "127.0.0.1", 7, False
    )
    assert str(HomeserverAddress("::1", 6000, True)) == "coap://[::1]:6000"
    for bad in ("http://hs.example", "coap://hs.example/path", "coap://"):
        with pytest.raises(ConfigValueError) as info:
            HomeserverAddress.parse(bad)
        assert info.value.path == "--homeserver"


def test_http_target() -> None:
    assert str(parse_http_target("http://127.0.0.1:8008")) == "http://127.0.0.1:8008"
    for bad in ("ftp://x", "http://x/path", "127.0.0.1:8008"):
        with pytest.raises(ConfigValueError):
            parse_http_target(bad)


def test_server_key_as_text_or_file(tmp_path: Path) -> None:
    from synapse_coap.noise.keys import encode_public

    key = bytes(range(32))
    text = encode_public(key)
    assert load_server_key(text) == key
    (tmp_path / "hs.pub").write_text(text + "\n")
    assert load_server_key(str(tmp_path / "hs.pub")) == key
    with pytest.raises(ConfigValueError) as info:
        load_server_key("not-a-key")
    assert info.value.path == "--server-key"


def test_state_dir_key_is_created_0600_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = ensure_state_dir(state)
    mode = stat.S_IMODE((state / "sidecar.key").stat().st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert ensure_state_dir(state) == first  # reused, not regenerated
    assert len(first) == 32


def test_listen_options_and_verbatim_descriptions(capsys: pytest.CaptureFixture[str]) -> None:
    gw = ["gateway", "--http-target", "http://127.0.0.1:8008", "--key", "k"]
    args = build_parser().parse_args(gw)
    assert args.listen is None and args.plain_listen == []  # the runner defaults to [::]:5683
    args = build_parser().parse_args([*gw, "--listen", "[::1]:1", "--listen", "127.0.0.1:2"])
    assert args.listen == ["[::1]:1", "127.0.0.1:2"]
    # the demo is tooling outside the wheel (scripts/demo, python -m synapse_coap_lab)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo"])
    capsys.readouterr()
    # descriptions keep their line breaks (the examples stay copy-pasteable)
    for command, line in {
        "sidecar": "Point the client's homeserver URL at http://LISTEN (e.g. http://127.0.0.1:8008).",
        "gateway": "  synapse-coap gateway --listen [::]:5683 --http-target http://127.0.0.1:8008 \\",
    }.items():
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        assert line in capsys.readouterr().out.splitlines(), command


def test_demo_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    from synapse_coap_lab.__main__ import build_parser as demo_parser
    from synapse_coap_lab.__main__ import main as demo_main

    assert demo_parser().parse_args([]).messages == 5
    with pytest.raises(SystemExit):
        demo_parser().parse_args(["--help"])
    out = capsys.readouterr().out.splitlines()
    assert "  scripts/demo --messages 20 --workdir ./demo-out --keep" in out
    assert demo_main(["--messages", "0"]) == 2


def test_sidecar_keepalive_option() -> None:
    from synapse_coap.cli.proxy import _keepalive
    from synapse_coap.proxy.runner import DEFAULT_KEEPALIVE

    base = ["sidecar", "--homeserver", "coap://127.0.0.1", "--trust-on-first-use"]
    assert _keepalive(build_parser().parse_args(base).keepalive) == DEFAULT_KEEPALIVE == 110.0
    assert _keepalive(build_parser().parse_args([*base, "--keepalive", "25"]).keepalive) == 25.0
    assert _keepalive(build_parser().parse_args([*base, "--keepalive", "0"]).keepalive) is None
    with pytest.raises(ConfigValueError) as e:
        _keepalive(-1.0)
    assert e.value.path == "--keepalive"
    args = build_parser().parse_args([*base, "--no-short-txn-ids"])
    assert args.no_short_txn_ids
    assert not build_parser().parse_args(base).no_keepalive_ping
    assert build_parser().parse_args([*base, "--no-keepalive-ping"]).no_keepalive_ping


def test_the_client_hands_keepalive_ping_to_its_noise_endpoint() -> None:
    import asyncio

    from synapse_coap.noise import NoiseEndpoint, TrustPolicy
    from synapse_coap.noise.keys import generate_private_key
    from synapse_coap.transport.client import CoapClient

    made: list[NoiseEndpoint] = []

    def factory(*args: object, **kwargs: object) -> NoiseEndpoint:
        endpoint = NoiseEndpoint(*args, **kwargs)  # type: ignore[arg-type]
        made.append(endpoint)
        return endpoint

    async def main(ping: bool) -> None:
        client = await CoapClient.create(
            static_key=generate_private_key(),
            trust=TrustPolicy(),
            bind=("127.0.0.1", 0),
            endpoint_factory=factory,
            keepalive_interval=110.0,
            keepalive_ping=ping,
        )
        await client.close()

    asyncio.run(main(False))
    asyncio.run(main(True))
    assert [(e.keepalive_interval, e.keepalive_ping) for e in made] == [
        (110.0, False),
        (110.0, True),
    ]


def test_a_homeserver_named_without_a_port_is_looked_up_by_srv() -> None:
    from synapse_coap.cli.proxy import _srv_hosts

    texts = [
        "coap://hs.example",  # SRV
        "coap://hs.example:5683",  # an explicit port: as it is
        "coap://192.0.2.1",  # an address: as it is
        "coap://[2001:db8::1]",
        "coap+plain://other.example",  # SRV
        "coap://hs.example",  # (the same host again: one lookup)
    ]
    addresses = [HomeserverAddress.parse(t) for t in texts]
    assert _srv_hosts(texts, addresses) == ("hs.example", "other.example")


def test_sidecar_srv_options(capsys: pytest.CaptureFixture[str]) -> None:
    from synapse_coap.cli.proxy import run_sidecar_command

    base = ["sidecar", "--homeserver", "coap://hs.example", "--trust-on-first-use"]
    args = build_parser().parse_args([*base, "--dns-server", "127.0.0.1:5353", "--no-srv"])
    assert args.dns_server == ["127.0.0.1:5353"] and args.no_srv
    bad = build_parser().parse_args([*base, "--dns-server", "dns.example"])
    assert run_sidecar_command(bad) == 2
    assert "--dns-server" in capsys.readouterr().err
