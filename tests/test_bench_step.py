"""The decode-step benchmark: plan, peers' wiring, and one tiny point end to end (table + JSON).

On a CPU the tiny point runs under the Triton interpreter in a few seconds; the numbers are
wall-clock CPU times, so the test checks fields and arithmetic, not that the two methods agree.
"""

import json
import math

import pytest
import torch

from miniattn.attention import AttentionMetadata, PagedAttention
from miniattn.bench_step import cli
from miniattn.bench_step.peers import FlashKVCacheAttention, peer_status
from miniattn.bench_step.points import Point, kv_bytes_per_token, plan_engines, plan_points
from miniattn.layout import allocate_kv_caches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: conftest sets TRITON_INTERPRET=1


def test_plan_points_cross_and_grid():
    cross = plan_points([1, 4, 16], [512, 4096], "cross", pivot_batch=4, pivot_context=4096)
    assert cross == [Point(1, 4096), Point(4, 4096), Point(16, 4096), Point(4, 512)]
    assert len(plan_points([1, 4], [8, 16, 32], "grid")) == 6
    with pytest.raises(ValueError):
        plan_points([0], [8])


def test_plan_engines_sizes_pool_and_skips_what_does_not_fit():
    per_tok = kv_bytes_per_token(4, 8, 128, "auto", torch.bfloat16)
    assert per_tok == 4 * 2 * 8 * 128 * 2
    assert kv_bytes_per_token(4, 8, 128, "fp8", torch.bfloat16) == per_tok // 2
    pts = [Point(b, 1000) for b in (1, 8, 64)] + [Point(8, 97)]
    budget = 8 * 63 * 16 * per_tok  # exactly 8 sequences of 1000 tokens (63 blocks each)
    plans = {p.context: p for p in plan_engines(pts, 16, per_tok, budget)}
    big = plans[1000]
    assert [p.batch for p in big.points] == [1, 8] and big.num_blocks == 8 * 63 and big.max_batch == 8
    assert [p for p, _ in big.skipped] == [Point(64, 1000)] and "GiB" in big.skipped[0][1]
    assert plans[97].num_blocks == 8 * 7
    limited = plan_engines(pts, 16, per_tok, None, max_tokens=8000)
    assert sum(len(p.skipped) for p in limited) == 1


def test_peer_status_reasons():
    assert peer_status("reference", "paged5d", "fp8", cuda=False) is None
    assert peer_status("flash-attn", "HND", "auto", cuda=True) is not None
    with pytest.raises(ValueError):
        peer_status("nope", "NHD", "auto", cuda=False)


