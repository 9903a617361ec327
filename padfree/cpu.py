"""The CPU profile and the plan of CPU paths that follows from it.

:class:`CpuProfile` holds what the CPU is (instruction sets, vendor and family, cores, caches), read once from
``/proc/cpuinfo`` and ``/sys``; :class:`Settings` holds the environment's overrides, read once; :func:`plan_for`
turns both into a :class:`CpuPlan`: every CPU dispatch decision (which native kernels, up to how many rows each
path takes, whether bf16 computes in bf16) with the reason for each. Nothing else reads the CPU or these variables:
the encoder takes a plan when it resolves its kernels (:meth:`padfree.models.encoder.Encoder.prepare`), so a test can
ask what would run on a Zen 3, a Sapphire Rapids or a Graviton on any machine (:data:`EXAMPLES`), and ``padfree
info`` and the server's ``/info`` print the plan of the machine they run on.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

log = logging.getLogger("padfree")

# the x86 flags that make up AVX-512 as the native kernels and oneDNN's bf16 path use it (Skylake-X and later)
_AVX512 = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})


@dataclass(frozen=True)
class CpuProfile:
    """What the CPU can do. ``features``: /proc/cpuinfo's ``flags`` (x86) or ``Features`` (aarch64), lower case."""
    arch: str                      # platform.machine(): "x86_64", "aarch64", ...
    vendor: str                    # "GenuineIntel", "AuthenticAMD", "ARM" (the implementer), "" where unknown
    model_name: str
    family: int | None = None      # x86 "cpu family" (AMD: 0x17 Zen 1/2, 0x19 Zen 3/4, 0x1a Zen 5); None elsewhere
    model: int | None = None
    features: frozenset[str] = frozenset()
    cores: int = 1                 # CPUs this process may run on
    l2_kib: int | None = None      # per core
    l3_kib: int | None = None      # per cache instance

    # ---- instruction sets, as data ----
    @property
    def x86(self) -> bool:
        return self.arch in ("x86_64", "amd64", "AMD64")

    @property
    def avx2(self) -> bool:
        """AVX2 with FMA (Haswell, Zen 1 and later): the native kernels' lowest x86 level."""
        return self.x86 and {"avx2", "fma"} <= self.features

    @property
    def avx512(self) -> bool:
        """AVX-512 F/BW/VL/DQ (Skylake-X, Zen 4 and later)."""
        return self.x86 and _AVX512 <= self.features

    @property
    def avx512_bf16(self) -> bool:
        return self.avx512 and "avx512_bf16" in self.features

    @property
    def amx_bf16(self) -> bool:
        return self.x86 and {"amx_tile", "amx_bf16"} <= self.features

    @property
    def arm_bf16(self) -> bool:
        return self.arch == "aarch64" and "bf16" in self.features

    @property
    def amd(self) -> bool:
        return self.vendor == "AuthenticAMD"

    @property
    def isa_summary(self) -> list[str]:
        """The features that decide padfree's CPU paths, as /proc/cpuinfo names them."""
        keep = ("avx2", "fma", "avx512", "avx_vnni", "avx_ne_convert", "amx", "asimd", "sve", "bf16", "i8mm")
        return sorted(f for f in self.features if f.startswith(keep))

    @property
    def uarch(self) -> str:
        """A name for the microarchitecture from vendor, family and features (a hypervisor may report another
        family than the host's: no decision rests on this name, only on the features)."""
        if self.amd and self.family is not None:
            generation = {0x17: "Zen 1/2", 0x19: "Zen 4" if self.avx512 else "Zen 3", 0x1a: "Zen 5"}.get(self.family)
            return f"AMD {generation or f'family {self.family:#x}'}" + (
                " by the family a hypervisor reports" if "hypervisor" in self.features else "")
        if self.vendor == "GenuineIntel":
            if self.amx_bf16:
                return "Intel with AMX (Sapphire Rapids or later)"
            return "Intel with AVX-512" if self.avx512 else "Intel with AVX2" if self.avx2 else "Intel"
        if self.arch == "aarch64":
            return "Arm" + (" with SVE" if "sve" in self.features else "") + (" and BF16" if self.arm_bf16 else "")
        return self.vendor or self.arch

    # ---- reading ----
    @classmethod
    def from_cpuinfo(cls, text: str, arch: str, cores: int, l2_kib: int | None = None,
                     l3_kib: int | None = None) -> "CpuProfile":
        """A profile from the text of ``/proc/cpuinfo`` (its first processor's fields) and what it lacks."""
        fields: dict[str, str] = {}
        for line in text.splitlines():
            if not line.strip():
                if fields.get("flags") or fields.get("Features"):
                    break  # the first processor's block is enough
                continue
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        features = frozenset((fields.get("flags") or fields.get("Features") or "").lower().split())
        vendor = fields.get("vendor_id", "")
        if not vendor and fields.get("CPU implementer"):
            vendor = {"0x41": "ARM", "0x61": "Apple", "0xc0": "Ampere"}.get(fields["CPU implementer"], "ARM")
        return cls(arch=arch, vendor=vendor, model_name=fields.get("model name", "") or platform.processor(),
                   family=_number(fields.get("cpu family")), model=_number(fields.get("model")), features=features, cores=max(1, cores),
                   l2_kib=l2_kib, l3_kib=l3_kib)

    @classmethod
    def read(cls) -> "CpuProfile":
        """This machine's CPU (``/proc/cpuinfo``, the process's CPU affinity, the cache sizes under ``/sys``)."""
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        caches = _cache_sizes()
        return cls.from_cpuinfo(text, platform.machine(), cores, caches.get(2), caches.get(3))


