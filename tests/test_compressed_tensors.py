"""compressed-tensors export: packed int4/int8 round trips through transformers' own loader, bit-exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from compressed_tensors.config import SparsityCompressionConfig
from compressed_tensors.quantization import QuantizationConfig
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from tiny_lm import save_tiny, tiny_tokenizer
from transformers import AutoModelForCausalLM

from sparsesolve import prune
from sparsesolve.cli import main
from sparsesolve.core.quantize import GroupQuantizer
from sparsesolve.deploy.compressed_tensors import export_compressed_tensors, pack_int32
from sparsesolve.lm.corpora import load_text
from sparsesolve.lm.models import load_model
from sparsesolve.lm.output import OutputFolder


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 40), bits=st.integers(2, 8), seed=st.integers(0, 99))
def test_packing_puts_code_j_at_bit_j_times_bits(rows: int, cols: int, bits: int, seed: int) -> None:
    codes = torch.randint(0, 2**bits, (rows, cols), generator=torch.Generator().manual_seed(seed))
    words = pack_int32(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (rows, -(-cols * bits // 32))
    as_unsigned = words.to(torch.int64) % 2**32  # the 32-bit pattern of each word
    bit_string = "".join(format(int(w), "032b")[::-1] for w in as_unsigned.reshape(-1))  # per row, LSB first
    per_row = len(bit_string) // rows
    for r in range(rows):
        row = bit_string[r * per_row:(r + 1) * per_row]
        assert [int(row[j * bits:(j + 1) * bits][::-1], 2) for j in range(cols)] == codes[r].tolist()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(load_text("wiki", "train")[:50_000])


def _pruned(folder: Path, family: str, vocabulary, pattern: str, bits: int | None) -> Path:
    """A tiny model pruned by sparsegpt (jointly quantised with ``bits``) on random windows, saved as
    ``sparsesolve prune`` saves it (no corpus to tokenise: a few seconds)."""
    model, tokenizer = load_model(str(save_tiny(folder / f"tiny-{family}", family, vocabulary)))
    windows = torch.randint(0, 500, (4, 64), generator=torch.Generator().manual_seed(1))
    options = {"solver_options": {"quantizer": GroupQuantizer(bits, 32)}} if bits else {}
    result = prune(model, windows, method="sparsegpt", pattern=pattern, progress=False, **options)
    out = OutputFolder(folder / "pruned")
    out.begin()
    out.commit(model, tokenizer, result.masks, {"pattern": "2:4" if pattern == "2:4" else "70%"}, result.grids)
    return folder / "pruned"


@pytest.mark.parametrize(("family", "pattern", "bits"), [("llama", "2:4", 4), ("llama", "0.7", 8), ("opt", "0.7", 4),
                                                         ("opt", "2:4", 8), ("gpt2", "2:4", 4), ("llama", "2:4", None)])
def test_round_trip_through_transformers_is_bit_exact(tmp_path: Path, tokenizer, family: str, pattern: str,
                                                      bits: int | None) -> None:
    pruned = _pruned(tmp_path, family, tokenizer, pattern, bits)
    report = export_compressed_tensors(pruned, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    reference = AutoModelForCausalLM.from_pretrained(pruned)
    saved = load_file(str(pruned / "model.safetensors"))
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(ids).logits, reference(ids).logits)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(config)       # compressed-tensors' own config classes
    sparsity = dict(config["sparsity_config"])
    structure = SparsityCompressionConfig.load_from_registry(sparsity.pop("format"), **sparsity)
    assert structure.sparsity_structure == ("2:4" if pattern == "2:4" else "unstructured")
    assert abs(structure.global_sparsity - (0.5 if pattern == "2:4" else 0.7)) < 0.01
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    packed = [k for k in tensors if k.endswith(".weight_packed")]
    if bits and family != "gpt2":
        assert parsed.config_groups["group_0"].weights.num_bits == bits and len(packed) == report["quantized_linears"] > 0
        first = packed[0].removesuffix(".weight_packed")
        out_features, in_features = tensors[f"{first}.weight_shape"].tolist()
        assert tensors[packed[0]].shape == (out_features, in_features * bits // 32)
        assert tensors[f"{first}.weight_scale"].dtype == torch.float32
    else:                        # no grid, or GPT-2's Conv1D (compressed-tensors packs nn.Linear only): dense
        assert not packed and parsed.config_groups == {}
        assert bool(report["quantized_but_stored_dense"]) == (bits is not None)


def test_the_command_line_export_and_its_errors(tmp_path: Path, tokenizer, capsys) -> None:
    pruned = _pruned(tmp_path, "llama", tokenizer, "2:4", 4)
    out = tmp_path / "ct"
    assert main(["export", "--model", str(pruned), "--out", str(out), "--format", "compressed-tensors"]) == 0
    assert "packed as int4 with groups of 32" in capsys.readouterr().out
    assert main(["export", "--model", str(pruned), "--out", str(out), "--format", "compressed-tensors"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "--model", str(pruned), "--out", str(tmp_path / "x"), "--format", "compressed-tensors",
                 "--dtype", "float16"]) == 2
    assert "--dtype applies to --format compressed" in capsys.readouterr().err and not (tmp_path / "x").exists()
