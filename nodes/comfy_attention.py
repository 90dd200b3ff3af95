"""PyTorch's scaled-dot-product attention for the trainer's own UNet forward/backward.

Where ComfyUI's default attention is split or sub-quadratic (its choice on the CPU, and on backends
without PyTorch attention enabled), a UNet forward+backward at SD1.5 512 px takes 25.8 s against
13.9 s with ``torch.nn.functional.scaled_dot_product_attention`` (SDPA), and peaks at 8.9 against
5.7 GB (ComfyUI 0.3.64, 2-core CPU). Sub-quadratic attention computes softmax(q k^T / sqrt(d)) v in
query chunks and autograd keeps every chunk's intermediates; SDPA's fused kernels recompute them.

ComfyUI lets a MODEL choose its attention per patcher: every UNet attention function is wrapped by
``comfy.ldm.modules.attention.wrap_attn``, which calls
``transformer_options["optimized_attention_override"](func, *args, **kwargs)`` in place of
``func(*args, **kwargs)`` when the key is present. ``ComfyDenoiser.predict_eps`` passes the patcher's
``model_options["transformer_options"]`` to ``apply_model``, so setting the key on the patcher for
the duration of a training run changes the training path only; sampling after the run sees the
patcher's own options again.

The CLIP text encoders are not affected: ``comfy.clip_model.CLIPEncoder`` picks its attention with
``optimized_attention_for_device(..., small_input=True)`` (PyTorch attention where ComfyUI enables
it, else plain ``attention_basic``) and passes no ``transformer_options``, so no override reaches
it; over 77 tokens the plain path costs little either way.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["OVERRIDE_KEY", "has_sdpa", "sdpa", "sdpa_override", "sdpa_attention"]

OVERRIDE_KEY = "optimized_attention_override"
# PyTorch >= 2.3 on NVIDIA GPUs fails in SDPA above this many batch rows; ComfyUI splits the batch
# there (attention.py SDP_BATCH_LIMIT), and so does this module.
_CUDA_BATCH_LIMIT = 2**15


def has_sdpa() -> bool:
    """Whether this torch has ``scaled_dot_product_attention`` (2.0 and later)."""
    return hasattr(torch.nn.functional, "scaled_dot_product_attention")


def sdpa(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    """Attention in ComfyUI's calling convention, computed by SDPA: softmax(q k^T / sqrt(d) + mask) v.

    Layouts as in ComfyUI: q, k, v are [B, N, heads * d], or [B, heads, N, d] with ``skip_reshape``;
    the result is [B, N, heads * d], or [B, heads, N, d] with ``skip_output_reshape``. A mask of
    [N_q, N_k] or [B, N_q, N_k] gains the missing batch/head dimensions (float: added to the
    scores; bool: True where attention is allowed). ``attn_precision`` is ignored, as ComfyUI's
    PyTorch path ignores it: SDPA's kernels accumulate the softmax in float32.
    """
    if skip_reshape:
        b, _, _, d = q.shape
    else:
        b, _, width = q.shape
        d = width // heads
        q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)

    def attend(qs, ks, vs, m):
        return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=m, dropout_p=0.0,
                                                                is_causal=False)

    if q.is_cuda and b > _CUDA_BATCH_LIMIT:
        parts = []
        for i in range(0, b, _CUDA_BATCH_LIMIT):
            m = mask[i:i + _CUDA_BATCH_LIMIT] if mask is not None and mask.shape[0] > 1 else mask
            parts.append(attend(q[i:i + _CUDA_BATCH_LIMIT], k[i:i + _CUDA_BATCH_LIMIT], v[i:i + _CUDA_BATCH_LIMIT], m))
        out = torch.cat(parts)
    else:
        out = attend(q, k, v, mask)
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(b, -1, heads * d)


def sdpa_override(func, *args, **kwargs):
    """The ``optimized_attention_override`` callable: ``wrap_attn`` hands it ComfyUI's attention
    function and that function's arguments; this computes the same attention with SDPA instead."""
    return sdpa(*args, **kwargs)


@contextlib.contextmanager
def sdpa_attention(model) -> Iterator[bool]:
    """For the duration, ``model`` (a ModelPatcher) runs its UNet attention through SDPA.

    Sets ``model_options["transformer_options"]["optimized_attention_override"]`` on a copy of
    the options (so clones and the caller's dicts are never mutated) and puts the previous options
    object back on exit, exceptions included (contexts entered inside this one exit first). An
    override set before (another node's) is replaced for the duration: training needs a backward
    pass, which not every attention kernel has (SageAttention's has none).
    Yields whether SDPA is in use (False, and nothing changed, when torch has no SDPA).
    """
    if not has_sdpa():
        yield False
        return
    previous = model.model_options
    options = dict(previous)
    options["transformer_options"] = {**previous.get("transformer_options", {}), OVERRIDE_KEY: sdpa_override}
    model.model_options = options
    try:
        yield True
    finally:
        model.model_options = previous
