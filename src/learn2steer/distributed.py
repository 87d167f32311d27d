"""Several processes on one job (``torchrun`` / ``accelerate launch``): who does which shard.

Work is split by index (shard ``k`` belongs to rank ``k % world``), every rank writes only its own files,
and a barrier separates "compute" from "merge", so a job of N processes produces exactly the files of a
single-process run. Without launcher variables everything here is a no-op (one process, rank 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes shared files (index, results, report)."""
        return self.rank == 0

    def mine(self, items: Sequence[T]) -> list[T]:
        """The items this rank computes: every ``world``-th one, starting at ``rank``."""
        return list(items[self.rank::self.world])

    def deal(self, todo: Sequence[T]) -> list[T]:
        """This rank's share of ``todo``, a list each rank derived from the files: a collective, every rank calls it.

        It waits for every rank first, so that all have looked at the same files before any writes one; a rank
        that looked late would see work another rank just finished, deal the rest differently, and leave
        some of it to nobody.
        """
        self.barrier()
        return self.mine(todo)

    def barrier(self) -> None:
        """Wait for every rank (no-op for a single process)."""
        if self.world > 1:
            torch.distributed.barrier()


def ranks() -> Ranks:
    """Read ``RANK`` / ``WORLD_SIZE`` (set by torchrun and accelerate) and join the process group (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    rank = int(os.environ.get("RANK", "0"))
    dist = torch.distributed
    if not dist.is_initialized():
        # gloo works on CPU and GPU alike for barriers; the launcher provides MASTER_ADDR / MASTER_PORT
        dist.init_process_group("gloo", rank=rank, world_size=world)
    return Ranks(rank=rank, world=world)
