"""GPUs as data: memory and dense peak throughput, one row per device, each with its source.

Memory is the capacity NVIDIA's datasheet states, in GiB (what the driver reports is a little
lower, and the CUDA context takes 300-500 MiB of it: ``CONTEXT_RESERVE``). Peak throughput is the
dense (no structured sparsity) tensor-core figure for 16-bit inputs, and the plain FP32 figure, in
TFLOP/s, from the same datasheets. Pure data; no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from estimator.names import lookup

GiB = 1 << 30
MiB = 1 << 20
CONTEXT_RESERVE = 512 * MiB  # CUDA context + cuBLAS workspace, kept free (docs/peak.md: 300-500 MiB)


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    bf16_tflops: float | None  # dense 16-bit tensor-core peak (bf16, or fp16 where bf16 is absent)
    fp32_tflops: float  # non-tensor FP32 peak
    source: str

    def peak_flops(self, precision: str) -> float:
        """FLOP/s for the dtype the matmuls run in: 16-bit under bf16/fp16/amp, else FP32."""
        if precision == "fp32" or self.bf16_tflops is None:
            return self.fp32_tflops * 1e12
        return self.bf16_tflops * 1e12


_A100 = "NVIDIA A100 Tensor Core GPU datasheet (2021): BF16 312 TFLOPS dense, FP32 19.5 TFLOPS"
_H100 = "NVIDIA H100 Tensor Core GPU datasheet (2023): SXM BF16 989 TFLOPS dense (1979 with sparsity), FP32 67"
_H100P = "NVIDIA H100 Tensor Core GPU datasheet (2023): PCIe BF16 756 TFLOPS dense, FP32 51"
_V100 = "NVIDIA V100 datasheet (2020): SXM2 tensor 125 TFLOPS (FP16), FP32 15.7; no BF16"
_T4 = "NVIDIA T4 datasheet (2019): FP16 tensor 65 TFLOPS, FP32 8.1; no BF16"
_L4 = "NVIDIA L4 datasheet (2023): BF16 121 TFLOPS dense (242 with sparsity), FP32 30.3"
_A10 = "NVIDIA A10 datasheet (2021): BF16 125 TFLOPS dense (250 with sparsity), FP32 31.2"

GPUS: dict[str, GPU] = {g.name: g for g in [
    GPU("a100-40gb", 40 * GiB, 312.0, 19.5, _A100),
    GPU("a100-80gb", 80 * GiB, 312.0, 19.5, _A100),
    GPU("h100-sxm", 80 * GiB, 989.0, 67.0, _H100),
    GPU("h100-pcie", 80 * GiB, 756.0, 51.0, _H100P),
    GPU("v100-16gb", 16 * GiB, 125.0, 15.7, _V100),
    GPU("v100-32gb", 32 * GiB, 125.0, 15.7, _V100),
    GPU("t4", 16 * GiB, 65.0, 8.1, _T4),
    GPU("l4", 24 * GiB, 121.0, 30.3, _L4),
    GPU("a10", 24 * GiB, 125.0, 31.2, _A10),
]}


def get_gpu(name: str) -> GPU:
    """The GPU called ``name``; a typo names the closest match and the known ones."""
    return lookup(GPUS, name, "--gpu", "GPU")