def _fake_flash_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table,
                             softmax_scale, causal):
    """flash_attn_with_kvcache's contract in plain torch (paged NHD cache, append then attend)."""
    bs = k_cache.shape[1]
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(cache_seqlens[b])
        if k is not None:
            blk, off = int(block_table[b, n // bs]), n % bs
            k_cache[blk, off], v_cache[blk, off] = k[b, 0], v[b, 0]
            n += 1
        ids = block_table[b, : -(-n // bs)].long()
        kk = k_cache[ids].flatten(0, 1)[:n].float()
        vv = v_cache[ids].flatten(0, 1)[:n].float()
        group = q.shape[2] // kk.shape[1]
        kk, vv = kk.repeat_interleave(group, 1), vv.repeat_interleave(group, 1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[b, 0].float(), kk) * softmax_scale, -1)
        out[b, 0] = torch.einsum("hn,nhd->hd", p, vv).to(q.dtype)
    return out


def test_flash_backend_wiring_matches_paged_attention():
    """The flash-attn peer's call (lengths before the append, block tables, scale) equals the engine's."""
    g = torch.Generator().manual_seed(7)
    B, Hq, Hk, D, bs, nblk = 3, 4, 2, 16, 4, 12
    lens = torch.tensor([5, 9, 1], dtype=torch.int32)
    tables = torch.randperm(nblk, generator=g)[: B * 3].reshape(B, 3).to(torch.int32)
    caches = allocate_kv_caches("NHD", 1, nblk, bs, Hk, D, torch.float32)
    for c in caches[0]:
        c.copy_(torch.randn(c.shape, generator=g))
    twin = [(k.clone(), v.clone()) for k, v in caches]
    slots = torch.stack([tables[b, (n - 1) // bs].long() * bs + (n - 1) % bs for b, n in enumerate(lens.tolist())])
    q, k, v = (torch.randn(B, h, D, generator=g) for h in (Hq, Hk, Hk))
    meta = AttentionMetadata(is_prefill=False, slot_mapping=slots, block_tables=tables, seq_lens=lens)
    ref = PagedAttention(caches, "NHD", scale=D ** -0.5, impl="reference")(0, q, k, v, meta)
    flash = FlashKVCacheAttention(PagedAttention(twin, "NHD", scale=D ** -0.5, impl="reference"),
                                  _fake_flash_with_kvcache)
    out = flash(0, q, k, v, meta)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(twin[0][0], caches[0][0])  # the fused append wrote the same slots
    flash.write_repeats = 0  # ablation: attend over the same lengths without appending
    torch.testing.assert_close(flash(0, q, k, v, meta), ref, rtol=1e-5, atol=1e-5)


def test_one_tiny_point_end_to_end(tmp_path, capsys):
    """`miniattn bench step` on one tiny point: table, JSON fields, components that add up."""
    argv = ["--preset", "tiny", "--batch", "2", "--context", "40", "--layouts", "NHD", "--kv-cache-dtypes", "auto",
            "--peers", "reference", "--reps", "1", "--rounds", "2", "--layers", "0", "--no-progress",
            "--out-dir", str(tmp_path)]
    if DEVICE == "cuda":
        argv += ["--dtype", "bfloat16"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "## Decode step: the write share on" in out
    if DEVICE == "cpu":
        assert "CPU numbers" in out
    for col in ("graph µs", "write µs/L (a)", "write %step (b)", "slope µs/L", "a vs b", "write/attn"):
        assert col in out
    [path] = list(tmp_path.glob("decode_step_*_tiny_L2_*.json"))
    doc = json.loads(path.read_text())
    assert {"env", "config", "rows", "model", "ceilings"} <= set(doc)
    assert doc["env"]["torch"] and "device" in doc["env"]
    rows = {r["impl"]: r for r in doc["rows"]}
    assert set(rows) == {"miniattn", "reference"}
    for r in rows.values():
        assert r["status"] == "ok" and (r["batch"], r["context"], r["layout"]) == (2, 40, "NHD")
        assert len(r["layers"]) == 2
        for d in r["layers"]:
            assert d["write"] > 0 and d["attn"] > 0 and d["layer"] > 0
            assert d["write"] + d["attn"] <= d["layer"] * 1.001
            assert math.isclose(d["write"] + d["attn"] + d["rest"], d["layer"], rel_tol=1e-9)
        ev = r["events"]
        assert sum(d["layer"] for d in r["layers"]) <= ev["step_us"] * 1.001
        assert 0 < r["write_pct_step_a"] < 100 and 0 < r["write_pct_layer"] < 100
        assert r["write_pct_step_a"] <= r["write_pct_layer"] * 1.001  # the step holds more than the layers
        t = r["ablation"]["t_us"]
        assert {"0", "1", "2"} <= set(t) and all(v > 0 for v in t.values())
        assert math.isfinite(r["write_pct_step_b"]) and math.isfinite(r["a_vs_b"])
        if DEVICE == "cuda" and r["impl"] == "miniattn":  # the headline pair, both on the graph step
            assert "9" in t and r["ablation"]["extra"] == 8 and math.isfinite(r["write_us_b_slope"])
            assert all("write_net" in d and "write_empty" in d for d in r["events_graph"]["layers"])
            assert math.isfinite(r["write_us_a_net"]) and math.isfinite(r["anet_vs_b"])
        assert r["bytes"]["total"] == r["bytes"]["weights"] + r["bytes"]["kv_read"] + r["bytes"]["write"]
        assert r["step_eager_us"] > 0


def test_timing_suspect_flags_graph_timings_that_contradict_the_events():
    from miniattn.bench_step.measure import timing_suspect

    row = {"step_graph_us": 1720.0, "events": {"step_us": 1960.0}, "ablation": {"t_us": {"1": 1718.0}}}
    assert timing_suspect(row) is None  # an idle H100 (validation run)
    assert "eager step" in timing_suspect(row | {"step_graph_us": 2528.0})  # 1.29x: another context on the GPU
    assert "T1" in timing_suspect(row | {"ablation": {"t_us": {"1": 2000.0}}})
    assert timing_suspect(row | {"step_graph_us": float("nan")}) is None  # no graph: nothing to check


def test_graph_events_are_calibrated_by_the_empty_region_before_each_write():
    from miniattn.bench_step.events import _summarise

    def replay(pair, write, attn):  # one replay's [(name, layer, µs)], as GraphRegions.read gives them
        out = [("empty", None, pair), ("step", None, 1000.0)]
        for layer in range(2):
            out += [("write:empty", layer, pair), ("write", layer, write + pair),
                    ("attn:empty", layer, pair), ("attn", layer, attn + pair), ("layer", layer, 400.0)]
        return out

    runs = [replay(2.0, 1.5, 50.0), replay(2.4, 1.5, 50.0), replay(1.8, 1.5, 50.0)]
    split = _summarise(runs, mode="graph", queued_ahead=True)
    for d in split.layers:
        assert math.isclose(d["write_net"], 1.5) and math.isclose(d["attn_net"], 50.0)
        assert math.isclose(d["write_empty"], 2.0)
        assert math.isclose(d["rest"], 400.0 - d["write"] - d["attn"] - d["write_empty"] - d["attn_empty"])
    assert math.isclose(split.total("write_net"), 3.0)
    assert math.isnan(_summarise([[("step", None, 9.0), ("write", 0, 1.0), ("layer", 0, 5.0)]],
                                 mode="eager", queued_ahead=False).total("write_net"))


def test_ablation_slope_spreads_the_paired_difference_over_the_extra_writes():
    from miniattn.bench_step.ablation import _result

    rounds = {0: [1000.0, 1001.0, 999.0], 1: [1002.0, 1003.0, 1001.5], 2: [1004.0, 1005.0, 1003.0],
              9: [1018.0, 1019.0, 1017.0]}
    abl = _result(rounds, mode="graph", rounds=3, reps=10)
    assert abl.extra == 8 and math.isclose(abl.slope_us, 2.0)  # (T9 - T1) / 8, median of paired rounds
    assert math.isclose(abl.write_us, 2.0) and math.isclose(abl.check_us, 2.0)
    assert abl.slope_noise_us <= abl.noise_us
    plain = _result({k: rounds[k] for k in (0, 1, 2)}, mode="graph", rounds=3, reps=10)
    assert plain.extra == 0 and math.isnan(plain.slope_us)


def test_result_files_are_named_by_a_short_device_tag():
    from miniattn.timing import device_tag

    assert [device_tag(n) for n in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB")] == \
        ["h100", "h200", "a100"]
    assert device_tag("Tesla T4") == "tesla-t4"
