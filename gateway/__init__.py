"""mlx-gateway: an OpenAI-compatible gateway on mlx-lm with named, isolated prefix caches."""

__version__ = "0.1.0"