def _number(text: str | None) -> int | None:
    """A /proc/cpuinfo number (decimal or 0x hex), None where absent or not a number."""
    try:
        return int(text, 0) if text else None
    except ValueError:
        return None


def _cache_sizes() -> dict[int, int]:
    """KiB of each unified or data cache level of CPU 0 (``/sys/devices/system/cpu/cpu0/cache``); {} where absent."""
    sizes: dict[int, int] = {}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            size = (index / "size").read_text().strip()
            level = int((index / "level").read_text())
        except (OSError, ValueError):
            continue
        scale = {"K": 1, "M": 1024, "G": 1024 * 1024}.get(size[-1:], None)
        if scale is not None and size[:-1].isdigit():
            sizes[level] = int(size[:-1]) * scale
    return sizes


def _flag(environ, name: str, default: str, meaning: str) -> bool:
    value = environ.get(name, default).strip()
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1 ({meaning}); got {value!r}")
    return value == "1"


@dataclass(frozen=True)
class Settings:
    """The environment's say over the CPU paths, read in one place (:meth:`from_env`)."""
    native: bool = True             # PADFREE_NATIVE: 0 never builds or uses the native module (the Python forward)
    pin_threads: bool = True        # PADFREE_PIN_THREADS: 0 leaves torch's OpenMP workers unpinned
    small_rows: int | None = None   # PADFREE_SMALL_ROWS: the most rows on MKL's packed sgemm (None: the plan's rule)

    @classmethod
    def from_env(cls, environ=None) -> "Settings":
        """The settings in ``environ`` (default ``os.environ``); ``ValueError`` naming a malformed variable."""
        environ = os.environ if environ is None else environ
        small = environ.get("PADFREE_SMALL_ROWS")
        if small is not None and not small.strip().isdigit():
            raise ValueError("PADFREE_SMALL_ROWS must be an integer >= 0 (0 turns MKL's small-batch path off); "
                             f"got {small!r}")
        return cls(native=_flag(environ, "PADFREE_NATIVE", "1", "0: no native code, the Python forward"),
                   pin_threads=_flag(environ, "PADFREE_PIN_THREADS", "1", "0: leave torch's threads unpinned"),
                   small_rows=None if small is None else int(small))


@dataclass(frozen=True)
class CpuPlan:
    """Every CPU dispatch decision, from a profile and the settings (:func:`plan_for`); ``reasons`` says why each."""
    profile: CpuProfile
    native_isa: str          # the native module's kernels: "avx512", "avx2", "aten" (its ATen ops), "" (not used)
    bf16_dot: bool           # bf16 batches of the native stack on bf16 dot products (x rounded to bf16)
    bf16_compute: bool       # bf16 products run faster than fp32 here: a bf16 model computes in bf16
    onednn_bf16: bool        # oneDNN runs bf16 products here (PyTorch's needs AVX-512 BW/VL/DQ, AVX-NE-CONVERT or ARM)
    mkl_small_rows: int      # fp32 products of at most this many rows on MKL's packed sgemm (0: never)
    own_product_rows: int    # fp32 batches of at most this many tokens on the native product (0: never)
    bf16_native_rows: int    # bf16 batches of at most this many tokens on the native stack
    onednn_stack_rows: int   # fp32 batches above own_product_rows, up to this, through the stack on oneDNN's products
    attention_len: int       # the longest sequence the native attention takes (PyTorch's flash kernel above)
    int8_isa: str            # the native int8 products' kernels ("avx2", which AVX-512 CPUs run too), "" (none)
    pin_threads: bool        # torch's OpenMP workers pinned one per CPU (padfree.ops.native.pin_workers)
    reasons: dict[str, str] = field(default_factory=dict, compare=False)

    def replace(self, **changes) -> "CpuPlan":
        return replace(self, **changes)

    def describe(self) -> dict:
        """The profile and the plan as plain data (``padfree info``, the server's ``/info``)."""
        p = self.profile
        return {"cpu": {"model": p.model_name, "vendor": p.vendor, "uarch": p.uarch, "arch": p.arch,
                        "family": None if p.family is None else hex(p.family),
                        "model_number": None if p.model is None else hex(p.model), "cores": p.cores,
                        "l2_kib": p.l2_kib, "l3_kib": p.l3_kib, "features": p.isa_summary},
                "plan": {k: getattr(self, k) for k in ("native_isa", "bf16_compute", "bf16_dot", "onednn_bf16",
                                                       "own_product_rows", "bf16_native_rows", "onednn_stack_rows",
                                                       "mkl_small_rows", "attention_len", "int8_isa",
                                                       "pin_threads")},
                "reasons": dict(self.reasons)}


