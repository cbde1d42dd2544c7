"""Peak resident memory while loading a >= 1 GB checkpoint: dsv2's loader vs a naive load_file + copy.

    python benchmarks/load_memory.py [--params-m 600] [--dtype bfloat16] [--shard-size 5GB]

Writes a random V2-Lite-shaped (narrower) checkpoint to a temp folder, then loads it in a fresh process per method and
reports peak RSS above the process's RSS before loading, as a multiple of the checkpoint's bytes on disk.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from dsv2 import DeepseekV2ForCausalLM, ModelConfig


def status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process. Unlike getrusage's ru_maxrss, VmHWM is not
    inherited from the parent across fork + exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:"))


def checkpoint_config(params_m: int) -> ModelConfig:
    """V2-Lite's shape with hidden 1024 and 32 experts of width 1024; layers chosen to reach ~params_m million."""
    base = ModelConfig.preset("v2-lite").replace(hidden_size=1024, intermediate_size=4096, moe_intermediate_size=1024,
                                                 n_routed_experts=32, vocab_size=32000, num_hidden_layers=2)
    per_layer = 32 * 3 * 1024 * 1024 + 2 * 3 * 1024 * 1024  # routed + shared experts dominate
    layers = max(2, round((params_m * 1e6 - 2 * 32000 * 1024) / per_layer) + 1)
    return base.replace(num_hidden_layers=layers)


def measure(path: str, method: str) -> dict:
    """Runs in a fresh process: load with `method`, return peak RSS growth in bytes."""
    config = ModelConfig.from_pretrained(path)
    before = status_bytes("VmRSS")
    if method == "dsv2":
        model = DeepseekV2ForCausalLM.from_pretrained(path, progress=False)
    else:  # naive: the whole state dict in memory, then copied into a built model
        from safetensors.torch import load_file

        from dsv2.weights import checkpoint_layout

        state = {}
        for file in sorted(Path(path).glob("*.safetensors")):
            state.update(load_file(file))
        model = DeepseekV2ForCausalLM.empty(config, config.dtype)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, slot in checkpoint_layout(model).items():
                target = params[slot.param] if slot.expert is None else params[slot.param][slot.expert]
                target.copy_(state[key])
        del state
    peak = status_bytes("VmHWM")
    assert sum(p.numel() for p in model.parameters()) > 0
    return {"peak_growth": peak - before}


def run(params_m: int = 600, dtype: str = "bfloat16", shard_size: str = "5GB",
        methods: tuple[str, ...] = ("naive", "dsv2")) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        config = checkpoint_config(params_m)
        model = DeepseekV2ForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        model.save_pretrained(tmp, max_shard_size=shard_size)
        del model
        ckpt_bytes = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))
        results = {"checkpoint_bytes": ckpt_bytes}
        for method in methods:
            code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import load_memory; "
                    f"print(json.dumps(load_memory.measure({tmp!r}, {method!r})))")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            results[method] = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth"] / ckpt_bytes
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params-m", type=int, default=600, help="approximate parameters, in millions")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--shard-size", default="5GB", help="max_shard_size used to write the checkpoint")
    args = parser.parse_args()
    r = run(args.params_m, args.dtype, args.shard_size)
    print(f"checkpoint: {r['checkpoint_bytes'] / 1e9:.2f} GB ({args.dtype}, shards of at most {args.shard_size})")
    print("| loader | peak RSS growth / checkpoint bytes |")
    print("|---|---|")
    for method in ("naive", "dsv2"):
        print(f"| {method} | {r[method]:.2f}× |")


if __name__ == "__main__":
    main()
