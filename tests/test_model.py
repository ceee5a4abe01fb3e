"""The toy model: presets, seeded weights, the dense oracle, rotary, the prefill attention path."""

import copy

import pytest
import torch

from miniattn.attention import AttentionMetadata, DenseCausalAttention, _sdpa_causal
from miniattn.model import PRESETS, Rotary, ToyLlama, get_preset


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_presets_by_name():
    assert {"tiny", "llama-1b", "llama-8b"} <= set(PRESETS)
    cut = get_preset("llama-8b", num_layers=2)
    assert cut.num_layers == 2 and cut.hidden_size == 4096 and PRESETS["llama-8b"].num_layers == 32
    # the Llama shapes give the Llama parameter counts
    assert abs(get_preset("llama-8b").num_params / 1e9 - 8.03) < 0.01
    assert abs(get_preset("llama-1b").num_params / 1e9 - 1.24) < 0.01
    tiny = get_preset("tiny")
    assert tiny.head_size % 16 == 0  # paged5d with an FP8 cache needs head_size % 16 == 0


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model preset 'llama-70b'.*tiny"):
        get_preset("llama-70b")


@pytest.mark.parametrize("bad, match", [
    ({"num_q_heads": 6, "num_kv_heads": 4}, "multiple of num_kv_heads"),
    ({"head_size": 63}, "even"),
    ({"num_layers": 0}, "num_layers"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        get_preset("tiny", **bad)


def test_weights_are_seeded():
    cfg = get_preset("tiny")
    ids = torch.tensor([3, 1, 4, 1, 5])
    a = ToyLlama(cfg, seed=7).forward_dense(ids)
    b = ToyLlama(cfg, seed=7).forward_dense(ids)
    c = ToyLlama(cfg, seed=8).forward_dense(ids)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.shape == (5, cfg.vocab_size) and torch.isfinite(a).all()
    assert 0.3 < a.std() < 5  # logits neither flat nor exploding


def test_untied_head():
    cfg = get_preset("tiny", tie_word_embeddings=False)
    m = ToyLlama(cfg, seed=0)
    assert m.lm_head is not None and not torch.equal(m.lm_head.weight, m.embed.weight[:, :cfg.hidden_size])
    assert m.forward_dense([1, 2]).shape == (2, cfg.vocab_size)


def test_dense_forward_is_causal():
    m = ToyLlama(get_preset("tiny"), seed=1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (23,), generator=g)
    full = m.forward_dense(ids)
    part = m.forward_dense(ids[:9])
    torch.testing.assert_close(full[:9], part, atol=1e-5, rtol=1e-5)


def test_dense_forward_rejects_bad_lengths():
    m = ToyLlama(get_preset("tiny", max_seq_len=16), seed=0)
    with pytest.raises(ValueError, match="sequence length"):
        m.forward_dense([])
    with pytest.raises(ValueError, match="sequence length"):
        m.forward_dense(list(range(17)))


def test_rotary_scores_depend_on_relative_position():
    rot = Rotary(64, 128, 10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 64, generator=g), torch.randn(1, 1, 64, generator=g)

    def score(pq, pk):
        cq, sq = rot.cos_sin(torch.tensor([pq]))
        ck, sk = rot.cos_sin(torch.tensor([pk]))
        return (Rotary.apply(q, cq, sq) * Rotary.apply(k, ck, sk)).sum()

    torch.testing.assert_close(score(10, 3), score(57, 50), atol=1e-4, rtol=1e-4)
    c0, s0 = rot.cos_sin(torch.tensor([0]))
    torch.testing.assert_close(Rotary.apply(q, c0, s0), q)  # position 0 is the identity


def test_rotary_table_stays_float32_when_model_is_cast():
    m = ToyLlama(get_preset("tiny"), seed=0)
    m.rotary.table("cpu")
    m16 = copy.deepcopy(m).to(torch.float16)
    assert m16.dtype == torch.float16 and m16.rotary.table("cpu").dtype == torch.float32


@pytest.mark.parametrize("lens", [(1,), (7, 1, 19)])
def test_prefill_sdpa_path_matches_dense_attention(lens):
    """The engine's prefill attention (SDPA, varlen, GQA) equals the oracle's plain-torch attention."""
    g = torch.Generator().manual_seed(sum(lens))
    T, hq, hkv, d = sum(lens), 8, 2, 64
    q, k, v = (torch.randn(T, h, d, generator=g) for h in (hq, hkv, hkv))
    meta = AttentionMetadata(is_prefill=True, query_lens=lens, max_query_len=max(lens))
    want = DenseCausalAttention(d ** -0.5)(0, q, k, v, meta)
    got = _sdpa_causal(q, k, v, lens, d ** -0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@gpu
def test_bf16_model_close_to_fp32():
    m32 = ToyLlama(get_preset("tiny"), device="cuda", seed=0)
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    ids = torch.arange(40) % 256
    a, b = m32.forward_dense(ids).float(), m16.forward_dense(ids).float()
    assert (a - b).abs().max() / a.abs().max() < 0.05
