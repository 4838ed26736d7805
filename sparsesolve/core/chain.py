"""The model as a chain of modular layer functions.

A chain is a list of stages. Stage ``l`` reads the activation ``a_{l-1}`` (``a_{-1} = X``, tokens as
rows, shape ``N x n``), applies its linear map(s) to get pre-activations and then its nonlinearity::

    DenseStage:  z = a W^T + b,                       a_l = phi(z)
    GatedStage:  u = a W_up^T + b_up, s = a W_gate^T + b_gate,   a_l = phi(s) * u     (SwiGLU FFN)

The output of the chain is the last stage's pre-activation (a trailing activation does not change
which weights reconstruct it). Each stage knows the proximal update of its pre-activations given its
activation auxiliary (``prox``), which is all the SparseLLM coordinator needs to know about it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsesolve.core.activations import Activation, get_activation

__all__ = ["LinearMap", "DenseStage", "GatedStage", "Chain", "GatedMLP"]


@dataclass
class LinearMap:
    """A named linear map ``y = x W^T + b`` backed by a module's parameter; ``W`` is ``(out, in)``.

    - ``transposed=True`` for modules that store ``W^T`` (GPT-2's Conv1D keeps ``weight`` as in x out).
    - ``param``: the parameter holding ``W`` (``"weight"``; e.g. ``"gate_up_proj"`` for fused experts).
    - ``index``: for a 3-D parameter (one matrix per expert, ``E x out x in``), the expert's matrix.
    - ``rows``: a block of output rows (one half of a fused gate/up weight); the rest is left alone.
    - ``path``: the module's full name when ``name`` names a block of it (``place`` files masks under it).
    The bias exists only for a whole ``weight`` or its rows.
    """

    name: str
    module: nn.Module
    transposed: bool = False
    param: str = "weight"
    index: int | None = None
    rows: slice | None = None
    path: str = ""

    def _view(self) -> torch.Tensor:
        p = getattr(self.module, self.param).data
        if self.index is not None:
            p = p[self.index]
        if self.transposed:
            p = p.T
        return p if self.rows is None else p[self.rows]

    @property
    def weight(self) -> torch.Tensor:
        """The weight as ``(out_features, in_features)``."""
        return self._view().detach()

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias (``out_features``) or None."""
        b = getattr(self.module, "bias", None) if self.param == "weight" and self.index is None else None
        if b is None:
            return None
        return b.detach() if self.rows is None else b.detach()[self.rows]

    def assign(self, weight: torch.Tensor) -> None:
        """Write an ``(out, in)`` weight into the module's parameter in place, in its dtype."""
        target = self._view()
        target.copy_(weight.to(target.dtype))

    def place(self, masks: dict[str, torch.Tensor], mask: torch.Tensor) -> None:
        """Record this map's ``(out, in)`` keep-``mask`` in ``masks``: a whole ``weight`` under ``name``; a
        block of a parameter (rows, one expert) into the parameter's mask under ``path`` (the module's
        name and, unless it is ``weight``, the parameter's), created all True with shape ``(..., out, in)``
        (the parameter's, with its last two axes swapped when it is stored transposed)."""
        if self.param == "weight" and self.index is None and self.rows is None:
            masks[self.name] = mask
            return
        key = self.path if self.param == "weight" else f"{self.path}.{self.param}"
        shape = list(getattr(self.module, self.param).shape)
        if self.transposed:
            shape[-2:] = shape[-1], shape[-2]
        full = masks.setdefault(key, torch.ones(shape, dtype=torch.bool, device=mask.device))
        view = full[self.index] if self.index is not None else full
        (view if self.rows is None else view[self.rows]).copy_(mask)


def _apply(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x @ weight.T
    return out if bias is None else out + bias


@dataclass
class DenseStage:
    """One linear map followed by an elementwise activation."""

    linear: LinearMap
    activation: Activation

    @property
    def linears(self) -> list[LinearMap]:
        return [self.linear]

    def activate(self, pres: list[torch.Tensor]) -> torch.Tensor:
        """``a = phi(z)``."""
        return self.activation(pres[0])

    def prox(
        self, maps: list[torch.Tensor], pres: list[torch.Tensor], act: torch.Tensor, alpha: float, gamma: float,
        local_steps: int | None = None,
    ) -> list[torch.Tensor]:
        """``z = argmin alpha ||z - m||^2 + gamma ||act - phi(z)||^2`` elementwise (``m = maps[0]``);
        ``local_steps``: the fast local update from the current ``z`` with that many Newton steps
        (``Activation.prox(start=..., steps=...)``); None: the global search."""
        if local_steps is None:
            return [self.activation.prox(maps[0], act, alpha, gamma, candidate=pres[0])]
        return [self.activation.prox(maps[0], act, alpha, gamma, start=pres[0], steps=local_steps)]


@dataclass
class GatedStage:
    """Gated linear unit: ``a = phi(s) * u`` with ``u`` from ``up`` and ``s`` from ``gate``."""

    up: LinearMap
    gate: LinearMap
    activation: Activation

    @property
    def linears(self) -> list[LinearMap]:
        return [self.up, self.gate]

    def activate(self, pres: list[torch.Tensor]) -> torch.Tensor:
        """``a = phi(s) * u``."""
        return self.activation(pres[1]) * pres[0]

    def prox(
        self, maps: list[torch.Tensor], pres: list[torch.Tensor], act: torch.Tensor, alpha: float, gamma: float,
        local_steps: int | None = None,
    ) -> list[torch.Tensor]:
        """Exact block updates of ``alpha(||u - m_u||^2 + ||s - m_s||^2) + gamma ||act - phi(s) u||^2``.

        First ``u`` given the current ``s`` (closed form ``(alpha m_u + gamma sigma act) / (alpha +
        gamma sigma^2)``, ``sigma = phi(s)``), then ``s`` given the new ``u`` (1-D solve per element;
        ``local_steps``: the fast local update from the current ``s``; the global search has the current
        ``s`` as a candidate: either way never worse than it).
        """
        sigma = self.activation(pres[1])
        up = (alpha * maps[0] + gamma * sigma * act) / (alpha + gamma * sigma * sigma)
        if local_steps is None:
            gate = self.activation.prox(maps[1], act, alpha, gamma, scale=up, candidate=pres[1])
        else:
            gate = self.activation.prox(maps[1], act, alpha, gamma, scale=up, start=pres[1], steps=local_steps)
        return [up, gate]


Stage = DenseStage | GatedStage


class GatedMLP(nn.Module):
    """A SwiGLU feed-forward block ``down(silu(gate(x)) * up(x))`` (Llama-family FFN)."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = False) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.gate = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``down(silu(gate x) * up x)``."""
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


_ACTIVATION_MODULES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.SiLU: "silu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.Identity: "identity",
}


def _activation_of(module: nn.Module) -> Activation | None:
    if isinstance(module, nn.GELU):
        return get_activation("gelu_tanh" if module.approximate == "tanh" else "gelu")
    name = _ACTIVATION_MODULES.get(type(module))
    return None if name is None else get_activation(name)


class Chain:
    """An ordered list of stages; the last one is a ``DenseStage`` whose output is reconstructed."""

    def __init__(self, stages: list[Stage]) -> None:
        if not stages:
            raise ValueError("a chain needs at least one linear layer")
        if not isinstance(stages[-1], DenseStage):
            raise ValueError("a chain must end with a linear layer (the output to reconstruct)")
        self.stages = stages

    @property
    def linears(self) -> list[LinearMap]:
        """Every linear map, in forward order."""
        return [lin for stage in self.stages for lin in stage.linears]

    @classmethod
    def from_module(cls, module: nn.Module) -> Chain:
        """Read a chain from ``nn.Linear``, ``GatedMLP`` or a (nested) ``nn.Sequential`` of them with
        elementwise activations (ReLU, SiLU, GELU, Tanh, Sigmoid, Identity) and Dropout in between."""
        stages: list[Stage] = []
        prefix_modules = _flatten(module)
        for name, child in prefix_modules:
            if isinstance(child, nn.Linear):
                stages.append(DenseStage(LinearMap(name, child), get_activation("identity")))
            elif isinstance(child, GatedMLP):
                join = f"{name}." if name else ""
                stages.append(GatedStage(LinearMap(join + "up", child.up), LinearMap(join + "gate", child.gate),
                                         get_activation("silu")))
                stages.append(DenseStage(LinearMap(join + "down", child.down), get_activation("identity")))
            elif isinstance(child, nn.Dropout):
                continue
            elif (act := _activation_of(child)) is not None:
                last = stages[-1] if stages else None
                if not isinstance(last, DenseStage) or last.activation.name != "identity":
                    raise ValueError(f"activation {name!r} must directly follow a Linear layer")
                stages[-1] = DenseStage(last.linear, act)
            else:
                raise ValueError(
                    f"unsupported module {name!r} ({type(child).__name__}); a chain is built from Linear, "
                    "GatedMLP and elementwise activations in an nn.Sequential"
                )
        return cls(stages)

    def forward(self, x: torch.Tensor, weights: list[list[torch.Tensor]] | None = None) -> torch.Tensor:
        """The chain's output (last pre-activation) for inputs ``x`` (N x n), optionally with ``weights``
        (per stage, per linear, ``(out, in)``) in place of the modules' own."""
        a = x
        for l, stage in enumerate(self.stages):
            ws = [lin.weight for lin in stage.linears] if weights is None else weights[l]
            pres = [apply_linear(a, w, lin) for lin, w in zip(stage.linears, ws)]
            if l == len(self.stages) - 1:
                return pres[0]
            a = stage.activate(pres)
        raise AssertionError("unreachable")


def _bias(linear: LinearMap, dtype: torch.dtype) -> torch.Tensor | None:
    b = linear.bias
    return None if b is None else b.to(dtype)


def apply_linear(x: torch.Tensor, weight: torch.Tensor, linear: LinearMap) -> torch.Tensor:
    """``x W^T + b`` with the weight and the bias of ``linear`` cast to ``x``'s dtype (no copy when
    they have it already)."""
    return _apply(x, weight.to(x.dtype), _bias(linear, x.dtype))


def _flatten(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        out: list[tuple[str, nn.Module]] = []
        for name, child in module.named_children():
            out.extend(_flatten(child, f"{prefix}.{name}" if prefix else name))
        return out
    return [(prefix, module)]
