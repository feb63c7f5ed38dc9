"""The machine in front of the user: its CPU (model, the instruction sets that decide which kernels are fast), cores,
memory and CUDA GPUs, read once per process. Every report and benchmark row names it, and techniques declare what
they need to be fast (:attr:`model_opt.registry.Technique.fast_needs`), which :func:`slow_here` checks against it;
the core names no backend. Where the flags cannot tell (int8 kernels on a CPU without int8 dot products), the profile
carries a measurement (:mod:`model_opt.kernel_probe`)."""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .kernel_probe import ENV as INT8_ENV
from .kernel_probe import Int8Speed, int8_speed

#: What a technique may need to be fast, and how a message says it.
CAPABILITIES = {
    "int8 dot products": "int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX; any CUDA GPU)",
    "int8 kernels": "int8 matmul kernels faster than float ones (int8 dot-product instructions, or a CPU without "
                    "them where oneDNN's int8 linear outruns its float one when timed)",
    "bf16": "bfloat16 instructions (AVX-512 BF16 or AMX; a CUDA GPU of compute capability 8.0 or newer)",
    "cuda": "a CUDA GPU",
    "cuda 8.9": "a CUDA GPU of compute capability 8.9 or newer (float8)",
}
#: /proc/cpuinfo flags that matter, and how reports name them.
ISA = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI",
       "avx512_bf16": "AVX-512 BF16", "amx_int8": "AMX-INT8", "amx_bf16": "AMX-BF16"}
INT8_DOT = ("avx512_vnni", "avx_vnni", "amx_int8")
BF16 = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class DeviceProfile:
    """One machine: the CPU's model, its instruction sets among :data:`ISA`, cores (logical), memory, and each CUDA
    GPU's name and compute capability."""

    cpu: str
    isa: tuple[str, ...]
    cores: int
    memory_bytes: int | None
    gpus: tuple[tuple[str, str], ...] = ()
    #: oneDNN's int8 linear against float here, where measured (CPUs without int8 dot products only).
    int8: Int8Speed | None = None

    def has(self, capability: str, device: str = "cpu") -> bool:
        """Whether ``device`` here has ``capability`` (one of :data:`CAPABILITIES`)."""
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown capability {capability!r}; choose one of: {', '.join(CAPABILITIES)}")
        on_gpu = device.startswith("cuda")
        majors = [tuple(int(x) for x in capability_text.split(".")) for _, capability_text in self.gpus]
        if capability == "cuda":
            return bool(self.gpus)
        if capability == "cuda 8.9":
            return any(major >= (8, 9) for major in majors)
        if capability == "int8 dot products":
            return bool(self.gpus) if on_gpu else any(flag in self.isa for flag in INT8_DOT)
        if capability == "int8 kernels":
            if on_gpu or any(flag in self.isa for flag in INT8_DOT):
                return self.has("int8 dot products", device)
            return self.int8 is None or self.int8.speedup >= 1.0  # (unmeasured: not known to be slow)
        return any(major >= (8, 0) for major in majors) if on_gpu else any(flag in self.isa for flag in BF16)

    def describe(self, device: str = "cpu") -> str:
        """One line: ``AMD EPYC, 2 cores, 23.5 GiB; AVX2 (no VNNI, no AMX)`` (the GPU too on a CUDA device)."""
        memory = f", {self.memory_bytes / 2**30:.1f} GiB" if self.memory_bytes else ""
        names = [ISA[flag] for flag in ISA if flag in self.isa]
        missing = [label for label, flags in (("VNNI", ("avx512_vnni", "avx_vnni")), ("AMX", ("amx_int8",)))
                   if not any(flag in self.isa for flag in flags)]
        isa = ", ".join(names) or "no AVX2"
        text = f"{self.cpu}, {self.cores} cores{memory}; {isa}" + (f" (no {', no '.join(missing)})" if missing else "")
        if self.int8 is not None:
            text += f"; {self.int8.describe()}"
        if device.startswith("cuda") and self.gpus:
            text += "; " + "; ".join(f"{name} (compute capability {cc})" for name, cc in self.gpus)
        return text

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "isa": [ISA[flag] for flag in ISA if flag in self.isa],
                "int8_dot_products": any(flag in self.isa for flag in INT8_DOT)}


def parse_cpuinfo(text: str) -> tuple[str, tuple[str, ...]]:
    """(CPU model, the :data:`ISA` flags present) from the text of /proc/cpuinfo. The model carries the x86
    family and model numbers where the file gives them: a virtual machine's name is often only the brand ("AMD
    EPYC"), and two CPUs of one name with the same flags can differ several-fold in int8 speed (Zen 1 against
    later generations)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if not key:
            continue
        fields.setdefault("flags" if key == "Features" else key, " ".join(value.split()))
    model, flags = fields.get("model name", ""), set(fields.get("flags", "").split())
    if model and fields.get("cpu family") and fields.get("model"):
        model += f" (family {fields['cpu family']}, model {fields['model']})"
    return model, tuple(flag for flag in ISA if flag in flags)


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gpus() -> tuple[tuple[str, str], ...]:
    """CUDA GPUs, when torch is imported already (a profile never imports torch)."""
    import sys

    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_available():
            return ()
        return tuple((torch.cuda.get_device_name(i), ".".join(map(str, torch.cuda.get_device_capability(i))))
                     for i in range(torch.cuda.device_count()))
    except Exception:  # a broken driver: no GPU to speak of
        return ()


@functools.cache
def _cpu() -> tuple[str, tuple[str, ...], int, int | None]:
    try:
        model, isa = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        model, isa = "", ()
    return model or platform.processor() or platform.machine() or "unknown CPU", isa, os.cpu_count() or 1, \
        _memory_bytes()


def device_profile() -> DeviceProfile:
    """This machine's profile: the CPU read once per process, the GPUs as torch sees them now, and, on a CPU
    without int8 dot products, its int8 kernels' measured speed (see :mod:`model_opt.kernel_probe`)."""
    cpu, isa, cores, memory = _cpu()
    int8 = None if any(flag in isa for flag in INT8_DOT) else int8_speed(cpu, isa)
    return DeviceProfile(cpu, isa, cores, memory, _gpus(), int8)


def slow_here(fast_needs: dict[str, str], device: str = "cpu", profile: DeviceProfile | None = None) -> str | None:
    """Why a technique that needs ``fast_needs`` (capability -> why) is slow on ``device`` of this machine: the
    first capability it lacks, in words; None when it has them all."""
    if not fast_needs:
        return None  # (no profile to build, no measurement to read, for the techniques that need nothing)
    profile = profile or device_profile()
    where = "GPU" if device.startswith("cuda") else "CPU"
    for capability, why in fast_needs.items():
        if not profile.has(capability, device):
            if capability == "int8 kernels" and profile.int8 is not None:
                how = "measured once on this machine" if profile.int8.source == "measured" else \
                    f"as {INT8_ENV} says"
                return (f"slow on this {where}: oneDNN's int8 linear runs {profile.int8.speedup:.2f}x its float one "
                        f"here ({how}; no int8 dot-product instructions)") + (f" ({why})" if why else "")
            return f"slow on this {where}: it needs {CAPABILITIES[capability]}, which this {where} lacks" + (
                f" ({why})" if why else "")
    return None
