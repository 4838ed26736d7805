"""The optimisation layer: no transformers import, no knowledge of language models.

- ``patterns``: unstructured and N:M patterns and their projections; ``linalg``: damped Cholesky.
- ``solvers``: the per-layer masked least-squares solvers (magnitude, wanda, sparsegpt, admm, refits),
  pure functions returning ``LayerSolution``.
- ``activations`` (with their proximal updates), ``chain`` (linear maps and activations in sequence),
  ``streaming`` (token-chunked sums), ``sequential`` (one pass over a chain), ``coordinator`` (SparseLLM).
- ``quantize``: group-wise quantisation grids for SparseGPT's joint pass; ``reference``: brute force.
- ``config``: ``SparseLLMConfig`` and ``PruneConfig``, validated once at construction.
"""
