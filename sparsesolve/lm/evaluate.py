"""The perplexity protocol of the SparseGPT / SparseLLM papers.

The test split is joined with blank lines, tokenised once and cut into non-overlapping windows of
``seq_len`` tokens; each window is scored on its own (no context carried across windows) and the
perplexity is ``exp`` of the mean negative log-likelihood over every predicted token
(``seq_len - 1`` per window; the windows are equal, so this equals the papers' mean of window means).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sparsesolve.core import distributed
from sparsesolve.lm.data import corpus_tokens, eval_windows
from sparsesolve.lm.models import check_seq_len

__all__ = ["perplexity"]


def _model_device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


def perplexity(
    model: PreTrainedModel,
    corpus: str | torch.Tensor,
    seq_len: int = 512,
    max_windows: int | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    split: str = "test",
    batch_size: int = 4,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on ``corpus`` (a corpus name from ``sparsesolve.lm.data.CORPORA``, scored on
    ``split``, or a 1-D tensor of token ids) over the first ``max_windows`` windows of ``seq_len``.

    A corpus name needs ``tokenizer``. Returns ``inf`` when the mean loss overflows; raises if the
    model produces non-finite logits (a NaN never comes back as a number). Token sharded
    (``distributed.token_sharded``), each rank scores its share of the windows and the sums are all-reduced.
    """
    check_seq_len(model, seq_len)
    if isinstance(corpus, str):
        if tokenizer is None:
            raise ValueError("perplexity on a named corpus needs tokenizer=")
        tokens = corpus_tokens(tokenizer, corpus, split)
    else:
        tokens = corpus.reshape(-1)
    windows = eval_windows(tokens, seq_len, max_windows)
    windows = windows[distributed.share(windows.shape[0])] if distributed.sharded() else windows
    device = _model_device(model)
    total, count = 0.0, 0
    batches = range(0, windows.shape[0], batch_size)
    with torch.inference_mode():
        for start in tqdm(batches, desc="perplexity", unit="batch", disable=not (progress and distributed.is_main()),
                          leave=False):
            ids = windows[start : start + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            for row, window in zip(logits, ids):     # one window at a time bounds the float32 copies
                row = row.float()
                if not torch.isfinite(row).all():
                    raise FloatingPointError("the model produced non-finite logits; the weights are broken")
                total += float(F.cross_entropy(row[:-1], window[1:], reduction="sum").double())
                count += window.numel() - 1
            del logits
    mean = distributed.reduce_float(total) / distributed.reduce_count(count)
    return math.exp(mean) if mean < 700 else math.inf
