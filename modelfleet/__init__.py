"""modelfleet: serve open-weight language models on Kubernetes."""

__version__ = "0.1.0"
