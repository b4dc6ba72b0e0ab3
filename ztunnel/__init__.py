"""pyambient: ztunnel."""
