"""Peak GPU memory of a phase (caching, training setup, the training loop, validation), for its summary.

Allocated is what tensors held; reserved is what the caching allocator took from the card, the
figure that decides whether a card is big enough. Off CUDA the figures are empty: nothing to report.
Reading or resetting never starts CUDA (its allocator settings must come first: `trainer.model.memory`).
"""

import gc
from contextlib import contextmanager

import torch

GiB = 2**30


def _on_cuda(device: torch.device | None) -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized() and (device is None or torch.device(device).type == "cuda")


def peak_gib(device: torch.device | None = None) -> dict[str, float]:
    """{"allocated": GiB, "reserved": GiB} since the last reset (or since CUDA started); {} off CUDA."""
    if not _on_cuda(device):
        return {}
    return {
        "allocated": round(torch.cuda.max_memory_allocated(device) / GiB, 3),
        "reserved": round(torch.cuda.max_memory_reserved(device) / GiB, 3),
    }


def reset_peak(device: torch.device | None = None) -> None:
    if _on_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


@contextmanager
def measured_peak(device: torch.device | None = None):
    """`with measured_peak(device) as peak:` ... `peak` holds the block's figures once it has run."""
    reset_peak(device)
    peak: dict[str, float] = {}
    try:
        yield peak
    finally:
        peak.update(peak_gib(device))


def release_cached_memory(device: torch.device | None = None) -> float:
    """Give the card back what freed models left cached in this process; returns the GiB still reserved."""
    gc.collect()
    if not _on_cuda(device):
        return 0.0
    torch.cuda.empty_cache()
    return round(torch.cuda.memory_reserved(device) / GiB, 3)
