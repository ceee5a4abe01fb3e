"""The engine end to end: paged tokens equal the dense no-cache model, scheduling, hooks, bad input.

Small on purpose (tiny preset, a few steps): on a CPU the Triton kernels run under the interpreter.
"""

import random

import pytest
import torch

from miniattn.engine import Engine, EngineConfig, Request, SamplingParams
from miniattn.model import ToyLlama, get_preset
from miniattn.step_timer import StepTimer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: conftest sets TRITON_INTERPRET=1
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
LAYOUTS = ["NHD", "HND", "paged5d"]
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16


def _model(dtype=torch.float32, **cfg):
    return ToyLlama(get_preset("tiny", **cfg), dtype=dtype, device=DEVICE, seed=0)


@pytest.fixture(scope="module")
def model32():
    return _model(torch.float32)


def _prompts(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lens]


def _check_against_dense(model, prompt, out_tokens, tol):
    """Every generated token is the dense model's greedy pick given the tokens before it.

    With tol=0 this is exact greedy equality with the no-cache model (by induction over the
    steps), computed in one dense forward instead of one per step. With tol > 0 the engine's pick
    may differ from the argmax only among tokens whose dense logit is within tol of the best.
    """
    logits = model.forward_dense(prompt + out_tokens).float()
    for i, tok in enumerate(out_tokens):
        row = logits[len(prompt) - 1 + i]
        if tol == 0:
            assert tok == int(row.argmax()), f"step {i}: engine {tok}, dense {int(row.argmax())}"
        else:
            assert row.max() - row[tok] <= tol, f"step {i}: token {tok} is {float(row.max() - row[tok])} below the best"


def _decode_accepts(dtype) -> bool:
    from miniattn.layout import allocate_kv_caches
    from miniattn.ops.decode import paged_decode_attention

    [(k, v)] = allocate_kv_caches("NHD", 1, 1, 8, 1, 64, dtype, device=DEVICE)
    q = torch.zeros(1, 1, 64, dtype=dtype, device=DEVICE)
    one = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    try:
        paged_decode_attention(q, k, v, one, one[0], kv_layout="NHD")
    except TypeError:
        return False
    return True


# ------------------------------------------------------------------------------ correctness
def _same_weights_fp32(model):
    m32 = _model(torch.float32, num_layers=model.config.num_layers)
    m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    return m32


@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_tokens_equal_dense_fp32(layout, model32):
    """fp32 engine (paged cache, real kernels) vs the fp32 no-cache model: identical greedy tokens."""
    if not _decode_accepts(torch.float32):
        pytest.xfail("paged_decode_attention does not accept float32 queries (issue 3 scope: fp16/bf16)")
    engine = Engine(model32, EngineConfig(kv_layout=layout, block_size=8, max_seq_len=64, max_num_seqs=4))
    prompts = _prompts([5, 8, 13])  # inside a block, exactly one block, across blocks
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=6))
    for p, o in zip(prompts, outs):
        assert len(o.output_token_ids) == 6 and o.finish_reason == "length"
        _check_against_dense(model32, p, o.output_token_ids, tol=0)
    assert engine.allocator.num_free == engine.allocator.num_blocks


@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_tokens_equal_dense_half(layout):
    """fp16 (CPU) / bf16 (GPU) engine vs the same weights run densely in fp32 without a cache.

    Tokens must be the dense argmax, except at a near-tie (top-2 gap < 0.05 in fp16, 0.15 in bf16)
    where either is fine; on the CPU they are in fact identical.
    """
    model = _model(HALF)
    m32 = _same_weights_fp32(model)
    engine = Engine(model, EngineConfig(kv_layout=layout, block_size=8, max_seq_len=64, max_num_seqs=4))
    prompts = _prompts([5, 8, 13])
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=6))
    for p, o in zip(prompts, outs):
        assert len(o.output_token_ids) == 6
        _check_against_dense(m32, p, o.output_token_ids, tol=0.05 if HALF == torch.float16 else 0.15)
    assert engine.allocator.num_free == engine.allocator.num_blocks


