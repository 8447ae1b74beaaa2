"""dtype "auto": bf16 on CPUs that compute it natively (from /proc/cpuinfo's flags), fp16 on CUDA
and MPS, fp32 elsewhere; $CTRLNET_DTYPE replaces auto, an explicit dtype wins over both."""

import pytest
import torch

from ctrlnet.runtime import device as rd

X86_BF16 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: fpu vme de pse tsc msr avx2 avx512f avx512_bf16 avx512_vnni amx_tile amx_bf16 amx_int8
"""
X86_AMX_ONLY = "flags\t: fpu avx2 avx512f amx_bf16 amx_tile\n"
X86_PLAIN = """processor\t: 0
model name\t: Intel(R) Xeon(R) CPU @ 2.20GHz
flags\t\t: fpu vme avx2 avx512f avx512bw avx512_vnni avx512_fp16
"""  # avx512_fp16 is not bf16; a word that merely contains "bf16" must not count either
ARM_BF16 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
"""
ARM_PLAIN = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid svebf16x
"""


@pytest.mark.parametrize("text, machine, want", [
    (X86_BF16, "x86_64", True), (X86_AMX_ONLY, "x86_64", True), (X86_PLAIN, "x86_64", False),
    (ARM_BF16, "aarch64", True), (ARM_PLAIN, "aarch64", False), ("", "x86_64", False),
    (X86_BF16, "aarch64", False),  # x86 flags are not Arm features
])
def test_native_bf16_from_cpuinfo(text, machine, want):
    assert rd.cpu_has_native_bf16(text, machine) is want


@pytest.fixture
def cpu_flags(monkeypatch):
    """Pretend the processor has (or lacks) native bf16; the auto choice is read without the env pin."""
    monkeypatch.delenv(rd.DTYPE_ENV, raising=False)

    def set_native(native: bool):
        monkeypatch.setattr(rd, "_this_cpu_has_native_bf16", lambda: native)

    return set_native


def test_auto_is_bf16_on_a_bf16_cpu_and_fp32_elsewhere(cpu_flags):
    cpu = torch.device("cpu")
    cpu_flags(True)
    assert rd.resolve_dtype("auto", cpu) == torch.bfloat16
    assert rd.resolve_dtype(None, cpu) == torch.bfloat16
    assert rd.resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert rd.resolve_dtype("auto", torch.device("mps")) == torch.float16
    cpu_flags(False)
    assert rd.resolve_dtype("auto", cpu) == torch.float32
    assert rd.resolve_dtype("auto", torch.device("cuda")) == torch.float16


def test_explicit_dtype_and_environment_override_auto(cpu_flags, monkeypatch):
    cpu = torch.device("cpu")
    cpu_flags(True)
    assert rd.resolve_dtype("fp32", cpu) == torch.float32
    assert rd.resolve_dtype(torch.float32, cpu) == torch.float32
    monkeypatch.setenv(rd.DTYPE_ENV, "fp32")
    assert rd.resolve_dtype("auto", cpu) == torch.float32
    assert rd.resolve_dtype("bf16", cpu) == torch.bfloat16  # an explicit dtype beats the variable
    monkeypatch.setenv(rd.DTYPE_ENV, "auto")
    assert rd.resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setenv(rd.DTYPE_ENV, "float64")
    with pytest.raises(ValueError, match="CTRLNET_DTYPE"):
        rd.resolve_dtype("auto", cpu)
    with pytest.raises(ValueError, match="unknown dtype"):
        rd.resolve_dtype("int8", cpu)


def test_cpuinfo_is_read_once_and_not_at_import():
    import importlib
    import pathlib

    rd._this_cpu_has_native_bf16.cache_clear()
    reads = []
    real = pathlib.Path.read_text

    def counting(self, *a, **k):
        if str(self) == "/proc/cpuinfo":
            reads.append(1)
        return real(self, *a, **k)

    pathlib.Path.read_text = counting
    try:
        importlib.reload(rd)
        assert reads == []  # importing probes nothing
        rd._this_cpu_has_native_bf16()
        rd._this_cpu_has_native_bf16()
        assert len(reads) <= 1  # (0 where there is no /proc/cpuinfo)
    finally:
        pathlib.Path.read_text = real
        importlib.reload(rd)


def test_demo_models_load_in_bf16_on_a_bf16_cpu_and_record_it(cpu_flags, tmp_path):
    """The models, the VAE placement and the PNG record follow the automatic choice."""
    from ctrlnet.generation.bundle import load_models

    cpu_flags(True)
    m = load_models(base="random:tiny-sd1", controlnets=["random:c"], device="cpu")
    assert m.dtype == torch.bfloat16
    assert next(m.base.unet.parameters()).dtype == torch.bfloat16
    assert next(m.controlnets["c"].parameters()).dtype == torch.bfloat16
    assert next(m.base.vae.parameters()).dtype == rd.vae_dtype(torch.bfloat16)
    cpu_flags(False)
    assert load_models(base="random:tiny-sd1", device="cpu").dtype == torch.float32
