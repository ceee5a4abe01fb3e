"""Write new key/value tokens into a paged KV cache: the Triton kernel, then its launchers.

`reshape_and_cache_flash` (NHD, HND) and `reshape_and_cache` (vLLM's paged5d) take vLLM's arguments
in vLLM's order and write in place: token ``i`` goes to slot ``slot_mapping[i]`` (block
``slot // block_size``, offset ``slot % block_size``); slots < 0 are padding and are skipped. With an
FP8 cache the kernel stores ``saturate(x / scale)``.

One program copies one token's key and value rows for ``HEADS_PER_PROGRAM`` heads. It is a pure
copy, so its speed is set by bytes: it reads every input byte once and writes every cache byte once,
issues its three loads (slot, key, value) together, and masks the stores of padding tokens instead
of branching on them (a branch would put the key/value loads behind the slot load's latency).
The cache is addressed only through `layout.cache_strides`, never through a hard-coded layout.

The launcher validates arguments on the host, once per configuration of shapes / strides / dtypes /
devices: the checked result is kept as a `_Plan` keyed by that metadata. The first call of a plan
goes through `launch.Launcher` (compiling if needed); later calls with 16-byte-aligned pointers hand
raw addresses to the compiled kernel's C launch function (`launch.compiled_handle`). A repeated call
costs the plan key and lookup plus that launch: 8.9-9.3 µs of host time per call on the H200
machine in a steady phase, where a torch `x.add_(1)` costs 6.3-6.6 (11-15 µs on the H100 machine;
benchmarks/README.md, "Host cost").
"""

from __future__ import annotations


import torch

from ..layout import KV_CACHE_DTYPES, cache_geometry, cache_strides, get_layout
from . import launch
from .launch import Launcher, interpreting, triton_available
from .reference import reshape_and_cache_ref

try:  # Triton is optional: without it the launchers fall back to the torch reference.
    import triton
    import triton.language as tl

    _jit = triton.jit
except Exception:  # pragma: no cover - depends on the environment

    class tl:  # noqa: N801 - stands in for triton.language so the kernel's annotations evaluate
        constexpr = None

    def _jit(fn):
        return fn


__all__ = ["reshape_and_cache_flash", "reshape_and_cache"]


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


@_jit
def _round_to_fp8_grid(y, DROP_BITS: tl.constexpr, SUB_INV_STEP: tl.constexpr, MIN_NORMAL: tl.constexpr):
    """Round float32 `y` (|y| <= the format's max) to the nearest FP8 value, ties to even, in float32.

    Only used under TRITON_INTERPRET: the interpreter's float->fp8 cast loses the carry when the
    mantissa rounds up (31.9 -> 16 in e4m3). After this rounding the cast is exact, as on the GPU.
    DROP_BITS = 23 - mantissa bits; below MIN_NORMAL the grid step is 1 / SUB_INV_STEP.
    """
    bits = y.to(tl.int32, bitcast=True)
    lsb = (bits >> DROP_BITS) & 1
    bits = (bits + ((1 << (DROP_BITS - 1)) - 1) + lsb) & (-(1 << DROP_BITS))
    normal = bits.to(tl.float32, bitcast=True)
    magic = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds to an integer, ties to even
    subnormal = ((y * SUB_INV_STEP + magic) - magic) * (1.0 / SUB_INV_STEP)
    return tl.where(tl.abs(y) < MIN_NORMAL, subnormal, normal)


