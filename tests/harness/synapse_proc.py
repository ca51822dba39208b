"""Run a real Synapse homeserver process for tests: a re-export.

The harness lives in the package (:mod:`synapse_coap.lab.homeserver`) because
the demo ships in the wheel; tests keep importing it from here::

    from tests.harness.synapse_proc import SynapseProcess, free_port
"""

from __future__ import annotations

from synapse_coap.lab.homeserver import *  # noqa: F403 (exactly the names in its __all__)
from synapse_coap.lab.homeserver import __all__ as __all__
