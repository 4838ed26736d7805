"""Token windows: corpora tokenised once, calibration samples and the evaluation protocol's windows."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from sparsesolve.lm.corpora import load_text

__all__ = ["tokenize", "corpus_tokens", "calibration_windows", "eval_windows"]


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Tokenise ``text`` once, as the papers do, into a 1-D LongTensor."""
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def corpus_tokens(tokenizer: PreTrainedTokenizerBase, corpus: str, split: str) -> torch.Tensor:
    """One split of a corpus, tokenised once (``tokenize(tokenizer, load_text(corpus, split))``)."""
    return tokenize(tokenizer, load_text(corpus, split))


def _check_length(tokens: torch.Tensor, seq_len: int, needed: int, what: str) -> None:
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if tokens.numel() < needed:
        raise ValueError(f"{what} has {tokens.numel()} tokens, fewer than the {needed} that seq_len={seq_len} needs; "
                         "use a shorter seq_len or a larger corpus")


def calibration_windows(tokens: torch.Tensor, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens at uniformly random starts (seeded), ``n x seq_len``."""
    if n < 1:
        raise ValueError(f"the number of calibration windows must be >= 1, got {n}")
    _check_length(tokens, seq_len, seq_len + 1, "the calibration text")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (n,), generator=generator)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """The first ``max_windows`` (all if None) non-overlapping windows of ``seq_len`` tokens."""
    _check_length(tokens, seq_len, seq_len, "the evaluation text")
    count = tokens.numel() // seq_len
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        count = min(count, max_windows)
    return tokens[: count * seq_len].view(count, seq_len)
