"""``python -m synapse_coap.lab --listen ... --upstream ...``: run the impairment relay."""

from __future__ import annotations

import sys

from synapse_coap.lab.relay_cli import main

sys.exit(main())
