"""bench/perfsplit.py: perf samples split per listener turn and grouped by library
(bench/inbound.py --perf-out; issue 12: where the CoAP path's CPU goes)."""

from __future__ import annotations

import pytest

from tests.harness.bench import load_bench

SCRIPT = """\
  4242  100.000100:      7f1dd7bab742 _PyEval_EvalFrameDefault (/usr/lib/libpython3.11.so.1.0)
  4242  100.000200:      7f1dd7bab742 CPyDef_codec___WireCodec___encode_response (/x/synapse_coap/native__mypyc.cpython-311-x86_64-linux-gnu.so)
  4243  100.000300:      ffffffff8100 finish_task_switch.isra.0 ([kernel.kallsyms])
  4242  100.000400:      7f1dd7bab742 [unknown] (/usr/lib/x86_64-linux-gnu/libz.so.1.2.13)
  4242  100.000500:      7f1dd7bab742 ChaCha20_avx512 (/v/cryptography/hazmat/bindings/_rust.abi3.so)
  4242  100.000600:      7f1dd7bab742 get_versions (/v/synapse/synapse_rust.abi3.so)
  4242  100.000700:      7f1dd7bab742 sock_recvfrom (/v/lib-dynload/_socket.cpython-311-x86_64-linux-gnu.so)
  4242  100.000800:      7f1dd7bab742 parse_string (/x/synapse_coap/wire/_cenc.cpython-311-x86_64-linux-gnu.so)
  4242  100.000900:      7f1dd7bab742 __memmove_avx512_unaligned_erms (/usr/lib/x86_64-linux-gnu/libc.so.6)
  4242  100.001000:      7f1dd7bab742 __vdso_clock_gettime ([vdso])
  4242  200.000100:      7f1dd7bab742 _PyEval_EvalFrameDefault (/usr/lib/libpython3.11.so.1.0)
  4242  200.000200:      7f1dd7bab742 _PyEval_EvalFrameDefault (/usr/lib/libpython3.11.so.1.0)
  4242  300.000000:      7f1dd7bab742 _PyEval_EvalFrameDefault (/usr/lib/libpython3.11.so.1.0)
perf: a note perf writes that is no sample
"""


def test_each_shared_object_has_its_group() -> None:
    ps = load_bench("perfsplit")
    samples = list(ps.parse_script(SCRIPT.splitlines()))
    assert len(samples) == 13  # the note is skipped
    groups = [ps.group_of(s.dso) for s in samples[:10]]
    assert groups == [
        "Python interpreter",
        "compiled by mypyc (synapse-coap)",
        "kernel",
        "zlib",
        "AEAD (libsodium, or cryptography's Rust and OpenSSL)",
        "Synapse's Rust",
        "other extension modules",  # (not the interpreter: "cpython-311" is no libpython)
        "synapse-coap C (_cenc, _cbody, _cdeflate, _caead)",
        "C library",
        "other",
    ]
    assert samples[2].tid == 4243 and samples[0].time == pytest.approx(100.0001)


def test_samples_go_to_the_turn_they_fell_in() -> None:
    """A sample counts for the listener whose turn it fell in; one outside every turn
    (between turns, after the last) for none; a cell's requests are its turns'."""
    ps = load_bench("perfsplit")
    turns = [
        ps.Turn("client versions", "CoAP+Noise", 100.0, 100.0005, 100),
        ps.Turn("client versions", "HTTP/1.1", 100.0006, 100.002, 100),
        ps.Turn("client versions", "HTTP/1.1", 200.0, 200.00015, 100),
    ]
    cells = ps.split(ps.parse_script(SCRIPT.splitlines()), turns)
    coap, http = cells[("client versions", "CoAP+Noise")], cells[("client versions", "HTTP/1.1")]
    assert (coap.requests, coap.samples) == (100, 5)
    assert (http.requests, http.samples) == (200, 6)  # the one at 200.0002 is past its turn
    assert coap.groups["Python interpreter"] == 1 and coap.groups["zlib"] == 1
    assert http.groups["Python interpreter"] == 1 and http.groups["C library"] == 1
    assert sum(coap.groups.values()) + sum(http.groups.values()) == 11
    # 1 sample at 1000 Hz is 1 ms; over 100 requests, 10 us each
    assert ps.per_request(1, coap, 1000.0) == pytest.approx(10.0)


def test_the_text_gives_both_listeners_and_their_difference() -> None:
    ps = load_bench("perfsplit")
    turns = [
        ps.Turn("whoami", "CoAP+Noise", 100.0, 100.0005, 100),
        ps.Turn("whoami", "HTTP/1.1", 100.0006, 100.002, 100),
    ]
    cells = ps.split(ps.parse_script(SCRIPT.splitlines()), turns)
    text = "\n".join(ps.render(cells, 1000.0, title="default reactor", symbols=3))
    assert "## default reactor" in text
    assert "### whoami: 100 CoAP+Noise and 100 HTTP/1.1 requests, 5 and 5 samples" in text
    # zlib: one CoAP+Noise sample, none for HTTP/1.1: 10 us a request more
    assert "  zlib" in text and "+10.0" in text
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("all"))
    assert line.split()[1:] == ["50.0", "50.0", "+0.0"]
    # the functions only CoAP+Noise ran: zlib's among them, HTTP/1.1's shared ones not
    mine = text.split("functions only CoAP+Noise ran (us/request):\n", 1)[1].splitlines()
    assert any("[zlib]" in ln and "10.0" in ln for ln in mine)
    assert all(
        cells[("whoami", "HTTP/1.1")].symbols[ln.strip().split("  ", 1)[1]] == 0 for ln in mine
    )
    assert "only CoAP+Noise" not in "\n".join(
        ps.render(cells, 1000.0, title="t", symbols=3, only=0)
    )
    # a listener missing from an endpoint: nothing rendered for it
    only = {k: v for k, v in cells.items() if k[1] == "CoAP+Noise"}
    assert ps.render(only, 1000.0, title="t") == ["## t", ""]
