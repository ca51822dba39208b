"""Differential fuzzing of the C body decoder (synapse_coap/wire/_cbody.c), for
``scripts/fuzz-cbody``, which builds it with AddressSanitizer and UBSan and runs this.

    python tests/harness/cbody_fuzz.py EXTENSION [--seed N] [--inputs N] [--leak-rounds N]

Every JSON body of the corpus is encoded, then mutated (bytes replaced, truncated,
bytes inserted, or random bytes); whatever the C decoder accepts must be what the
reference decoder gives, and the module's walk of that value for the session string
table (``request_strings``, with a random count cap) what the Python walk gives. Then
every body (whole and truncated) is decoded, and every decoded value walked,
``--leak-rounds`` times and the peak RSS must not grow (a reference leaked per decode
would show; meaningless under AddressSanitizer, whose quarantine holds freed memory,
so the script skips it there). Progress goes to stderr every 20,000 inputs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from synapse_coap.errors import SynapseCoapError  # noqa: E402
from synapse_coap.wire import body_decode, body_encode, body_fast, strings  # noqa: E402
from synapse_coap.wire.body import DEFAULT_BODY_LIMITS, BodyLimits  # noqa: E402
from synapse_coap.wire.context import WireContext  # noqa: E402
from synapse_coap.wire.profile import load_profile  # noqa: E402
from tests.harness.corpus import json_bodies  # noqa: E402


def load(path: str | Path, name: str = "synapse_coap.wire._cbody") -> Any:
    """The C module ``name`` built at ``path``, loaded directly (the package refuses to
    import it while the sources run)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def c_module(name: str, imported: Any) -> Any:
    """For a test: the C module ``name`` as the package ``imported`` it, or, where the
    sources run (SYNAPSE_COAP_PURE=1, so the package refuses to import it), the build's
    extension loaded directly; the test is skipped when there is no current build."""
    if imported is not None:
        return imported
    from synapse_coap import native

    fault = native.build_fault()
    ext = native.extension_path(name)
    if fault is not None or ext is None:
        import pytest

        pytest.skip(f"no current native build ({fault}): synapse-coap build-native")
    return load(ext, name)


def fuzz_arguments(doc: str | None, module: str, leak_rounds: int = 300) -> argparse.Namespace:
    """The command line every fuzz harness takes: the built extension, --seed, --inputs
    and --leak-rounds."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("extension", help=f"the built {module} extension (.so) to fuzz")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--inputs", type=int, default=100_000)
    ap.add_argument("--leak-rounds", type=int, default=leak_rounds)
    return ap.parse_args()


def leak_check(one_round: Callable[[], None], rounds: int) -> int:
    """Run ``one_round`` 3 times, then ``rounds`` times: 1 if the peak RSS grew by more
    than 2 MiB meanwhile (a reference or buffer leaked per call), else 0; skipped (0)
    under AddressSanitizer, whose quarantine holds freed memory."""
    if "asan" in os.environ.get("LD_PRELOAD", ""):
        print("leak check: skipped under AddressSanitizer")
        return 0
    for _ in range(3):
        one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(rounds):
        one_round()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"leak check: peak RSS {before} KiB before, {after} KiB after")
    return 1 if after > before + 2048 else 0


def reference_strings(value: Any, max_ids: int = strings.MAX_IDS) -> tuple[Any, Any]:
    """What ``request_strings(value, max_ids, MIN_TEXT, MAX_TEXT, MAX_TEXT_TOTAL)`` must
    give: the Python walk's identifiers and texts (``strings._identifiers_of`` and
    ``_texts_of`` over ``strings._strings``) with the count cap ``max_ids``."""
    items = strings._strings(value)
    saved = strings.MAX_IDS
    strings.MAX_IDS = max_ids
    try:
        return strings._identifiers_of(items), strings._texts_of(items)
    finally:
        strings.MAX_IDS = saved


def _mutate(rng: random.Random, body: bytes) -> bytes:
    b = bytearray(body)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 1:
        del b[rng.randrange(len(b) + 1) :]
    elif kind == 2:
        at = rng.randrange(len(b))
        b[at:at] = rng.randbytes(rng.randint(1, 8))
    else:
        b = bytearray(rng.randbytes(rng.randint(0, 64)))
    return bytes(b)


#: request_strings' text caps after its count cap (strings.request_identifiers' call)
_TEXT_CAPS = (strings.MIN_TEXT, strings.MAX_TEXT, strings.MAX_TEXT_TOTAL)


def main() -> int:
    args = fuzz_arguments(__doc__, "_cbody")

    mod = load(args.extension)
    profile = load_profile(1)
    ctx = WireContext(server_names=("corpus.example.org", "other.example"))
    tables = body_fast.c_tables(mod, profile, ctx.server_names)
    bodies = [body_encode._encode_cbor(b, profile, ctx) for b in json_bodies()]
    rng = random.Random(args.seed)
    accepted = 0
    for i in range(args.inputs):
        data = _mutate(rng, rng.choice(bodies))
        limits = DEFAULT_BODY_LIMITS
        if rng.random() < 0.2:
            limits = BodyLimits(max_depth=rng.randint(1, 8))
        got = mod.decode(data, tables, limits.max_depth, None)
        if got is not body_fast.FALLBACK:
            accepted += 1
            try:
                ref = body_decode._Decoder(data, profile, ctx, limits, None).decode()
            except SynapseCoapError as e:
                raise SystemExit(f"C accepted what the reference refuses: {data!r}: {e}") from e
            if repr(got) != repr(ref):
                raise SystemExit(f"C and reference differ on {data!r}: {got!r} != {ref!r}")
            # the request's identifiers and texts for the session string table, from
            # the decoded value (the walk the module runs on every request body)
            max_ids = rng.choice((0, 1, 3, strings.MAX_IDS))
            walk = mod.request_strings(got, max_ids, *_TEXT_CAPS)
            if walk != reference_strings(got, max_ids):
                raise SystemExit(f"request_strings differs from the Python walk on {got!r}")
        if (i + 1) % 20_000 == 0:
            print(f"  {i + 1} inputs, {accepted} accepted", file=sys.stderr)
    print(
        f"fuzz: {args.inputs} inputs (seed {args.seed}), {accepted} accepted, all as the reference"
    )
    values = [mod.decode(data, tables, 64, None) for data in bodies]
    values = [v for v in values if v is not body_fast.FALLBACK]

    def one_round() -> None:
        for data in bodies:
            mod.decode(data, tables, 64, None)
            mod.decode(data[:-1], tables, 64, None)
        for value in values:
            mod.request_strings(value, strings.MAX_IDS, *_TEXT_CAPS)

    return leak_check(one_round, args.leak_rounds)


if __name__ == "__main__":
    raise SystemExit(main())
