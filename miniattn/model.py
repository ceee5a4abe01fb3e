"""A toy Llama-style decoder with random, seeded weights (nothing is downloaded).

Token embedding → N × [RMSNorm → attention (fused qkv, rotary, GQA) → residual → RMSNorm → SwiGLU
MLP → residual] → RMSNorm → LM head (tied to the embedding or not). The model works on a flat batch
of tokens ``[T]`` with their positions, like vLLM's: what attention does with the cache is the
backend's business (`miniattn.attention`), so the same layers run the paged engine and the dense
no-cache oracle (`ToyLlama.forward_dense`).

Presets by name (`PRESETS`, `get_preset`): ``tiny`` for a CPU under the Triton interpreter, and
``llama-1b`` / ``llama-8b`` with the shapes of Llama 3.2 1B / Llama 3 8B (``num_layers`` can be cut
for a benchmark: ``get_preset("llama-8b", num_layers=4)``).

Example
-------
>>> import torch
>>> model = ToyLlama(get_preset("tiny"), seed=0)
>>> logits = model.forward_dense(torch.tensor([1, 2, 3]))
>>> tuple(logits.shape)
(3, 256)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import AttentionMetadata, DenseCausalAttention
from .step_timer import region

__all__ = ["ModelConfig", "PRESETS", "get_preset", "ToyLlama"]


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of the toy model. ``num_q_heads * head_size`` need not equal `hidden_size`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_size: int
    max_seq_len: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_word_embeddings: bool = True

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_q_heads",
                  "num_kv_heads", "head_size", "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ModelConfig.{f} must be a positive int, got {v!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.head_size % 2:
            raise ValueError(f"head_size must be even for rotary embeddings, got {self.head_size}")

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (e.g. ``num_layers=4``)."""
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_size
        attn = h * (self.num_q_heads + 2 * self.num_kv_heads) * d + self.num_q_heads * d * h
        layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * layer + h + head


PRESETS: dict[str, ModelConfig] = {
    # seconds on a CPU under the Triton interpreter; head_size 64 suits every layout and FP8
    "tiny": ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2,
                        num_q_heads=4, num_kv_heads=2, head_size=64, max_seq_len=512),
    # Llama 3.2 1B shapes
    "llama-1b": ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                            num_q_heads=32, num_kv_heads=8, head_size=64, max_seq_len=65536,
                            rope_theta=500000.0, tie_word_embeddings=True),
    # Llama 3 8B shapes
    "llama-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                            num_q_heads=32, num_kv_heads=8, head_size=128, max_seq_len=65536,
                            rope_theta=500000.0, tie_word_embeddings=False),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """The preset `name` with fields overridden (ValueError naming the presets for an unknown name)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, **factory):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class Rotary:
    """Rotary embeddings (Llama's "rotate half" form) from a float32 cos/sin table per device.

    The table is a plain attribute, not a buffer, so casting the model to bf16 leaves it float32.
    """

    def __init__(self, head_size: int, max_seq_len: int, theta: float):
        self.head_size, self.max_seq_len, self.theta = head_size, max_seq_len, theta
        self._tables: dict[torch.device, torch.Tensor] = {}

    def table(self, device) -> torch.Tensor:
        """[max_seq_len, head_size] float32: cos in the first half, sin in the second."""
        device = torch.device(device)
        t = self._tables.get(device)
        if t is None:
            inv_freq = self.theta ** -(torch.arange(0, self.head_size, 2, dtype=torch.float64) / self.head_size)
            ang = torch.arange(self.max_seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
            t = torch.cat([ang.cos(), ang.sin()], dim=-1).to(device=device, dtype=torch.float32)
            self._tables[device] = t
        return t

    def cos_sin(self, positions: torch.Tensor):
        """cos, sin of shape [T, 1, head_size // 2] (float32) for the given positions."""
        cs = self.table(positions.device)[positions]
        cos, sin = cs[:, None, : self.head_size // 2], cs[:, None, self.head_size // 2:]
        return cos, sin

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, head_size] (computed in float32, returned in x's dtype)."""
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Fused qkv projection → rotary → backend (cache write + attention) → output projection."""

    def __init__(self, cfg: ModelConfig, layer: int, **factory):
        super().__init__()
        self.layer = layer
        self.num_q_heads, self.num_kv_heads, self.head_size = cfg.num_q_heads, cfg.num_kv_heads, cfg.head_size
        self.q_size = cfg.num_q_heads * cfg.head_size
        self.kv_size = cfg.num_kv_heads * cfg.head_size
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=False, **factory)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False, **factory)

    def forward(self, x, cos, sin, backend, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = Rotary.apply(rearrange(q, "t (h d) -> t h d", d=self.head_size), cos, sin)
        k = Rotary.apply(rearrange(k, "t (h d) -> t h d", d=self.head_size), cos, sin)
        v = rearrange(v, "t (h d) -> t h d", d=self.head_size)  # a strided view of the qkv output
        o = backend(self.layer, q, k, v, meta)
        return self.o_proj(rearrange(o, "t h d -> t (h d)"))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused in one matmul."""

    def __init__(self, cfg: ModelConfig, **factory):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False, **factory)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, **factory):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, **factory)
        self.attn = Attention(cfg, layer, **factory)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, **factory)
        self.mlp = MLP(cfg, **factory)

    def forward(self, x, cos, sin, backend, meta):
        x = x + self.attn(self.input_norm(x), cos, sin, backend, meta)
        return x + self.mlp(self.post_attn_norm(x))


