import math

import pytest
import torch

from dsv2 import ModelConfig
from dsv2.model.rope import RotaryEmbedding, apply_rope, rope_inv_freq, rope_mscale, yarn_correction_range

from helpers import tiny_config


def remote_yarn_inv_freq(dim, base, factor, original_max, beta_fast, beta_slow):
    """The reference (remote code) YaRN frequencies, transcribed independently of dsv2.model.rope."""

    def find_correction_dim(num_rotations):
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(find_correction_dim(beta_fast)), 0)
    high = min(math.ceil(find_correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    linear = (torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)
    inv_freq_mask = 1.0 - torch.clamp(linear, 0, 1)
    freq_extra = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freq_inter = 1.0 / (factor * base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return freq_inter * (1 - inv_freq_mask) + freq_extra * inv_freq_mask


def test_v2_correction_range_and_frequencies():
    config = ModelConfig.preset("v2")
    assert yarn_correction_range(64, 10000, 4096, 32, 1) == (10, 23)
    expected = remote_yarn_inv_freq(64, 10000, 40, 4096, 32, 1)
    assert torch.equal(rope_inv_freq(config), expected)  # bit for bit
    assert rope_mscale(config) == 1.0  # mscale == mscale_all_dim


def test_frequencies_equal_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = ModelConfig.preset("v2-lite")
    hf_config = transformers.DeepseekV2Config(**config.to_dict())
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    assert torch.equal(rope_inv_freq(config), inv_freq)
    assert attention_factor == rope_mscale(config)


def test_mscale_without_mscale_all_dim_follows_the_reference():
    """The remote code scales cos/sin by yarn_get_mscale(s, mscale) / yarn_get_mscale(s, 0) = 0.1·mscale·ln s + 1;
    transformers 5.24 uses 0.1·ln s + 1 here (section 7 of the reference). We follow the remote code."""
    config = tiny_config(rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 64,
                                       "mscale": 0.707})
    assert rope_mscale(config) == pytest.approx(0.1 * 0.707 * math.log(40) + 1)
    assert config.softmax_scale == config.qk_head_dim**-0.5  # no mscale_all_dim → no m²
    no_mscale = tiny_config(rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 64})
    assert rope_mscale(no_mscale) == pytest.approx(0.1 * math.log(40) + 1)


def test_cos_sin_equal_the_reference_table_rows_far_out():
    config = ModelConfig.preset("v2-lite")
    inv_freq = remote_yarn_inv_freq(64, 10000, 40, 4096, 32, 1)
    positions = torch.tensor([[0, 1, 4095, 4096, 100_000, 163_839]])
    table = torch.outer(torch.arange(163_840, dtype=torch.float32), inv_freq)  # what the reference caches per layer
    cos, sin = RotaryEmbedding(config)(positions)
    assert torch.equal(cos[0], table[positions[0]].cos()) and torch.equal(sin[0], table[positions[0]].sin())


@pytest.mark.parametrize("rope_scaling", [None, {"type": "yarn", "factor": 40, "original_max_position_embeddings": 64,
                                                    "mscale": 0.707}], ids=["plain", "yarn-mscale"])
def test_the_decoding_tables_hold_forwards_values(rope_scaling):
    """`tables` (what the one-call decoding step reads RoPE from) holds, row p, what `forward` gives position p, bit
    for bit; it grows to the positions asked for and keeps its rows while they suffice."""
    rotary = RotaryEmbedding(tiny_config(rope_scaling=rope_scaling, max_position_embeddings=4096))
    cos, sin = rotary.tables(100, torch.device("cpu"))
    assert cos.shape[0] >= 100 and cos.shape == sin.shape
    assert rotary.tables(cos.shape[0], torch.device("cpu"))[0] is cos  # kept
    cos, sin = rotary.tables(1500, torch.device("cpu"))
    positions = torch.tensor([[0], [1], [63], [64], [777], [1499]])  # [B, 1], as a decoding step's
    want_cos, want_sin = rotary(positions)
    assert torch.equal(cos[positions[:, 0]], want_cos[:, 0]) and torch.equal(sin[positions[:, 0]], want_sin[:, 0])


def test_interleaved_rotation_equals_the_reference_permute_then_rotate_half():
    x = torch.randn(2, 5, 3, 16)  # [B, T, heads, d_R]
    angles = torch.randn(2, 5, 8)
    cos, sin = angles.cos(), angles.sin()
    # reference: permute pairs to halves, then x·cos + rotate_half(x)·sin with cos/sin duplicated over the halves
    halves = x.view(2, 5, 3, 8, 2).transpose(-1, -2).reshape(2, 5, 3, 16)
    rotate_half = torch.cat([-halves[..., 8:], halves[..., :8]], dim=-1)
    cos2, sin2 = torch.cat([cos, cos], -1)[:, :, None], torch.cat([sin, sin], -1)[:, :, None]
    expected = halves * cos2 + rotate_half * sin2
    got = apply_rope(x, cos[:, :, None], sin[:, :, None])
    # ours keeps the raw (interleaved) layout; permute it the same way to compare
    got_halves = got.view(2, 5, 3, 8, 2).transpose(-1, -2).reshape(2, 5, 3, 16)
    torch.testing.assert_close(got_halves, expected)
    # q·k only depends on the position difference: the property the layouts must share
    q, k = torch.randn(16), torch.randn(16)
    rope = RotaryEmbedding(tiny_config(qk_rope_head_dim=16))
    c, s = rope(torch.tensor([[3, 10, 103, 110]]))
    rq = [apply_rope(q, c[0, i], s[0, i]) for i in range(4)]
    rk = [apply_rope(k, c[0, i], s[0, i]) for i in range(4)]
    assert torch.dot(rq[1], rk[0]) == pytest.approx(torch.dot(rq[3], rk[2]).item(), abs=1e-4)


def test_rotation_gradient_is_the_inverse_rotation():
    x = torch.randn(2, 5, 3, 16, requires_grad=True)
    angles = torch.randn(2, 5, 1, 8)
    cos, sin = angles.cos(), angles.sin()
    written_out = torch.stack([x[..., 0::2] * cos - x[..., 1::2] * sin, x[..., 0::2] * sin + x[..., 1::2] * cos], -1)
    rotated = apply_rope(x, cos, sin)
    torch.testing.assert_close(rotated, written_out.flatten(-2), atol=1e-6, rtol=1e-6)
    upstream = torch.randn_like(rotated)
    rotated.backward(upstream)
    torch.testing.assert_close(x.grad, apply_rope(upstream, cos, -sin), atol=1e-6, rtol=1e-6)
