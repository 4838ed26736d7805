"""Machine facts for reports, and handing freed heap memory back between decoder layers."""

from __future__ import annotations

import sys

import pytest
import torch

from sparsesolve.lm.environment import release_free_memory, resident_memory_mb


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's (Linux)")
def test_release_free_memory_returns_freed_heap_pages_to_the_system() -> None:
    """Many small tensors freed except the last leave ~100 MiB of free heap resident (the last one pins
    the heap's top, so free() cannot shrink it); the trim gives it back."""
    blocks = [torch.ones(16 * 1024) for _ in range(1600)]   # 64 KiB each: heap, not mmap
    last = blocks[-1]
    del blocks
    before = resident_memory_mb()
    assert release_free_memory()
    assert resident_memory_mb() < before - 50
    assert float(last.sum()) == 16 * 1024
