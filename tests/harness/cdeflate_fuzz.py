"""Differential fuzzing of the C DEFLATE module (synapse_coap/wire/_cdeflate.c), for
``scripts/fuzz-cbody``, which builds it with AddressSanitizer and UBSan and runs this.

    python tests/harness/cdeflate_fuzz.py EXTENSION [--seed N] [--inputs N] [--leak-rounds N]

Each input takes one of the module's three entry points, with the dictionary of the
call drawn from the profiles' dictionaries, none, and random ones (so the kept inflate
stream, the primed compressors and the sequence tables switch between dictionaries,
and their caches fill and are dropped):

- ``inflate_dict`` on a peer's bytes: a DEFLATE stream of a corpus body (CBOR or JSON
  text, zlib's forms at random levels and memLevels, with or without the dictionary),
  then mutated (bytes replaced, truncated, bytes inserted, junk appended, or random
  bytes), with a random output cap: the same output, end and trailing-input verdict
  as ``zlib.decompressobj(-15, zdict=...).decompress(data, max_length)``, and an error
  exactly where zlib's module raises one;
- ``deflate_dict`` on a body (a corpus body, cut or mutated) with the window and
  memLevel the encoder would pick: zlib's module's bytes;
- ``cannot_shrink`` on a body of up to 70 bytes: the reference proof's verdict
  (``deflate.python_cannot_shrink``), or False (nothing proven) for a dictionary of
  more than 8,194 bytes.

Then every corpus body is inflated, deflated and judged ``--leak-rounds`` times and the
peak RSS must not grow (skipped under AddressSanitizer, as in cbody_fuzz.py). Progress
goes to stderr every 20,000 inputs.
"""

from __future__ import annotations

import json
import random
import sys
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from synapse_coap.wire import body_encode, deflate  # noqa: E402
from synapse_coap.wire.context import WireContext  # noqa: E402
from synapse_coap.wire.profile import load_profile, profile_ids  # noqa: E402
from tests.harness.cbody_fuzz import _mutate, fuzz_arguments, leak_check, load  # noqa: E402
from tests.harness.corpus import json_bodies  # noqa: E402

#: the C proof's largest dictionary (a larger one proves nothing: False)
TRI_DICT_MAX = 8194


def _reference_inflate(data: bytes, zdict: bytes, max_length: int) -> tuple[Any, ...]:
    """zlib's module's verdict: ("ok", output, eof, unused length) or ("error",)."""
    try:
        d = zlib.decompressobj(-15, zdict=zdict) if zdict else zlib.decompressobj(-15)
        out = d.decompress(data, max_length)
    except zlib.error:
        return ("error",)
    return ("ok", out, d.eof, len(d.unused_data))


def _c_inflate(mod: Any, data: bytes, zdict: bytes, max_length: int) -> tuple[Any, ...]:
    try:
        out, ended, unused = mod.inflate_dict(data, zdict, max_length)
    except ValueError:
        return ("error",)
    return ("ok", out, bool(ended), unused)


def _stream(rng: random.Random, body: bytes, zdict: bytes) -> bytes:
    """A raw DEFLATE stream of ``body`` in one of zlib's forms."""
    level = rng.choice((1, 6, 9, 9))
    mem = rng.randint(1, 9)
    wbits = rng.choice((9, 12, 15, 15))
    strategy = rng.choice((zlib.Z_DEFAULT_STRATEGY, zlib.Z_DEFAULT_STRATEGY, zlib.Z_FIXED))
    if zdict:
        c = zlib.compressobj(level, zlib.DEFLATED, -wbits, mem, strategy, zdict)
    else:
        c = zlib.compressobj(level, zlib.DEFLATED, -wbits, mem, strategy)
    return c.compress(body) + c.flush()


def _peer_bytes(rng: random.Random, stream: bytes) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:
        return stream
    if kind == 1:
        return stream + rng.randbytes(rng.randint(1, 16))  # junk after the stream's end
    if kind == 2 and stream:
        return stream[: rng.randrange(len(stream))]
    return _mutate(rng, stream) if stream else rng.randbytes(8)


