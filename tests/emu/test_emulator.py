"""The emulator itself (csrc/emu): built-ins, barriers, shuffles, votes, shared memory poisoning,
WMMA with a scrambled layout, and the errors it must report."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import emu_build


def test_block_reduction_is_exact(emu, seed):
    x = torch.arange(5000, dtype=torch.float32) % 7
    got = emu.emu_selftest("block_sum", x, 9)
    assert got.item() == x.sum().item()


def _shfl_expected():
    rows = []
    lanes = range(32)
    for w in (1, 2, 4, 8, 16, 32):
        for arg in range(0, 33, 3):
            base = [lane & ~(w - 1) for lane in lanes]
            rows.append([100 + b + (arg & (w - 1)) for b in base])
            rows.append([100 + (lane - arg if lane - arg >= b else lane) for lane, b in zip(lanes, base)])
            rows.append([100 + (lane + arg if lane + arg < b + w else lane) for lane, b in zip(lanes, base)])
            rows.append([100 + ((lane ^ arg) if (lane ^ arg) < b + w else lane) for lane, b in zip(lanes, base)])
    ballot = sum(1 << i for i in lanes if i % 3 == 0)
    rows.append([ballot] * 32)
    rows.append([1] * 32)
    rows.append([0] * 32)
    rows.append([lane ^ 1 if lane < 16 else -7 for lane in lanes])
    return torch.tensor(rows, dtype=torch.int32)


def test_shuffles_and_votes_match_cuda_semantics(emu, seed):
    got = emu.emu_selftest("shfl_table", torch.empty(0), 0)
    assert torch.equal(got, _shfl_expected())


def test_missing_syncthreads_is_a_visible_race(emu):
    expected = (torch.arange(256, dtype=torch.float32) + 1) % 256
    for s in (0, 1, 2):
        emu.emu_set_seed(s)
        assert torch.equal(emu.emu_selftest("neighbour", torch.empty(0), 1), expected)
    # without the barrier some thread reads its neighbour's slot before it is written (poison = NaN)
    bad = 0
    for s in (0, 1, 2):
        emu.emu_set_seed(s)
        got = emu.emu_selftest("neighbour", torch.empty(0), 0)
        bad += int(not torch.equal(got, expected))
    assert bad == 3


def test_shared_memory_is_poisoned_per_block(emu, seed):
    got = emu.emu_selftest("unwritten_shared", torch.empty(0), 0)
    assert got.isnan().all()


def test_dynamic_shared_memory(emu, seed):
    got = emu.emu_selftest("dynamic_shared", torch.empty(0), 0)
    assert torch.equal(got, (63 - torch.arange(64, dtype=torch.float32)).repeat(3))


@pytest.mark.parametrize("which,message", [
    (0, r"lane 5 .*(exited|never arrived)"),
    (1, r"deadlock.*__shfl_xor_sync.*never arrived.*__syncthreads"),
    (2, r"does not name the calling lane"),
    (3, r"reads lane 1\d which is not in the mask"),
    (4, r"divergent barrier"),
    (5, r"deadlock.*__syncwarp.*never arrived"),
])
def test_broken_patterns_are_reported(emu, seed, which, message):
    with pytest.raises(RuntimeError, match=message):
        emu.emu_selftest("broken", torch.empty(0), which)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wmma_gemm_exact_and_layout_assumptions_caught(emu, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-4, 5, (16, 16), generator=g).to(dtype)
    b = torch.randint(-4, 5, (16, 16), generator=g).to(dtype)
    exp = a.float() @ b.float()
    assert torch.equal(emu.emu_wmma(a, b, False), exp)
    assert not torch.equal(emu.emu_wmma(a, b, True), exp)


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with the ASan runtime (an ASan report aborts the process)."""
    env = dict(os.environ, ASAN_OPTIONS=emu_build.ASAN_OPTIONS)
    prelude = (f"import sys, torch; sys.path.insert(0, {os.path.dirname(__file__)!r}); import emu_build; "
               "torch.ops.load_library(emu_build.build()); emu = torch.ops.tokops_emu\n")
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=600)


def test_shared_memory_overruns_abort_with_the_source_line(emu):
    p = _run_isolated('emu.emu_selftest("dynamic_shared", torch.empty(0), 1)')
    assert p.returncode != 0
    assert "ERROR: AddressSanitizer" in p.stderr and "selftest.cu" in p.stderr, p.stderr[-3000:]
    p = _run_isolated('emu.emu_selftest("broken", torch.empty(0), 6)')
    assert p.returncode != 0
    assert ("out of bounds" in p.stderr or "global-buffer-overflow" in p.stderr) and "selftest.cu" in p.stderr, \
        p.stderr[-3000:]
