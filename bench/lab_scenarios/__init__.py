"""The Matrix scenarios of the constrained-link lab (``bench/lab.py``).

- :mod:`lab_scenarios.common`: results, counting helpers, link tuning per profile.
- :mod:`lab_scenarios.client`: client-server scenarios (matrix-nio through the
  sidecar over CoAP+Noise, and matrix-nio over HTTPS+JSON).
- :mod:`lab_scenarios.federation`: federation scenarios (two homeservers with
  the module, and two stock Synapses over HTTPS), built on the demo's pairs.
"""
