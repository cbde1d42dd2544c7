"""Native CPU kernels, compiled on first use (torch's C++ extension loader: a C++ compiler and ninja) and cached.

For decoding on x86-64 CPUs with AVX-512 and its bf16 instructions (AVX512-BF16: Intel Xeon 3rd generation Cooper
Lake and 4th generation on, AMD EPYC / Ryzen from Zen 4), in bf16 and float32, one library, ``torch.ops.dsv2_cpu``:
`routed_experts` (a step's routed experts, each expert's weights read once: routed_experts.cpp), `latent_attention`
(MLA's absorbed attention read straight from the paged latent cache: latent_attention.cpp), `small_matmul` (a few
rows times a weight streamed once: small_matmul.cpp), and for a few sequences a whole half of a decoder layer in one
call: `mla_decode` (mla_decode.cpp) and `moe_decode` (moe_decode.cpp), or every layer of a step: `decode_layers`
(decode_layers.cpp), or several greedy steps: `decode_greedy` (there too). Where the CPU has AMX (Intel Xeon 4th
generation on), bf16 products of several rows run on its tiles; elsewhere on AVX-512 registers (VDPBF16PS, FMAs).
Everything works without them: where the CPU lacks those instructions, the build fails, or ``DSV2_CPU_KERNELS=0`` is
set, `cpu_ops` is None and the model keeps its torch paths. The compiled library is cached per source and torch
version under ``$XDG_CACHE_HOME/dsv2/kernels`` (default ``~/.cache``), so only the first use pays the ~30 s build.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE_DIR = Path(__file__).parent
SOURCES = [SOURCE_DIR / name for name in ("routed_experts.cpp", "latent_attention.cpp", "small_matmul.cpp",
                                              "mla_decode.cpp", "moe_decode.cpp", "decode_layers.cpp")]
HEADERS = [SOURCE_DIR / "common.h"]
CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"})  # the library needs them; AMX: at run time
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-fopenmp"]
LIBRARY = "dsv2_cpu"


@functools.cache
def _cpuinfo_field(name: str) -> str:
    """The first value of a field of /proc/cpuinfo ("" elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == name), "")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    return frozenset(_cpuinfo_field("flags").split())


def cpu_vendor() -> str:
    """"GenuineIntel", "AuthenticAMD", … as Linux reports it ("" elsewhere): some row limits differ between the two."""
    return _cpuinfo_field("vendor_id")


def cpu_family() -> int:
    """The CPU's family number as Linux reports it (0 elsewhere): on AMD, 25 is Zen 3/4, 26 Zen 5."""
    family = _cpuinfo_field("cpu family")
    return int(family) if family.isdigit() else 0


def kernels_enabled() -> bool:
    return os.environ.get("DSV2_CPU_KERNELS", "1") != "0"


def _build_directory() -> Path:
    key = hashlib.sha256(b"".join(path.read_bytes() for path in SOURCES + HEADERS))
    key.update(" ".join([*CFLAGS, torch.__version__, sys.version]).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "dsv2" / "kernels" / f"{LIBRARY}-{key.hexdigest()[:16]}"


def _ninja_on_path() -> None:
    """torch's loader runs `ninja`; the `ninja` package's copy lives in the environment's bin, which may be off
    PATH when the environment is not activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja  # type: ignore[import-not-found]
        except ImportError:
            return
        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


@functools.cache
def cpu_ops() -> ModuleType | None:
    """``torch.ops.dsv2_cpu``, built or loaded from the cache; None where it cannot run:
    not x86-64 Linux with AVX-512 (F, BW, VL, BF16), ``DSV2_CPU_KERNELS=0``, or a failed build (warned once)."""
    if not kernels_enabled() or platform.system() != "Linux" or not cpu_flags() >= CPU_FLAGS:
        return None
    directory = _build_directory()
    library = directory / f"{LIBRARY}.so"
    try:
        if library.exists():
            torch.ops.load_library(str(library))
        else:
            from torch.utils import cpp_extension

            print(f"dsv2: compiling the CPU decoding kernels into {directory} (once, ~30 s; DSV2_CPU_KERNELS=0 "
                  "skips them)", file=sys.stderr, flush=True)
            _ninja_on_path()
            directory.mkdir(parents=True, exist_ok=True)
            cpp_extension.load(name=LIBRARY, sources=[str(path) for path in SOURCES], extra_cflags=CFLAGS,
                               extra_ldflags=["-fopenmp"], build_directory=str(directory), is_python_module=False)
    except Exception as error:  # no compiler, no ninja, an old assembler: the torch path serves
        warnings.warn(f"dsv2: the CPU decoding kernels are unavailable ({type(error).__name__}: {error}); "
                      "decoding runs through torch", stacklevel=2)
        return None
    return torch.ops.dsv2_cpu
