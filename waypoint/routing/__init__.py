"""Route table of the waypoint: API objects -> compiled table -> per-request route decisions."""
