"""pyambient: waypoint."""
