"""Spec models of the Kubernetes API objects the mesh reads (Gateway API, Istio), plus shared parsing helpers."""
