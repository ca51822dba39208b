"""Differential fuzzing of the Noise records' AEAD in C (synapse_coap/noise/_caead.c:
ChaCha20-Poly1305 through libsodium), for ``scripts/fuzz-cbody``, which builds it with
AddressSanitizer and UBSan and runs this.

    python tests/harness/caead_fuzz.py EXTENSION [--seed N] [--inputs N] [--leak-rounds N]

Each input seals a random plaintext (0 to 1,500 bytes, a record's sizes and beyond)
under a random key, nonce and associated data, which must give cryptography's
ChaCha20Poly1305 bytes (the plain-Python sources' AEAD); then opens what a peer could
send instead: that ciphertext as it is, with bytes flipped, cut (also below the 16-byte
tag), extended, under another nonce or associated data, or random bytes, which must
open exactly where cryptography's decrypt does (the same plaintext; None where it
raises InvalidTag). Keys and nonces of a wrong length must be refused, as cryptography
refuses them. Then the corpus of sizes is sealed and opened ``--leak-rounds`` times and
the peak RSS must not grow (skipped under AddressSanitizer, as in cbody_fuzz.py).
Progress goes to stderr every 20,000 inputs.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.harness.cbody_fuzz import fuzz_arguments, leak_check, load  # noqa: E402

TAG = 16


def _reference_open(key: bytes, nonce: bytes, data: bytes, ad: bytes) -> bytes | None:
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, data, ad)
    except InvalidTag:
        return None


def _peer_bytes(rng: random.Random, sealed: bytes) -> bytes:
    b = bytearray(sealed)
    kind = rng.randrange(6)
    if kind == 0:
        return sealed
    if kind == 1 and b:
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 2:
        return sealed[: rng.randrange(len(sealed) + 1)]
    if kind == 3:
        return sealed + rng.randbytes(rng.randint(1, 16))
    if kind == 4:
        return sealed[:TAG] if rng.random() < 0.5 else sealed[: rng.randrange(TAG)]
    return rng.randbytes(rng.randint(0, 64))


def _refused(fn: Any, *args: Any) -> bool:
    try:
        fn(*args)
    except ValueError:
        return True
    return False


def main() -> int:
    args = fuzz_arguments(__doc__, "_caead", leak_rounds=20_000)
    mod = load(args.extension, "synapse_coap.noise._caead")
    rng = random.Random(args.seed)
    opened = refused = 0
    for i in range(args.inputs):
        key, nonce = rng.randbytes(32), rng.randbytes(12)
        size = rng.choice((0, 1, 15, 16, 17, 64, rng.randint(0, 1500), rng.randint(0, 4000)))
        plaintext = rng.randbytes(size)
        ad = rng.randbytes(rng.choice((0, 8, 13, 32)))
        sealed = mod.seal(key, nonce, plaintext, ad)
        ref = ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad)
        if sealed != ref:
            raise SystemExit(f"seal differs from cryptography (size {size}, ad {len(ad)})")
        data = _peer_bytes(rng, sealed)
        open_nonce, open_ad = nonce, ad
        if rng.random() < 0.1:
            open_nonce = rng.randbytes(12)
        if rng.random() < 0.1:
            open_ad = ad + b"\x00"
        got = mod.open(key, open_nonce, data, open_ad)
        want = _reference_open(key, open_nonce, data, open_ad)
        if got != want:
            raise SystemExit(f"open differs from cryptography on {data!r}: {got!r} != {want!r}")
        opened += got is not None
        if rng.random() < 0.01:  # a key or nonce of a wrong length: refused by both
            bad_key, bad_nonce = rng.randbytes(rng.choice((0, 16, 31, 33))), rng.randbytes(11)
            if not (
                _refused(mod.seal, bad_key, nonce, plaintext, ad)
                and _refused(mod.open, key, bad_nonce, sealed, ad)
                and _refused(ChaCha20Poly1305, bad_key)
                and _refused(ChaCha20Poly1305(key).decrypt, bad_nonce, sealed, ad)
            ):
                raise SystemExit("a key or nonce of a wrong length was not refused")
            refused += 1
        if (i + 1) % 20_000 == 0:
            print(f"  {i + 1} inputs, {opened} opened", file=sys.stderr)
    print(
        f"fuzz: {args.inputs} inputs (seed {args.seed}): every seal as cryptography's, "
        f"{opened} opened and the rest refused as cryptography does, {refused} bad key or "
        "nonce lengths refused"
    )
    key, nonce = bytes(range(32)), bytes(12)
    texts = [bytes(n) for n in (0, 1, 16, 100, 1200, 1500)]

    def one_round() -> None:
        for text in texts:
            sealed = mod.seal(key, nonce, text, b"ad")
            mod.open(key, nonce, sealed, b"ad")
            mod.open(key, nonce, sealed[:-1], b"ad")

    return leak_check(one_round, args.leak_rounds)


if __name__ == "__main__":
    raise SystemExit(main())
