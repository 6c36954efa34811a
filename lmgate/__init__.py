"""lmgate: a self-hosted, OpenAI-compatible gateway for large language models."""

__version__ = "0.1.0"
