"""Layer 2: CoAP over Noise/UDP with aiocoap (the only package touching aiocoap).

Public API: :class:`CoapServer` / :class:`ServerConfig` (server.py),
:class:`CoapClient` / :class:`Endpoint` (client.py), :class:`LinkParameters`
/ :class:`RttEstimator` (link.py), :class:`TransportMetrics` /
:class:`NullMetrics` / :class:`CountingMetrics` (metrics.py).
Import them from their modules; this package imports nothing eagerly.
"""
