"""pyambient: deploy."""
