"""Token windows: corpora tokenised once, calibration samples and the evaluation protocol's windows."""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict

import torch
from transformers import PreTrainedTokenizerBase

from sparsesolve.lm.corpora import load_text

__all__ = ["tokenize", "corpus_tokens", "calibration_windows", "mixed_calibration_windows", "eval_windows"]


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Tokenise ``text`` once, as the papers do, into a 1-D LongTensor."""
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


#: tokenised corpus splits kept per process, by (tokenizer digest, corpus, split); the oldest goes first
_TOKENS: OrderedDict[tuple[str, str, str], torch.Tensor] = OrderedDict()
_TOKENS_KEPT = 8
_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of what the tokenizer does (its serialised fast tokenizer, else its vocabulary), so two
    loads of one tokenizer share their cached corpora."""
    if tokenizer not in _DIGESTS:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        spec = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
        _DIGESTS[tokenizer] = hashlib.sha256(f"{type(tokenizer).__name__}\n{spec}".encode()).hexdigest()
    return _DIGESTS[tokenizer]


def corpus_tokens(tokenizer: PreTrainedTokenizerBase, corpus: str, split: str) -> torch.Tensor:
    """One split of a corpus, tokenised once per process (``tokenize(tokenizer, load_text(corpus, split))``,
    the last ``_TOKENS_KEPT`` kept; the returned tensor is shared: do not modify it)."""
    key = (_digest(tokenizer), corpus, split)
    if key not in _TOKENS:
        _TOKENS[key] = tokenize(tokenizer, load_text(corpus, split))
        while len(_TOKENS) > _TOKENS_KEPT:
            _TOKENS.popitem(last=False)
    _TOKENS.move_to_end(key)
    return _TOKENS[key]


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


def mixed_calibration_windows(token_sets: list[torch.Tensor], n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n`` windows split evenly over several token streams (the first ``n % k`` get one more), each
    part drawn by ``calibration_windows`` with seed ``seed + i``, concatenated in stream order
    (``n x seq_len``; one stream gives exactly ``calibration_windows``)."""
    k = len(token_sets)
    if not 1 <= k <= n:
        raise ValueError(f"{n} calibration windows cannot be split over {k} corpora")
    counts = [n // k + (1 if i < n % k else 0) for i in range(k)]
    return torch.cat([calibration_windows(tokens, count, seq_len, seed + i)
                      for i, (tokens, count) in enumerate(zip(token_sets, counts))])


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """The first ``max_windows`` (all if None) non-overlapping windows of ``seq_len`` tokens."""
    _check_length(tokens, seq_len, seq_len, "the evaluation text")
    count = tokens.numel() // seq_len
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        count = min(count, max_windows)
    return tokens[: count * seq_len].view(count, seq_len)
