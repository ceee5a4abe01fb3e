"""Pick the next token of each row of logits: greedy, temperature, top-k.

Greedy rows take the argmax of the whole batch in one op. Sampled rows draw with their sequence's
own generator, so a request's samples depend on its seed and its logits only, not on its batch.
"""

from __future__ import annotations

import torch

from .sequence import Sequence

__all__ = ["sample_next_tokens"]


def _sample_row(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> torch.Tensor:
    x = logits.float() / temperature
    if 0 < top_k < x.numel():
        vals, idx = torch.topk(x, top_k)
        pick = torch.multinomial(torch.softmax(vals, dim=-1), 1, generator=gen)
        return idx[pick]
    return torch.multinomial(torch.softmax(x, dim=-1), 1, generator=gen)


@torch.no_grad()
def sample_next_tokens(logits: torch.Tensor, seqs: list[Sequence], engine_seed: int) -> list[int]:
    """Next token of each sequence from ``logits[i]`` ([len(seqs), vocab]); one host sync."""
    picks = logits.argmax(dim=-1)
    sampled = [i for i, s in enumerate(seqs) if not s.sampling.greedy]
    if sampled:
        picks = picks.clone()
        for i in sampled:
            sp = seqs[i].sampling
            gen = seqs[i].generator(logits.device, engine_seed)
            picks[i] = _sample_row(logits[i], sp.temperature, sp.top_k, gen).reshape(())
    return picks.tolist()
