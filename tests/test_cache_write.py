"""The cache-write kernel against the torch reference, bit for bit, on poisoned caches.

Every case fills the caches with random bytes first, runs the kernel on one copy and the reference
on another, and compares every byte: written slots must hold the reference's values and every other
byte must be untouched. FP8 is compared to within one FP8 step (the interpreter may round
differently from the GPU). Bad arguments must raise before anything is written.

On a CPU these run under TRITON_INTERPRET=1 (tests/conftest.py); keep shapes tiny.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from miniattn.layout import allocate_kv_caches, split_combined_cache, to_nhd
from miniattn.ops import cache_write
from miniattn.ops.cache_write import reshape_and_cache, reshape_and_cache_flash
from miniattn.ops.reference import reshape_and_cache_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUTS = ("NHD", "HND", "paged5d")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_SIZES = (64, 80, 96, 112, 120, 128, 192, 256)
BLOCK_SIZES = (8, 16, 32, 64, 128)


def write(kv_layout, *args, **kw):
    """The public op for `kv_layout`, as a user calls it."""
    if kv_layout == "paged5d":
        return reshape_and_cache(*args, **kw)
    return reshape_and_cache_flash(*args, kv_layout=kv_layout, **kw)


def poison(*tensors):
    for t in tensors:
        t.view(torch.uint8).random_(0, 256)


def as_bytes(t):
    return t.view(torch.uint8)


def random_slots(num_tokens, num_slots, gen, num_padding=2):
    """Distinct random slots over the whole cache, with `num_padding` entries set to -1."""
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    pad = torch.randperm(num_tokens, generator=gen)[:num_padding]
    slots[pad] = -1
    return slots.to(DEVICE)


def make_case(kv_layout, dtype, num_tokens, num_kv_heads, head_size, block_size, seed, kv_cache_dtype="auto"):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = max(2, math.ceil(2 * num_tokens / block_size))
    [(kc, vc)] = allocate_kv_caches(kv_layout, 1, num_blocks, block_size, num_kv_heads, head_size, dtype,
                                    kv_cache_dtype, device=DEVICE)
    poison(kc, vc)
    key = (torch.randn(num_tokens, num_kv_heads, head_size, generator=gen) * 2).to(dtype).to(DEVICE)
    value = (torch.randn(num_tokens, num_kv_heads, head_size, generator=gen) * 2).to(dtype).to(DEVICE)
    slots = random_slots(num_tokens, num_blocks * block_size, gen)
    return key, value, kc, vc, slots


def check_exact(kv_layout, key, value, kc, vc, slots, **kw):
    """Run kernel and reference on copies of the (poisoned) caches; every byte must agree."""
    kc_ref, vc_ref = kc.clone(), vc.clone()
    write(kv_layout, key, value, kc, vc, slots, **kw)
    reshape_and_cache_ref(key, value, kc_ref, vc_ref, slots, kv_layout=kv_layout, **kw)
    assert torch.equal(as_bytes(kc), as_bytes(kc_ref)), "key cache differs from the reference"
    assert torch.equal(as_bytes(vc), as_bytes(vc_ref)), "value cache differs from the reference"


# layouts x dtypes x head sizes, each with a block size and head count cycling through their values:
# every (layout, dtype, head_size) triple, every block size and head count with each layout.
_CASES = [
    (lay, dt, hs, BLOCK_SIZES[i % len(BLOCK_SIZES)], 1 + i % 4)
    for i, (lay, dt, hs) in enumerate(itertools.product(LAYOUTS, DTYPES, HEAD_SIZES))
]


@pytest.mark.parametrize("kv_layout,dtype,head_size,block_size,num_kv_heads", _CASES)
def test_matches_reference(kv_layout, dtype, head_size, block_size, num_kv_heads):
    seed = hash((kv_layout, str(dtype), head_size, block_size)) % 2**31
    case = make_case(kv_layout, dtype, 11, num_kv_heads, head_size, block_size, seed)
    check_exact(kv_layout, *case)


@pytest.mark.parametrize("kv_layout", LAYOUTS)
def test_values_land_in_their_slots(kv_layout):
    """Independent of the reference: read each written token back through the NHD view."""
    key, value, kc, vc, slots = make_case(kv_layout, torch.bfloat16, 9, 2, 64, 16, seed=3)
    write(kv_layout, key, value, kc, vc, slots)
    k_nhd, v_nhd = to_nhd(kv_layout, kc, vc)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(k_nhd[s // 16, s % 16], key[i])
            assert torch.equal(v_nhd[s // 16, s % 16], value[i])


@pytest.mark.parametrize("kv_layout", LAYOUTS)
def test_strided_inputs_from_fused_qkv(kv_layout):
    """key/value as slices of a fused qkv output: head and token strides are not head_size."""
    gen = torch.Generator().manual_seed(7)
    num_tokens, q_heads, kv_heads, head_size, block_size = 10, 4, 2, 128, 16
    qkv = torch.randn(num_tokens, q_heads + 2 * kv_heads, head_size, generator=gen).to(torch.float16).to(DEVICE)
    key, value = qkv[:, q_heads:q_heads + kv_heads], qkv[:, q_heads + kv_heads:]
    assert not key.is_contiguous()
    [(kc, vc)] = allocate_kv_caches(kv_layout, 1, 4, block_size, kv_heads, head_size, torch.float16, device=DEVICE)
    poison(kc, vc)
    check_exact(kv_layout, key, value, kc, vc, random_slots(num_tokens, 4 * block_size, gen))


@pytest.mark.parametrize("kv_layout", LAYOUTS)
def test_padded_rows_inputs(kv_layout):
    """Rows padded past head_size (head stride 72 for head_size 64) and value from another buffer."""
    gen = torch.Generator().manual_seed(8)
    key = torch.randn(7, 3, 72, generator=gen).to(torch.bfloat16).to(DEVICE)[..., :64]
    value = torch.randn(14, 3, 64, generator=gen).to(torch.bfloat16).to(DEVICE)[::2]  # token stride 2*3*64
    [(kc, vc)] = allocate_kv_caches(kv_layout, 1, 3, 8, 3, 64, torch.bfloat16, device=DEVICE)
    poison(kc, vc)
    check_exact(kv_layout, key, value, kc, vc, random_slots(7, 24, gen, num_padding=1))


def test_inputs_longer_than_slot_mapping():
    """As in vLLM: rows past len(slot_mapping) (CUDA-graph padding) are ignored."""
    key, value, kc, vc, slots = make_case("NHD", torch.float16, 8, 2, 64, 16, seed=11)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    longer_k = torch.cat([key, torch.randn_like(key)])
    longer_v = torch.cat([value, torch.randn_like(value)])
    reshape_and_cache_flash(longer_k, longer_v, kc, vc, slots)
    reshape_and_cache_ref(key, value, kc_ref, vc_ref, slots)
    assert torch.equal(as_bytes(kc), as_bytes(kc_ref)) and torch.equal(as_bytes(vc), as_bytes(vc_ref))


def test_int32_slot_mapping_and_all_padding():
    key, value, kc, vc, slots = make_case("HND", torch.bfloat16, 6, 2, 64, 8, seed=12)
    check_exact("HND", key, value, kc, vc, slots.to(torch.int32))
    before_k, before_v = kc.clone(), vc.clone()
    reshape_and_cache_flash(key, value, kc, vc, torch.full((6,), -1, device=DEVICE), kv_layout="HND")
    reshape_and_cache_flash(key[:0], value[:0], kc, vc, slots[:0], kv_layout="HND")  # no tokens: no-op
    assert torch.equal(as_bytes(kc), as_bytes(before_k)) and torch.equal(as_bytes(vc), as_bytes(before_v))


@pytest.mark.parametrize("head_size_k,head_size_v", [(192, 128), (80, 64)])
def test_diffkv_combined_nhd_cache(head_size_k, head_size_v):
    """Key and value of different head sizes into one combined NHD cache (vLLM's diffkv)."""
    gen = torch.Generator().manual_seed(head_size_k)
    num_tokens, heads, block_size, num_blocks = 9, 2, 16, 2
    combined = torch.empty(num_blocks, block_size, heads, head_size_k + head_size_v, dtype=torch.bfloat16, device=DEVICE)
    poison(combined)
    ref = combined.clone()
    key = torch.randn(num_tokens, heads, head_size_k, generator=gen).to(torch.bfloat16).to(DEVICE)
    value = torch.randn(num_tokens, heads, head_size_v, generator=gen).to(torch.bfloat16).to(DEVICE)
    slots = random_slots(num_tokens, num_blocks * block_size, gen)
    reshape_and_cache_flash(key, value, *split_combined_cache(combined, head_size_k), slots)
    reshape_and_cache_ref(key, value, *split_combined_cache(ref, head_size_k), slots)
    assert torch.equal(as_bytes(combined), as_bytes(ref))


# ---------------------------------------------------------------------------------------------- FP8

def fp8_steps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per element, how many FP8 codes apart two float8/uint8 tensors are (sign-aware, +0 == -0)."""
    def ordinal(t):
        c = t.view(torch.uint8).to(torch.int32)
        mag = c & 0x7F
        return torch.where(c & 0x80 != 0, -mag, mag)
    return (ordinal(a) - ordinal(b)).abs()


def assert_fp8_close(out: torch.Tensor, ref: torch.Tensor, name: str):
    steps = fp8_steps_apart(out, ref)
    assert int(steps.max()) <= 1, f"{name}: {int((steps > 1).sum())} elements more than one FP8 step off"
    # the kernel divides exactly (IEEE x / scale) and rounds to nearest even like torch: a one-step
    # difference may come from an interpreter's rounding, but must stay rare
    assert float((steps == 0).float().mean()) >= 0.999, f"{name}: {int((steps != 0).sum())} elements one step off"


@pytest.mark.parametrize("kv_layout", LAYOUTS)
@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("as_uint8", [False, True])
def test_fp8_with_scales(kv_layout, kv_cache_dtype, per_head, as_uint8):
    heads, head_size = 3, 128
    seed = hash((kv_layout, kv_cache_dtype, per_head, as_uint8)) % 2**31
    key, value, kc, vc, slots = make_case(kv_layout, torch.bfloat16, 9, heads, head_size, 16, seed, kv_cache_dtype)
    gen = torch.Generator().manual_seed(seed)
    # scales small enough that some |x / scale| pass the format's max: saturation is exercised
    n = heads if per_head else 1
    fmax = torch.finfo(kc.dtype).max
    k_scale = (torch.rand(n, generator=gen) * 4 / fmax + 2 / fmax).to(DEVICE)
    v_scale = (torch.rand(n, generator=gen) * 0.5 + 0.01).to(DEVICE)
    if as_uint8:
        kc, vc = kc.view(torch.uint8), vc.view(torch.uint8)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    write(kv_layout, key, value, kc, vc, slots, kv_cache_dtype, k_scale, v_scale)
    reshape_and_cache_ref(key, value, kc_ref, vc_ref, slots, kv_cache_dtype, k_scale, v_scale, kv_layout=kv_layout)
    assert_fp8_close(kc, kc_ref, "key_cache")
    assert_fp8_close(vc, vc_ref, "value_cache")
    # bytes of unwritten slots are untouched: compare outside the written (block, offset) rows
    k_nhd, v_nhd = to_nhd(kv_layout, kc, vc)
    kr_nhd, vr_nhd = to_nhd(kv_layout, kc_ref, vc_ref)
    written = torch.zeros(k_nhd.shape[:2], dtype=torch.bool, device=DEVICE)
    s = slots[slots >= 0]
    written[s // 16, s % 16] = True
    assert torch.equal(k_nhd[~written].view(torch.uint8), kr_nhd[~written].view(torch.uint8))
    assert torch.equal(v_nhd[~written].view(torch.uint8), vr_nhd[~written].view(torch.uint8))


def test_fp8_saturates_and_is_exact_on_grid_values():
    """Values that are exactly representable after scaling, ties and huge values: saturate(x / s)."""
    fmax = 448.0
    grid = torch.tensor([0.0, 1.0, -1.5, 0.001953125, 240.0, 448.0, -448.0, 17.0, 31.9, 200.0, 1e6, -1e6,
                         0.0078125 * 3, 104.0, 0.015, 2.0 ** -10])
    key = grid.repeat(8)[:64].reshape(1, 1, 64).to(torch.float32).to(DEVICE)
    [(kc, vc)] = allocate_kv_caches("NHD", 1, 1, 8, 1, 64, torch.float32, "fp8", device=DEVICE)
    poison(kc, vc)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    one = torch.ones(1, device=DEVICE)
    slots = torch.tensor([3], device=DEVICE)
    reshape_and_cache_flash(key, key, kc, vc, slots, "fp8", one, one)
    reshape_and_cache_ref(key, key, kc_ref, vc_ref, slots, "fp8", one, one)
    assert float(kc[0, 3].float().abs().max()) == fmax
    assert torch.equal(as_bytes(kc), as_bytes(kc_ref))


# ------------------------------------------------------------------------------------ bad arguments

def _good(kv_layout="NHD", kv_cache_dtype="auto"):
    key, value, kc, vc, slots = make_case(kv_layout, torch.float16, 5, 2, 64, 8, seed=21, kv_cache_dtype=kv_cache_dtype)
    scale = torch.ones(1, device=DEVICE) if kv_cache_dtype != "auto" else None
    return dict(key=key, value=value, key_cache=kc, value_cache=vc, slot_mapping=slots,
                kv_cache_dtype=kv_cache_dtype, k_scale=scale, v_scale=scale)


def _bad_cases():
    """(id, layout, kv_cache_dtype, {argument: replacement or callable(args) -> replacement}, error, name)."""
    f16 = torch.float16
    return [
        ("layout", "NHD", "auto", {"kv_layout": "paged5d"}, ValueError, "kv_layout"),
        ("layout_unknown", "NHD", "auto", {"kv_layout": "XYZ"}, ValueError, "kv_layout"),
        ("cache_dtype_name", "NHD", "auto", {"kv_cache_dtype": "fp16"}, ValueError, "kv_cache_dtype"),
        ("key_not_tensor", "NHD", "auto", {"key": lambda a: a["key"].tolist()}, TypeError, "key"),
        ("key_2d", "NHD", "auto", {"key": lambda a: a["key"].flatten(1)}, ValueError, "key"),
        ("key_int", "NHD", "auto", {"key": lambda a: a["key"].to(torch.int16)}, TypeError, "key"),
        ("value_dtype", "NHD", "auto", {"value": lambda a: a["value"].to(torch.bfloat16)}, TypeError, "value"),
        ("key_last_dim_strided", "NHD", "auto",
         {"key": lambda a: a["key"].transpose(1, 2).contiguous().transpose(1, 2)}, ValueError, "key"),
        ("key_heads", "NHD", "auto", {"key": lambda a: a["key"][:, :1]}, ValueError, "key"),
        ("value_head_size", "HND", "auto", {"value": lambda a: a["value"][..., :32]}, ValueError, "value"),
        ("slots_float", "NHD", "auto", {"slot_mapping": lambda a: a["slot_mapping"].float()}, TypeError, "slot_mapping"),
        ("slots_2d", "NHD", "auto", {"slot_mapping": lambda a: a["slot_mapping"][None]}, ValueError, "slot_mapping"),
        ("slots_too_many", "NHD", "auto",
         {"slot_mapping": lambda a: torch.cat([a["slot_mapping"], a["slot_mapping"]])}, ValueError, "slot_mapping"),
        ("slots_strided", "NHD", "auto",
         {"slot_mapping": lambda a: torch.stack([a["slot_mapping"]] * 2, 1)[:, 0]}, ValueError, "slot_mapping"),
        ("cache_dtype_auto", "NHD", "auto", {"key_cache": lambda a: a["key_cache"].to(torch.bfloat16)}, TypeError, "key_cache"),
        ("cache_rank", "NHD", "auto", {"value_cache": lambda a: a["value_cache"].flatten(0, 1)}, ValueError, "value_cache"),
        ("caches_disagree", "NHD", "auto", {"value_cache": lambda a: a["value_cache"][:1]}, ValueError, "key_cache"),
        ("hnd_diffkv", "HND", "auto",
         {"value_cache": lambda a: a["value_cache"][..., :32], "value": lambda a: a["value"][..., :32]}, ValueError, "head size"),
        ("paged5d_x", "paged5d", "auto",
         {"key_cache": lambda a: a["key_cache"].reshape(*a["key_cache"].shape[:2], -1, a["key_cache"].shape[3], 4)},
         ValueError, "key_cache"),
        ("fp8_model_cache", "NHD", "fp8", {"key_cache": lambda a: torch.zeros_like(a["key_cache"], dtype=f16)},
         TypeError, "key_cache"),
        ("fp8_wrong_format", "NHD", "fp8_e5m2", {"kv_cache_dtype": "fp8_e4m3"}, TypeError, "key_cache"),
        ("fp8_no_k_scale", "NHD", "fp8", {"k_scale": None}, ValueError, "k_scale"),
        ("fp8_no_v_scale", "HND", "fp8", {"v_scale": None}, ValueError, "v_scale"),
        ("fp8_scale_float", "NHD", "fp8", {"k_scale": 1.0}, TypeError, "k_scale"),
        ("fp8_scale_f64", "NHD", "fp8", {"v_scale": lambda a: a["v_scale"].double()}, TypeError, "v_scale"),
        ("fp8_scale_numel", "NHD", "fp8", {"k_scale": lambda a: torch.ones(3, device=DEVICE)}, ValueError, "k_scale"),
        ("key_device", "NHD", "auto", {"key": lambda a: torch.empty_like(a["key"], device="meta")}, ValueError, "device"),
        ("slots_device", "NHD", "auto",
         {"slot_mapping": lambda a: torch.empty_like(a["slot_mapping"], device="meta")}, ValueError, "slot_mapping"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_arguments_raise_and_leave_cache_unchanged(case):
    _, kv_layout, kv_cache_dtype, changes, error, name = case
    args = _good(kv_layout, kv_cache_dtype)
    kc, vc = args["key_cache"], args["value_cache"]
    before = as_bytes(kc).clone(), as_bytes(vc).clone()
    kw = {"kv_layout": kv_layout}
    for arg, repl in changes.items():
        v = repl(args) if callable(repl) else repl
        (kw if arg == "kv_layout" else args)[arg] = v
    lay = kw.pop("kv_layout")
    with pytest.raises(error) as exc:
        if lay == "paged5d":
            reshape_and_cache(**args)
        else:
            reshape_and_cache_flash(**args, kv_layout=lay)
    assert name in str(exc.value), str(exc.value)
    assert torch.equal(as_bytes(kc), before[0]) and torch.equal(as_bytes(vc), before[1])
    # a valid call with the same caches still works afterwards (no stale cached plan)
    good = _good(kv_layout, kv_cache_dtype)
    write(kv_layout, **good)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_cache_with_cuda_key_raises():
    args = _good()
    args["key_cache"] = args["key_cache"].cpu()
    with pytest.raises(ValueError, match="key_cache"):
        reshape_and_cache_flash(**args)


def test_debug_checks_slot_range(monkeypatch):
    args = _good("HND")
    num_slots = args["key_cache"].shape[0] * args["key_cache"].shape[2]
    args["slot_mapping"] = args["slot_mapping"].clone()
    args["slot_mapping"][1] = num_slots  # one past the end
    before = as_bytes(args["key_cache"]).clone()
    monkeypatch.setenv("MINIATTN_DEBUG", "1")
    with pytest.raises(ValueError, match="slot_mapping"):
        reshape_and_cache_flash(**args, kv_layout="HND")
    assert torch.equal(as_bytes(args["key_cache"]), before)
    args["slot_mapping"][1] = -1
    reshape_and_cache_flash(**args, kv_layout="HND")  # in range: fine with the debug check on


def test_torch_fallback_without_triton(monkeypatch):
    """Without Triton the launchers run the reference (same result, same validation)."""
    monkeypatch.setattr(cache_write, "triton_available", lambda: False)
    monkeypatch.setattr(cache_write, "_PLANS", {})
    key, value, kc, vc, slots = make_case("paged5d", torch.float16, 6, 2, 64, 8, seed=31)
    check_exact("paged5d", key, value, kc, vc, slots)
    with pytest.raises(TypeError, match="value"):
        reshape_and_cache(key, value.float(), kc, vc, slots)


def test_repeated_calls_reuse_the_plan():
    """Same configuration, new tensors: one cached plan, results still exact."""
    cache_write._PLANS.clear()
    for seed in range(3):
        check_exact("NHD", *make_case("NHD", torch.bfloat16, 5, 2, 64, 8, seed=40 + seed))
    assert len(cache_write._PLANS) == 1
    plan = next(iter(cache_write._PLANS.values()))
    assert plan.use_ref == (not cache_write.triton_available())  # the kernel, not the fallback, was tested


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the direct launch path is CUDA-only")
def test_direct_launch_path_and_misaligned_inputs():
    """After the first call a plan launches the compiled kernel directly; misaligned inputs don't."""
    cache_write._PLANS.clear()
    for seed in range(3):
        check_exact("NHD", *make_case("NHD", torch.bfloat16, 7, 2, 64, 16, seed=50 + seed))
    plan = next(iter(cache_write._PLANS.values()))
    assert callable(plan.compiled)
    key, value, kc, vc, slots = make_case("NHD", torch.bfloat16, 7, 2, 64, 16, seed=60)
    shifted = torch.empty(key.numel() + 1, dtype=key.dtype, device=DEVICE)[1:].view(key.shape)  # 2-byte offset
    shifted.copy_(key)
    check_exact("NHD", shifted, value, kc, vc, slots)
    check_exact("NHD", *make_case("NHD", torch.bfloat16, 7, 2, 64, 16, seed=61))  # aligned again: direct


@pytest.mark.parametrize("num_kv_heads", [1, 2, 8, 32, 128])
@pytest.mark.parametrize("head_size", HEAD_SIZES)
def test_launch_config_heuristic(num_kv_heads, head_size):
    block_d = cache_write._next_pow2(head_size)
    for elem, layout, tokens in itertools.product((2, 4), ("NHD", "paged5d"), (1, 4096, 65536)):
        hpp, warps = cache_write._launch_config(num_kv_heads, block_d, elem, layout, tokens, 132)
        assert hpp & (hpp - 1) == 0 and 1 <= hpp <= cache_write._next_pow2(num_kv_heads)
        assert warps in (1, 2, 4, 8)


def test_launch_config_measured_choices():
    """The choices the notes report: 8 heads x 128 bf16 -> 8 heads per program, 4 warps, 1 warp once
    the grid passes one wave of 4-warp programs (2112 on 132 SMs), 2 for FP8; 128 heads -> 8 x 4;
    paged5d -> 4 x 2."""
    cfg = cache_write._launch_config
    assert [cfg(8, 128, 2, "NHD", n, 132) for n in (1, 1024, 2112, 2113, 4096, 65536)] == \
        [(8, 4), (8, 4), (8, 4), (8, 1), (8, 1), (8, 1)]
    assert [cfg(8, 128, 2, "NHD", n, 132, True) for n in (1024, 4096, 65536)] == [(8, 4), (8, 2), (8, 2)]  # FP8
    assert cfg(128, 128, 2, "HND", 4096, 132) == (8, 4)
    assert cfg(8, 128, 2, "paged5d", 4096, 132) == (4, 2)
