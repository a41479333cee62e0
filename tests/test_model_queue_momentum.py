"""Feature queues (single process and two gloo ranks) and the EMA (plain and ZeRO-3 partitions)."""
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from model.feature_queue import FeatureQueue
from model.momentum import ema_update, make_momentum_copies, parameter_pairs
from tests.fixtures.model import REPO_ROOT


def test_queue_writes_columns_at_the_pointer_and_wraps():
    torch.manual_seed(0)
    q = FeatureQueue(dim=3, size=6, with_idx=True)
    assert torch.allclose(q.image_queue.norm(dim=0), torch.ones(6))  # column-normalised at init
    assert (q.idx_queue == -100).all() and q.image_queue.dtype == torch.float32
    a = torch.arange(12, dtype=torch.float32).view(4, 3)
    q.enqueue(a, -a, torch.tensor([1, 2, 3, 4]))
    assert torch.equal(q.image_queue[:, :4], a.t()) and torch.equal(q.text_queue[:, :4], -a.t())
    assert q.queue_ptr.item() == 4
    b = a + 100
    q.enqueue(b, -b, torch.tensor([5, 6, 7, 8]))
    assert torch.equal(q.image_queue[:, 4:], b[:2].t()) and torch.equal(q.image_queue[:, :2], b[2:].t())
    assert torch.equal(q.image_queue[:, 2:4], a[2:].t())
    assert q.idx_queue[0].tolist() == [7, 8, 3, 4, 5, 6]
    assert q.queue_ptr.item() == 2


def test_queue_refusals_name_the_numbers():
    with pytest.raises(ValueError, match=r"queue_size=100 is not divisible by the global batch size 64"):
        FeatureQueue(4, 100, with_idx=False, global_batch_size=64)
    q = FeatureQueue(4, 8, with_idx=False)
    with pytest.raises(ValueError, match=r"global batch of 9 features exceeds model.queue_size=8"):
        q.enqueue(torch.zeros(9, 4), torch.zeros(9, 4))
    q.bfloat16()
    with pytest.raises(RuntimeError, match="torch_autocast"):
        q.enqueue(torch.zeros(2, 4), torch.zeros(2, 4))


WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from model.feature_queue import FeatureQueue
    rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(100 + rank)  # a different random queue on each rank
    q = FeatureQueue(4, 8, with_idx=True, global_batch_size=4)
    before = q.image_queue.clone()
    q.sync_buffers()
    feats = torch.full((2, 4), float(rank + 1))
    q.enqueue(feats, 2 * feats, torch.tensor([10 * rank, 10 * rank + 1]))
    torch.save({"before": before, **q.state_dict()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
""")


@pytest.mark.timeout(120)
def test_two_ranks_share_one_queue_of_all_gathered_features(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(r), str(port), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    try:
        for p in procs:
            out, _ = p.communicate(timeout=100)
            assert p.returncode == 0, out.decode()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert not torch.equal(r0["before"], r1["before"])
    for key in ("image_queue", "text_queue", "idx_queue", "queue_ptr"):
        assert torch.equal(r0[key], r1[key]), key
    assert (r0["image_queue"][:, :2] == 1.0).all() and (r0["image_queue"][:, 2:4] == 2.0).all()
    assert (r0["text_queue"][:, 2:4] == 4.0).all()
    assert torch.equal(r0["image_queue"][:, 4:], r0["before"][:, 4:])  # rank 0's initial queue everywhere
    assert r0["idx_queue"][0, :4].tolist() == [0, 1, 10, 11] and r0["queue_ptr"].item() == 4


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5)
        self.out.weight = self.emb.weight


def test_momentum_copies_are_frozen_keep_ties_and_pairs_are_unique():
    online = _Tied()
    (copy_,) = make_momentum_copies([online])
    assert copy_.out.weight is copy_.emb.weight and copy_.emb.weight is not online.emb.weight
    assert not any(p.requires_grad for p in copy_.parameters())
    pairs = parameter_pairs([(online, copy_), (online.out, copy_.out)])
    # the shared weight and out.bias, each once although reachable three and two times
    assert [(p is online.emb.weight, p_m is copy_.emb.weight) for p, p_m in pairs] == [(True, True), (False, False)]
    assert pairs[1] == (online.out.bias, copy_.out.bias)


def _sharded(full: torch.Tensor, shard: slice, dtype=torch.float32) -> nn.Parameter:
    """A stand-in for a ZeRO-3 parameter: empty data, this rank's partition in `ds_tensor`."""
    p = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
    p.ds_tensor = full.view(-1)[shard].clone().to(dtype)
    return p


def test_ema_updates_zero3_partitions_shard_by_shard():
    g = torch.Generator().manual_seed(0)
    online_full, momentum_full = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    shard = slice(10, 20)
    p, p_m = _sharded(online_full, shard), _sharded(momentum_full, shard)
    before = p_m.ds_tensor.clone()
    ema_update([(p, p_m)], 0.9)
    assert p_m.data.numel() == 0
    assert torch.allclose(p_m.ds_tensor - before, 0.1 * (p.ds_tensor - before), atol=1e-7)
    # a low-precision momentum copy would make the EMA round away: refused, not silent
    low = _sharded(momentum_full, shard, torch.bfloat16)
    with pytest.raises(RuntimeError, match="not float32"):
        ema_update([(p, low)], 0.9)
    # differently partitioned copies cannot be updated shard by shard
    with pytest.raises(RuntimeError, match="partitioned the same way"):
        ema_update([(p, _sharded(momentum_full, slice(0, 5)))], 0.9)
