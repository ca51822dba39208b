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

if os.environ.get("SYNAPSE_COAP_STAGES"):
    # Stage timing (bench/inbound.py --stages-out): the main thread's CPU time
    # (thread_time_ns) inside a fixed list of functions of the request path of each
    # listener, nested, summed per function, with and without the timed calls made inside
    # it. Each SIGUSR1 toggles: the first wraps the functions, the next writes ``PREFIX.N``
    # (``label<TAB>calls<TAB>ns<TAB>own ns`` lines) and puts the originals back. Each
    # wrapper costs its caller two clock reads (a system call each, about 0.5 us here),
    # so the innermost figures are the most exact.
    import signal as _signal
    import time as _time

    _stage_prefix = os.environ["SYNAPSE_COAP_STAGES"]
    _stage: dict[str, object] = {"n": 0, "on": None}

    #: module, class.method, label: the request path of each listener, outermost first
    STAGES = [
        line.split()
        for line in """
        synapse_coap.transport.batch BatchReader._handle_batch coap.handle_batch
        synapse_coap.transport.batch BatchReader.datagram_received coap.read
        synapse_coap.transport.batch BatchReader._next coap.next
        synapse_coap.transport.batch BatchHold.release coap.release
        synapse_coap.transport.noise_udp NoiseMessageInterface._ev_received coap.message
        synapse_coap.transport.server CoapServer.respond_now coap.respond_now
        synapse_coap.transport.server CoapServer._open coap.open
        synapse_coap.transport.server _Now.start coap.start
        synapse_coap.synapse.dispatch InProcessDispatcher.dispatch_now coap.dispatch_now
        synapse_coap.synapse.channel CoapChannel.response coap.channel_response
        synapse_coap.transport.server _Now.complete coap.complete
        synapse_coap.transport.server CoapServer._conclude coap.conclude
        synapse_coap.transport.server _Now._answer coap.answer
        synapse_coap.synapse.channel CoapChannel.writeHeaders coap.channel_headers
        synapse_coap.synapse.channel CoapChannel.write coap.channel_write
        synapse_coap.synapse.channel CoapChannel.requestDone coap.channel_done
        synapse_coap.transport.noise_udp NoiseMessageInterface.send_datagram coap.send_datagram
        synapse_coap.transport.noise_udp NoiseMessageInterface._sendto coap.sendto
        twisted.web.http HTTPChannel.dataReceived http.data_received
        twisted.web.http HTTPChannel.allContentReceived http.all_content
        twisted.web.http Request.write http.write
        synapse.http.site SynapseRequest.requestReceived synapse.request_received
        """.strip().splitlines()
    ]

    def _stage_wrap() -> dict[str, list[int]]:
        import importlib

        sums: dict[str, list[int]] = {}
        #: the time timed calls took inside the timed call in progress (main thread)
        inner = [0]
        undo = []
        clock = _time.thread_time_ns
        for module, method, label in STAGES:
            cls_name, name = method.split(".")
            cls = getattr(importlib.import_module(module), cls_name)
            orig = cls.__dict__[name]
            acc = sums[label] = [0, 0, 0]

            def wrapper(*a, __orig=orig, __acc=acc, **k):  # type: ignore[no-untyped-def]
                # (calls, inclusive ns, exclusive ns: less the timed calls made inside,
                # wherever this one is called from)
                t = clock()
                inner.append(0)
                try:
                    return __orig(*a, **k)
                finally:
                    spent = clock() - t
                    __acc[0] += 1
                    __acc[1] += spent
                    __acc[2] += spent - inner.pop()
                    inner[-1] += spent

            setattr(cls, name, wrapper)
            undo.append((cls, name, orig))
        _stage["undo"] = undo
        return sums

    def _stage_toggle(signum: int, frame: object) -> None:
        sums = _stage["on"]
        if sums is None:
            _stage["on"] = _stage_wrap()
            return
        for cls, name, orig in _stage.pop("undo"):  # type: ignore[attr-defined]
            setattr(cls, name, orig)
        _stage["on"] = None
        with open(f"{_stage_prefix}.{_stage['n']}", "w") as f:
            for label, (calls, ns, own) in sums.items():  # type: ignore[attr-defined]
                f.write(f"{label}\t{calls}\t{ns}\t{own}\n")
        _stage["n"] = int(str(_stage["n"])) + 1

    _signal.signal(_signal.SIGUSR1, _stage_toggle)
