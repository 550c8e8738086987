"""Which device and precision to train on, and a human-readable description of it."""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass

import torch

from .errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu. Asking for a device that is absent is an error, not a fallback."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("Device 'cuda' was asked for but this machine has no CUDA GPU; choose device auto or cpu.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("Device 'mps' was asked for but this machine has no Apple MPS backend; choose auto or cpu.")
    if name not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"Unknown device {name!r}: choose auto, cpu, cuda or mps.")
    return torch.device(name)


# oneDNN ISA names (ONEDNN_MAX_CPU_ISA values) at or above the first one with bf16 dot products.
_ONEDNN_ISAS_WITH_BF16 = frozenset(
    {
        "ALL",
        "DEFAULT",
        "AVX512_CORE_BF16",
        "AVX512_CORE_FP16",
        "AVX512_CORE_AMX",
        "AVX512_CORE_AMX_FP16",
        "AVX10_1_512",
        "AVX10_1_512_AMX",
        "AVX10_1_512_AMX_FP16",
        "AVX10_2_512",
        "AVX10_2_512_AMX_2",
    }
)


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 matrices in hardware (AMX or AVX-512 BF16).

    There oneDNN runs bf16 matmuls several times faster than fp32 (about 6x measured on a 2-core
    Xeon with AMX); elsewhere bf16 is emulated and slower than fp32, so it is never picked by auto.
    """
    # oneDNN can be capped below the CPU's own ISA (ONEDNN_MAX_CPU_ISA=AVX2 makes an AMX machine behave
    # like an AVX2-only one, bf16 emulated): torch's probes still see the hardware, so read the cap too.
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if cap and cap not in _ONEDNN_ISAS_WITH_BF16:
        return False
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None:
            with contextlib.suppress(Exception):
                if fn():
                    return True
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is the fastest mode that keeps the baby preset's quality (see bench/RESULTS.md):
    bf16 autocast on CUDA GPUs that support it and on CPUs with native bf16 matmuls, else fp32."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        if device.type == "cpu" and cpu_has_native_bf16():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 autocast needs a CUDA GPU; use bf16 or fp32 on this device.")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for the forward pass; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class DeviceInfo:
    kind: str  # cuda | mps | cpu
    name: str  # GPU name, or the CPU description
    memory_gb: float | None  # GPU memory; None for CPU
    threads: int  # torch intra-op threads

    def describe(self) -> str:
        if self.kind == "cuda":
            return f"GPU: {self.name} ({self.memory_gb:.0f} GB)"
        if self.kind == "mps":
            return "Apple GPU (MPS)"
        return f"CPU: {self.threads} thread{'s' if self.threads != 1 else ''}"


def device_info(name: str = "auto") -> DeviceInfo:
    device = resolve_device(name)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return DeviceInfo("cuda", props.name, props.total_memory / 2**30, torch.get_num_threads())
    if device.type == "mps":
        return DeviceInfo("mps", "Apple MPS", None, torch.get_num_threads())
    return DeviceInfo("cpu", _cpu_name(), None, torch.get_num_threads())


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return os.uname().machine if hasattr(os, "uname") else "CPU"


_threads_lock = threading.Lock()
_threads_configured: int | None = None

# Torch threads of the app's server process unless $TINYGPT_NUM_THREADS says otherwise. Streamlit runs
# each page run on a new thread, and with OpenMP every thread that runs a parallel torch op gets its own
# team of worker threads; two teams on the same cores wait on each other. bench/page_threads.py times
# it: on the 2-core machine, decoding 80 tokens on a page run's thread took 90 ms alone and 213 ms
# beside another live page run with 2 threads, 100 and 102 ms with one (in a browser, a Sampling
# column took 0.26-1.77 s on 2 threads, 0.14-0.50 s on one). On one thread an op runs inline, with no
# team. Training never runs in the server: its processes set their own threads
# (``worker.threads_per_job``), so this only paces what a page computes itself.
SERVER_THREADS = 1


def configure_threads(threads: int | None = None, *, default: int | None = None) -> int:
    """Set torch's intra-op threads once per process and return the number in use.

    ``torch.set_num_threads`` is process-wide, so a server (the app) calls this once at start-up; later
    calls return the number set the first time. ``threads`` (else $TINYGPT_NUM_THREADS, else ``default``,
    else torch's default: the physical cores) must be a whole number >= 1."""
    global _threads_configured
    with _threads_lock:
        if _threads_configured is not None:
            return _threads_configured
        if threads is None:
            raw = os.environ.get("TINYGPT_NUM_THREADS", "").strip()
            try:
                threads = int(raw) if raw else 0
            except ValueError:
                raise ConfigError(f"TINYGPT_NUM_THREADS must be a whole number >= 1, got {raw!r}.") from None
        if threads < 0:
            raise ConfigError(f"The number of torch threads must be >= 1, got {threads}.")
        threads = threads or default or torch.get_num_threads()
        torch.set_num_threads(threads)
        _threads_configured = threads
        return threads


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA/MPS out-of-memory errors, which end a job with advice instead of a crash."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
