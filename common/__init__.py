"""pyambient: common."""
