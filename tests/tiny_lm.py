"""Tiny random-init causal LMs of each supported family, and a tiny BPE tokenizer, for fast tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig, PreTrainedModel, PreTrainedTokenizerFast

VOCAB = 512
CONTEXT = 256


def tiny_config(family: str, layers: int = 2, width: int = 64, ffn: int = 128) -> object:
    """A random-init config of ``family`` (llama, opt, gpt2) with ``layers`` decoder layers."""
    if family == "llama":
        return LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                           tie_word_embeddings=True)
    if family == "opt":
        return OPTConfig(vocab_size=VOCAB, hidden_size=width, ffn_dim=ffn, num_hidden_layers=layers, num_attention_heads=4,
                         max_position_embeddings=CONTEXT, word_embed_proj_dim=width, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0)
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=width, n_inner=ffn, n_layer=layers, n_head=4, n_positions=CONTEXT,
                          bos_token_id=0, eos_token_id=0)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, **sizes: int) -> PreTrainedModel:
    """A seeded random-init model of ``family`` in eval mode."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **sizes)).eval()


def tiny_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ``VOCAB`` entries trained on ``text``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def save_tiny(folder: Path, family: str, tokenizer: PreTrainedTokenizerFast, **sizes: int) -> Path:
    """Save a tiny model of ``family`` with ``tokenizer`` as a transformers folder."""
    tiny_model(family, **sizes).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
