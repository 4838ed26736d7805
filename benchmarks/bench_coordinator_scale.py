"""SparseLLM against SparseGPT on one gated FFN at the widths of real models: time and FFN error.

    python -m benchmarks.bench_coordinator_scale                      # CPU, 8192 tokens, all widths
    python -m benchmarks.bench_coordinator_scale --widths 576x1536 --tokens 8192 --patterns 2:4

One row per (width, pattern, device): both methods prune the same FFN ``down(silu(gate x) * up x)`` from
the same calibration inputs in the same process and thread count, sparsellm with the language-model
defaults (``SparseLLMConfig.for_language_models()``). The error is the FFN's relative output error
``||F(X) - F_hat(X)||^2 / ||F(X)||^2`` on the calibration tokens.

Inputs: at SmolLM2's width (576 x 1536) the real FFN of decoder layer 1 and its real inputs (the
first ``--tokens`` of 64 x 512 wiki calibration windows through the dense model); at the other widths a
synthetic FFN: inputs from ``benchmarks.synthetic.llm_like_inputs`` (correlated features with a decaying
spectrum and outlier channels) and Gaussian weights with SmolLM2 layer 1's per-matrix standard
deviations scaled by ``sqrt(576 / fan_in)``, so the activations keep the real layer's magnitude.
``--synthetic-small`` adds a synthetic row at 576 x 1536 to compare with the real one.

With ``--count-ops`` each method runs once more under ``torch.profiler`` (untimed): the operators it
launches, a proxy for the launch overhead a GPU pays, and where its CPU time goes.

With ``--whole-model`` it also times ``sparsesolve.prune`` on a random-init Llama of ``--model-shape``
(default the 7B shape, 2 decoder layers) with ``--model-windows`` x ``--model-seq-len`` random token
windows, both methods (sparsellm once per ``--preactivations`` setting), with peak memory: allocated
device memory on a GPU, the process's resident memory on the CPU, and ``lm.memory``'s prediction.
Each device type keeps its own whole-model rows.

Writes (merging rows by key) ``benchmarks/results/coordinator_scale.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, metadata, write_json
from benchmarks.synthetic import llm_like_inputs

NAME = "coordinator_scale"
WIDTHS = "576x1536,1024x2816,2048x5632,4096x11008"


def real_ffn(tokens: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """SmolLM2's decoder layer 1 FFN as a ``GatedMLP`` and its first ``tokens`` real inputs."""
    from sparsesolve.core.chain import GatedMLP
    from sparsesolve.lm.data import calibration_windows, corpus_tokens
    from sparsesolve.lm.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    windows = calibration_windows(corpus_tokens(tokenizer, "wiki", "train"), -(-tokens // 512), 512, seed=0)
    mlp, captured = model.model.layers[1].mlp, []
    handle = mlp.register_forward_pre_hook(lambda _m, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for batch in windows.split(8):
            model(batch, use_cache=False)
    handle.remove()
    ffn = GatedMLP(mlp.up_proj.in_features, mlp.up_proj.out_features)
    for ours, theirs in ((ffn.up, mlp.up_proj), (ffn.gate, mlp.gate_proj), (ffn.down, mlp.down_proj)):
        ours.weight.data.copy_(theirs.weight.detach())
    return ffn, torch.cat(captured)[:tokens].contiguous()


#: per-matrix weight standard deviations of SmolLM2's layer 1 FFN (fan-in 576 for up/gate, 1536 for down)
SMOLLM2_STD = {"up": 0.181, "gate": 0.204, "down": 0.184}


def synthetic_ffn(d_model: int, d_ff: int, tokens: int, seed: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """A Gaussian gated FFN with SmolLM2-like scales and LLM-like inputs (module docstring)."""
    from sparsesolve.core.chain import GatedMLP

    g = torch.Generator().manual_seed(seed)
    ffn = GatedMLP(d_model, d_ff)
    for name, fan_in, fan_out in (("up", d_model, d_ff), ("gate", d_model, d_ff), ("down", d_ff, d_model)):
        std = SMOLLM2_STD[name] * ((576 if name != "down" else 1536) / fan_in) ** 0.5
        getattr(ffn, name).weight.data.copy_(torch.randn(fan_out, fan_in, generator=g) * std)
    return ffn, llm_like_inputs(tokens, d_model, seed)


def count_ops(ffn: torch.nn.Module, x: torch.Tensor, pattern: str, method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Run ``method`` once more under ``torch.profiler``: operators launched (a proxy for a GPU's launch
    overhead), the five operators with the most host self time and, on a GPU, the five with the most
    device time."""
    import sparsesolve as ss

    model = torch.nn.Sequential(copy.deepcopy(ffn)).to(x.device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if x.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        ss.prune(model, x, method=method, pattern=pattern, **options)
        _sync(x.device)
    events = prof.key_averages()
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:5]
    out = {"ops": sum(e.count for e in events),
           "top_self_s": {e.key: round(e.self_cpu_time_total / 1e6, 2) for e in top}}
    if x.device.type == "cuda":
        device = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:8]
        out["device_s"] = round(sum(e.self_device_time_total for e in events) / 1e6, 2)
        out["top_device_s"] = {e.key[:80]: round(e.self_device_time_total / 1e6, 3) for e in device}
    return out


def warm_up(device: torch.device) -> None:
    """Prune a small FFN with both methods, untimed, so the first timed run does not pay the device's
    library loading and kernel set-up (on a GPU about 2 s, once per process)."""
    if device.type != "cuda":
        return
    ffn, x = synthetic_ffn(256, 512, 4096, seed=1)
    time_methods(ffn.to(device), x.to(device), "2:4")


def time_methods(ffn: torch.nn.Module, x: torch.Tensor, pattern: str, ops: bool = False) -> dict[str, Any]:
    """Prune copies of ``ffn`` with sparsegpt and sparsellm; seconds, errors, refit iterations and the
    peak memory each adds to what was there before it: allocated device memory on a GPU, resident
    memory on the CPU (the high-water mark reset before each, the freed heap handed back first; with
    ``ops``, also ``count_ops`` of each in a separate, untimed run)."""
    import sparsesolve as ss
    from sparsesolve.core.config import SparseLLMConfig

    out: dict[str, Any] = {}
    for method, options in (("sparsegpt", {}), ("sparsellm", {"sparsellm": SparseLLMConfig.for_language_models()})):
        model = torch.nn.Sequential(copy.deepcopy(ffn)).to(x.device)
        _sync(x.device)
        if x.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        result, out[f"{method}_s"], resident = _timed(
            x.device, lambda m=model, o=options, name=method: ss.prune(m, x, method=name, pattern=pattern, **o))
        if x.device.type == "cuda":
            out[f"{method}_peak_gb"] = (torch.cuda.max_memory_allocated() - before) / 2**30
        else:
            out[f"{method}_peak_gb"] = (resident.peak_mb - resident.before_mb) / 1024
        out[f"{method}_error"] = result.relative_error
        if ops:
            out[f"{method}_profile"] = count_ops(ffn, x, pattern, method, options)
        if method == "sparsellm":
            best = result.best_iteration
            out["sparsellm_refine_iterations"] = result.history[best - 1]["refine_iterations"] if best else {}
            out["sparsellm_best_iteration"] = result.best_iteration
    out["time_ratio"] = out["sparsellm_s"] / out["sparsegpt_s"]
    out["error_ratio"] = out["sparsellm_error"] / out["sparsegpt_error"]
    return out


def whole_model(shape: str, layers: int, windows: int, seq_len: int, pattern: str, device: str,
                dtype: str = "float32", preactivations: tuple[str, ...] = ("auto",)) -> list[dict[str, Any]]:
    """Both methods on a random-init Llama of ``shape`` (``HIDDENxFFN``) in ``dtype`` (the stored
    activations take it too), sparsellm once per ``preactivations`` setting: wall seconds and peak
    memory (allocated device memory on a GPU; on the CPU the process's resident memory, model and
    libraries included, its high-water mark reset before each run), beside ``lm.memory``'s prediction
    for the same run (``predicted_gb``: its per-layer total plus the model's parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import sparsesolve as ss
    from sparsesolve.core.config import SparseLLMConfig
    from sparsesolve.lm.memory import pruning_memory

    hidden, ffn = (int(v) for v in shape.split("x"))
    config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 128),
                         vocab_size=32000, max_position_embeddings=max(2048, seq_len))
    tokens = torch.randint(0, config.vocab_size, (windows, seq_len), generator=torch.Generator().manual_seed(0))
    rows = []
    for method, where in (("sparsegpt", None), *(("sparsellm", p) for p in preactivations)):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(device=device, dtype=getattr(torch, dtype)).eval()
        options = {} if where is None else {"sparsellm": SparseLLMConfig.for_language_models(preactivations=where)}
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        _sync(torch.device(device))
        result, wall, resident = _timed(torch.device(device), lambda m=model, name=method, o=options: ss.prune(
            m, tokens, method=name, pattern=pattern, progress=False, **o))
        on_gpu = device.startswith("cuda")
        size = torch.finfo(getattr(torch, dtype)).bits // 8
        predicted = pruning_memory(tokens=windows * seq_len, d_model=hidden, d_ff=ffn, storage_bytes=size, param_bytes=size,
                                   layer_params=sum(p.numel() for p in model.model.layers[0].parameters()),
                                   model_params=sum(p.numel() for p in model.parameters()), method=method,
                                   device=torch.device(device).type, preactivations=where or "auto")
        rows.append({"model_shape": shape, "layers": layers, "windows": windows, "seq_len": seq_len, "pattern": pattern,
                     "dtype": dtype, "device": device, "method": method, "preactivations": where, "wall_s": wall,
                     "solve_s": result.solve_seconds, "forward_s": result.forward_seconds,
                     "peak_device_gb": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
                     "peak_resident_gb": None if on_gpu else resident.peak_mb / 1024,
                     "predicted_gb": (predicted["total"] + predicted["model"]) / 2**30,
                     "threads": torch.get_num_threads()})
        print(json.dumps(rows[-1]), flush=True)
        del model
    return rows


def table(folder: Path = RESULTS) -> str:
    """The README table: one line per row of ``coordinator_scale.json`` (time ratio, error ratio, and on a
    GPU the peak memory each method adds), then the whole-model rows where a GPU measured them."""
    data = json.loads((folder / f"{NAME}.json").read_text())
    lines = ["| d_model x d_ff | inputs | tokens | pattern | device (threads) | sparsegpt s | sparsellm s | ratio | "
             "FFN error sparsegpt -> sparsellm (ratio) | peak GiB sparsegpt -> sparsellm | CG iterations up / gate / down |",
             "|---|---|---:|---|---|---:|---:|---:|---|---|---|"]
    for r in sorted(data["rows"], key=lambda r: (r["device"], r["d_model"], r["source"], r["pattern"])):
        iters = " / ".join("-" if v is None else str(v) for v in r.get("sparsellm_refine_iterations", {}).values())
        peak = f"{r['sparsegpt_peak_gb']:.1f} -> {r['sparsellm_peak_gb']:.1f}" if "sparsellm_peak_gb" in r else "-"
        lines.append(f"| {r['d_model']} x {r['d_ff']} | {r['source']} | {r['tokens']:,} | {r['pattern']} | "
                     f"{r['device']} ({r['threads']}) | {r['sparsegpt_s']:.1f} | {r['sparsellm_s']:.1f} | "
                     f"{r['time_ratio']:.2f}x | {r['sparsegpt_error']:.4f} -> {r['sparsellm_error']:.4f} "
                     f"({r['error_ratio']:.2f}) | {peak} | {iters} |")
    sources = "; ".join(f"{device}: {_source(meta)}" for device, meta in sorted(data["meta_by_device"].items()))
    out = "\n".join(lines) + f"\n\n_Source: {sources}._\n"
    if data.get("whole_model"):
        out += "\n" + _whole_model_table(data["whole_model"], data["whole_model_meta_by_device"])
    return out


def _source(meta: dict[str, Any]) -> str:
    machine = meta["machine"]["cuda"] or f"{meta['machine']['cpus']} CPUs"
    commit = meta["commit"][:12] + ("-dirty" if meta["commit"].endswith("-dirty") else "")
    return f"`{meta['command']}` at commit `{commit}`, {meta['date']}, {machine}, torch {meta['versions']['torch']}"


def _whole_model_table(rows: list[dict[str, Any]], meta_by_device: dict[str, dict[str, Any]]) -> str:
    """Both methods on the random-init Llama, per device and dtype: wall seconds, peak memory (device
    memory on a GPU, resident memory on the CPU) and the ratios."""
    lines = ["| model (layers) | tokens | pattern | device | dtype | sparsellm pre-activations | sparsegpt s | sparsellm s | "
             "ratio | peak GiB sparsegpt | peak GiB sparsellm | ratio |",
             "|---|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for device, dtype in dict.fromkeys((r["device"], r["dtype"]) for r in rows):
        gpt = next(r for r in rows if (r["device"], r["dtype"], r["method"]) == (device, dtype, "sparsegpt"))
        for llm in (r for r in rows if (r["device"], r["dtype"], r["method"]) == (device, dtype, "sparsellm")):
            a, b = (r["peak_device_gb"] or r.get("peak_resident_gb") for r in (gpt, llm))
            memory = f"{a:.1f} | {b:.1f} | {b / a:.2f}x" if a and b else "- | - | -"
            lines.append(f"| Llama {gpt['model_shape']} ({gpt['layers']}) | {gpt['windows'] * gpt['seq_len']:,} | "
                         f"{gpt['pattern']} | {device} | {dtype} | {llm.get('preactivations') or 'auto'} | "
                         f"{gpt['wall_s']:.1f} | {llm['wall_s']:.1f} | {llm['wall_s'] / gpt['wall_s']:.2f}x | {memory} |")
    sources = "; ".join(f"{device}: {_source(meta)}" for device, meta in sorted(meta_by_device.items()))
    return "\n".join(lines) + f"\n\n_Source: {sources}._\n"


def _timed(device: torch.device, run: Callable[[], Any]) -> tuple[Any, float, Any]:
    """``run()``'s result, its wall seconds (the device synchronised before the clock stops) and its
    ``stage_peak`` (resident memory; the freed heap handed back and the high-water mark reset first)."""
    from sparsesolve.lm.environment import release_free_memory, stage_peak

    release_free_memory()
    with stage_peak() as resident:
        started = time.perf_counter()
        result = run()
        _sync(device)
        seconds = time.perf_counter() - started
    return result, seconds, resident


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    """Parse arguments, run every (width, pattern), merge the rows into the JSON after each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default=WIDTHS, help=f"comma-separated D_MODELxD_FF (default {WIDTHS}; '' for none)")
    parser.add_argument("--patterns", default="2:4,0.7")
    parser.add_argument("--tokens", type=int, default=None, help="calibration tokens (default 8192 on CPU, 131072 on GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic-small", action="store_true", help="also a synthetic row at 576x1536")
    parser.add_argument("--count-ops", action="store_true", help="also count the operators each method launches (profiled rerun)")
    parser.add_argument("--whole-model", action="store_true", help="also time a random-init Llama (--model-shape)")
    parser.add_argument("--model-shape", default="4096x11008")
    parser.add_argument("--model-layers", type=int, default=2)
    parser.add_argument("--model-windows", type=int, default=64)
    parser.add_argument("--model-seq-len", type=int, default=2048)
    parser.add_argument("--model-dtypes", default="float32", help="comma-separated dtypes of the whole model (e.g. float32,bfloat16)")
    parser.add_argument("--preactivations", default="auto",
                        help="comma-separated SparseLLMConfig.preactivations settings, one sparsellm run of the whole model each")
    parser.add_argument("--name", default=NAME, help=f"results/NAME.json (default {NAME})")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokens = args.tokens or (131072 if args.device.startswith("cuda") else 8192)
    path = args.out / f"{args.name}.json"
    payload = json.loads(path.read_text()) if path.exists() else {"rows": [], "whole_model": []}
    if "whole_model_meta" in payload:  # files written before the CPU rows: their whole model ran on the GPU
        payload["whole_model_meta_by_device"] = {"cuda": payload.pop("whole_model_meta")}
    payload["meta"] = metadata("benchmarks.bench_coordinator_scale", args.seed)
    payload.setdefault("meta_by_device", {})[torch.device(args.device).type] = payload["meta"]
    payload["commands"] = list(dict.fromkeys([*payload.get("commands", []), payload["meta"]["command"]]))

    def keep(row: dict[str, Any]) -> None:
        key = ("d_model", "d_ff", "pattern", "device", "source")
        payload["rows"] = [r for r in payload["rows"] if any(r.get(k) != row[k] for k in key)] + [row]
        write_json(args.name, payload, args.out)

    warm_up(torch.device(args.device))
    cases = [(int(a), int(b), "real" if (int(a), int(b)) == (576, 1536) else "synthetic")
             for a, b in (w.split("x") for w in filter(None, args.widths.split(",")))]
    if args.synthetic_small:
        cases.append((576, 1536, "synthetic"))
    for d_model, d_ff, source in cases:
        ffn, x = real_ffn(tokens) if source == "real" else synthetic_ffn(d_model, d_ff, tokens, args.seed)
        ffn, x = ffn.to(args.device), x.to(args.device)
        for pattern in args.patterns.split(","):
            row = {"d_model": d_model, "d_ff": d_ff, "tokens": tokens, "pattern": pattern, "device": args.device,
                   "threads": torch.get_num_threads(), "source": source, **time_methods(ffn, x, pattern, args.count_ops)}
            keep(row)
            print(json.dumps(row), flush=True)
    if args.whole_model:  # replaces the rows of this device type
        device_type = torch.device(args.device).type
        payload["whole_model"] = [r for r in payload.get("whole_model", []) if torch.device(r["device"]).type != device_type] + [
            row for dtype in args.model_dtypes.split(",") for row in whole_model(
                args.model_shape, args.model_layers, args.model_windows, args.model_seq_len, args.patterns.split(",")[0],
                args.device, dtype, tuple(args.preactivations.split(",")))]
        payload.setdefault("whole_model_meta_by_device", {})[device_type] = payload["meta"]
        write_json(args.name, payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
