"""The decode step's small kernels (``lowbit.kernels.decode_step``) against torch: greedy argmax and the float
KV-cache row write, on CPU under ``TRITON_INTERPRET=1`` and on the GPU."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="lowbit's kernels need triton (pip install -e '.[dev]' brings it)")

from lowbit.kernels import decode_step
from lowbit.kernels.decode_step import cache_rows_index, row_argmax, write_cache_rows

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not INTERP, reason="CPU runs need TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tile", [256, decode_step.ARGMAX_TILE])
def test_row_argmax_is_torchs_first_index_of_the_maximum(device, tile, monkeypatch):
    """Ties inside a tile and across tiles resolve to the first index, as ``torch.argmax``; bf16 logits read
    without an fp32 copy."""
    monkeypatch.setattr(decode_step, "ARGMAX_TILE", tile)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1000, generator=g).to(torch.bfloat16)
    x[0, 7] = x[0, 900] = 9.0  # tie across tiles of 256
    x[1, 300] = x[1, 301] = 9.0  # tie inside a tile
    x[2, 999] = 9.0  # the last logit
    x[3] = -1.0  # every logit equal: index 0
    x = x.to(device)
    got = row_argmax(x)
    assert got.dtype == torch.int64
    assert torch.equal(got.cpu(), x.cpu().float().argmax(-1))
    assert got.tolist() == [7, 300, 999, 0]
    with pytest.raises(ValueError, match="row_argmax.*\\[B, V\\]"):
        row_argmax(x[0])


@pytest.mark.parametrize("device", DEVICES)
def test_cache_row_write_equals_scatter(device):
    """``write_cache_rows`` writes what ``scatter_(2, index, new)`` writes, per-sequence positions, a head_dim that
    is not a power of two, a strided source (a view of the step's keys)."""
    g = torch.Generator().manual_seed(1)
    b, h, s, d, n = 2, 3, 16, 24, 2
    cache = torch.randn(b, h, s, d, generator=g).to(torch.bfloat16).to(device)
    new = torch.randn(b, n, h, d, generator=g).to(torch.bfloat16).to(device).transpose(1, 2)  # [b, h, n, d] view
    positions = torch.tensor([[5, 6], [9, 10]], device=device)
    index = positions[:, None, :, None].expand(b, h, n, d)
    assert cache_rows_index(index, 2, new)
    expect = cache.clone().scatter_(2, index, new)
    write_cache_rows(cache, index, new)
    assert torch.equal(cache, expect)
    write_cache_rows(cache, index, -new, checked=True)  # scatter_into's path: it has checked the index itself
    assert torch.equal(cache, expect.clone().scatter_(2, index, -new))
    full = index.contiguous()  # a materialised index may hold anything: not a row write
    assert not cache_rows_index(full, 2, new) and not cache_rows_index(index, 1, new)
    with pytest.raises(ValueError, match="write_cache_rows.*not a row index"):
        write_cache_rows(cache, full, new)
