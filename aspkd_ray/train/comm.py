"""Sharing rank 0's decisions with every Ray Train worker."""

from __future__ import annotations

import torch


class TorchDistComm:
    """Broadcast rank 0's decisions to every rank (gloo on CPU, NCCL on GPU).

    Same interface as `aspkd_ray.aspkd.rounds.Comm`, which is the one-process identity.
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def broadcast(self, obj):
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
