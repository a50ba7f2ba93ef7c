"""How set-up builds llama-cpp-python for this CPU: prints ``<variant> <CMAKE_ARGS...>`` for scripts/setup.sh.

Never ``-march=native``: it turns on AMX where the CPU reports it, and AMX's first instruction (``tilezero``)
died with SIGILL on a 2-core Intel Xeon VM whose /proc/cpuinfo lists amx_tile (2026-12-06). Instead
the x86-64 instruction sets are named one by one (``GGML_NATIVE=OFF``): AVX2/FMA/F16C/BMI2 everywhere
(the portable build, as in the Dockerfile), and AVX-512 with its VBMI/VNNI/BF16 extensions and AVX-VNNI
where /proc/cpuinfo lists them, which made prompt evaluation of the 1.5B faster on such a CPU
(``benchmarks/results/llama_build_speed.md``). The variant names the wheel cache folder, so a home folder
moved to another CPU builds again rather than reusing a wheel this one cannot run.

    python3 scripts/llama_build.py            # for this machine's /proc/cpuinfo
"""
from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

# what GGML_AVX512 compiles for (-mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw)
AVX512_BASE = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
# optional extensions: /proc/cpuinfo flag -> ggml's CMake option
AVX512_EXTRAS = {"avx512vbmi": "GGML_AVX512_VBMI", "avx512_vnni": "GGML_AVX512_VNNI",
                 "avx512_bf16": "GGML_AVX512_BF16", "avx_vnni": "GGML_AVX_VNNI"}
PORTABLE = "portable"


def cpu_flags(cpuinfo: str) -> set[str]:
    """The flags of the first processor listed in a /proc/cpuinfo text (empty where it lists none)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cmake_args(flags: Iterable[str]) -> tuple[str, list[str]]:
    """The build variant (a folder name) and its CMake arguments for a CPU with these flags; never AMX."""
    flags = set(flags)
    args = ["-DGGML_NATIVE=OFF"]
    if not all(f in flags for f in AVX512_BASE):
        return PORTABLE, args
    extras = [name for name in AVX512_EXTRAS if name in flags]
    args += ["-DGGML_AVX512=ON"] + [f"-D{AVX512_EXTRAS[name]}=ON" for name in extras]
    variant = "-".join(["avx512"] + [name.replace("avx512", "").replace("_", "") for name in extras])
    return variant, args


def main(argv: list[str]) -> int:
    path = Path(argv[1]) if len(argv) > 1 else Path("/proc/cpuinfo")
    flags = cpu_flags(path.read_text()) if path.exists() else set()
    variant, args = cmake_args(flags)
    print(variant, *args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
