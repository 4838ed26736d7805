"""Token sharding: the calibration tokens split over the ranks of a ``torch.distributed`` process group.

Every statistic a solve reads is a sum over tokens: the Gram ``X^T X``, the cross-covariance
``T^T X``, the penalised objective, every error. Inside ``token_sharded()`` each rank sums over its
own share of the tokens and the partial sums are all-reduced (``reduce``, ``reduce_float``,
``reduce_count``), so every rank holds the statistics of all ``N`` tokens while it stores and
updates only its ``N / K`` rows of the per-token arrays (activations, the coordinator's auxiliaries).
The weight solves whose rows decouple (SparseGPT with a per-row pattern, the fixed-mask refits) are
split by rows instead: inside ``rows_shared()`` each rank solves its ``share`` of a weight's rows, the
row sums a solve reads (conjugate gradients' residual) are all-reduced (``reduce_rows``) and the rows
are all-gathered (``gather_rows``); the other solves run on identical inputs on every rank. Either way
every rank ends with identical weights (``check_identical`` verifies it per decoder layer). Only
``d x d``- and ``m x n``-sized data crosses between ranks.

Outside ``token_sharded()`` (or with one rank) every function here is the identity, so the one-process
code path is unchanged. gloo serves CPU tensors, nccl CUDA tensors (``start_process_group``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["token_sharded", "sharded", "rank", "world_size", "is_main", "share", "reduce", "reduce_float",
           "reduce_count", "rows_shared", "reduce_rows", "gather_rows", "agree", "on_main", "check_identical",
           "gather", "start_process_group"]

_SHARDED: ContextVar[bool] = ContextVar("sparsesolve_token_sharded", default=False)
_ROWS: ContextVar[bool] = ContextVar("sparsesolve_rows_shared", default=False)
T = TypeVar("T")


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if _initialised() else 0


def world_size() -> int:
    """Number of ranks in the default process group (1 without one)."""
    return dist.get_world_size() if _initialised() else 1


def is_main() -> bool:
    """True on rank 0 when token sharded, always otherwise: the process that writes files and prints."""
    return not sharded() or rank() == 0


def sharded() -> bool:
    """True inside ``token_sharded()`` with more than one rank: token sums are all-reduced."""
    return _SHARDED.get() and world_size() > 1


@contextmanager
def token_sharded() -> Iterator[None]:
    """Within the block, every token sum of the core is all-reduced over the default process group;
    each rank passes its own share of the calibration tokens (``share``)."""
    token = _SHARDED.set(True)
    try:
        yield
    finally:
        _SHARDED.reset(token)


def share(count: int, ranks: int | None = None, index: int | None = None) -> slice:
    """Rank ``index``'s contiguous share of ``count`` items split over ``ranks`` (default: this process
    and the default group): the first ``count % ranks`` ranks hold one item more (a rank may get none)."""
    ranks = world_size() if ranks is None else ranks
    index = rank() if index is None else index
    base, extra = divmod(count, ranks)
    start = index * base + min(index, extra)
    return slice(start, start + base + (1 if index < extra else 0))


def reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks in place (when sharded) and return it."""
    if sharded():
        dist.all_reduce(tensor)
    return tensor


def reduce_float(value: float) -> float:
    """A scalar summed over the ranks, in float64 (``value`` itself when not sharded)."""
    return float(_reduce_scalar(value, torch.float64)) if sharded() else value


def reduce_count(value: int) -> int:
    """An integer count summed over the ranks (``value`` itself when not sharded)."""
    return int(_reduce_scalar(value, torch.int64)) if sharded() else value


def _reduce_scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
    total = torch.tensor([value], dtype=dtype, device=_collective_device())
    dist.all_reduce(total)
    return total


@contextmanager
def rows_shared() -> Iterator[None]:
    """Within the block (when sharded) each rank solves its ``share`` of a weight's rows: sums over
    rows go through ``reduce_rows``."""
    token = _ROWS.set(True)
    try:
        yield
    finally:
        _ROWS.reset(token)