def _engine_logits(engine, prompt, steps):
    """Run one request step by step through the scheduler and runner; logits of every step."""
    seq = engine.add_request(prompt, SamplingParams(max_new_tokens=steps))
    out = []
    while engine.has_unfinished():
        b = engine.scheduler.schedule()
        logits = engine.runner.prefill(b.seqs) if b.is_prefill else engine.runner.decode(b.seqs)
        out.append(logits[0].float().clone())
        if seq.append_token(int(logits[0].argmax())):
            engine.scheduler.finish(seq)
    return seq.output_token_ids, out


@pytest.mark.parametrize("layout,kv_cache_dtype", [(lay, "auto") for lay in LAYOUTS] +
                         [("NHD", "fp8"), ("paged5d", "fp8_e4m3"), ("HND", "fp8_e5m2")])
def test_half_precision_logits_close_to_dense(layout, kv_cache_dtype):
    """fp16 (CPU) / bf16 (GPU) model, auto or FP8 cache: logits of the first steps near fp32 dense."""
    m16 = _model(HALF)
    m32 = _same_weights_fp32(m16)
    engine = Engine(m16, EngineConfig(kv_layout=layout, kv_cache_dtype=kv_cache_dtype, block_size=8,
                                      max_seq_len=64, max_num_seqs=2, k_scale=0.05, v_scale=0.05))
    prompt = _prompts([11], seed=3)[0]
    toks, logits = _engine_logits(engine, prompt, steps=3)
    dense = m32.forward_dense(prompt + toks).float()
    tol = 0.08 if kv_cache_dtype == "auto" else 0.25
    for i, got in enumerate(logits):
        want = dense[len(prompt) - 1 + i]
        err = float((got - want).abs().max() / want.abs().max())
        assert err < tol, f"step {i}: relative logit error {err:.3f}"
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_stop_token_ends_early(model32):
    engine = Engine(model32, EngineConfig(block_size=8, max_seq_len=64, attention_impl="reference"))
    prompt = _prompts([6])[0]
    free_run = engine.generate([prompt], SamplingParams(max_new_tokens=8))[0].output_token_ids
    stop = free_run[2]
    first = free_run.index(stop)
    out = engine.generate([prompt], SamplingParams(max_new_tokens=8, stop_token_id=stop))[0]
    assert out.output_token_ids == free_run[:first + 1] and out.finish_reason == "stop"


# ------------------------------------------------------------------------------ scheduler
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_many_requests_through_a_small_pool(impl):
    """More requests than the pool holds: preemption happens, all finish, results equal solo runs.

    On the CPU batched and solo runs compute bit-identical logits, so tokens must be identical. On a
    GPU a GEMM over 5 rows and over 1 row may round differently, so a greedy request may part from
    its solo run at a near-tie (top-2 dense logit gap < 0.02), and only there.
    """
    model = _model(torch.float16)
    rng = random.Random(0)
    reqs = []
    for i in range(14):
        prompt = [rng.randrange(256) for _ in range(rng.randint(1, 16))]
        sampled = i % 3 == 0  # some sample (seeded), the rest are greedy
        sp = SamplingParams(max_new_tokens=rng.randint(1, 12), temperature=0.8 if sampled else 0.0,
                            top_k=20 if sampled else 0, seed=100 + i if sampled else None)
        reqs.append(Request(prompt, sp, request_id=f"r{i}"))
    cfg = EngineConfig(block_size=4, num_blocks=8, max_num_seqs=5, max_seq_len=32, attention_impl=impl)
    engine = Engine(model, cfg)
    m32 = _same_weights_fp32(model)
    seqs = [engine.add_request(r) for r in reqs]
    while engine.has_unfinished():
        engine.step()
        ids = [s.seq_id for s in engine.scheduler.running]
        assert ids == sorted(ids), "running set must stay in arrival order (the newest is preempted)"
        assert sum(len(s.block_table.block_ids) for s in engine.scheduler.running) + \
            engine.allocator.num_free == cfg.num_blocks, "a block was lost or shared"
    outs = [s.output() for s in seqs]
    assert engine.scheduler.num_preemptions > 0, "the pool should have been too small for everyone"
    assert engine.allocator.num_free == cfg.num_blocks
    assert not engine.has_unfinished()
    for r, o in zip(reqs, outs):
        assert o.request_id == r.request_id
        assert len(o.output_token_ids) == r.sampling.max_new_tokens and o.finish_reason == "length"
        alone = Engine(model, cfg).generate([r])[0].output_token_ids
        if DEVICE == "cuda" and r.sampling.greedy and o.output_token_ids != alone:
            i = next(j for j, (a, b) in enumerate(zip(o.output_token_ids, alone)) if a != b)
            row = m32.forward_dense(r.prompt_token_ids + alone[:i])[-1].float()
            gap = abs(float(row[alone[i]] - row[o.output_token_ids[i]]))
            assert gap < 0.02, f"{r.request_id} parts from its solo run at step {i} without a near-tie"
            continue
        assert o.output_token_ids == alone, f"{r.request_id} differs from its solo run"


