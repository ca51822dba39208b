"""cProfile for a process started by bench/inbound.py or bench/transport_cpu.py with
--cprofile-out (only then: Synapse, or the transport bench's CoAP listener).

Put on PYTHONPATH with SYNAPSE_COAP_CPROFILE=PREFIX in the environment: the process
does not profile until told; each SIGUSR2 toggles: the first starts a profile, the
next writes it to PREFIX.N (N = 0, 1, ...) and stops, so the measured rounds run
without the profiler's overhead and the bench profiles only the passes it chooses.
cProfile sees the main thread only: use it with the asyncio reactor (one thread).
Its clock is the thread's CPU time (``time.thread_time``), not wall time: on a shared
machine wall time counts waiting for a core, and it made HTTP/1.1 and CoAP look alike
where ``/proc`` said otherwise (CPU time costs a clock read per call event, so small
functions weigh more than they cost; compare counts and proportions, not totals).
"""

import os

if os.environ.get("SYNAPSE_COAP_CPROFILE"):
    import cProfile
    import signal
    import time

    _prefix = os.environ["SYNAPSE_COAP_CPROFILE"]
    _state: dict[str, object] = {"n": 0, "prof": None}

    def _toggle(signum: int, frame: object) -> None:
        prof = _state["prof"]
        if prof is None:
            fresh = cProfile.Profile(time.thread_time)
            _state["prof"] = fresh
            fresh.enable()
            return
        assert isinstance(prof, cProfile.Profile)
        prof.disable()
        prof.dump_stats(f"{_prefix}.{_state['n']}")
        _state["n"] = int(str(_state["n"])) + 1
        _state["prof"] = None

    signal.signal(signal.SIGUSR2, _toggle)
