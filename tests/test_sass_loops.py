"""benchmarks/sass_loops.py: loops found in a hand-made SASS listing, and one real compile of the
decode kernel for sm_90 (no GPU needed: Triton's ptxas and cuobjdump, a stand-in driver)."""

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")
sys.path.insert(0, BENCH)
import sass_loops as sl  # noqa: E402

LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_CTAID.X ;
        /*0020*/                   HMMA.16816.F32.BF16 R4, R8, R12, RZ ;
        /*0030*/              @P0 BRA 0x0080 ;
        /*0040*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R6.64] ;
        /*0050*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0060*/                   NOP ;
        /*0070*/              @!P1 BRA 0x0040 ;
        /*0080*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR11], R12 ;
        /*0090*/              @!P0 BRA 0x00c0 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0x00b0 ;
        /*00c0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR11], R12 ;
        /*00d0*/              @!P0 BRA 0x00c0 ;
        /*00e0*/                   BRA 0x0090 ;
"""


def test_opcode_strips_predicate_and_modifiers():
    assert sl.opcode("@!P0 HMMA.16816.F32.BF16 R1, R2, R3, R4") == "HMMA"
    assert sl.opcode("LDGSTS.E.BYPASS.128 [R2], desc[UR4][R6.64]") == "LDGSTS"
    assert sl.opcode("EXIT") == "EXIT"


def test_loops_and_main_loop():
    assert [a for a, _ in sl.parse_sass(LISTING)][:3] == [0, 0x10, 0x20]
    found = {(lp["start"], lp["end"]): lp for lp in sl.loops(LISTING)}
    # the step loop, the end-of-kernel trap and the retry spin; the retry block's return jump to 0x90
    # spans the EXIT and is no loop
    assert set(found) == {(0x40, 0x70), (0xB0, 0xB0), (0xC0, 0xD0)}
    step = found[(0x40, 0x70)]
    assert step["instructions"] == 3  # the NOP is not counted
    assert step["ops"] == {"LDGSTS": 1, "HMMA": 1, "BRA": 1}
    assert sl.main_loop(LISTING) == step
    assert sl.main_loop("        /*0000*/   EXIT ;") is None


def _have_sass_tools():
    try:
        import triton

        return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        return False


@pytest.mark.skipif(not _have_sass_tools(), reason="Triton without its NVIDIA backend tools")
def test_decode_kernel_compiles_for_sm90_and_has_a_step_loop(tmp_path):
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, os.path.join(BENCH, "sass_loops.py"), "--points", "16x4096", "--caches",
                    "auto", "--out", str(out)], check=True, env=env, capture_output=True, timeout=300)
    (row,) = json.loads(out.read_text())["rows"]
    # the plan a 132-SM GPU gets at b16 x 4096: 4 pieces of 64-token steps, 4 warps, the fused merge
    assert (row["splits"], row["block_n"], row["warps"], row["fused_merge"]) == (4, 64, 4, True)
    ops = row["ops"]
    # a 64-token step of 16 q rows x 128: 16 m16n8k16 MMAs for the scores, 16 for p v, per warp of 4;
    # 16-byte cp.async copies of its keys and values
    assert ops["HMMA"] == 32 and ops.get("LDGSTS", 0) >= 8
    assert 100 < row["step"] < 2000 and row["regs"] > 0
