"""Queues of past momentum features: the extra ITC negatives (MoCo-style ring buffer).

Buffers (fp32, names as in the released checkpoints): `image_queue` and
`text_queue` [D, Q] with one feature per column, `queue_ptr` [1] (next column
to write) and, for retrieval, `idx_queue` [1, Q] (image id of each column,
-100 = empty). Enqueue all-gathers the batch from every rank when
torch.distributed is initialised (every rank then holds the same queue) and
works in a single plain process otherwise.

Every rank must start from the same queue. Call `sync_buffers()` once after
`deepspeed.initialize` (DeepSpeed broadcasts parameters at start-up, not
buffers): it broadcasts the queue buffers from rank 0.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

EMPTY_IDX = -100  # idx_queue value of a column that holds no real image id


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [n, ...] from every rank in rank order (no gradient); `x` itself without distributed."""
    if not _distributed() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


class FeatureQueue(nn.Module):
    def __init__(self, dim: int, size: int, with_idx: bool, global_batch_size: int | None = None):
        super().__init__()
        if global_batch_size is not None and global_batch_size <= 0:
            raise ValueError(f"global batch size {global_batch_size} must be positive")
        if global_batch_size is not None and size % global_batch_size:
            raise ValueError(f"model.queue_size={size} is not divisible by the global batch size "
                             f"{global_batch_size} (batch per rank x ranks); the reference requires it")
        self.size = size
        self.register_buffer("image_queue", F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        if with_idx:
            self.register_buffer("idx_queue", torch.full((1, size), EMPTY_IDX, dtype=torch.long))
        else:
            self.idx_queue = None

    @torch.no_grad()
    def enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor,
                idx: torch.Tensor | None = None) -> None:
        """Write the (gathered) batch [n, D] at the pointer, wrapping around; advance the pointer."""
        if self.image_queue.dtype != torch.float32 or self.text_queue.dtype != torch.float32:
            raise RuntimeError(f"the feature queues are {self.image_queue.dtype}, not float32: the module "
                               "was cast to low precision (DeepSpeed 'bf16' mode casts everything); "
                               "use DeepSpeed's torch_autocast mode, which keeps the module in fp32")
        if (self.idx_queue is None) != (idx is None):
            raise ValueError("idx must be given exactly when the queue holds image ids (model.retrieval)")
        image_feat = all_gather_rows(image_feat)
        text_feat = all_gather_rows(text_feat)
        n = image_feat.shape[0]
        if n > self.size:
            raise ValueError(f"global batch of {n} features exceeds model.queue_size={self.size}")
        cols = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % self.size  # [n]
        self.image_queue[:, cols] = image_feat.t().to(self.image_queue.dtype)
        self.text_queue[:, cols] = text_feat.t().to(self.text_queue.dtype)
        if idx is not None:
            self.idx_queue[0, cols] = all_gather_rows(idx.view(-1)).to(self.idx_queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % self.size)

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """Broadcast every queue buffer from rank 0 (no-op without torch.distributed)."""
        if not _distributed():
            return
        for buf in self.buffers():
            dist.broadcast(buf, src=0)
