"""Compressed export: bit-exact round trip of every encoding, size accounting, loading through load_model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_lm import save_tiny, tiny_tokenizer

from sparsesolve import prune
from sparsesolve.core.patterns import NM, Unstructured
from sparsesolve.core.quantize import GroupQuantizer
from sparsesolve.deploy.export import export_compressed, pack
from sparsesolve.lm.compressed import COMPRESSED_FILE, unpack
from sparsesolve.lm.corpora import load_text
from sparsesolve.lm.data import calibration_windows, corpus_tokens
from sparsesolve.lm.models import load_model
from sparsesolve.lm.output import GRIDS_FILE, OutputFolder


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 70), density=st.floats(0.0, 1.0), seed=st.integers(0, 99))
def test_pack_round_trips_bit_exactly_and_picks_the_smaller_encoding(rows: int, cols: int, density: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < density
    weight = torch.randn(rows, cols, generator=g) * mask
    tensors, encoding = pack(weight, mask, "w")
    assert torch.equal(unpack(tensors, "w", (rows, cols), encoding), weight)
    size = {"bitmask": rows * ((cols + 7) // 8), "indices": 2 * (rows + int(mask.sum()))}
    assert encoding == min(size, key=lambda e: (size[e], e != "bitmask"))
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == 4 * int(mask.sum()) + size[encoding]


def test_pack_refuses_weights_outside_the_mask() -> None:
    mask = torch.tensor([[True, False]])
    with pytest.raises(ValueError, match="outside its mask"):
        pack(torch.tensor([[1.0, 2.0]]), mask, "w")


@pytest.mark.parametrize(("family", "pattern"), [("llama", NM(2, 4)), ("gpt2", Unstructured(0.95)),
                                                 ("opt", Unstructured(0.5))])
def test_export_round_trip_of_a_pruned_model(tmp_path: Path, family: str, pattern) -> None:
    tiny = save_tiny(tmp_path / "tiny", family, tiny_tokenizer(load_text("wiki", "train")[:50_000]))
    model, tokenizer = load_model(str(tiny))
    windows = calibration_windows(corpus_tokens(tokenizer, "wiki", "train"), 2, 32)
    result = prune(model, windows, method="sparsegpt", pattern=pattern, progress=False)
    pruned = tmp_path / "pruned"
    folder = OutputFolder(pruned)
    folder.begin()
    folder.commit(model, tokenizer, result.masks, {})
    report = export_compressed(pruned, tmp_path / "small")
    again, _ = load_model(str(tmp_path / "small"))
    expected = model.state_dict()
    assert set(again.state_dict()) == set(expected)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in expected.items())
    ids = windows[:1]
    assert torch.equal(again(ids).logits, model(ids).logits)
    saved = json.loads((tmp_path / "small" / "compression.json").read_text())
    assert saved == report and report["bytes"]["compressed"] == (tmp_path / "small" / COMPRESSED_FILE).stat().st_size
    assert report["bytes"]["compressed"] < report["bytes"]["source_weights"] and report["pruned_linears"] == len(result.masks)
    if pattern.sparsity > 15 / 16:
        assert report["encodings"]["indices"] > 0
    half = export_compressed(pruned, tmp_path / "half", dtype=torch.float16)
    assert half["bytes"]["compressed"] < report["bytes"]["compressed"]
    halved = load_model(str(tmp_path / "half"), dtype=torch.float16)[0].state_dict()
    assert all(torch.equal(halved[k], v.half()) for k, v in expected.items())
    with pytest.raises(ValueError, match="already exists"):
        export_compressed(pruned, tmp_path / "small")
    with pytest.raises(ValueError, match="masks.safetensors"):
        export_compressed(tiny, tmp_path / "other")


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 7), cols=st.integers(1, 50), bits=st.integers(2, 8), groupsize=st.sampled_from([4, 8, 16]),
       seed=st.integers(0, 99))
def test_quantised_values_round_trip_as_grid_codes(rows: int, cols: int, bits: int, groupsize: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < 0.5
    quantizer = GroupQuantizer(bits, groupsize)
    dense = torch.randn(rows, cols, generator=g)
    grid = quantizer.grid([quantizer.params(dense[:, c : c + groupsize]) for c in range(0, cols, groupsize)])
    weight = torch.cat([quantizer.quantize(dense[:, c : c + groupsize], *quantizer.params(dense[:, c : c + groupsize]))
                        for c in range(0, cols, groupsize)], dim=1) * mask
    tensors, encoding = pack(weight, mask, "w", grid)
    assert torch.equal(unpack(tensors, "w", (rows, cols), encoding, (bits, groupsize)), weight)
    kept = int(mask.sum())
    assert tensors["w.codes"].numel() == ((kept + 1) // 2 if bits <= 4 else kept)
    half, encoding = pack(weight.half(), mask, "w", grid)  # the same codes; the value is cast on load
    assert torch.equal(unpack(half, "w", (rows, cols), encoding, (bits, groupsize)).half(), weight.half())
    if kept:
        moved = weight.clone()
        moved[mask.nonzero()[0].tolist()[0], mask.nonzero()[0].tolist()[1]] += 1e-3
        with pytest.raises(ValueError, match="not on the quantisation grid"):
            pack(moved, mask, "w", grid)


def test_export_of_a_jointly_quantised_model_is_exact_and_smaller(tmp_path: Path) -> None:
    tiny = save_tiny(tmp_path / "tiny", "llama", tiny_tokenizer(load_text("wiki", "train")[:50_000]))
    model, tokenizer = load_model(str(tiny))
    windows = calibration_windows(corpus_tokens(tokenizer, "wiki", "train"), 2, 32)
    result = prune(model, windows, method="sparsegpt", pattern="2:4", progress=False,
                   solver_options={"quantizer": GroupQuantizer(4, 32)})
    folder = OutputFolder(tmp_path / "pruned")
    folder.begin()
    assert set(result.grids) == set(result.masks)
    folder.commit(model, tokenizer, result.masks, {}, result.grids)
    report = export_compressed(tmp_path / "pruned", tmp_path / "small")
    again, _ = load_model(str(tmp_path / "small"))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    assert report["quantization"] == {"bits": 4, "groupsize": 32}
    half = export_compressed(tmp_path / "pruned", tmp_path / "half", dtype=torch.float16)
    halved, _ = load_model(str(tmp_path / "half"), dtype=torch.float16)
    assert all(torch.equal(halved.state_dict()[k], v.half()) for k, v in model.state_dict().items())
    assert half["bytes"]["compressed"] < report["bytes"]["compressed"]
    (tmp_path / "pruned" / GRIDS_FILE).unlink()
    plain = export_compressed(tmp_path / "pruned", tmp_path / "plain")
    assert report["bytes"]["compressed"] < plain["bytes"]["compressed"]
