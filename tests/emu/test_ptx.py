"""The warp-level PTX instruction layer (csrc/ptx.cuh) under the emulator: mma.sync m16n8k16
(fp16, bf16), ldmatrix x4 (plain, .trans), cp.async groups. The fragment layouts are checked
against the PTX ISA independently (ldmatrix here, and ldmatrix + mma against a torch matmul)."""

import pytest
import torch


def _as_u16(t):
    return t.view(torch.int16).to(torch.int64) & 0xFFFF


@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_x4(emu, seed, trans):
    x = (torch.arange(32 * 8, dtype=torch.int32) * 7 + 3).to(torch.int16).view(32, 8)
    got = emu.emu_ptx_ldmatrix(x, trans).to(torch.int64) & 0xFFFFFFFF
    u = _as_u16(x)
    exp = torch.empty(32, 4, dtype=torch.int64)
    for lane in range(32):
        for j in range(4):
            if not trans:  # row lane/4, columns 2*(lane%4), +1 of matrix j
                lo, hi = u[8 * j + lane // 4, 2 * (lane % 4)], u[8 * j + lane // 4, 2 * (lane % 4) + 1]
            else:  # rows 2*(lane%4), +1 of column lane/4
                lo, hi = u[8 * j + 2 * (lane % 4), lane // 4], u[8 * j + 2 * (lane % 4) + 1, lane // 4]
            exp[lane, j] = lo | (hi << 16)
    assert torch.equal(got, exp)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mma_m16n8k16(emu, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-8, 9, (16, 16), generator=g).to(dtype)
    bt = torch.randint(-8, 9, (8, 16), generator=g).to(dtype)
    c = torch.randn(16, 8, generator=g).round()
    d = emu.emu_ptx_mma(a, bt, c)
    assert torch.equal(d, a.float() @ bt.float().T + c)  # small integers: exact in fp32


def test_cp_async_lands_at_the_wait(emu, seed):
    src = torch.arange(256, dtype=torch.float32)
    out = emu.emu_ptx_cp_async(src)
    lanes = torch.arange(32)
    assert torch.equal(out[:32], src[lanes * 4])
    assert (out[32:64] == -1).all()  # second group not waited for yet
    assert torch.equal(out[64:], src[128 + lanes * 4])