def plan_for(profile: CpuProfile, settings: Settings = Settings()) -> CpuPlan:
    """The CPU paths for ``profile`` under ``settings``. Each threshold is a measured crossover on a machine of that
    kind (benchmarks/NOTES.md, the section named in its reason)."""
    why: dict[str, str] = {}
    if not settings.native:
        isa, why["native_isa"] = "", "PADFREE_NATIVE=0"
    elif profile.avx512:
        isa, why["native_isa"] = "avx512", "AVX-512 F/BW/VL/DQ"
    elif profile.avx2:
        isa, why["native_isa"] = "avx2", "AVX2 and FMA, no AVX-512"
    else:
        isa, why["native_isa"] = "aten", "no AVX2 + FMA: the native stack runs ATen's ops (same results)"
    amd = profile.amd
    bf16_dot = isa == "avx512" and profile.avx512_bf16 and amd
    why["bf16_dot"] = ("AVX-512 BF16 at the fp32 FMA rate (AMD), twice the work of widening (NOTES 19)" if bf16_dot
                       else "bf16 weights widened to fp32 in registers (no AVX-512 BF16, or at half rate: NOTES 18)")
    fast_bf16 = profile.amx_bf16 or (profile.avx512_bf16 and amd)
    why["bf16_compute"] = (
        "bf16 products faster than fp32 here (AMX-BF16, or AVX-512 BF16 at the FMA rate on AMD)" if fast_bf16 else
        "bf16 products are slower than fp32 here (AVX2 only: 5-7x slower; AVX-512 BF16 at half rate on Intel "
        "without AMX: 0.66x at W2; Arm BF16 unmeasured): a bf16 model computes in fp32 on its bf16 weights (NOTES 22)")
    onednn_bf16 = profile.avx512 or "avx_ne_convert" in profile.features or profile.arch == "aarch64"
    why["onednn_bf16"] = "oneDNN's bf16 reorder needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT" + (
        "" if onednn_bf16 else ": this CPU has neither")
    # MKL's packed sgemm beat oneDNN at 8-64 rows on Intel; on AMD it takes a generic path, 2-3x slower (NOTES 15, 19)
    small = settings.small_rows if settings.small_rows is not None else (64 if profile.x86 and not amd else 0)
    why["mkl_small_rows"] = "PADFREE_SMALL_ROWS" if settings.small_rows is not None else (
        "MKL's sgemm is 2-3x oneDNN's on AMD (NOTES 19)" if amd else "no MKL off x86" if not profile.x86 else
        "MKL's packed sgemm wins to 64 rows on Intel (NOTES 15)")
    int8 = "avx2" if isa in ("avx2", "avx512") else ""
    why["int8_isa"] = ("the native AVX2 int8 products (vpmaddwd on int8 values held as int16; NOTES 26)" if int8 else
                       "int8 products need the native module's AVX2 kernels: " + why["native_isa"])
    limits = _LIMITS.get((isa, "amd" if amd else "intel"), _NO_KERNELS)
    why["row_limits"] = limits["why"]
    return CpuPlan(profile=profile, native_isa=isa, bf16_dot=bf16_dot, bf16_compute=fast_bf16,
                   onednn_bf16=onednn_bf16, mkl_small_rows=small, int8_isa=int8, pin_threads=settings.pin_threads,
                   reasons=why,
                   **{k: v for k, v in limits.items() if k != "why"})


# The row limits of the native stack's paths per kernel set and vendor: each the crossover measured on a machine of
# that kind (the section of benchmarks/NOTES.md in "why"); Intel's AVX2 CPUs (unmeasured) take the EPYC's.
_NO_KERNELS = dict(own_product_rows=0, onednn_stack_rows=0, bf16_native_rows=0, attention_len=0,
                   why="no native kernels: the stack runs ATen's ops where MKL's products take the batch")
