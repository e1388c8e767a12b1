"""The Kubernetes operator: kopf handlers, child-object builders, status and autoscaling."""
