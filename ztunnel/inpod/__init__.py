"""In-pod traffic capture (Istio's in-pod model): rules inside each enrolled pod's netns."""
