"""cProfile for a Synapse process started by bench/inbound.py --cprofile-out (only then).

Put on PYTHONPATH with SYNAPSE_COAP_CPROFILE=PREFIX in the environment: the process
profiles itself from start; each SIGUSR2 writes the profile so far to PREFIX.N
(N = 0, 1, ...) and starts a fresh one, so the bench can cut the run into phases.
cProfile sees the main thread only: use it with the asyncio reactor (one thread).
"""

import os

if os.environ.get("SYNAPSE_COAP_CPROFILE"):
    import cProfile
    import signal

    _prefix = os.environ["SYNAPSE_COAP_CPROFILE"]
    _state = {"n": 0, "prof": cProfile.Profile()}
    _state["prof"].enable()

    def _cut(signum: int, frame: object) -> None:
        prof = _state["prof"]
        prof.disable()
        prof.dump_stats(f"{_prefix}.{_state['n']}")
        _state["n"] += 1
        fresh = cProfile.Profile()
        _state["prof"] = fresh
        fresh.enable()

    signal.signal(signal.SIGUSR2, _cut)
