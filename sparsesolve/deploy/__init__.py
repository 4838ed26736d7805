"""Deployment: the compressed export and the 2:4 semi-structured kernels of torch.

Imports ``sparsesolve.lm`` and ``sparsesolve.core``; nothing below imports it.
"""
