"""Does the step fit on a GPU, what is the largest batch that does, and how long would it take.

Fit: the simulated steady-step peak (CUDA allocator rounding, ``device: cuda``) plus
``CONTEXT_RESERVE`` must not exceed the GPU's memory. The largest batch is found by bisection over
``training.batch_size`` (the peak grows with the batch). Step time is the exact matmul FLOP count
over the GPU's dense peak, which is a lower bound, and at a model FLOPs utilisation (MFU, the
fraction of peak a real run reaches; PaLM, Chowdhery et al. 2022, appendix B, reports 46% for its
largest run; 30-50% is typical of well-tuned training).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from estimator.api import Estimate, estimate
from estimator.config import Config
from estimator.hardware import CONTEXT_RESERVE, GPU

MAX_BATCH_SEARCH = 1 << 24


@dataclass(frozen=True)
class Fit:
    gpu: GPU
    peak_bytes: int
    needed_bytes: int  # peak + context reserve
    fits: bool
    max_batch_size: int  # 0: not even a batch of 1 fits
    step_seconds_at_peak: float
    step_seconds_at_mfu: float
    mfu: float

    @property
    def headroom_bytes(self) -> int:
        return self.gpu.memory_bytes - self.needed_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.gpu.name,
            "memory_bytes": self.gpu.memory_bytes,
            "context_reserve_bytes": CONTEXT_RESERVE,
            "needed_bytes": self.needed_bytes,
            "fits": self.fits,
            "headroom_bytes": self.headroom_bytes,
            "max_batch_size": self.max_batch_size,
            "step_seconds_at_peak": self.step_seconds_at_peak,
            "step_seconds_at_mfu": self.step_seconds_at_mfu,
            "mfu": self.mfu,
            "source": self.gpu.source,
        }


def _needed(config: Config) -> int:
    est = estimate(config, "cuda")
    return max(est.peak_bytes, est.first_step_peak_bytes) + CONTEXT_RESERVE


def _with_batch(config: Config, batch: int) -> Config:
    return config.model_copy(update={"training": config.training.model_copy(update={"batch_size": batch})})


def largest_batch(config: Config, gpu: GPU) -> int:
    """The largest ``training.batch_size`` whose step fits on ``gpu`` (0 if a batch of 1 does not)."""
    if _needed(_with_batch(config, 1)) > gpu.memory_bytes:
        return 0
    low, high = 1, 2
    while high < MAX_BATCH_SEARCH and _needed(_with_batch(config, high)) <= gpu.memory_bytes:
        low, high = high, high * 2
    while high - low > 1:  # invariant: low fits, high does not (or is the search cap)
        mid = (low + high) // 2
        if _needed(_with_batch(config, mid)) <= gpu.memory_bytes:
            low = mid
        else:
            high = mid
    return low


def fit_on(est: Estimate, gpu: GPU, mfu: float) -> Fit:
    """Fit, largest batch and step time of ``est``'s config on ``gpu``."""
    cuda = est if est.device == "cuda" else estimate(est.config, "cuda")
    peak = max(cuda.peak_bytes, cuda.first_step_peak_bytes)
    needed = peak + CONTEXT_RESERVE
    flops_per_second = gpu.peak_flops(est.config.training.precision)
    seconds = cuda.flops.matmul / flops_per_second
    return Fit(gpu, peak, needed, needed <= gpu.memory_bytes, largest_batch(est.config, gpu), seconds,
               seconds / mfu, mfu)