_LIMITS = {
    ("avx512", "amd"): dict(own_product_rows=96, onednn_stack_rows=128, bf16_native_rows=128, attention_len=128,
                            why="EPYC Zen 4: own product faster than oneDNN's to 64 rows and as fast at 96, oneDNN's "
                                "in the stack to 128; own attention 1.3-1.4x PyTorch's at 128 tokens (NOTES 19)"),
    ("avx512", "intel"): dict(own_product_rows=48, onednn_stack_rows=0, bf16_native_rows=128, attention_len=64,
                              why="Xeon: own product 1.2-2.3x MKL's to 48 rows, MKL's faster at 49-64; own attention "
                                  "as fast as PyTorch's from 64 tokens (NOTES 18)"),
    ("avx2", "amd"): dict(own_product_rows=128, onednn_stack_rows=0, bf16_native_rows=128, attention_len=128,
                          why="AVX2 EPYC: own product faster than oneDNN's at 1-128 rows (1.3-3x at 1-8), own "
                              "attention faster than PyTorch's at 8-128 tokens (NOTES 22)"),
}
_LIMITS[("avx2", "intel")] = _LIMITS[("avx2", "amd")]


@functools.cache
def current() -> CpuPlan:
    """This process's plan: the machine's profile and the environment's settings, each read once."""
    return plan_for(CpuProfile.read(), Settings.from_env())


def _example(name: str, vendor: str, family: int | None, flags: str, arch: str = "x86_64") -> CpuProfile:
    return CpuProfile(arch=arch, vendor=vendor, model_name=name, family=family, features=frozenset(flags.split()),
                      cores=2)


_X86 = "sse sse2 ssse3 sse4_1 sse4_2 avx f16c"
_SKX = _X86 + " avx2 fma avx512f avx512bw avx512vl avx512dq avx512cd"
# The machine kinds padfree is planned for, as their /proc/cpuinfo reports them: tests check the plan of each on any
# machine (tests/test_cpu.py), and ``padfree info --as NAME`` shows it.
EXAMPLES: dict[str, CpuProfile] = {
    "zen3": _example("AMD EPYC (Zen 3)", "AuthenticAMD", 0x19, _X86 + " avx2 fma"),
    "zen4": _example("AMD EPYC (Zen 4)", "AuthenticAMD", 0x19, _SKX + " avx512_bf16 avx512_vnni"),
    "xeon-avx512": _example("Intel Xeon (AVX-512, bf16 at half rate)", "GenuineIntel", 6,
                            _SKX + " avx512_bf16 avx512_vnni"),
    "sapphire-rapids": _example("Intel Xeon (Sapphire Rapids)", "GenuineIntel", 6,
                                _SKX + " avx512_bf16 avx512_vnni avx_vnni amx_tile amx_bf16 amx_int8"),
    "haswell": _example("Intel Xeon (AVX2)", "GenuineIntel", 6, _X86 + " avx2 fma"),
    "x86-sse": _example("x86-64 without AVX2", "GenuineIntel", 6, _X86),
    "graviton3": _example("AWS Graviton3", "ARM", None, "fp asimd sve bf16 i8mm", arch="aarch64"),
}


DTYPE_CHOICES = ("auto", "fp32", "bf16", "int8")  # what the CLI, jobs and Ray take (auto: choose_dtype's pick)
_DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
                "fp16": "float16", "float16": "float16", "int8": "int8"}


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a dtype the CLI takes ("fp32", "bf16", "fp16", "int8")."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "int8"}[dtype]


def choose_dtype(dtype, device="cpu", plan: CpuPlan | None = None):
    """The ``torch.dtype`` a model loads in for a requested ``dtype``: a ``torch.dtype``, one of the names
    fp32/bf16/fp16 (or float32, ...), or "auto": bfloat16 where the plan says bf16 products are faster than fp32
    here (and on a GPU), float32 elsewhere; the choice is logged. An explicit bf16 is kept: where bf16 products are
    slower than fp32 the encoder computes in fp32 on the bf16 weights, or says at load why it is slow
    (:meth:`padfree.models.encoder.Encoder.prepare`). "int8" gives ``torch.int8``: fp32 weights and activations
    with every product on int8 operands (:mod:`padfree.ops.int8_backend`). ``ValueError`` for any other value."""
    plan = plan or current()
    on_cpu = torch.device(device).type == "cpu"
    if isinstance(dtype, str):
        name = dtype.strip().lower()
        if name == "auto":
            chosen = torch.bfloat16 if not on_cpu or plan.bf16_compute else torch.float32
            log.info("padfree: dtype auto: %s (%s)", str(chosen).removeprefix("torch."),
                     "GPU" if not on_cpu else plan.reasons["bf16_compute"])
            return chosen
        if name not in _DTYPE_NAMES:
            raise ValueError(f"dtype {dtype!r} is not supported; use auto, fp32, bf16, fp16 or int8 (or a torch.dtype)")
        dtype = getattr(torch, _DTYPE_NAMES[name])
    return dtype
