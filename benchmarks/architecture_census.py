"""Census: does every decoder-only causal LM of the installed transformers prune?

For every model type in transformers' causal-LM mapping, a tiny random-init model is built from its
config class (hidden 64, FFN 128, 2 layers, 4 heads, 4 experts of width 64 where the config has them;
every other setting the config's default). Types that cannot be built offline at that size, and models
that are not causal decoders (position 0's logits change when a later token changes: encoders,
encoder-decoders), or whose dense model transformers itself cannot save and reload as
``AutoModelForCausalLM``, are listed under ``skipped`` with the reason. Every other type is pruned at 2:4 with
sparsegpt and with sparsellm (16 x 32 seeded token ids, both layers) and checked:

- exact 2:4 sparsity of every pruned matrix (every group of 4 inputs has exactly 2 zeros);
- finite logits; save with ``save_pretrained`` and reload with plain ``AutoModelForCausalLM``: the same logits;
- ``ffn_error_ratio``: sparsellm's FFN (or expert) relative error over sparsegpt's, mean over layers.

Status ``ok`` when all hold, ``refused`` when sparsesolve declines the model with a reason, ``error``
otherwise. Each type runs in a worker process (a crash or a 60 s hang costs one type, not the census).

    python -m benchmarks.architecture_census                # every type -> results/architectures.json
    python -m benchmarks.architecture_census --types llama,mixtral --out census_small
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

from benchmarks.common import RESULTS, metadata, write_json

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 256, "head_dim": 16, "n_embd": 64,
         "n_layer": 2, "n_head": 4, "n_positions": 256, "d_model": 64, "ffn_dim": 128, "num_layers": 2, "num_heads": 4,
         "n_inner": 128, "ffn_hidden_size": 128, "num_experts": 4, "num_local_experts": 4, "num_experts_per_tok": 2,
         "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "n_routed_experts": 4,
         "n_shared_experts": 1, "first_k_dense_replace": 0, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
         "d_ff": 128, "decoder_ffn_dim": 128, "encoder_ffn_dim": 128, "decoder_layers": 2, "encoder_layers": 2,
         "decoder_attention_heads": 4, "encoder_attention_heads": 4, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
         "v_head_dim": 16, "kv_lora_rank": 16, "q_lora_rank": 32, "dff": 128, "rotary_dim": 8,
         "attention_types": [[["global", "local"], 1]]}
TIMEOUT = 60


def _small(config: Any) -> Any:
    """``config`` rebuilt at census size, nested configs (text, vision, audio towers) included."""
    wanted = {key: value for key, value in SMALL.items() if hasattr(config, key)}
    for name, value in vars(config).items():
        if name.endswith("_config") and hasattr(value, "to_dict") and hasattr(value, "model_type"):
            wanted[name] = _small(value)
    try:
        return type(config)(**wanted)  # from the class defaults: derived settings (layer types, head sizes) follow
    except Exception:  # noqa: BLE001 - a class that refuses some keyword: set what it accepts one by one
        for key, value in wanted.items():
            try:
                setattr(config, key, value)
            except Exception:  # noqa: BLE001, S112 - a read-only or validated setting keeps its default
                continue
        return config


def tiny_config(model_type: str) -> Any:
    """The model type's config at census size (settings its class does not have are left out)."""
    from transformers import AutoConfig

    return _small(AutoConfig.for_model(model_type))


def _logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def _exact_two_four(masks: dict[str, Any]) -> bool:
    return all(m.shape[-1] % 4 == 0 and bool((m.reshape(*m.shape[:-1], -1, 4).sum(-1) == 2).all()) for m in masks.values())


def _ffn_errors(result: Any) -> list[float]:
    errors = []
    for record in result.layers:
        parts = ([record.ffn.relative_error] if record.ffn is not None else []) + [e.relative_error for e in record.experts]
        errors.append(sum(parts) / len(parts))
    return errors