def test_newest_request_is_preempted(model32):
    cfg = EngineConfig(block_size=4, num_blocks=4, max_num_seqs=4, max_seq_len=16, attention_impl="reference")
    engine = Engine(model32, cfg)
    old = engine.add_request([1, 2, 3, 4], SamplingParams(max_new_tokens=6))
    new = engine.add_request([5, 6, 7, 8], SamplingParams(max_new_tokens=6))
    engine.step()  # prefill both: 1 block each, 2 free
    engine.step()  # decode: each takes a second block, 0 free
    for _ in range(3):
        engine.step()  # fill the second blocks
    engine.step()  # both need a third block: the newest gives its blocks up
    assert new.num_preemptions == 1 and old.num_preemptions == 0
    assert engine.scheduler.waiting[0] is new
    while engine.has_unfinished():
        engine.step()
    assert len(old.output_token_ids) == len(new.output_token_ids) == 6
    assert engine.allocator.num_free == 4


def test_sampling_is_seeded(model32):
    engine = Engine(model32, EngineConfig(block_size=8, max_seq_len=64, attention_impl="reference"))
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=50, seed=5)
    a = engine.generate([[1, 2, 3]], sp)[0].output_token_ids
    b = engine.generate([[1, 2, 3]], sp)[0].output_token_ids
    c = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=8, temperature=1.0, top_k=50, seed=6))[0]
    assert a == b and a != c.output_token_ids


# ------------------------------------------------------------------------------ bad input
def test_bad_requests_are_refused_clearly(model32):
    cfg = EngineConfig(block_size=8, num_blocks=4, max_seq_len=48, attention_impl="reference")
    engine = Engine(model32, cfg)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="longer than max_seq_len=48"):
        engine.add_request(list(range(49)), SamplingParams(max_new_tokens=1))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        engine.add_request(list(range(40)), SamplingParams(max_new_tokens=9))
    with pytest.raises(ValueError, match="pool has only 4"):
        engine.add_request(list(range(30)), SamplingParams(max_new_tokens=10))  # 39 cached tokens: 5 blocks
    with pytest.raises(ValueError, match="0..255"):
        engine.add_request([1, 256], SamplingParams(max_new_tokens=1))
    with pytest.raises(ValueError, match="prompt 1: .*empty"):
        engine.generate([[1, 2], []])
    with pytest.raises(ValueError, match="prompt 2: .*0..255"):
        engine.generate([[1, 2], [3], [4, -1]])
    assert not engine.has_unfinished()  # nothing half-accepted
    for bad in (0, -3, 1.5):
        with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
            SamplingParams(max_new_tokens=bad)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)


