"""The DeepSeek-V2 model: RMSNorm, YaRN RoPE, Multi-head Latent Attention, DeepSeekMoE, the decoder stack."""

from dsv2.model.cache import LatentCache
from dsv2.model.transformer import CausalLMOutput, DeepseekV2ForCausalLM

__all__ = ["CausalLMOutput", "DeepseekV2ForCausalLM", "LatentCache"]