def reduce_rows(value: float) -> float:
    """A sum over a weight's rows, over every rank's rows inside ``rows_shared()`` (float64)."""
    return reduce_float(value) if _ROWS.get() else value


def gather_rows(part: torch.Tensor, rows: int) -> torch.Tensor:
    """The ``rows``-row tensor whose ``share(rows)`` this rank holds as ``part``, all-gathered in rank
    order (shares are padded to equal length for the collective); ``part`` itself when not sharded."""
    if not sharded():
        return part
    ranks = world_size()
    longest = -(-rows // ranks)
    # gloo has no bool or int16 collectives: such tensors travel as int32
    carrier = torch.int32 if part.dtype in (torch.bool, torch.int16) else part.dtype
    padded = torch.zeros((longest, *part.shape[1:]), dtype=carrier, device=_collective_device())
    padded[: part.shape[0]] = part
    pieces = [torch.empty_like(padded) for _ in range(ranks)]
    dist.all_gather(pieces, padded)
    lengths = [share(rows, ranks, r).stop - share(rows, ranks, r).start for r in range(ranks)]
    return torch.cat([p[:n] for p, n in zip(pieces, lengths)]).to(device=part.device, dtype=part.dtype)


def gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (a picklable object), in rank order, when sharded; else ``[value]``."""
    if not sharded():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def agree(settings: dict[str, Any], what: str = "settings") -> None:
    """Raise the same one-line ``ValueError`` on every rank unless all ranks pass equal ``settings``."""
    values = gather(settings)
    differing = sorted({key for other in values[1:] for key in set(other) | set(values[0])
                        if other.get(key) != values[0].get(key)})
    if differing:
        key = differing[0]
        shown = ", ".join(f"rank {r} has {v.get(key)!r}" for r, v in enumerate(values))
        raise ValueError(f"ranks disagree on {what} ({', '.join(differing)}; {key}: {shown}); "
                         "start every rank with the same command and files")


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank; an exception there is raised on
    every rank (as ``ValueError`` with the same message when it was one), so no rank waits forever.
    Not sharded: ``fn()``."""
    if not sharded():
        return fn()
    outcome: list[Any] = [None]
    if is_main():
        try:
            outcome[0] = ("ok", fn())
        except Exception as error:  # handed to the other ranks, then raised here too
            outcome[0] = ("error", error)
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        if is_main():
            raise value
        raise type(value)(*value.args) if isinstance(value, ValueError) else RuntimeError(f"rank 0 failed: {value}")
    return value


def check_identical(tensors: Sequence[torch.Tensor]) -> bool:
    """True when every rank holds bit-identical ``tensors``; otherwise rank 0's are broadcast into
    every rank's (in place) and False is returned, so the ranks continue from one set of weights."""
    if not sharded() or not tensors:
        return True
    digest = torch.stack([_checksum(t) for t in tensors])
    lowest, highest = digest.clone(), digest.clone()
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    if torch.equal(lowest, highest):
        return True
    for t in tensors:
        dist.broadcast(t, src=0)
    return False


def _checksum(tensor: torch.Tensor) -> torch.Tensor:
    """Two float64 digests of ``tensor``'s bits (sum and position-weighted sum): equal bits, equal digests."""
    flat = tensor.detach().reshape(-1).to(torch.float64)
    position = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    return torch.stack([flat.sum(), (flat * position.remainder(9973)).sum()]).to(_collective_device())


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def start_process_group(device: str) -> tuple[str, bool]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1) start the default process group, gloo for ``device``
    "cpu", nccl for "cuda" (each rank on GPU ``LOCAL_RANK``); returns the rank's device and whether a
    group was started here (the caller then destroys it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _initialised():
        return device, False
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is visible; use --device cpu")
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device, True
