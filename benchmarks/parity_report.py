"""Max |Δlogit| against transformers' DeepseekV2ForCausalLM for every oracle config of tests/test_hf_parity.py.

    python benchmarks/parity_report.py

fp32, random weights (std 0.1) saved by transformers and loaded through dsv2's loader; batch 2 × 64 tokens from
position 0, 64 tokens at positions 2400-2463 (far beyond original_max_position_embeddings = 64), and a 32-token greedy
continuation of a 16-token prompt (dsv2 through its latent cache, transformers through `generate`).
"""

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from dsv2 import DeepseekV2ForCausalLM

import test_hf_parity
from helpers import greedy_continuation


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    print("| config | max abs Δlogit, positions 0-63 | at positions 2400-2463 | 32-token greedy continuation |")
    print("|---|---|---|---|")
    for name, config in test_hf_parity.CONFIGS.items():
        hf = test_hf_parity.hf_model(config)
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            ours = DeepseekV2ForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        ids = torch.randint(2, config["vocab_size"], (2, 64))
        near = (hf(ids).logits - ours(ids)).abs().max().item()
        positions = torch.arange(2400, 2464)[None]
        far = (hf(ids[:1], position_ids=positions).logits - ours(ids[:1], positions=positions)).abs().max().item()
        prompt = ids[:1, :16]
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False)
        same = expected[:, 16:].tolist() == greedy_continuation(ours, prompt, 32).tolist()
        print(f"| {name} | {near:.1e} | {far:.1e} | {'identical' if same else 'DIFFERENT'} |")


if __name__ == "__main__":
    main()
