"""ztunnel's DNS proxy (15053, udp and tcp, inside every enrolled pod).

``wire`` (message format), ``zone`` (what the snapshot answers), ``cache``, ``upstream``
(forwarding), ``resolver`` (the three together), ``server`` (the trio shells and pod hook).
"""
