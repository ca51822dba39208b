"""Differential fuzzing of the C JSON-to-CBOR transcoder (synapse_coap/wire/_cenc.c), for
``scripts/fuzz-cbody``, which builds it with AddressSanitizer and UBSan and runs this.

    python tests/harness/cenc_fuzz.py EXTENSION [--seed N] [--inputs N] [--leak-rounds N]

Every JSON body of the corpus is written as Synapse writes JSON (and indented), then
mutated (bytes replaced, truncated, bytes inserted, or random bytes); whatever the
transcoder takes must give the reference path's bytes (parse_json_exact, then the
encoder), and whatever the response identifiers scan (``response_ids``) takes must give
the reference's tuple (``strings.python_response_identifiers``). Then every body (whole and truncated) is transcoded ``--leak-rounds`` times
and the peak RSS must not grow (skipped under AddressSanitizer, as in cbody_fuzz.py).
Progress goes to stderr every 20,000 inputs.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from synapse_coap.mapping.jsonbody import parse_json_exact  # noqa: E402
from synapse_coap.wire import body_encode, strings  # noqa: E402
from synapse_coap.wire.body_tables import _tables  # noqa: E402
from synapse_coap.wire.context import WireContext  # noqa: E402
from synapse_coap.wire.profile import load_profile, profile_ids  # noqa: E402
from tests.harness.cbody_fuzz import _mutate, fuzz_arguments, leak_check, load  # noqa: E402
from tests.harness.corpus import json_bodies  # noqa: E402


def main() -> int:
    args = fuzz_arguments(__doc__, "_cenc")

    mod = load(args.extension, "synapse_coap.wire._cenc")
    profile = load_profile(max(profile_ids()))
    ctx = WireContext(server_names=("corpus.example.org", "other.example"))
    t = _tables(profile)
    miss = body_encode._Miss(profile, ctx)
    targs = (t.key_bytes, t.value_bytes, miss.enc.cache, miss)
    bodies = [
        text
        for value in json_bodies()
        for text in (
            json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode(),
            json.dumps(value, indent=1).encode(),
        )
    ]
    rng = random.Random(args.seed)
    taken = ids_taken = 0
    limit = strings.MAX_RESPONSE_IDS
    for i in range(args.inputs):
        data = _mutate(rng, rng.choice(bodies))
        ids = mod.response_ids(data, limit)
        if ids is not None:
            ids_taken += 1
            ref_ids = strings.python_response_identifiers(data)
            if ids != ref_ids:
                raise SystemExit(f"C and reference ids differ on {data!r}: {ids!r} != {ref_ids!r}")
        got = mod.transcode(data, *targs)
        if got is not None:
            taken += 1
            try:
                ref = body_encode._encode_cbor(parse_json_exact(data), profile, ctx)
            except Exception as e:
                raise SystemExit(f"C took what the reference refuses: {data!r}: {e!r}") from e
            if got != ref:
                raise SystemExit(f"C and reference differ on {data!r}: {got!r} != {ref!r}")
        if (i + 1) % 20_000 == 0:
            print(f"  {i + 1} inputs, {taken} taken, {ids_taken} ids", file=sys.stderr)
    print(
        f"fuzz: {args.inputs} inputs (seed {args.seed}), {taken} transcoded and {ids_taken} "
        "response ids scans taken, all as the reference"
    )

    def one_round() -> None:
        for data in bodies:
            mod.transcode(data, *targs)
            mod.transcode(data[:-1], *targs)
            mod.response_ids(data, limit)
            mod.response_ids(data[:-1], limit)

    return leak_check(one_round, args.leak_rounds)


if __name__ == "__main__":
    raise SystemExit(main())