@_jit
def _quantize_fp8(x, scale, FP8_FORMAT: tl.constexpr, ROUND_ON_GRID: tl.constexpr):
    """saturate(x / scale) as float8_e4m3fn (FP8_FORMAT 1) or float8_e5m2 (2)."""
    # y = x / scale rounded as IEEE division (what torch computes). tl.math.div_rn per element would
    # do it too, but its slow-path call costs 8 registers (40 instead of 32: fewer programs per SM).
    # Instead: the approximate reciprocal (within 2 ulp), one Newton step to the correctly rounded
    # 1/scale, the quotient x * (1/scale) (within an ulp), and one FMA residual step to the correctly
    # rounded quotient (Markstein); identical to x / scale on 2e7 random (bf16, fp32) pairs.
    r = 1.0 / scale
    r = tl.fma(r, tl.fma(-scale, r, 1.0), r)
    x = x.to(tl.float32)
    y = x * r
    y = tl.fma(tl.fma(-y, scale, x), r, y)
    if FP8_FORMAT == 1:
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        if ROUND_ON_GRID:
            y = _round_to_fp8_grid(y, 20, 512.0, 0.015625)
        q = y.to(tl.float8e4nv)
    else:
        y = tl.minimum(tl.maximum(y, -57344.0), 57344.0)
        if ROUND_ON_GRID:
            y = _round_to_fp8_grid(y, 21, 65536.0, 0.00006103515625)
        q = y.to(tl.float8e5)
    return q


