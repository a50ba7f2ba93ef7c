"""scripts/llama_build.py: the instruction sets set-up compiles llama.cpp for, never AMX or -march=native."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "llama_build.py"
_spec = importlib.util.spec_from_file_location("llama_build", SCRIPT)
llama_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llama_build)

# /proc/cpuinfo flags of the two machines this project runs on (abridged to the x86 SIMD ones)
XEON_AMX = ("fpu sse sse2 ssse3 sse4_1 sse4_2 fma avx f16c bmi1 avx2 bmi2 avx512f avx512dq avx512ifma "
                   "avx512cd avx512bw avx512vl avx_vnni avx512_bf16 avx512vbmi avx512_vbmi2 avx512_vnni "
                   "avx512_bitalg avx512_vpopcntdq amx_bf16 avx512_fp16 amx_tile amx_int8")
ZEN3 = "fpu sse sse2 ssse3 sse4_1 sse4_2 fma avx f16c bmi1 avx2 bmi2 vaes vpclmulqdq"


def cpuinfo(flags: str) -> str:
    return (f"processor\t: 0\nmodel name\t: some CPU\nflags\t\t: {flags}\n\n"
            f"processor\t: 1\nmodel name\t: some CPU\nflags\t\t: {flags}\n")


def test_avx512_cpu_gets_its_extensions_and_never_amx():
    variant, args = llama_build.cmake_args(llama_build.cpu_flags(cpuinfo(XEON_AMX)))
    assert variant == "avx512-vbmi-vnni-bf16-avxvnni"
    assert args == ["-DGGML_NATIVE=OFF", "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON", "-DGGML_AVX512_VNNI=ON",
                    "-DGGML_AVX512_BF16=ON", "-DGGML_AVX_VNNI=ON"]
    assert not any("AMX" in a or "NATIVE=ON" in a for a in args)


@pytest.mark.parametrize("flags", [ZEN3, ZEN3 + " avx512f avx512cd avx512vl avx512dq", ""])
def test_cpu_without_full_avx512_gets_the_portable_build(flags):
    """AVX-512 needs all five of F/CD/VL/DQ/BW (what GGML_AVX512 compiles for); a CPU missing one, or a
    /proc/cpuinfo without flags, gets the AVX2 build the Dockerfile uses."""
    assert llama_build.cmake_args(llama_build.cpu_flags(cpuinfo(flags))) == ("portable", ["-DGGML_NATIVE=OFF"])


def test_script_prints_variant_then_cmake_args_for_setup(tmp_path):
    (tmp_path / "cpuinfo").write_text(cpuinfo(ZEN3 + " avx512f avx512cd avx512vl avx512dq avx512bw avx512_vnni"))
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "cpuinfo")], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["avx512-vnni", "-DGGML_NATIVE=OFF", "-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON"]
