"""Language models: loading, corpora, perplexity and the layer-by-layer driver.

- ``models`` (bundled GGUF, folders, hub ids), ``compressed`` and ``slorb`` (the saved forms a load reads).
- ``data`` (corpora, calibration and evaluation windows), ``evaluate`` (the papers' perplexity protocol).
- ``adapters`` (which modules of a decoder layer are the attention groups and the FFN chain).
- ``decoder`` (prune a decoder-only model in true sequence), ``records`` (typed per-layer results),
  ``checkpoint`` and ``output`` (resumable, atomic output folders), ``environment`` (for reports).

Imports only ``sparsesolve.core`` from the layers below.
"""
