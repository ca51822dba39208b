"""Fresh random user names, room names and message texts for each lab or demo run.

The wire profile's dictionary is trained on a neutralised corpus (no name of
it survives), and the figures must not be flattered by names the dictionary
happens to hold either: so the lab (bench/lab.py) and the demo draw their users,
rooms and texts here, anew in every process. Lengths are fixed (the same as the
names they replace: "alice", "bob", "Bob", "lab"), so byte counts stay comparable
from run to run while the characters change.
"""

from __future__ import annotations

import secrets

import attrs

_LOWER = "abcdefghijklmnopqrstuvwxyz"
#: word lengths of an English-like sentence (cycled)
_WORDS = (5, 3, 4, 2, 6, 3, 5, 4, 7, 2, 3)


def word(n: int) -> str:
    return "".join(secrets.choice(_LOWER) for _ in range(n))


@attrs.frozen
class RunNames:
    """The names of one run."""

    alice: str  # the user whose client is measured (5 letters)
    bob: str  # the other user (3 letters)
    bob_display: str  # bob's display name (3 letters, capitalised)
    room: str  # room name (3 letters... or 4 for the demo's)
    room_demo: str

    def text(self, length: int) -> str:
        """A fresh random sentence of exactly ``length`` characters (words and spaces)."""
        out: list[str] = []
        size = 0
        i = 0
        while size < length:
            if out:
                out.append(" ")
                size += 1
            n = min(_WORDS[i % len(_WORDS)], max(length - size, 0))
            out.append(word(n))
            size += n
            i += 1
        return "".join(out)[:length]


def fresh() -> RunNames:
    return RunNames(
        alice=word(5),
        bob=word(3),
        bob_display=word(3).capitalize(),
        room=word(3),
        room_demo=word(4),
    )


#: this process's names (one run)
NAMES = fresh()
