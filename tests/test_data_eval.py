"""Corpora, calibration windows and the perplexity protocol."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from tiny_lm import VOCAB, tiny_model, tiny_tokenizer

from sparsesolve.config import CalibrationConfig
from sparsesolve.lm.corpora import CORPORA, code_source, load_text, wiki_documents
from sparsesolve.lm.data import calibration_windows, corpus_tokens, eval_windows, mixed_calibration_windows, tokenize
from sparsesolve.lm.evaluate import perplexity


def test_wiki_splits_are_fixed_disjoint_and_cover_the_corpus() -> None:
    splits = {s: wiki_documents(s) for s in ("train", "validation", "test")}
    assert load_text("wiki", "test") == "\n\n".join(splits["test"])
    sizes = {s: len(d) for s, d in splits.items()}
    assert 10_000 <= sum(sizes.values()) <= 10_033
    assert sizes["train"] == pytest.approx(0.8 * sum(sizes.values()), abs=1)
    assert not set(splits["train"]) & set(splits["test"])
    assert not set(splits["validation"]) & (set(splits["test"]) | set(splits["train"]))
    assert wiki_documents("test") == splits["test"]


def test_ptb_splits_load() -> None:
    test = load_text("ptb", "test")
    assert test.startswith(" no it was n't black monday")
    assert len(load_text("ptb", "validation")) > 100_000


def test_unknown_or_unreachable_corpora_fail_clearly() -> None:
    with pytest.raises(ValueError, match="unknown corpus 'wikitext3'"):
        load_text("wikitext3", "test")
    with pytest.raises(ValueError, match="unknown split"):
        load_text("wiki", "dev")
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ValueError, match="needs the hub and the datasets package"):
            load_text("wikitext2", "test")
    assert set(CORPORA) == {"wiki", "ptb", "code", "wikitext2", "c4"}


def test_calibration_windows_are_seeded_and_inside_the_text() -> None:
    tokens = torch.arange(1000)
    a, b = calibration_windows(tokens, 16, 50, seed=3), calibration_windows(tokens, 16, 50, seed=3)
    assert torch.equal(a, b) and a.shape == (16, 50)
    assert not torch.equal(a, calibration_windows(tokens, 16, 50, seed=4))
    assert bool(((a[:, 1:] - a[:, :-1]) == 1).all())      # contiguous slices of the token stream
    assert int(a.max()) < 1000
    with pytest.raises(ValueError, match="fewer than the 51 that seq_len=50 needs"):
        calibration_windows(torch.arange(50), 1, 50)
    with pytest.raises(ValueError, match=">= 1"):
        calibration_windows(tokens, 0, 50)


def test_code_corpus_is_python_source_split_by_file() -> None:
    splits = {s: load_text("code", s) for s in ("train", "validation", "test")}
    files = {s: set(text.split("\n\n# ")) for s, text in splits.items()}
    total = sum(len(text) for text in splits.values())
    assert total > 2_000_000 and 0.6 < len(splits["train"]) / total < 0.95     # 80 % of the files
    assert "def forward(self" in splits["train"] and "import torch" in splits["test"]
    assert len(files["test"] & files["train"]) <= 1          # no file in two splits (the empty piece aside)
    assert code_source().startswith("torch 2.") and "nn" in code_source()


def test_mixed_calibration_splits_the_windows_evenly_over_the_corpora() -> None:
    streams = [torch.arange(1000), torch.arange(5000, 6000), torch.arange(9000, 9500)]
    windows = mixed_calibration_windows(streams, 8, 50, seed=2)
    assert windows.shape == (8, 50)
    assert [int(w[0]) // 1000 for w in windows] == [0, 0, 0, 5, 5, 5, 9, 9]      # 3 + 3 + 2, in corpus order
    assert torch.equal(mixed_calibration_windows(streams[:1], 8, 50, seed=2), calibration_windows(streams[0], 8, 50, seed=2))
    assert CalibrationConfig("wiki, ptb", 8).corpus == "wiki,ptb"
    with pytest.raises(ValueError, match="several distinct"):
        CalibrationConfig("wiki,wiki", 8)
    with pytest.raises(ValueError, match="unknown corpus 'news'"):
        CalibrationConfig("wiki,news", 8)


def test_eval_windows_are_the_first_non_overlapping_windows() -> None:
    windows = eval_windows(torch.arange(1050), 100, max_windows=None)
    assert windows.shape == (10, 100) and torch.equal(windows.reshape(-1), torch.arange(1000))
    assert eval_windows(torch.arange(1050), 100, max_windows=3).shape == (3, 100)
    with pytest.raises(ValueError, match="fewer than"):
        eval_windows(torch.arange(99), 100)


def test_perplexity_equals_exp_of_the_model_loss() -> None:
    """Reference: transformers' own mean token loss over the same windows (labels = inputs)."""
    model = tiny_model("llama")
    tokens = torch.randint(0, VOCAB, (700,), generator=torch.Generator().manual_seed(0))
    windows = eval_windows(tokens, 64, 10)
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    expected = math.exp(sum(losses) / len(losses))
    got = perplexity(model, tokens, 64, 10, batch_size=3, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, tokens, 64, 10, batch_size=10, progress=False) == pytest.approx(got, rel=1e-6)


def test_perplexity_rejects_windows_longer_than_the_context_and_broken_models() -> None:
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="longer than the model's context"):
        perplexity(model, torch.arange(2000) % VOCAB, 512, progress=False)
    with pytest.raises(ValueError, match="needs tokenizer"):
        perplexity(model, "wiki", 64, progress=False)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        perplexity(model, torch.arange(200) % VOCAB, 64, progress=False)


def test_a_corpus_is_tokenised_once_per_tokenizer() -> None:
    """Two loads of one tokenizer share the cached split; another tokenizer gets its own tokens."""
    text = load_text("wiki", "train")[:20_000]
    first, again, other = tiny_tokenizer(text), tiny_tokenizer(text), tiny_tokenizer(text[:5_000])
    tokens = corpus_tokens(first, "ptb", "validation")
    assert corpus_tokens(again, "ptb", "validation") is tokens
    assert torch.equal(tokens, tokenize(first, load_text("ptb", "validation")))
    assert not torch.equal(corpus_tokens(other, "ptb", "validation")[:100], tokens[:100])
