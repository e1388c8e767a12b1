"""The Ray Serve application: OpenAI-compatible HTTP API, replica placement, metrics."""
