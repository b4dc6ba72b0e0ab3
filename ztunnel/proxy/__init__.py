"""ztunnel's data path: per-pod listeners (outbound, inbound HBONE, inbound plaintext)."""
