"""The project's tooling beside the runtime package (not in the wheel).

- :mod:`synapse_coap_lab.homeserver`: starts real Synapse processes (tests, lab, demo);
- :mod:`synapse_coap_lab.capture`: IP-level byte counting of loopback traffic with tshark;
- :mod:`synapse_coap_lab.demo` and ``python -m synapse_coap_lab``: the federation demo
  (``scripts/demo``);
- :mod:`synapse_coap_lab.attack`: the datagram and handshake floods of ``bench/attack.py``;
- :mod:`synapse_coap_lab.names`: fresh random user and room names for the lab and demo.

A checkout's ``scripts/setup`` installs synapse-coap in develop mode with the
checkout's root on ``sys.path`` (``[tool.hatch.build] dev-mode-dirs``), which makes
this package importable; the wheel holds ``synapse_coap`` only.
"""
