"""The CPU profile and its plan (padfree.cpu): /proc/cpuinfo texts of each CPU kind read into profiles, the plan of
every kind padfree is planned for checked on any machine, the environment's overrides, the dtype rule, the path a
batch takes under each plan, and ``padfree info``."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from padfree import cpu
from padfree.ops.onednn_backend import stack_path
from padfree.ops.registry import Kernels

# /proc/cpuinfo as these machines print it (first processor; trimmed to the fields read)
ZEN3_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni

processor\t: 1
vendor_id\t: AuthenticAMD
"""
GRAVITON_CPUINFO = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm sve bf16 i8mm
CPU implementer\t: 0x41
CPU architecture: 8
"""


def test_a_profile_reads_cpuinfo_of_each_architecture():
    zen3 = cpu.CpuProfile.from_cpuinfo(ZEN3_CPUINFO, "x86_64", cores=2, l2_kib=512, l3_kib=32768)
    assert (zen3.vendor, zen3.family, zen3.model, zen3.model_name) == ("AuthenticAMD", 0x19, 1, "AMD EPYC 7B13")
    assert zen3.avx2 and not zen3.avx512 and zen3.uarch == "AMD Zen 3" and zen3.isa_summary == ["avx2", "fma"]
    arm = cpu.CpuProfile.from_cpuinfo(GRAVITON_CPUINFO, "aarch64", cores=4)
    assert arm.vendor == "ARM" and arm.arm_bf16 and not arm.avx2 and "sve" in arm.features
    assert cpu.plan_for(arm).native_isa == "aten"


def test_this_machines_profile_is_what_proc_cpuinfo_says():
    """The profile of the machine running the tests against /proc/cpuinfo read independently."""
    flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo")
                 if line.startswith(("flags", "Features")))
    profile = cpu.current().profile
    assert profile.features == frozenset(flags) and profile.cores >= 1
    assert profile.avx512 == {"avx512f", "avx512bw", "avx512vl", "avx512dq"}.issubset(flags)


# kind: (native kernels, bf16 computes in bf16, bf16 dot products, oneDNN bf16, fp32 rows on the own product, MKL's)
EXPECTED = {"zen3": ("avx2", False, False, False, 128, 0), "zen4": ("avx512", True, True, True, 96, 0),
            "xeon-avx512": ("avx512", False, False, True, 48, 64),
            "sapphire-rapids": ("avx512", True, False, True, 48, 64), "haswell": ("avx2", False, False, False, 128, 64),
            "x86-sse": ("aten", False, False, False, 0, 64), "graviton3": ("aten", False, False, True, 0, 0)}


@pytest.mark.parametrize("kind", list(cpu.EXAMPLES))
def test_the_plan_of_every_cpu_kind(kind):
    """Whatever CPU runs this: the decisions each kind gets, each with its reason."""
    plan = cpu.plan_for(cpu.EXAMPLES[kind])
    assert (plan.native_isa, plan.bf16_compute, plan.bf16_dot, plan.onednn_bf16, plan.own_product_rows,
            plan.mkl_small_rows) == EXPECTED[kind]
    assert set(plan.reasons) >= {"native_isa", "bf16_compute", "bf16_dot", "onednn_bf16", "mkl_small_rows"}


def test_the_environment_is_read_in_one_place_and_checked():
    s = cpu.Settings.from_env({"PADFREE_NATIVE": "0", "PADFREE_PIN_THREADS": "0", "PADFREE_SMALL_ROWS": "16"})
    plan = cpu.plan_for(cpu.EXAMPLES["zen4"], s)
    assert (plan.native_isa, plan.pin_threads, plan.mkl_small_rows) == ("", False, 16)
    assert plan.reasons["native_isa"] == "PADFREE_NATIVE=0"
    for name, bad in (("PADFREE_NATIVE", "yes"), ("PADFREE_PIN_THREADS", "2"), ("PADFREE_SMALL_ROWS", "-1")):
        with pytest.raises(ValueError, match=name):
            cpu.Settings.from_env({name: bad})


@pytest.mark.parametrize("kind,dtype,rows,path", [
    ("zen3", torch.float32, 64, "blocks"), ("zen3", torch.float32, 128, "blocks"), ("zen3", torch.float32, 129, None),
    ("zen4", torch.float32, 100, "onednn"),
    ("zen3", torch.bfloat16, 128, "blocks"), ("zen4", torch.bfloat16, 128, "pairs"), ("zen4", torch.float32, 96, "blocks"),
    ("xeon-avx512", torch.float32, 48, "blocks"), ("xeon-avx512", torch.float32, 64, "mkl"),
    ("xeon-avx512", torch.float32, 65, None), ("xeon-avx512", torch.bfloat16, 16, "blocks"),
    ("x86-sse", torch.float32, 8, "mkl"), ("x86-sse", torch.bfloat16, 8, None), ("graviton3", torch.float32, 8, None),
    ("zen4", torch.float16, 8, None)])
def test_the_path_of_a_batch_under_each_plan(kind, dtype, rows, path):
    expected = path if path != "mkl" or torch.backends.mkl.is_available() else None
    assert stack_path(dtype, rows, cpu.plan_for(cpu.EXAMPLES[kind])) == expected
    off = cpu.plan_for(cpu.EXAMPLES[kind], cpu.Settings(native=False))
    assert stack_path(dtype, rows, off) is None  # PADFREE_NATIVE=0: never the native stack


def test_dtype_auto_picks_by_the_plan(caplog):
    zen3, zen4 = (cpu.plan_for(cpu.EXAMPLES[k]) for k in ("zen3", "zen4"))
    with caplog.at_level(logging.INFO, logger="padfree"):
        assert cpu.choose_dtype("auto", "cpu", zen3) == torch.float32
    assert "dtype auto: float32" in caplog.text
    assert cpu.choose_dtype("auto", "cpu", zen4) == torch.bfloat16
    assert cpu.choose_dtype("auto", "cuda", zen3) == torch.bfloat16
    assert cpu.choose_dtype("bf16", "cpu", zen3) == cpu.choose_dtype(torch.bfloat16, "cpu", zen4) == torch.bfloat16
    assert cpu.choose_dtype("int8", "cpu", zen3) == torch.int8  # int8 products (padfree.ops.int8_backend)
    with pytest.raises(ValueError, match="dtype 'int4' is not supported"):
        cpu.choose_dtype("int4")


def test_a_bf16_model_computes_in_fp32_where_bf16_is_slow_or_says_why(caplog):
    """Under a plan without fast bf16 (Zen 3's), a plain BERT in bf16 computes in fp32 on its bf16 weights: its
    output is the fp32 forward of the bf16-rounded weights (rounded to bf16 once), bf16 in dtype, and no bf16
    product runs; under Zen 4's it computes in bf16. A family the mixed ops do not cover (relative terms: MPNet) keeps
    bf16 and a warning says why it is slow. The weights stay bf16 either way (half an fp32 model's)."""
    import padfree
    from family_zoo import batch, make, max_diff
    zen3, zen4 = (cpu.plan_for(cpu.EXAMPLES[k]) for k in ("zen3", "zen4"))
    zen3 = zen3.replace(native_isa=cpu.current().native_isa, bf16_native_rows=16)  # kernels this CPU runs
    model = make("bert", 0)
    enc = padfree.from_pretrained(model, dtype=torch.bfloat16).prepare(plan=zen3)
    assert enc.compute_dtype == torch.float32 and enc.dtype == torch.bfloat16
    reference = padfree.from_pretrained(model, dtype=torch.bfloat16).float().prepare(plan=zen3)  # exact widening
    for lengths in ([7, 3], [40, 33, 20]):  # the native stack's widened weights; layer by layer on packed fp32
        ids, mask, types, _ = batch(model, lengths, "right")
        out = enc(ids, mask, types).last_hidden_state
        ref = reference(ids, mask, types).last_hidden_state
        assert out.dtype == torch.bfloat16 and max_diff(out.float(), ref, mask) <= 2 ** -7 * ref.abs().max() + 1e-4
    if cpu.current().onednn_bf16:
        assert padfree.from_pretrained(model, dtype=torch.bfloat16).prepare(plan=zen4).compute_dtype == torch.bfloat16
    with caplog.at_level(logging.WARNING, logger="padfree"):
        mpnet = padfree.from_pretrained(make("mpnet", 0), dtype=torch.bfloat16).prepare(plan=zen3)
    assert mpnet.compute_dtype == torch.bfloat16 and "slower than fp32" in caplog.text


def test_the_registry_validates_against_the_plan():
    """A bf16 model on a CPU without oneDNN bf16 never gets oneDNN's products (the reason says why); on one with
    it, it does: decided by the plan, whatever CPU runs this."""
    zen3, zen4 = (cpu.plan_for(cpu.EXAMPLES[k]) for k in ("zen3", "zen4"))
    assert Kernels.resolve("cpu", torch.bfloat16, 64, plan=zen4).names["linear_bias_act"] == "onednn"
    assert Kernels.resolve("cpu", torch.bfloat16, 64, plan=zen3).names["linear_bias_act"] == "composed(torch)"
    with pytest.raises(ValueError, match="no oneDNN bf16 support .*AVX-NE-CONVERT"):
        Kernels.resolve("cpu", torch.bfloat16, 64, backend="onednn", plan=zen3)


def test_padfree_info_prints_the_profile_and_the_plan():
    run = subprocess.run([sys.executable, "-m", "padfree.cli", "info", "--json"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert report["plan"]["native_isa"] == cpu.current().native_isa
    assert report["cpu"]["features"] == cpu.current().profile.isa_summary
    assert set(report["paths"]) == {"float32", "bfloat16", "int8"} and "native_module" in report
    assert report["plan"]["int8_isa"] == cpu.current().int8_isa
    text = subprocess.run([sys.executable, "-m", "padfree.cli", "info", "--as", "zen4"], capture_output=True,
                          text=True, timeout=300)
    assert text.returncode == 0 and "AMD Zen 4" in text.stdout and "bf16 dot products" in text.stdout
    assert "int8: 1: native stack, int8 products" in text.stdout
    sse = subprocess.run([sys.executable, "-m", "padfree.cli", "info", "--as", "x86-sse"], capture_output=True,
                         text=True, timeout=300)
    assert "int8: 1: not available (int8 products need the native module's AVX2 kernels" in sse.stdout
    bad = subprocess.run([sys.executable, "-m", "padfree.cli", "info", "--as", "pentium"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "unknown CPU kind 'pentium'" in bad.stderr
