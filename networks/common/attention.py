"""Scaled dot-product attention that exports as one fused node where the target runtime has one.

In eager torch `attend` is `F.scaled_dot_product_attention` on (B, heads, N, D) views. Inside
`export_attention_as(AttentionKernel.ORT)` it exports as ONNX Runtime's
`com.microsoft.MultiHeadAttention` on (B, N, C) tensors: one node instead of MatMul, Softmax
and MatMul over a materialised (B, heads, N, N) score matrix, which is most of a U-Net step on
CPU. `AttentionKernel.ONNX` keeps the portable decomposition (TensorRT fuses that itself).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from runtime.specs.core import AttentionKernel

_export_kernel = AttentionKernel.ONNX


@contextmanager
def export_attention_as(kernel: AttentionKernel) -> Iterator[None]:
    global _export_kernel
    previous, _export_kernel = _export_kernel, kernel
    try:
        yield
    finally:
        _export_kernel = previous


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape  # (B, N, C) -> (B, heads, N, C / heads)
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape  # (B, heads, N, D) -> (B, N, heads * D)
    return x.transpose(1, 2).reshape(b, n, h * d)


class _OrtMultiHeadAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, heads: int):
        return _merge(F.scaled_dot_product_attention(_split(q, heads), _split(k, heads), _split(v, heads)))

    @staticmethod
    def symbolic(g, q, k, v, heads: int):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads)
        out.setType(q.type())  # (B, N, C) like the query: keeps the exporter's shape inference exact
        return out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D)) V per head; q (B, N, C), k and v (B, L, C) -> (B, N, C)."""
    if torch.onnx.is_in_onnx_export() and _export_kernel is AttentionKernel.ORT:
        return _OrtMultiHeadAttention.apply(q, k, v, heads)
    return _merge(F.scaled_dot_product_attention(_split(q, heads), _split(k, heads), _split(v, heads)))


class CrossAttentionProcessor:
    """diffusers' plain attention for SD 1.5 transformer blocks, through `attend`."""

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attention_mask is not None or hidden_states.ndim != 3:
            raise NotImplementedError("CrossAttentionProcessor expects (B, N, C) inputs without an attention mask")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        out = attend(attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context), attn.heads)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


class _OrtMultiHeadAttentionWithBias(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, heads: int):
        return _merge(F.scaled_dot_product_attention(_split(q, heads), _split(k, heads), _split(v, heads), attn_mask=bias))

    @staticmethod
    def symbolic(g, q, k, v, bias, heads: int):
        # MultiHeadAttention's inputs 3 (projection bias) and 4 (key padding mask) are absent;
        # input 5 is the additive attention bias, (B or 1, heads or 1, N, L).
        absent = g.op("prim::Constant")
        absent.setType(torch._C.OptionalType.ofTensor())
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, absent, absent, bias, num_heads_i=heads)
        out.setType(q.type())
        return out


def attend_biased(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, heads: int) -> torch.Tensor:
    """`attend` with an additive score bias: softmax(Q K^T / sqrt(D) + bias) V per head.

    q (B, N, C), k and v (B, L, C), bias (B, 1, N, L) shared by every head -> (B, N, C). Exports
    as the fused node's `attention_bias` input under AttentionKernel.ORT, else MatMul/Add/Softmax.
    """
    if torch.onnx.is_in_onnx_export() and _export_kernel is AttentionKernel.ORT:
        return _OrtMultiHeadAttentionWithBias.apply(q, k, v, bias, heads)
    return _merge(F.scaled_dot_product_attention(_split(q, heads), _split(k, heads), _split(v, heads), attn_mask=bias))