def test_bad_engine_settings(model32):
    for bad, match in [({"kv_layout": "NDH"}, "kv_layout"), ({"kv_cache_dtype": "int8"}, "kv_cache_dtype"),
                       ({"max_seq_len": 10_000}, "max_seq_len"), ({"attention_impl": "cuda"}, "attention_impl"),
                       ({"max_num_seqs": 0}, "max_num_seqs"),
                       ({"max_seq_len": 64, "max_num_batched_tokens": 32}, "max_num_batched_tokens")]:
        with pytest.raises(ValueError, match=match):
            Engine(model32, EngineConfig(**bad))
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="CUDA"):
            Engine(model32, EngineConfig(cuda_graph=True))


# ------------------------------------------------------------------------------ hooks
def test_step_hooks_and_decode_batch():
    """What the step benchmark uses: on_step stats, prepared batches, timers, the write ablation."""
    model = _model(HALF, num_layers=3)
    stats = []
    engine = Engine(model, EngineConfig(block_size=8, max_seq_len=40, max_num_seqs=3, profile=True),
                    on_step=stats.append)
    engine.generate(_prompts([4, 9]), SamplingParams(max_new_tokens=2))
    assert [s.is_prefill for s in stats] == [True, False]
    assert stats[0].num_tokens == 13 and stats[1].num_tokens == 2 and stats[1].num_finished == 2
    assert {"step", "write", "attn", "layer", "other"} <= set(stats[1].regions)

    batch = engine.prepare_decode_batch(3, context_len=21, seed=1)
    assert engine.allocator.num_free == engine.allocator.num_blocks - 3 * 3
    timer = StepTimer(engine.device)
    logits = engine.decode_step(batch, timer=timer).float().clone()
    per_layer = timer.per_layer()
    assert sorted(per_layer) == [0, 1, 2]
    assert all({"write", "attn", "other"} <= set(d) and d["layer"] >= d["write"] for d in per_layer.values())
    assert torch.isfinite(logits).all() and logits.shape == (3, 256)

    step = engine.runner.decode_callable(batch.seqs)
    torch.testing.assert_close(step().float(), logits)  # the same step, device work only
    engine.runner.set_write_repeats(2)  # idempotent: same result
    torch.testing.assert_close(engine.decode_step(batch).float(), logits)
    engine.runner.set_write_repeats(1)
    engine.release(batch)
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_cli_generate_smoke(capsys):
    from miniattn.cli import main

    assert main(["generate", "--preset", "tiny", "--batch", "3", "--prompt-len", "5", "--gen-len", "3",
                 "--layout", "HND", "--no-progress", "--no-cuda-graph"]) == 0
    out = capsys.readouterr().out
    assert "tok/s" in out and "step latency" in out and "kv-cache write" in out
    with pytest.raises(SystemExit, match="unknown model preset"):
        main(["generate", "--preset", "gpt-5", "--no-progress"])


# ------------------------------------------------------------------------------ GPU only
@gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_graph_decode_matches_eager(layout):
    model = _model(torch.bfloat16)
    cfg = EngineConfig(kv_layout=layout, block_size=16, max_seq_len=256, max_num_seqs=8, cuda_graph=True,
                       graph_batch_sizes=(1, 4, 8))
    engine = Engine(model, cfg)
    batch = engine.prepare_decode_batch(3, context_len=100)  # replays bucket 4: one padding row
    eager = engine.decode_step(batch, use_graph=False).float().clone()
    graph = engine.decode_step(batch, use_graph=True).float().clone()
    torch.testing.assert_close(graph, eager, atol=2e-2, rtol=2e-2)
    engine.runner.set_write_repeats(2)  # re-captures; writing twice changes nothing
    replay = engine.runner.decode_callable(batch.seqs, use_graph=True)
    torch.testing.assert_close(replay().float(), graph)
    engine.runner.set_write_repeats(1)
    engine.release(batch)
    prompts = _prompts([5, 30, 17])
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=8))
    m32 = _same_weights_fp32(model)
    for p, o in zip(prompts, outs):
        _check_against_dense(m32, p, o.output_token_ids, tol=0.15)
