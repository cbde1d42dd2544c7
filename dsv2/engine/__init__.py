"""The inference engine: paged latent cache, continuous batching, prefix caching, vLLM's offline API."""

from dsv2.engine.engine import CompletionOutput, EngineConfig, LLMEngine, RequestOutput
from dsv2.engine.llm import LLM

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "LLMEngine", "RequestOutput"]
