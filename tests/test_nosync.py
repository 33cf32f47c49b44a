"""The host-sync detector used by the no-sync tests (issue 12) catches what it must and nothing else."""

import pytest
import torch

from nosync import HostSyncError, no_host_sync


def test_device_only_work_passes():
    x = torch.randn(7)
    with no_host_sync():
        y = torch.where(x > 0, x, 0).cumsum(0).gather(0, x.argmax()[None]) + x.topk(3).values.sum()
    assert torch.isfinite(y)


@pytest.mark.parametrize("name,fn", [
    ("item", lambda x: x.sum().item()),
    ("bool", lambda x: bool(x.max() > 0)),
    ("int", lambda x: int(x.argmax())),
    ("mask-index", lambda x: x[x > 0]),
    ("nonzero", lambda x: x.nonzero()),
    ("index-0d-tensor", lambda x: x[x.argmax()]),  # Python indexing reads a 0-d integer index (item)
    ("tolist", lambda x: x.tolist()),
    ("masked_select", lambda x: x.masked_select(x > 0)),
])
def test_syncs_are_caught(name, fn):
    x = torch.randn(7)
    with pytest.raises(HostSyncError):
        with no_host_sync():
            fn(x)
    fn(x)  # and the context restores everything
