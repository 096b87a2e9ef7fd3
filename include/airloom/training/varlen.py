"""Attention for packed rows without a dense mask: ``attn_implementation="airloom_varlen"``.

With sdpa, a packed row gets a (rows, 1, seq, seq) block-diagonal mask and a kernel that computes
every one of the seq² scores, masked or not: at seq 2048 and ~60-token examples nearly all that
work is thrown away, and a masked sdpa cannot use the flash kernel. Here the sequence boundaries
come from the position ids (each example restarts at 0) as cumulative lengths, and PyTorch's
``torch.nn.attention.varlen.varlen_attn`` (flash attention, CUDA, half precision) attends inside
each example only. Elsewhere (CPU, fp32, older torch) the same boundaries drive one causal sdpa
call per example: slow but exact, so the logic is testable without a GPU. With a padding mask
(evaluation batches) it falls back to sdpa with that mask.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

NAME = "airloom_varlen"

_cache: tuple = (None, None, None)  # (position_ids, cu_seqlens, max_len): shared by every layer of a forward


def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sequence starts over the flattened rows: each example begins where its position is 0."""
    global _cache
    if _cache[0] is position_ids:
        return _cache[1], _cache[2]
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    cu = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    _cache = (position_ids, cu, max_len)
    return cu, max_len


def _flash_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _causal_kwargs(fn) -> dict:
    params = inspect.signature(fn).parameters
    return {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: (B, H, S, D) in, ((B, S, H, D), None) out."""
    batch, heads, seq, dim = query.shape
    if key.shape[1] != heads:  # grouped-query attention: one K/V head serves several query heads
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or position_ids is None:
        mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            causal = torch.ones(seq, seq, dtype=torch.bool, device=query.device).tril()
            mask = causal[None, None] & attention_mask[:, None, None, :].bool()
        elif attention_mask is not None:
            mask = attention_mask
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=mask is None, scale=scaling, dropout_p=dropout
        )
        return out.transpose(1, 2).contiguous(), None

    cu, max_len = cu_seqlens(position_ids.expand(batch, -1))
    q, k, v = (t.transpose(1, 2).reshape(batch * seq, heads, dim) for t in (query, key, value))
    varlen = _flash_varlen()
    if varlen is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        out = varlen(q, k, v, cu, cu, max_len, max_len, scale=scaling, **_causal_kwargs(varlen))
    else:
        out = torch.empty_like(q)
        bounds = cu.tolist()
        for a, b in zip(bounds[:-1], bounds[1:], strict=False):
            part = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1),
                k[a:b].transpose(0, 1),
                v[a:b].transpose(0, 1),
                is_causal=True,
                scale=scaling,
            )
            out[a:b] = part.transpose(0, 1)
    return out.reshape(batch, seq, heads, dim), None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    # Like flash attention: no dense mask is built; None unless there is padding.
    AttentionMaskInterface.register(NAME, flash_attention_mask)
