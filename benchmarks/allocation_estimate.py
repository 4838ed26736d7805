"""What a sparsity allocation can gain, by the Fisher estimate, per layer and per linear, before any pruning.

The Fisher curves of ``lm/allocation.py`` estimate ``dL_u(s)``, the increase of the calibration loss
when unit ``u`` alone is pruned to sparsity ``s``: each linear's OBS error curve with every output row
weighed by the mean squared loss gradient of that output (second order, diagonal empirical Fisher).
Their sum over the units is the estimate for the whole model. The curves of every linear are computed
once, from one backward pass and one dense pass (no pruning). A layer's curve is the sum of its
linears' curves (``tests/test_allocation.py`` checks that identity). So each row below is the
``"fisher"`` allocation of one unit and range, scored on the same curves:

- ``predicted_loss_increase``: the sum of the units' ``dL_u`` at their allocated sparsities, in the
  curves' units (``sum_i f_i cost_i``, twice the second-order loss increase summed over the calibration
  tokens; a crude absolute estimate at these sparsities, so only the ratios between rows are read);
- ``change_vs_uniform``: its change against every unit at the target;
- ``min``, ``max``: the allocated sparsities' range.

``by_type`` holds, for the linear unit, each kind of linear's parameter-weighted mean sparsity (``q_proj``,
``down_proj``, ...). This is an estimate: perplexity after pruning is measured by ``ppl_vs_sparsity``
(``--allocation fisher [--allocation-unit linear]``), and the README sets the two side by side.

    python -m benchmarks.allocation_estimate   # -> results/allocation_estimate.json (SmolLM2, P1 calibration)
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from benchmarks.common import RESULTS, metadata, write_json


def estimate(model: nn.Module, windows: torch.Tensor, targets: list[float], ranges: list[float],
             batch_size: int = 8) -> dict[str, Any]:
    """The rows and ``by_type`` of the module docstring for ``model`` calibrated on ``windows``
    (``n x seq_len`` token ids), at each unstructured target and allocation range (``batch_size``:
    windows per dense forward; the Fisher backward passes take one window each, as pruning does)."""
    from sparsesolve.lm.adapters import get_adapter
    from sparsesolve.lm.allocation import LayerStatistics, allocate, layer_statistics, sparsity_grid
    from sparsesolve.lm.fisher import FISHER_BATCH, output_fisher
    from sparsesolve.lm.layer_inputs import capture_first_inputs

    adapter = get_adapter(model)
    layers = list(range(len(adapter.layers(model))))
    low = max(0.0, min(targets) - max(ranges))
    high = min(0.99, max(targets) + max(ranges))
    grid = sparsity_grid((low + high) / 2, (high - low) / 2)
    fisher = output_fisher(model, adapter, layers, windows, FISHER_BATCH)     # as pruning computes it
    inputs = capture_first_inputs(model, adapter.layers(model)[0], windows, batch_size, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        linear = layer_statistics(model, adapter, layers, inputs, torch.float32, torch.device("cpu"), grid,
                                  row_weights=fisher, unit="linear")
    layer_of = {lin.name: i for i in layers for lin in adapter.layer_map(model, i).linears if lin.index is None}
    per_layer = {i: LayerStatistics(sum(s.params for n, s in linear.items() if layer_of[n] == i), 0.0, grid,
                                    sum(s.errors for n, s in linear.items() if layer_of[n] == i)) for i in layers}
    units = {"layer": per_layer, "linear": linear}

    def at(stats: LayerStatistics, s: float) -> float:
        return float(stats.errors[int(torch.argmin((stats.grid - s).abs()))])

    rows, by_type = [], {}
    for target in targets:
        uniform = sum(at(s, target) for s in linear.values())
        for unit, stats in units.items():
            for spread in ranges:
                keep = (grid - target).abs() <= spread + 1e-9          # every unit's curve is on ``grid``
                window = {k: LayerStatistics(s.params, 0.0, grid[keep], s.errors[keep]) for k, s in stats.items()}
                chosen = allocate("fisher", target, window, spread)
                loss = sum(at(stats[k], v) for k, v in chosen.items())
                rows.append({"target": target, "unit": unit, "range": spread, "predicted_loss_increase": loss,
                             "uniform_loss_increase": uniform, "change_vs_uniform": loss / uniform - 1,
                             "min": min(chosen.values()), "max": max(chosen.values())})
                if unit == "linear":
                    kinds: dict[str, list[float]] = {}
                    for name, s in chosen.items():
                        kinds.setdefault(name.split(".")[-1], []).append(s)
                    by_type[f"{target:g}_range{spread:g}"] = {kind: sum(v) / len(v) for kind, v in sorted(kinds.items())}
    return {"rows": rows, "by_type": by_type}


def table(result: dict[str, Any]) -> str:
    """Markdown: target, range, the uniform estimate and each unit's estimate with its change."""
    out = ["| target | range | uniform dL | per layer dL (change) | per linear dL (change) |", "|---|---|---:|---:|---:|"]
    keyed = {(r["target"], r["range"], r["unit"]): r for r in result["rows"]}
    for target, spread in sorted({(r["target"], r["range"]) for r in result["rows"]}):
        layer, linear = keyed[(target, spread, "layer")], keyed[(target, spread, "linear")]
        out.append(f"| {target:g} | {spread:g} | {layer['uniform_loss_increase']:.0f} | "
                   f"{layer['predicted_loss_increase']:.0f} ({layer['change_vs_uniform']:+.0%}) | "
                   f"{linear['predicted_loss_increase']:.0f} ({linear['change_vs_uniform']:+.0%}) |")
    return "\n".join(out) + "\n"


def main() -> None:
    """Estimate for the bundled model on the P1 calibration windows and write the JSON."""
    from sparsesolve.lm.data import calibration_windows, corpus_tokens
    from sparsesolve.lm.models import load_model

    parser = argparse.ArgumentParser(description="Fisher estimate of what a per-layer or per-linear allocation gains")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--targets", default="0.7,0.8")
    parser.add_argument("--ranges", default="0.08,0.15,0.25")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    windows = calibration_windows(corpus_tokens(tokenizer, "wiki", "train"), args.nsamples, args.seq_len, seed=0)
    result = estimate(model, windows, [float(t) for t in args.targets.split(",")], [float(r) for r in args.ranges.split(",")])
    path = write_json("allocation_estimate", {"meta": metadata("benchmarks.allocation_estimate", 0), "model": args.model,
                                              "calibration": {"corpus": "wiki", "nsamples": args.nsamples,
                                                              "seq_len": args.seq_len, "seed": 0}, **result}, RESULTS)
    print(table(result), end="")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
