"""dsv2: DeepSeek-V2 (Multi-head Latent Attention + DeepSeekMoE) in readable PyTorch."""

from dsv2.config import ConfigError, ModelConfig
from dsv2.engine import LLM, CompletionOutput, RequestOutput
from dsv2.generation_config import GenerationConfig
from dsv2.model import CausalLMOutput, DeepseekV2ForCausalLM, LatentCache
from dsv2.sampling import SamplingParams
from dsv2.tokenizer import Tokenizer
from dsv2.weights import WeightsError

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "CausalLMOutput",
    "CompletionOutput",
    "ConfigError",
    "DeepseekV2ForCausalLM",
    "GenerationConfig",
    "LatentCache",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
    "Tokenizer",
    "WeightsError",
]
