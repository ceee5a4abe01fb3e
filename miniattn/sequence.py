"""Requests as the user gives them, and sequences as the scheduler tracks them.

A `Request` is prompt token ids plus `SamplingParams`. The engine turns it into a `Sequence`: its
tokens so far (prompt + generated), its `BlockTable` while it holds cache blocks, its status, and
its own sampling generator (so its samples do not depend on what it was batched with).
"""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass, field

import torch

from .allocator import BlockTable

__all__ = ["SamplingParams", "Request", "RequestOutput", "SequenceStatus", "Sequence"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token and when to stop.

    temperature : 0 (default) is greedy; > 0 samples from softmax(logits / temperature).
    top_k : keep only the k most likely tokens before sampling (0: all).
    max_new_tokens : tokens to generate (>= 1); fewer only if `stop_token_id` comes first.
    stop_token_id : generation ends after this token (it is included in the output).
    seed : this request's sampling seed; None derives one from the engine seed and the request's
        arrival number.
    """

    temperature: float = 0.0
    top_k: int = 0
    max_new_tokens: int = 16
    stop_token_id: int | None = None
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class Request:
    """Prompt token ids and sampling settings; `request_id` is echoed in the output."""

    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: object = None


@dataclass
class RequestOutput:
    """A finished request: its generated tokens and why it stopped ("length" or "stop")."""

    request_id: object
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    finish_reason: str
    num_preemptions: int = 0


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One request in flight. `seq_id` is its arrival number (smaller = older)."""

    def __init__(self, seq_id: int, request: Request):
        self.seq_id = seq_id
        self.request = request
        self.sampling = request.sampling
        self.token_ids: list[int] = [operator.index(t) for t in request.prompt_token_ids]
        self.num_prompt_tokens = len(self.token_ids)
        self.status = SequenceStatus.WAITING
        self.block_table: BlockTable | None = None
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        self._generator: torch.Generator | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def max_total_tokens(self) -> int:
        """Prompt plus every token it may generate."""
        return self.num_prompt_tokens + self.sampling.max_new_tokens

    @property
    def max_cached_tokens(self) -> int:
        """Most tokens it will ever hold in the cache (the last sampled token is never written)."""
        return self.max_total_tokens - 1

    def generator(self, device, engine_seed: int) -> torch.Generator:
        """This sequence's sampling generator on `device` (created on first use, then kept)."""
        if self._generator is None:
            seed = self.sampling.seed
            if seed is None:
                seed = (engine_seed * 1_000_003 + self.seq_id) % (2 ** 63)
            self._generator = torch.Generator(device=device).manual_seed(seed)
        return self._generator

    def append_token(self, token: int) -> bool:
        """Add a generated token; True (and the finish reason set) if the sequence is now done."""
        self.token_ids.append(token)
        if token == self.sampling.stop_token_id:
            self.finish_reason = "stop"
        elif self.num_output_tokens >= self.sampling.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None

    def output(self) -> RequestOutput:
        return RequestOutput(self.request.request_id, self.token_ids[:self.num_prompt_tokens],
                             self.output_token_ids, self.finish_reason or "", self.num_preemptions)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, status={self.status.value}, tokens={self.num_tokens}, "
                f"out={self.num_output_tokens}/{self.sampling.max_new_tokens})")
