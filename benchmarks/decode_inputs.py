"""The decode benchmarks' inputs: paged NHD caches, a random block table, equal-length rows, a query.

Imports nothing but torch, so a script can load it by file path without putting a checkout on
sys.path (`ab_decode.py` times whichever miniattn PYTHONPATH names).
"""

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(batch, ctx, a, seed=0):
    """NHD caches holding exactly batch x ctx tokens' blocks, a random block table over all of them.

    `a`: anything with dtype ("bf16" / "fp16"), block_size, num_q_heads, num_kv_heads and head_size."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = DTYPES[a.dtype]
    bs = a.block_size
    max_blocks = -(-ctx // bs)
    num_blocks = batch * max_blocks
    k = torch.randn(num_blocks, bs, a.num_kv_heads, a.head_size, dtype=dt, device="cuda", generator=g)
    v = torch.randn(num_blocks, bs, a.num_kv_heads, a.head_size, dtype=dt, device="cuda", generator=g)
    bt = torch.randperm(num_blocks, device="cuda", generator=g).to(torch.int32).reshape(batch, max_blocks)
    sl = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, a.num_q_heads, a.head_size, dtype=dt, device="cuda", generator=g)
    return dict(k=k, v=v, block_tables=bt, seq_lens=sl, query=q)
