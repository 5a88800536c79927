"""Continuous batching on transformers' DynamicCache: merge, select and trim rows.

Every row of the running batch shares one column timeline. Rows are left-padded: a row's
tokens sit in the rightmost columns and the 2-D attention mask marks them. Positions come
from each row's own token count, so RoPE never sees the padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - dim - 1) + [missing, 0]
    return F.pad(t, pad)


def merge(
    cache_a: DynamicCache, mask_a: torch.Tensor, cache_b: DynamicCache, mask_b: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """Stack two batches into one: left-pad the shorter to the longer, concatenate rows.

    mask_*: [rows, columns] with 1 on real tokens. Returns cache_a, mutated, and the new mask.
    """
    width = max(mask_a.shape[1], mask_b.shape[1])
    for la, lb in zip(cache_a.layers, cache_b.layers, strict=True):
        la.keys = torch.cat([_left_pad(la.keys, width, 2), _left_pad(lb.keys, width, 2)], dim=0)
        la.values = torch.cat([_left_pad(la.values, width, 2), _left_pad(lb.values, width, 2)], dim=0)
    mask = torch.cat([_left_pad(mask_a, width, 1), _left_pad(mask_b, width, 1)], dim=0)
    return cache_a, mask


def select(cache: DynamicCache, mask: torch.Tensor, rows: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Keep only `rows` (a LongTensor of row indices), then drop columns no remaining row uses."""
    mask = mask.index_select(0, rows)
    used = mask.any(dim=0).nonzero()
    first = int(used[0]) if used.numel() else mask.shape[1]
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, rows)[:, :, first:]
        layer.values = layer.values.index_select(0, rows)[:, :, first:]
    return cache, mask[:, first:]