def _prune_and_check(config: Any, dense: Any, calibration: Any, probe: Any, method: str) -> dict[str, Any]:
    """Prune a copy of ``dense`` with ``method``; ``{"errors": per-layer FFN errors}`` when every check
    holds, else the census row saying why not."""
    import torch
    from transformers import AutoModelForCausalLM

    import sparsesolve as ss

    model = AutoModelForCausalLM.from_config(config).eval()
    model.load_state_dict(dense.state_dict())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = ss.prune(model, calibration, method=method, pattern="2:4", progress=False)
    except ValueError as error:
        if "not supported" in str(error):
            return {"status": "refused", "reason": str(error)}
        raise
    if not _exact_two_four(result.masks):
        return {"status": "error", "reason": f"{method}: a pruned matrix is not exactly 2:4"}
    pruned = _logits(model, probe)
    if not torch.isfinite(pruned).all():
        return {"status": "error", "reason": f"{method}: non-finite logits after pruning"}
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        again = AutoModelForCausalLM.from_pretrained(folder).eval()
        if not torch.allclose(_logits(again, probe), pruned, atol=1e-5, rtol=1e-5):
            return {"status": "error", "reason": f"{method}: the reloaded model gives other logits"}
    return {"errors": _ffn_errors(result)}


def census_one(model_type: str) -> dict[str, Any]:
    """Build, check causality, prune with both methods, check, reload: one census row."""
    import torch
    from transformers import AutoModelForCausalLM

    from sparsesolve.lm.adapters import get_adapter

    try:
        config = tiny_config(model_type)
        if hasattr(config, "validate"):
            config.validate()  # what save_pretrained will check
        torch.manual_seed(0)
        dense = AutoModelForCausalLM.from_config(config).eval()
        vocab = min(int(getattr(config, "vocab_size", None) or 256), 256)
        probe = torch.randint(3, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
        changed = probe.clone()
        changed[0, -1] = 3 + (int(probe[0, -1]) - 2) % (vocab - 3)
        logits = _logits(dense, probe)
    except Exception as error:  # noqa: BLE001 - a type that cannot be built is skipped with its reason
        return {"status": "skipped", "reason": f"not buildable offline at census size: {type(error).__name__}: "
                                               f"{str(error).splitlines()[0][:160] if str(error) else ''}"}
    if not torch.allclose(logits[0, 0], _logits(dense, changed)[0, 0], atol=1e-5):
        return {"status": "skipped", "reason": "not a causal decoder (position 0 sees later tokens)"}
    try:
        with tempfile.TemporaryDirectory() as folder:
            dense.save_pretrained(folder)
            AutoModelForCausalLM.from_pretrained(folder)
    except Exception as error:  # noqa: BLE001 - the dense model itself does not round-trip: outside the census
        return {"status": "skipped", "reason": "transformers does not reload the dense model as AutoModelForCausalLM: "
                                               f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
    calibration = torch.randint(3, vocab, (16, 32), generator=torch.Generator().manual_seed(1))
    errors: dict[str, list[float]] = {}
    for method in ("sparsegpt", "sparsellm"):
        try:
            row = _prune_and_check(config, dense, calibration, probe, method)
        except Exception as error:  # noqa: BLE001 - the census reports every failure as a row
            row = {"status": "error", "reason": f"{method}: {type(error).__name__}: {str(error).splitlines()[0][:200]}"}
        if "status" in row:
            return row
        errors[method] = row["errors"]
    ratios = [a / b for a, b in zip(errors["sparsellm"], errors["sparsegpt"]) if b > 0]
    return {"status": "ok", "reason": "", "ffn_error_ratio": sum(ratios) / len(ratios) if ratios else None,
            "adapter": type(get_adapter(dense)).__name__}


def _worker() -> None:
    import torch
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.set_num_threads(1)
    for line in sys.stdin:
        model_type = line.strip()
        row = census_one(model_type)
        print(json.dumps({"model_type": model_type, **row}), flush=True)


def _spawn() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "benchmarks.architecture_census", "--worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)


def run(types: list[str], timeout: float = TIMEOUT) -> dict[str, dict[str, Any]]:
    """Census rows by model type, one worker process at a time (restarted after a crash or a hang)."""
    import select

    rows: dict[str, dict[str, Any]] = {}
    worker = _spawn()
    for model_type in types:
        started = time.perf_counter()
        worker.stdin.write(model_type + "\n")
        worker.stdin.flush()
        ready, _, _ = select.select([worker.stdout], [], [], timeout)
        line = worker.stdout.readline() if ready else ""
        if line:
            row = json.loads(line)
            row.pop("model_type")
        else:
            worker.kill()
            worker = _spawn()
            row = {"status": "error", "reason": f"the worker crashed or ran past {timeout:.0f} s"}
        row.setdefault("ffn_error_ratio", None)
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows[model_type] = row
        print(f"{model_type}: {row['status']} {row.get('reason', '')[:100]}", flush=True)
    worker.stdin.close()
    worker.wait()
    return rows


def summary(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Counts over the census (skipped types are outside it)."""
    counted = {k: v for k, v in rows.items() if v["status"] != "skipped"}
    count = {s: sum(v["status"] == s for v in counted.values()) for s in ("ok", "refused", "error")}
    return {"architectures": len(counted), **count, "ok_fraction": count["ok"] / max(1, len(counted)),
            "skipped": sum(v["status"] == "skipped" for v in rows.values())}


def table() -> str:
    """The README's census table: counts, then every counted type with its status, reason and error ratio."""
    rows = json.loads((RESULTS / "architectures.json").read_text())
    meta = json.loads((RESULTS / "architectures_meta.json").read_text())
    s = summary(rows)
    lines = [f"{s['architectures']} decoder-only architectures (of {len(rows)} causal-LM types; {s['skipped']} skipped: "
             "not buildable offline at census size, not causal, or not reloadable by transformers itself): "
             f"**{s['ok']} ok ({s['ok_fraction']:.0%}), {s['refused']} refused, {s['error']} error**.", "",
             "| model type | status | sparsellm / sparsegpt FFN error | adapter or reason |", "|---|---|---:|---|"]
    for name, row in sorted(rows.items()):
        if row["status"] == "skipped":
            continue
        ratio = "" if row.get("ffn_error_ratio") is None else f"{row['ffn_error_ratio']:.2f}"
        detail = row.get("adapter", "") if row["status"] == "ok" else row["reason"].split(": ", 1)[-1][:110]
        lines.append(f"| {name} | {row['status']} | {ratio} | {detail} |")
    m = meta["meta"]
    return "\n".join(lines) + (f"\n\n_Source: `python -m benchmarks.architecture_census` at commit `{m['commit'][:12]}`, "
                               f"{m['date']}; transformers {m['versions']['transformers']}, {m['machine']['cpus']} CPUs._\n")


def main() -> None:
    """Run the census; write ``results/OUT.json`` (``{model_type: {status, reason, ffn_error_ratio, ...}}``)
    and ``results/OUT_meta.json`` (machine, commit, counts)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=None, help="comma-separated model types (default: every causal-LM type)")
    parser.add_argument("--out", default="architectures", help="results/OUT.json")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help=f"seconds per type (default {TIMEOUT})")
    parser.add_argument("--merge", action="store_true", help="update these types' rows in an existing results/OUT.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker()
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = args.types.split(",") if args.types else sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    rows = run(types, args.timeout)
    if args.merge and (RESULTS / f"{args.out}.json").exists():
        rows = {**json.loads((RESULTS / f"{args.out}.json").read_text()), **rows}
    print(json.dumps(summary(rows)))
    write_json(args.out, rows)
    write_json(args.out + "_meta", {"meta": metadata("benchmarks.architecture_census", 0), "summary": summary(rows)})


if __name__ == "__main__":
    main()
