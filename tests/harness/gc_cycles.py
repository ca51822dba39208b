"""A fixture for the tests that a finished request leaves no reference cycle behind."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    """As in Synapse (which collects from a timer): during the test only reference
    counting frees objects, so what a request leaves in cycles stays to be counted."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
