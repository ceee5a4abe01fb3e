"""What do the write's destinations cost, and would writing the tokens in slot order pay for a sort?
The cache write on four slot patterns of the same size, next to torch.sort of the slot mapping alone.
(Session 11 also timed a kernel that sorted in the call and wrote token order[i] to the i-th smallest
slot, commit fd5c8b4, reverted: its rows "-> sorted in the call" are in results/write_order_probe_h200*.)

Slot patterns (each a set of distinct slots over the whole pool):
  random     a random subset in random order (vLLM's benchmark, the write sweep's default)
  pages      whole blocks in random block order, slots in order inside each block (a prefill)
  sorted     the random subset in ascending order, written as it is (what the sort buys, minus its cost)
  sequential slots 0 .. n-1

Every timed cell is graph-replayed (do_bench medians, cold L2), measured twice in alternating rounds;
% copy is of the 1 GiB copy ceiling measured in the same run. The sorted pattern's write is checked
(caches poisoned first).

    python benchmarks/write_order_probe.py [--cases 128:16384:16384,65536 8:65536:4096,16384,65536]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from _write_common import measure_ceilings  # noqa: E402
from miniattn import timing  # noqa: E402
from miniattn.layout import allocate_kv_caches  # noqa: E402
from miniattn.ops import cache_write  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def slot_pattern(kind: str, n: int, num_blocks: int, block_size: int, gen, device) -> torch.Tensor:
    num_slots = num_blocks * block_size
    if kind == "sequential":
        return torch.arange(n, device=device)
    if kind == "pages":
        blocks = torch.randperm(num_blocks, generator=gen, device=device)[: -(-n // block_size)]
        return (blocks[:, None] * block_size + torch.arange(block_size, device=device)).reshape(-1)[:n].contiguous()
    s = torch.randperm(num_slots, generator=gen, device=device)[:n].contiguous()
    return torch.sort(s).values if kind == "sorted" else s


def write(args, kc, vc, key, value, slots):
    fn = lambda: cache_write.reshape_and_cache_flash(key, value, kc, vc, slots, kv_layout=args.layout)  # noqa: E731
    fn()  # compile and plan outside the timing
    return fn


def check(args, kc, vc, key, value, slots, rows: int = 4096) -> bool:
    """Each token lands in its slot and other slots stay as they were (caches poisoned first; the
    first `rows` tokens and `rows` untouched slots are compared)."""
    bs = args.block_size
    for c in (kc, vc):
        c.view(torch.uint8).fill_(0xFF)
    write(args, kc, vc, key, value, slots)
    torch.cuda.synchronize()

    def rows_at(c, s):
        return c[s // bs, s % bs] if args.layout == "NHD" else c[s // bs, :, s % bs]

    s = slots[:rows]
    written = torch.zeros(kc.shape[0] * bs, dtype=torch.bool, device=slots.device)
    written[slots] = True
    free = (~written).nonzero().reshape(-1)[:rows]
    ok = torch.equal(rows_at(kc, s), key[:rows]) and torch.equal(rows_at(vc, s), value[:rows])
    return ok and all(bool((rows_at(c, free).view(torch.uint8) == 0xFF).all()) for c in (kc, vc))


def run_case(args, heads: int, num_blocks: int, tokens: list[int], ceiling: float, rows: list) -> None:
    dev = "cuda"
    dt = torch.bfloat16
    [(kc, vc)] = allocate_kv_caches(args.layout, 1, num_blocks, args.block_size, heads, args.head_size, dt,
                                    device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    n_max = max(tokens)
    key = torch.randn(n_max, heads, args.head_size, device=dev, dtype=dt, generator=g)
    value = torch.randn(n_max, heads, args.head_size, device=dev, dtype=dt, generator=g)
    for n in tokens:
        nbytes = 2 * 2 * n * heads * args.head_size * 2 + 8 * n
        cells = {}
        for kind in ("random", "pages", "sorted", "sequential"):
            slots = slot_pattern(kind, n, num_blocks, args.block_size, g, dev)
            if kind == "sorted" and not check(args, kc, vc, key[:n], value[:n], slots):
                raise SystemExit(f"a token missed its slot: {heads} heads x {n} tokens")
            cells[kind] = (write(args, kc, vc, key[:n], value[:n], slots), True)
            if kind == "random":
                s64, s32 = slots.clone(), slots.to(torch.int32)
                cells["torch.sort of the slots, int64"] = (lambda s=s64: torch.sort(s), False)
                cells["torch.sort of the slots, int32"] = (lambda s=s32: torch.sort(s), False)
        times = {k: [] for k in cells}
        for _ in range(args.rounds):
            for k, (fn, _) in cells.items():
                times[k].append(timing.time_graph(fn))
        for kind, us in times.items():
            med = sorted(us)[len(us) // 2]
            pct = 100 * nbytes / med / 1e3 / ceiling if cells[kind][1] else None
            rows.append(dict(heads=heads, num_blocks=num_blocks, tokens=n, what=kind, us=us, pct_copy=pct))
            ptxt = "" if pct is None else f"{pct:.1f}"
            print(f"| {heads} | {n} | {kind} | {' / '.join(f'{u:.1f}' for u in us)} | {ptxt} |", flush=True)
    del kc, vc, key, value
    torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["128:16384:16384,32768,65536", "8:65536:4096,16384,65536"],
                   help="HEADS:NUM_BLOCKS:TOKENS,... per case")
    p.add_argument("--layout", default="NHD", choices=("NHD", "HND"))
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if not timing.has_cuda():
        print("write_order_probe: needs a CUDA GPU")
        return
    ceiling = measure_ceilings()["ceiling"]  # the write benchmarks' copy ceiling (1 GiB each way)
    print(f"# copy ceiling {ceiling:.0f} GB/s; {a.layout}, bf16, head {a.head_size}, block {a.block_size}")
    print("| kv heads | tokens | slots | graph µs (rounds) | % copy |\n|---|---|---|---|---|")
    rows: list = []
    for c in a.cases:
        h, nb, toks = c.split(":")
        run_case(a, int(h), int(nb), [int(t) for t in toks.split(",")], ceiling, rows)
    out = a.out or os.path.join(RESULTS, f"write_order_probe_{timing.device_tag()}.json")
    timing.write_json(out, dict(vars(a), ceiling_gbps=ceiling), rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
