"""What a benchmark needs to know about the device: its name, its bf16 peak, a clock barrier
and peak memory. Every CUDA call sits behind a ``device.type`` check, so CPU runs take the
same code path."""

from __future__ import annotations

import platform
import resource

import torch

# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s), matched by substrings
# of ``torch.cuda.get_device_name``. H100 PCIe (756) is deliberately absent: its name carries
# neither "HBM3" nor "SXM", and an unknown device gets no MFU rather than a wrong one.
PEAK_BF16_TFLOPS: list[tuple[tuple[str, ...], float]] = [
    (("H100", "HBM3"), 989.0),
    (("H100", "SXM"), 989.0),
    (("H200",), 989.0),
    (("A100",), 312.0),
    (("L40S",), 362.0),
]


def peak_tflops(name: str) -> float | None:
    for parts, tflops in PEAK_BF16_TFLOPS:
        if all(p in name for p in parts):
            return tflops
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({torch.get_num_threads()} threads)"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a host clock reading covers the work it should."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Bytes and what they measure: CUDA ``max_memory_allocated`` since the last reset, or on
    CPU the process's peak resident set (which cannot be reset, so it covers the whole run)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"