@_jit
def _reshape_and_cache_kernel(
    # pointers
    key_ptr,  # [num_tokens, num_kv_heads, head_size_k]; fp16/bf16/fp32, last dim contiguous
    value_ptr,  # [num_tokens, num_kv_heads, head_size_v]; same dtype, last dim contiguous
    key_cache_ptr,  # paged key cache (NHD / HND / paged5d), addressed through kc_* strides
    value_cache_ptr,  # paged value cache, addressed through vc_* strides
    slot_mapping_ptr,  # [num_tokens] int64 or int32; < 0 = padding, skipped
    k_scale_ptr,  # FP8: [1] or [num_kv_heads] float32 (any pointer otherwise, unused)
    v_scale_ptr,  # FP8: [1] or [num_kv_heads] float32 (any pointer otherwise, unused)
    # geometry
    num_kv_heads,
    # input strides (elements; the last dim has stride 1)
    key_stride_tok,
    key_stride_head,
    value_stride_tok,
    value_stride_head,
    # key cache strides (elements): block, slot in block, head, d // KEY_X, d % KEY_X (or d)
    kc_stride_block,
    kc_stride_slot,
    kc_stride_head,
    kc_stride_dim_hi,
    kc_stride_dim_lo,
    # value cache strides (elements): block, slot in block, head, d
    vc_stride_block,
    vc_stride_slot,
    vc_stride_head,
    vc_stride_dim,
    # compile-time configuration
    BLOCK_SIZE: tl.constexpr,  # cache block size (slots per block): slot // BLOCK_SIZE is a shift
    HEAD_SIZE_K: tl.constexpr,
    HEAD_SIZE_V: tl.constexpr,
    BLOCK_DK: tl.constexpr,  # next power of two >= HEAD_SIZE_K
    BLOCK_DV: tl.constexpr,  # next power of two >= HEAD_SIZE_V
    HEADS_PER_PROGRAM: tl.constexpr,
    NUM_HEAD_BLOCKS: tl.constexpr,  # cdiv(num_kv_heads, HEADS_PER_PROGRAM)
    KEY_X: tl.constexpr,  # paged5d key splits d into (d // KEY_X, d % KEY_X); 0 = no split
    FP8_FORMAT: tl.constexpr,  # 0: store as is, 1: float8_e4m3fn, 2: float8_e5m2
    K_SCALE_PER_HEAD: tl.constexpr,  # FP8: k_scale is [num_kv_heads] (else one element)
    V_SCALE_PER_HEAD: tl.constexpr,  # FP8: v_scale is [num_kv_heads] (else one element)
    ROUND_ON_GRID: tl.constexpr,  # interpreter only, see _round_to_fp8_grid
):
    pid = tl.program_id(0)
    tok = pid // NUM_HEAD_BLOCKS
    heads = (pid % NUM_HEAD_BLOCKS) * HEADS_PER_PROGRAM + tl.arange(0, HEADS_PER_PROGRAM)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    head_ok = (heads < num_kv_heads)[:, None]
    k_mask = head_ok & (dk < HEAD_SIZE_K)[None, :]
    v_mask = head_ok & (dv < HEAD_SIZE_V)[None, :]

    # Three independent loads, all in flight at once. Padding tokens' rows are read too: they exist
    # (key/value have num_tokens rows) and making the loads wait for the slot would cost a latency.
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    tok = tok.to(tl.int64)
    k = tl.load(key_ptr + tok * key_stride_tok + heads[:, None] * key_stride_head + dk[None, :], mask=k_mask)
    v = tl.load(value_ptr + tok * value_stride_tok + heads[:, None] * value_stride_head + dv[None, :], mask=v_mask)
    if FP8_FORMAT != 0:
        if K_SCALE_PER_HEAD:
            k_scale = tl.load(k_scale_ptr + heads, mask=heads < num_kv_heads, other=1.0)[:, None]
        else:
            k_scale = tl.load(k_scale_ptr)
        if V_SCALE_PER_HEAD:
            v_scale = tl.load(v_scale_ptr + heads, mask=heads < num_kv_heads, other=1.0)[:, None]
        else:
            v_scale = tl.load(v_scale_ptr)

    # Cache addresses: int64 for the block part (caches pass 2**31 elements), int32 inside a block.
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    # a padding token (slot < 0) stores no head; written as a head limit, not `mask & scalar`,
    # because the interpreter turns a tensor & scalar mask into int32 and rejects it
    store_heads = tl.where(slot >= 0, num_kv_heads, 0)
    k_store = (heads < store_heads)[:, None] & (dk < HEAD_SIZE_K)[None, :]
    v_store = (heads < store_heads)[:, None] & (dv < HEAD_SIZE_V)[None, :]
    if KEY_X == 0:
        kc = key_cache_ptr + blk * kc_stride_block + off * kc_stride_slot
    else:  # the launcher checked kc_stride_slot % KEY_X == 0: say so, so the 16-byte chunks vectorise
        kc = key_cache_ptr + blk * kc_stride_block + (off * (kc_stride_slot // KEY_X)) * KEY_X
    vc = value_cache_ptr + blk * vc_stride_block + off * vc_stride_slot
    if KEY_X == 0:
        k_inner = heads[:, None] * kc_stride_head + dk[None, :] * kc_stride_dim_lo
    else:
        k_inner = (heads[:, None] * kc_stride_head + (dk // KEY_X)[None, :] * kc_stride_dim_hi
                   + (dk % KEY_X)[None, :] * kc_stride_dim_lo)
    v_inner = heads[:, None] * vc_stride_head + dv[None, :] * vc_stride_dim

    if FP8_FORMAT != 0:  # bitcast: a uint8 cache holds the same bits as a float8 one
        k = _quantize_fp8(k, k_scale, FP8_FORMAT, ROUND_ON_GRID).to(key_cache_ptr.dtype.element_ty, bitcast=True)
    tl.store(kc + k_inner, k, mask=k_store)
    if FP8_FORMAT != 0:
        v = _quantize_fp8(v, v_scale, FP8_FORMAT, ROUND_ON_GRID).to(value_cache_ptr.dtype.element_ty, bitcast=True)
    tl.store(vc + v_inner, v, mask=v_store)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_FLASH_LAYOUTS = ("NHD", "HND")
_MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SLOT_DTYPES = (torch.int64, torch.int32)
_FP8_FORMATS = {"fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 2}  # FP8_FORMAT constexpr per kv_cache_dtype
_FP8_TORCH = {1: torch.float8_e4m3fn, 2: torch.float8_e5m2}
_INT32_MAX = 2**31 - 1
_MAX_PLANS = 4096  # distinct argument configurations remembered (cleared when full)

_LAUNCH = Launcher(_reshape_and_cache_kernel) if triton_available() else None
_PLANS: dict = {}
#: (heads_per_program, num_warps) forced by benchmarks/tuning; None = the heuristic below.
_CONFIG_OVERRIDE: tuple | None = None


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _launch_config(num_kv_heads: int, block_d: int, elem_size: int, kv_layout: str = "NHD", num_tokens: int = 0,
                   num_sms: int = 0, fp8: bool = False) -> tuple[int, int]:
    """(heads_per_program, num_warps) from a small heuristic (H100 and H200 measurements in benchmarks/README.md).

    A program per token (times head blocks) keeps num_tokens out of the kernel: nothing to mask, no
    re-specialisation per batch size. Tiles of about 2 KiB of key and 2 KiB of value per program
    (1 KiB for paged5d, whose scattered value stores favour more, smaller programs), one 16-byte
    vector per lane. When one program holds a whole token (few heads) and the grid is more than one
    wave of such programs, a quarter of the lanes with four vectors each: four times as many programs
    fit on an SM at once (up to its 32-block limit), so the grid runs in fewer waves (4096 tokens x
    8 heads, graph µs: H100 17.7 with 4 warps, 16.5 with 2, 16.4 with 1; H200 14.0 / 14.0 / 13.2;
    16384 tokens on the H200 40.0 / 40.3 / 39.7; at many waves, 65536 tokens, all equal on both).
    Below one wave the 4-warp programs are faster (1 token: 5.2 against 5.5 µs on the H100). FP8
    programs also quantise, which one warp does four vectors deep: half the warps instead (H200,
    4096 tokens: 11.7 / 11.6 µs NHD / HND with 2 warps, 11.8 / 12.0 with 1, 12.3 / 12.5 with 4).
    """
    if _CONFIG_OVERRIDE is not None:
        return _CONFIG_OVERRIDE
    tile = (1024 if kv_layout == "paged5d" else 2048) // elem_size  # elements per tensor per program
    hpp = min(_next_pow2(num_kv_heads), max(1, tile // block_d))
    vec = 16 // elem_size
    num_warps = max(1, min(8, hpp * block_d // (vec * 32)))
    if kv_layout != "paged5d" and hpp >= num_kv_heads and num_warps > 1 and num_sms:
        resident = num_sms * min(32, 64 // num_warps)  # programs an SM holds at once (64 warps, 32 blocks)
        if num_tokens > resident:
            num_warps = max(1, num_warps // (2 if fp8 else 4))
    return hpp, num_warps


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    if device.index not in _SM_COUNT:
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device.index]


_SM_COUNT: dict = {}


class _Plan:
    """A validated argument configuration: what to launch (or that the reference must run)."""

    __slots__ = ("grid", "ints", "consts", "num_warps", "use_ref", "fp8", "num_slots", "num_tokens", "kv_layout",
                 "device_index", "compiled", "tail")


def _fail(cls, msg):
    raise cls(msg)


def _check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        _fail(TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_scale(name, s, num_kv_heads, device):
    if s is None:
        _fail(ValueError, f"{name} is required with an FP8 kv_cache_dtype "
                          "(a float32 tensor of 1 or num_kv_heads elements)")
    _check_tensor(name, s)
    if s.dtype != torch.float32:
        _fail(TypeError, f"{name} must be float32, got {s.dtype}")
    if s.device != device:
        _fail(ValueError, f"{name} must be on {device}, got {s.device}")
    if s.numel() not in (1, num_kv_heads):
        _fail(ValueError, f"{name} must have 1 or num_kv_heads={num_kv_heads} elements, got shape {tuple(s.shape)}")
    if s.numel() > 1 and not s.is_contiguous():
        _fail(ValueError, f"{name} must be contiguous, got strides {s.stride()}")


def _make_plan(kv_layout, key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
    """Validate every argument (cheap metadata only, no device sync) and build the launch plan."""
    if not isinstance(kv_cache_dtype, str) or kv_cache_dtype not in KV_CACHE_DTYPES:
        _fail(ValueError, f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    lay = get_layout(kv_layout)
    for name, t in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache),
                    ("slot_mapping", slot_mapping)):
        _check_tensor(name, t)

    # inputs
    for name, t in (("key", key), ("value", value)):
        if t.dim() != 3:
            _fail(ValueError, f"{name} must be [num_tokens, num_kv_heads, head_size], got shape {tuple(t.shape)}")
        if t.dtype not in _MODEL_DTYPES:
            _fail(TypeError, f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.shape[2] > 1 and t.stride(2) != 1:
            _fail(ValueError, f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    if value.dtype != key.dtype:
        _fail(TypeError, f"value must have key's dtype {key.dtype}, got {value.dtype}")
    if slot_mapping.dim() != 1:
        _fail(ValueError, f"slot_mapping must be 1-D [num_tokens], got shape {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in _SLOT_DTYPES:
        _fail(TypeError, f"slot_mapping must be int64 (or int32), got {slot_mapping.dtype}")
    if slot_mapping.numel() > 1 and slot_mapping.stride(0) != 1:
        _fail(ValueError, f"slot_mapping must be contiguous, got stride {slot_mapping.stride(0)}")
    num_tokens = slot_mapping.shape[0]
    for name, t in (("key", key), ("value", value)):
        if t.shape[0] < num_tokens:  # vLLM: inputs may be longer (CUDA-graph padding); slot_mapping rules
            _fail(ValueError, f"{name} has {t.shape[0]} tokens, fewer than slot_mapping's {num_tokens}")
    device = key.device
    for name, t in (("value", value), ("key_cache", key_cache), ("value_cache", value_cache),
                    ("slot_mapping", slot_mapping)):
        if t.device != device:
            _fail(ValueError, f"{name} must be on key's device {device}, got {t.device}")

    # caches
    fp8 = _FP8_FORMATS.get(kv_cache_dtype, 0)
    for name, c in (("key_cache", key_cache), ("value_cache", value_cache)):
        if fp8 == 0 and c.dtype != key.dtype:
            _fail(TypeError, f"{name} must have key's dtype {key.dtype} with kv_cache_dtype='auto', got {c.dtype}")
        if fp8 and c.dtype not in (_FP8_TORCH[fp8], torch.uint8):
            _fail(TypeError, f"{name} must be {_FP8_TORCH[fp8]} or uint8 with kv_cache_dtype={kv_cache_dtype!r}, "
                             f"got {c.dtype}")
    num_blocks, block_size, num_kv_heads, head_size_k, head_size_v = cache_geometry(kv_layout, key_cache, value_cache)
    if min(num_blocks, block_size, num_kv_heads, head_size_k, head_size_v) < 1:
        _fail(ValueError, f"caches must be non-empty, got key_cache {tuple(key_cache.shape)}, "
                          f"value_cache {tuple(value_cache.shape)}")
    if kv_layout != "NHD" and head_size_k != head_size_v:
        _fail(ValueError, f"key and value head sizes differ ({head_size_k} vs {head_size_v}): "
                          "only kv_layout='NHD' supports that")
    for name, t, d in (("key", key, head_size_k), ("value", value, head_size_v)):
        if t.shape[1] != num_kv_heads or t.shape[2] != d:
            _fail(ValueError, f"{name} must be [num_tokens, {num_kv_heads}, {d}] to match the cache, "
                              f"got {tuple(t.shape)}")
    ks = cache_strides(kv_layout, key_cache, True)
    vs = cache_strides(kv_layout, value_cache, False)
    key_x = ks.x if lay.splits_key_dim else 0
    if key_x and key_x != 16 // key_cache.element_size():
        _fail(ValueError, f"key_cache's last dim must be x = 16 // element size = {16 // key_cache.element_size()}, "
                          f"got {key_x}")
    if key_x and (ks.slot % key_x or ks.dim_lo != 1):
        _fail(ValueError, f"key_cache must hold contiguous x-element chunks (strides {key_cache.stride()})")
    if fp8:
        _check_scale("k_scale", k_scale, num_kv_heads, device)
        _check_scale("v_scale", v_scale, num_kv_heads, device)

    # within-block (and within-token) offsets are int32 in the kernel
    inner_k = ((num_kv_heads - 1) * abs(ks.head) + (block_size - 1) * abs(ks.slot)
               + (head_size_k - 1) * max(abs(ks.dim_hi), abs(ks.dim_lo)))
    inner_v = (num_kv_heads - 1) * abs(vs.head) + (block_size - 1) * abs(vs.slot) + (head_size_v - 1) * abs(vs.dim_lo)
    inner_in = max((num_kv_heads - 1) * abs(key.stride(1)) + head_size_k,
                   (num_kv_heads - 1) * abs(value.stride(1)) + head_size_v)
    if max(inner_k, inner_v, inner_in) > _INT32_MAX:
        _fail(ValueError, "one cache block (or one token of key/value) spans more than 2**31 elements")

    plan = _Plan()
    plan.kv_layout = kv_layout
    plan.fp8 = fp8
    plan.num_slots = num_blocks * block_size
    plan.num_tokens = num_tokens
    plan.use_ref = not triton_available() or (device.type != "cuda" and not interpreting())
    direct = not plan.use_ref and device.type == "cuda" and not interpreting()
    plan.device_index = device.index if direct else None
    plan.compiled = None  # the compiled kernel's launch handle, after the first aligned call; False: none
    block_dk, block_dv = _next_pow2(head_size_k), _next_pow2(head_size_v)
    hpp, num_warps = _launch_config(num_kv_heads, max(block_dk, block_dv), key.element_size(), kv_layout, num_tokens,
                                    _num_sms(device), bool(fp8))
    num_head_blocks = -(-num_kv_heads // hpp)
    plan.grid = (num_tokens * num_head_blocks,)
    plan.num_warps = num_warps
    plan.ints = (
        num_kv_heads,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        ks.block, ks.slot, ks.head, ks.dim_hi, ks.dim_lo,
        vs.block, vs.slot, vs.head, vs.dim_lo,
    )
    k_per_head = bool(fp8) and num_kv_heads > 1 and k_scale.numel() == num_kv_heads
    v_per_head = bool(fp8) and num_kv_heads > 1 and v_scale.numel() == num_kv_heads
    plan.consts = (block_size, head_size_k, head_size_v, block_dk, block_dv, hpp, num_head_blocks, key_x, fp8,
                   k_per_head, v_per_head, interpreting())
    plan.tail = plan.ints + plan.consts
    return plan


def _signature(kv_layout, key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
    """Everything `_make_plan` looks at, as a hashable key (AttributeError for non-tensors)."""
    sig = (kv_layout, kv_cache_dtype,
           key.dtype, key.shape, key.stride(), key.device,
           value.dtype, value.shape, value.stride(), value.device,
           key_cache.dtype, key_cache.shape, key_cache.stride(), key_cache.device,
           value_cache.dtype, value_cache.shape, value_cache.stride(), value_cache.device,
           slot_mapping.dtype, slot_mapping.shape, slot_mapping.stride(), slot_mapping.device)
    if kv_cache_dtype != "auto":
        sig += (k_scale.dtype, k_scale.shape, k_scale.stride(), k_scale.device,
                v_scale.dtype, v_scale.shape, v_scale.stride(), v_scale.device)
    return sig


def _check_slots(slot_mapping, num_slots):
    """MINIATTN_DEBUG: slot ids must be < num_slots (syncs the device)."""
    if slot_mapping.numel() and int(slot_mapping.max()) >= num_slots:
        raise ValueError(f"slot_mapping holds slot {int(slot_mapping.max())} >= "
                         f"num_slots = num_blocks * block_size = {num_slots}")


def _write(kv_layout, key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
    try:
        sig = _signature(kv_layout, key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale)
        plan = _PLANS.get(sig)
    except (AttributeError, TypeError):  # not tensors, or unhashable: let validation say what is wrong
        sig = plan = None
    if plan is None:
        plan = _make_plan(kv_layout, key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale)
        if sig is not None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[sig] = plan
    if launch.debug_enabled():
        _check_slots(slot_mapping, plan.num_slots)
    if plan.num_tokens == 0:
        return
    if plan.use_ref:
        n = plan.num_tokens
        reshape_and_cache_ref(key[:n], value[:n], key_cache, value_cache, slot_mapping, kv_cache_dtype,
                              k_scale, v_scale, kv_layout=kv_layout)
        return
    if not plan.fp8:  # unused scale pointers
        k_scale = v_scale = slot_mapping
    direct = plan.compiled
    if direct:
        # Hot path: everything was validated for this configuration; the kernel is compiled for all
        # pointers 16-byte aligned. Raw addresses spare Triton's C launcher a data_ptr() call and a
        # cuPointerGetAttribute per pointer; a profiler's launch hooks need the full path below.
        k, v, sm = key.data_ptr(), value.data_ptr(), slot_mapping.data_ptr()
        kc, vc = key_cache.data_ptr(), value_cache.data_ptr()
        ks, vs = (k_scale.data_ptr(), v_scale.data_ptr()) if plan.fp8 else (sm, sm)
        if (k | v | kc | vc | sm | ks | vs) & 15 == 0 and not launch.hooks_installed():
            stream = torch._C._cuda_getCurrentRawStream(plan.device_index)
            if direct.spread:  # `launch.DirectLaunch.__call__`, inlined
                direct.fn(plan.grid[0], 1, 1, stream, *direct.head, k, v, kc, vc, sm, ks, vs, *plan.tail)
            else:
                direct.fn(plan.grid[0], 1, 1, stream, *direct.head, (k, v, kc, vc, sm, ks, vs, *plan.tail))
            return
    ptrs = (key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)
    _LAUNCH(plan.grid, ptrs, plan.ints, plan.consts, plan.num_warps)
    if plan.compiled is None and plan.device_index is not None and not any(p.data_ptr() & 15 for p in ptrs):
        plan.compiled = launch.compiled_handle(_reshape_and_cache_kernel, plan.grid, ptrs, plan.ints, plan.consts,
                                               plan.num_warps)


def reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype="auto",
                            k_scale=None, v_scale=None, *, kv_layout="NHD"):
    """Write `key`/`value` tokens into an NHD or HND paged cache, in place (vLLM's argument order).

    Parameters
    ----------
    key, value : Tensor
        ``[num_tokens, num_kv_heads, head_size]`` fp16/bf16/fp32; may be strided views (e.g. slices of
        a fused qkv output), only the last dim must be contiguous. With ``kv_layout="NHD"`` key and
        value may have different head sizes (caches from `layout.split_combined_cache`). Rows past
        ``len(slot_mapping)`` are ignored.
    key_cache, value_cache : Tensor
        NHD ``[num_blocks, block_size, num_kv_heads, head_size]`` or HND
        ``[num_blocks, num_kv_heads, block_size, head_size]``, any strides; the model dtype, or
        float8_e4m3fn / float8_e5m2 / uint8 with an FP8 `kv_cache_dtype`.
    slot_mapping : Tensor
        ``[num_tokens]`` int64 (int32 accepted): ``block_id * block_size + offset``; < 0 is skipped.
    kv_cache_dtype : {"auto", "fp8", "fp8_e4m3", "fp8_e5m2"}
    k_scale, v_scale : Tensor, optional
        FP8 only (required there): float32 of 1 element (per tensor) or ``[num_kv_heads]``; the cache
        stores ``saturate(x / scale)``. Ignored with "auto".
    kv_layout : {"NHD", "HND"}

    Invalid arguments raise ValueError/TypeError naming the argument before anything is written.
    With ``MINIATTN_DEBUG=1`` slot ids are also checked against ``num_blocks * block_size`` (a sync).

    Example
    -------
    >>> from miniattn import allocate_kv_caches, reshape_and_cache_flash
    >>> [(kc, vc)] = allocate_kv_caches("NHD", 1, 4, 16, 2, 64, torch.float16)
    >>> k = torch.randn(3, 2, 64, dtype=torch.float16); v = torch.randn_like(k)
    >>> reshape_and_cache_flash(k, v, kc, vc, torch.tensor([0, 17, -1]), kv_layout="NHD")
    >>> torch.equal(kc[1, 1], k[1])
    True
    """
    if kv_layout not in _FLASH_LAYOUTS:
        raise ValueError("kv_layout must be 'NHD' or 'HND' for reshape_and_cache_flash "
                         f"(paged5d: reshape_and_cache), got {kv_layout!r}")
    _write(kv_layout, key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale)


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype="auto",
                      k_scale=None, v_scale=None):
    """Write `key`/`value` tokens into a paged5d cache (vLLM's PagedAttention layout), in place.

    key_cache ``[num_blocks, num_kv_heads, head_size // x, block_size, x]`` with
    ``x = 16 // element_size`` of the cache dtype, value_cache ``[num_blocks, num_kv_heads, head_size,
    block_size]``. Everything else as `reshape_and_cache_flash` (same head size for key and value).
    """
    _write("paged5d", key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale)
