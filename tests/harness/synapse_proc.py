"""Run a real Synapse homeserver process for tests: a re-export.

The harness lives in the package (:mod:`synapse_coap_lab.homeserver`) because
the demo ships in the wheel; tests keep importing it from here::

    from tests.harness.synapse_proc import SynapseProcess, free_port
"""

from __future__ import annotations

import re

import pytest

from synapse_coap_lab.homeserver import *  # noqa: F403 (exactly the names in its __all__)
from synapse_coap_lab.homeserver import __all__ as _lab_all
from synapse_coap_lab.homeserver import synapse_version

__all__ = [*_lab_all, "AUTHENTICATED_MEDIA", "requires_synapse"]


def requires_synapse(release: tuple[int, int], feature: str) -> pytest.MarkDecorator:
    """Skip a test on a Synapse (the one the tests run) older than ``release``, naming
    the feature it needs. The oldest supported release (1.120.0) has every feature
    marked so far: CI never skips these."""
    have = tuple(int(p) for p in re.findall(r"\d+", synapse_version())[:2])
    return pytest.mark.skipif(
        have < release,
        reason=f"needs {feature}, from Synapse {release[0]}.{release[1]}; "
        f"this is Synapse {synapse_version()}",
    )


#: Authenticated media (MSC3916, ``/_matrix/client/v1/media/...``): stable from 1.111.
AUTHENTICATED_MEDIA = requires_synapse((1, 111), "authenticated media (MSC3916)")