class ToyLlama(nn.Module):
    """Llama-style decoder with random weights drawn from `seed` (same seed, same weights).

    Parameters
    ----------
    config : ModelConfig (see `PRESETS`).
    dtype, device : where the weights live; they are drawn there directly (an 8B-like model never
        passes through host memory). The same seed on another device gives other weights.
    seed : weight seed.
    """

    def __init__(self, config: ModelConfig, *, dtype=torch.float32, device="cpu", seed: int = 0):
        super().__init__()
        self.config = cfg = config
        factory = {"dtype": dtype, "device": device}
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, **factory)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, **factory) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, **factory)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size,
                                                                      bias=False, **factory)
        self.rotary = Rotary(cfg.head_size, cfg.max_seq_len, cfg.rope_theta)
        self.scale = cfg.head_size ** -0.5
        self._init_weights(seed)
        self.requires_grad_(False)

    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        """N(0, 1/fan_in) matrices (outputs into the residual also / sqrt(2 * layers)), unit norms."""
        dev = self.embed.weight.device
        g = torch.Generator(device=dev).manual_seed(seed)
        h = self.config.hidden_size
        # tied head: logits = h_norm @ E^T, so E ~ N(0, 1/h) keeps logits O(1)
        self.embed.weight.normal_(0.0, h ** -0.5, generator=g)
        depth = (2 * self.config.num_layers) ** -0.5
        for name, p in self.named_parameters():
            if p.dim() != 2 or name == "embed.weight":
                continue
            std = p.shape[1] ** -0.5 * (depth if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0)
            p.normal_(0.0, std, generator=g)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, backend,
                meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] of a flat batch of tokens (ids and positions [T])."""
        timer = meta.timer
        with region(timer, "embed"):
            x = self.embed(input_ids)
            cos, sin = self.rotary.cos_sin(positions)
        for i, layer in enumerate(self.layers):
            with region(timer, "layer", i):
                x = layer(x, cos, sin, backend, meta)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: [N, hidden] → [N, vocab] (in the model dtype)."""
        x = self.norm(hidden)
        return F.linear(x, self.embed.weight if self.lm_head is None else self.lm_head.weight)

    @torch.no_grad()
    def forward_dense(self, token_ids) -> torch.Tensor:
        """Logits [L, vocab] of every position of one sequence, with no KV cache (the oracle).

        A full forward over the whole sequence in plain torch attention (float32 softmax).
        """
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device).reshape(-1)
        n = ids.numel()
        if not 1 <= n <= self.config.max_seq_len:
            raise ValueError(f"sequence length must be in 1..{self.config.max_seq_len}, got {n}")
        meta = AttentionMetadata(is_prefill=True, query_lens=(n,), max_query_len=n)
        positions = torch.arange(n, device=self.device)
        hidden = self.forward(ids, positions, DenseCausalAttention(self.scale), meta)
        return self.compute_logits(hidden)

    @torch.no_grad()
    def greedy_dense(self, prompt, max_new_tokens: int, stop_token_id: int | None = None) -> list[int]:
        """Greedy continuation computed by re-running `forward_dense` over the whole sequence each step."""
        seq = list(prompt)
        out = []
        for _ in range(max_new_tokens):
            tok = int(self.forward_dense(seq)[-1].argmax())
            out.append(tok)
            seq.append(tok)
            if tok == stop_token_id:
                break
        return out
