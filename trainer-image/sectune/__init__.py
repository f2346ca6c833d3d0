"""sectune: fine-tune and serve LLMs for security work."""

__version__ = "0.1.0"
