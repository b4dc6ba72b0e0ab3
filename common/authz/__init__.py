"""Istio AuthorizationPolicy and PeerAuthentication: compiled per config, checked per connection."""
