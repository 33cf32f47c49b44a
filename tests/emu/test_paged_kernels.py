"""The CUDA paged decode kernel (csrc/kv/paged_decode_cuda.cu) under the CPU emulator (ASan + UBSan), on
the test functions of tests/test_kv_paged.py called with ``backend_device=("cuda", "cpu")``, under the
scheduling seeds of the ``cuda_backend`` fixture."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import test_kv_paged as TP  # noqa: E402

EMU = ("cuda", "cpu")


@pytest.mark.parametrize("cfg", TP.CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_paged_fuzzed(cuda_api_one_seed, cfg):
    TP.test_fuzzed_appends_rows_finish_pages_reused(EMU, cfg)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_paged_half_precision(cuda_api_one_seed, dtype):
    TP.test_half_precision(EMU, dtype)


def test_paged_subset_rows_many_splits_stale_pages(cuda_api, monkeypatch):
    TP.test_subset_rows_and_empty_rows(EMU)
    TP.test_many_splits(EMU, monkeypatch)
    TP.test_stale_nan_in_a_freed_page_does_not_leak(EMU)


@pytest.mark.parametrize("D", [32, 64, 128, 256])
@pytest.mark.parametrize("mode,bits_k,bits_v", [("int", 4, 2), ("int", 2, 8), ("fp8", 8, 8)])
def test_paged_head_dims(cuda_api_one_seed, D, mode, bits_k, bits_v):
    """Every head dim the kernel is instantiated for, including the scalar-word path of the value
    loader (D * bits_v < 128: D=32 with int2 values) and GQA with two row chunks (20 query rows)."""
    c = TP.PagedKVCache(6, 16, 1, D, 2, max_pages_per_row=3, bits_k=bits_k, bits_v=bits_v, group_size=16,
                        residual=16, mode=mode, dtype=torch.float32)
    sim = TP.Sim(c, seed=D)
    sim.step([45, 20])
    sim.step([1, 2])
    TP.check_decode(sim, TP._q(2, 10 if D <= 64 else 4, 2, D, torch.float32, 1, "cpu"), "cuda")


@pytest.mark.parametrize("mode", ["int", "fp8"])
def test_paged_opcheck(cuda_api, mode):
    TP.test_opcheck(EMU, mode)


def test_paged_rejects_bad_input(cuda_api):
    c = TP.PagedKVCache(8, 16, 2, 32, 2, group_size=16, residual=16, dtype=torch.float32)
    TP.Sim(c).step([40, 5])
    q = torch.randn(2, 4, 1, 32)
    op = cuda_api.kv_paged_decode_attention_cuda
    args = [q, *TP._raw(c), c.block_table, c.lengths, 16, "int", 4, 4, 16, 0.2, False]
    with pytest.raises(RuntimeError, match="head dims"):
        op(torch.randn(2, 4, 1, 48), *args[1:])
    bad = list(args)
    bad[9] = c.block_table.long()
    with pytest.raises(RuntimeError, match="block_table"):
        op(*bad)
    bad = list(args)
    bad[11] = 32
    with pytest.raises(RuntimeError, match="residual"):
        op(*bad)
    # an out-of-range page id is skipped, never read through (ASan would catch an out-of-bounds read)
    bt = c.block_table.clone()
    bt[0, 0] = 1 << 20
    out, lse, _ = op(q, *TP._raw(c), bt, c.lengths, 16, "int", 4, 4, 16, 0.2, False)
    assert torch.isfinite(out).all()
