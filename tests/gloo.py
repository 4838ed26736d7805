"""Local gloo process groups for the distributed tests: ``spawn(worker, ...)`` runs
``worker(rank, port, ...)`` in each process, which enters ``gloo_rank(rank, port)``."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker: Callable[..., None], *args: Any, ranks: int = 2) -> None:
    """Run ``worker(rank, port, *args)`` in ``ranks`` fresh processes and wait for all of them."""
    mp.spawn(worker, args=(_free_port(), *args), nprocs=ranks, join=True)


@contextmanager
def gloo_rank(rank: int, port: int, ranks: int = 2) -> Iterator[None]:
    """This process as rank ``rank`` of a local gloo group (one torch thread), destroyed on exit."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    try:
        yield
    finally:
        dist.destroy_process_group()
