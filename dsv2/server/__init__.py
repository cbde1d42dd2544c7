"""The OpenAI-compatible server: ``dsv2 serve``."""
