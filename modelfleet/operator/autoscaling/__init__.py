"""Queue-depth autoscaling: a pure policy, a Prometheus reader, and the loop that writes /scale."""
