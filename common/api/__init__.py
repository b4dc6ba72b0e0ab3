"""Spec models of the API objects the mesh reads (Gateway API, Istio), and parsing helpers."""