def main() -> int:
    args = fuzz_arguments(__doc__, "_cdeflate", leak_rounds=100)

    mod = load(args.extension, "synapse_coap.wire._cdeflate")
    rng = random.Random(args.seed)
    profiles = [load_profile(i) for i in profile_ids()]
    newest = load_profile(max(profile_ids()))
    ctx = WireContext(server_names=("corpus.example.org", "other.example"))
    bodies: list[bytes] = []
    for value in json_bodies():
        bodies.append(json.dumps(value, separators=(",", ":")).encode())
        bodies.append(body_encode._encode_cbor(value, newest, ctx))
    # the profiles' dictionaries, none, and random ones (more than the C module's caches
    # keep, some larger than the proof's table takes)
    dicts = [p.dictionary for p in profiles if p.dictionary] + [b""]
    dicts += [rng.randbytes(rng.randint(1, 12_000)) for _ in range(12)]
    dicts += [rng.choice(bodies) for _ in range(4)]  # dictionaries the bodies share text with
    counts = {"inflate": 0, "inflate ok": 0, "deflate": 0, "proof": 0, "proved": 0}
    for i in range(args.inputs):
        zdict = rng.choice(dicts)
        body = rng.choice(bodies)
        kind = rng.randrange(3)
        if kind == 0:
            data = _peer_bytes(rng, _stream(rng, body, zdict if rng.random() < 0.9 else b""))
            max_length = rng.choice((1, 7, 64, len(body), len(body) + 1, 1 << 16, 1 << 20))
            got = _c_inflate(mod, data, zdict, max_length)
            ref = _reference_inflate(data, zdict, max_length)
            if got != ref:
                raise SystemExit(
                    f"inflate_dict differs from zlib on {data!r} (dictionary of "
                    f"{len(zdict)} bytes, max_length {max_length}): {got!r} != {ref!r}"
                )
            counts["inflate"] += 1
            counts["inflate ok"] += ref[0] == "ok"
        elif kind == 1:
            if not zdict:
                zdict = newest.dictionary
            if rng.random() < 0.5:
                body = _mutate(rng, body)
            body = body[: deflate.C_DEFLATE_MAX]
            wbits = deflate.deflate_window_bits(len(zdict) + len(body))
            mem = deflate.deflate_mem_level(len(body))
            got = mod.deflate_dict(body, zdict, wbits, mem)
            c = zlib.compressobj(9, zlib.DEFLATED, -wbits, mem, zlib.Z_DEFAULT_STRATEGY, zdict)
            ref = c.compress(body) + c.flush()
            if got != ref:
                raise SystemExit(
                    f"deflate_dict differs from zlib on {body!r} (dictionary of {len(zdict)} "
                    f"bytes, wbits {wbits}, memLevel {mem}): {got!r} != {ref!r}"
                )
            counts["deflate"] += 1
        else:
            n = rng.randint(0, deflate.CANNOT_SHRINK_MAX + 6)
            if rng.random() < 0.5 and len(body) > n:
                at = rng.randrange(len(body) - n + 1)
                data = body[at : at + n]  # a stretch of a real body
            else:
                data = _mutate(rng, body)[:n]
            if zdict and rng.random() < 0.3:  # a piece of the dictionary inside the body
                at = rng.randrange(len(zdict))
                piece = zdict[at : at + rng.randint(3, 12)]
                cut = rng.randint(0, len(data))
                data = (data[:cut] + piece + data[cut:])[: deflate.CANNOT_SHRINK_MAX + 6]
            got_proof = bool(mod.cannot_shrink(data, zdict))
            if len(data) > deflate.CANNOT_SHRINK_MAX or len(zdict) > TRI_DICT_MAX:
                ref_proof = False
            else:
                ref_proof = deflate.python_cannot_shrink(data, zdict)
            if got_proof != ref_proof:
                raise SystemExit(
                    f"cannot_shrink differs from the reference on {data!r} (dictionary of "
                    f"{len(zdict)} bytes): {got_proof} != {ref_proof}"
                )
            counts["proof"] += 1
            counts["proved"] += got_proof
        if (i + 1) % 20_000 == 0:
            print(f"  {i + 1} inputs, {counts}", file=sys.stderr)
    print(
        f"fuzz: {args.inputs} inputs (seed {args.seed}): {counts['inflate']} inflated "
        f"({counts['inflate ok']} without error), {counts['deflate']} deflated, "
        f"{counts['proof']} proofs ({counts['proved']} proved), all as zlib and the reference"
    )
    zdict = newest.dictionary
    streams = [_stream(random.Random(0), b, zdict) for b in bodies]

    def one_round() -> None:
        for body, stream in zip(bodies, streams, strict=True):
            mod.inflate_dict(stream, zdict, 1 << 20)
            try:
                mod.inflate_dict(stream[:-1] + b"\xff", zdict, 1 << 20)
            except ValueError:
                pass
            small = body[: deflate.C_DEFLATE_MAX]
            mod.deflate_dict(
                small,
                zdict,
                deflate.deflate_window_bits(len(zdict) + len(small)),
                deflate.deflate_mem_level(len(small)),
            )
            mod.cannot_shrink(body[: deflate.CANNOT_SHRINK_MAX], zdict)

    return leak_check(one_round, args.leak_rounds)


if __name__ == "__main__":
    raise SystemExit(main())
