"""What a CUDA estimate models in the CPU's form, said with the estimate rather than left to the docs.

Two parts of a step run different kernels on CUDA than on the CPU, and the analytic families model the
CPU's (the form this project measures to the byte):

* dropout in training: on the CPU ``aten::dropout`` runs ``_dropout_impl``, a noise tensor of the input's
  size and dtype kept for backward; on CUDA the fused ``native_dropout`` keeps a 1-byte bool mask instead
  (torch ``aten/src/ATen/native/Dropout.cpp``, ``is_fused_kernel_acceptable``). Attention dropout through
  SDPA takes the CPU's composite math attention, which keeps (B, H, S, S) probabilities and noise; CUDA's
  flash and memory-efficient kernels take ``dropout_p`` themselves and keep none.
* DeepSeek-V3's attention as transformers writes it (v heads narrower than q/k heads): no CPU fused kernel
  takes it, so the CPU runs the math attention; CUDA's memory-efficient kernel does.

The estimate is then above what CUDA keeps (docs/transformer.md "Dropout", docs/moe.md). Only a CUDA
estimate says so; a CPU estimate is exact for these.
"""

from __future__ import annotations

from typing import Any


def cpu_forms(model: Any, device: str) -> tuple[str, ...]:
    """One sentence per part of ``model``'s step a ``device`` estimate models as the CPU runs it."""
    if device != "cuda":
        return ()
    found = []
    drops = [f"{name}={getattr(model, name)}" for name in ("embd_dropout", "resid_dropout", "attn_dropout")
             if getattr(model, name, 0) > 0]
    if drops:
        found.append(f"dropout ({', '.join(drops)}) is estimated as the CPU runs it: a noise tensor of the input's "
                     "size and dtype per dropout" + (", and attention dropout through torch's math attention with "
                                                      "its (B, H, S, S) probabilities and noise"
                                                      if getattr(model, "attn_dropout", 0) > 0 else "")
                     + "; CUDA keeps a 1-byte mask per element (native_dropout) and its fused attention keeps no "
                     "(B, H, S, S) tensor, so the figures above are high by that difference")
    if getattr(model, "deepseek_transformers", False):
        found.append("DeepSeek-V3's attention (v heads narrower than q/k) is estimated as the CPU runs it, through "
                     "torch's math attention, which keeps its (B, H, S, S) probabilities for backward; CUDA's "
                     "memory-efficient kernel keeps none, so the figures above are high by those")
    return tuple(found)
