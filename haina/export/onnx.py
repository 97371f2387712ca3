"""`haina export onnx`: a decoder graph with its KV cache for ONNX Runtime, the tokenizer, and how to call it.

The graph is traced from the model's own layers with `torch.onnx.export(dynamo=True)`: `DecoderGraph` hands the
Transformer a cache object whose past keys and values are the graph's inputs and whose updated ones are its outputs,
so attention, rope, norms and MLPs are exactly the code haina runs (nothing is re-implemented for the export).

    inputs   input_ids (batch, sequence) int64
             past_key.{i}, past_value.{i} (batch, kv_heads, past_length, head_dim) for every layer i
    outputs  logits (batch, sequence, vocab) float32
             present_key.{i}, present_value.{i} (batch, kv_heads, past_length + sequence, head_dim)

A prefill passes a past of length 0; each decode step passes the last token and the presents of the step before.
Token t of the input has position past_length + t (computed in the graph), and attention is causal over the past
and the new tokens; there is no padding mask, so the rows of a batch share one length. `haina_onnx.json`
(`haina.generate.onnx_backend`, which reads it) records the names, layout, element type and special tokens.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from haina.core.errors import HainaError
from haina.core.io import write_json
from haina.core.log import info
from haina.core.output import check_output, output_dir
from haina.generate.onnx_backend import FORMAT, FORMAT_VERSION, SPEC_FILE, OnnxDecoder
from haina.model.config import require_causal
from haina.model.layers import MLP, Attention, Block, RMSNorm
from haina.model.transformer import Transformer
from haina.tokenizer import Tokenizer

__all__ = ["COMMAND", "DecoderGraph", "check_exportable", "export_onnx", "export_onnx_command"]

COMMAND = "export onnx"  # the name in the manifest of its outputs
MODEL_FILE = "model.onnx"
MIN_OPSET = 18  # the first opset with the reductions (ReduceMean's axes as an input) torch.onnx's library emits
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Exact types only: a subclass or a replacement (a quantized or adapter layer) may compute something the trace
# would capture wrongly or not at all, and is named in the error instead.
_KNOWN = (Transformer, nn.ModuleList, Block, Attention, MLP, nn.Embedding, nn.Linear, nn.LayerNorm, RMSNorm)


class _TensorCache:
    """The `KVCacheLike` of the graph: past keys/values come in as tensors, the concatenated ones go out.

    Keys visible to query t of the new tokens are those at positions <= past_length + t: the whole past and the new
    tokens causally. The mask (1, 1, T, S) is built once per call and shared by the layers.
    """

    def __init__(self, past_k: tuple[torch.Tensor, ...], past_v: tuple[torch.Tensor, ...], mask: torch.Tensor):
        self.past_k, self.past_v, self.mask = past_k, past_v, mask
        self.present_k: list[torch.Tensor] = []
        self.present_v: list[torch.Tensor] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = torch.cat([self.past_k[layer], k], dim=2)  # (B, nkv, P + T, hs)
        v = torch.cat([self.past_v[layer], v], dim=2)
        self.present_k.append(k)
        self.present_v.append(v)
        return k, v, self.mask


class DecoderGraph(nn.Module):
    """What is exported: (input_ids, past keys of every layer, past values of every layer) -> (logits, presents).

    Args:
        model: the Transformer (its layers are called, not copied).
    """

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        self.n_layer = model.cfg.n_layer

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """input_ids (B, T) and 2·layers past tensors (B, nkv, P, hs) -> logits (B, T, V) float32 and the presents."""
        B, T = input_ids.shape
        P = past[0].shape[2]
        query_pos = torch.arange(T, device=input_ids.device) + P  # (T,)
        keys = torch.arange(P + T, device=input_ids.device)
        mask = (keys[None, :] <= query_pos[:, None])[None, None]  # (1, 1, T, S)
        cache = _TensorCache(past[:self.n_layer], past[self.n_layer:], mask)
        h = self.model.hidden_states(input_ids, positions=query_pos.expand(B, T), cache=cache)
        # Float32 logits whatever the weights: sampling and log-probabilities want them, as haina's engine does.
        return (self.model.lm_head(h).float(), *cache.present_k, *cache.present_v)


def io_names(n_layer: int) -> tuple[list[str], list[str]]:
    """The graph's input and output names, in the order of `DecoderGraph.forward`."""
    past = [f"past_key.{i}" for i in range(n_layer)] + [f"past_value.{i}" for i in range(n_layer)]
    present = [f"present_key.{i}" for i in range(n_layer)] + [f"present_value.{i}" for i in range(n_layer)]
    return ["input_ids", *past], ["logits", *present]


def check_exportable(model: nn.Module) -> None:
    """A one-line HainaError unless the model is a plain haina Transformer the graph can express."""
    if not isinstance(model, Transformer):
        raise HainaError(f"cannot export a {type(model).__name__} to ONNX; the export takes a haina Transformer (a "
                         "decoder checkpoint)")
    require_causal(model.cfg, "haina export onnx (a decoder graph with a KV cache)", "this checkpoint")
    for name, module in model.named_modules():
        if type(module) not in _KNOWN:
            what = "LoRA adapters (merge them first: haina.model.lora.merge_lora)" if "LoRA" in type(module).__name__ \
                else f"a {type(module).__name__} layer"
            raise HainaError(f"the model holds {what} at {name}, which the ONNX export cannot express; export the "
                             "plain (unquantized, merged) checkpoint")
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if type(t.data) is not torch.Tensor or not t.is_floating_point():
            raise HainaError(f"{name} is a {type(t.data).__name__} of {t.dtype}, which the ONNX export cannot express "
                             "(a quantized checkpoint?); export the plain floating-point checkpoint")


def export_onnx(model: Transformer, tokenizer: Tokenizer | None, out: str | Path,
                dtype: Literal["float32", "float16", "bfloat16"] = "float32", *, opset: int = MIN_OPSET,
                overwrite: bool = False, inputs: tuple[str | Path, ...] = (), source: dict | None = None) -> Path:
    """Write the decoder graph of `model`, its tokenizer and haina_onnx.json into `out`, atomically; returns `out`.

    The written graph is run once with ONNX Runtime against the model before `out` is swapped in (float32 and
    float16; ONNX Runtime's CPU provider has no bfloat16 kernels, so a bfloat16 graph is only checked by onnx).

    Args:
        model: the Transformer to export (a copy is cast when `dtype` differs from its own).
        tokenizer: saved into `out/tokenizer`; None to export the graph alone.
        out: the directory to create (an earlier `export onnx` output there is replaced whole).
        dtype: element type of the weights and of the cache tensors; logits are float32 always.
        opset: the ONNX opset, at least 18.
        overwrite: replace an existing `out` of any other kind (never one overlapping `inputs`).
        inputs: where the model came from; `out` may never be, hold or lie inside them.
        source: recorded in haina_onnx.json (the checkpoint and adapter it was made from).
    """
    onnx = _require_onnx()
    if dtype not in DTYPES:
        raise HainaError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise HainaError(f"--opset {opset} is not supported; use {MIN_OPSET} to {onnx.defs.onnx_opset_version()}")
    check_exportable(model)
    cfg = model.cfg
    if cfg.block_size < 4:
        raise HainaError(f"the model's context of {cfg.block_size} tokens is too short to trace with dynamic lengths "
                         "(at least 4)")
    check_output(out, COMMAND, inputs=inputs, overwrite=overwrite)
    if next(model.parameters()).dtype != DTYPES[dtype] or next(model.parameters()).device.type != "cpu":
        model = copy.deepcopy(model).to(device="cpu", dtype=DTYPES[dtype])
    model.eval()
    t0 = time.perf_counter()
    program = _trace(DecoderGraph(model), opset)
    with output_dir(out, COMMAND, inputs=inputs, overwrite=overwrite) as tmp:
        # Weights go inside the .onnx file up to protobuf's 2 GiB; beyond it, into model.onnx.data beside it.
        program.save(str(tmp / MODEL_FILE))
        onnx.checker.check_model(str(tmp / MODEL_FILE))
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        write_json(tmp / SPEC_FILE, _spec(model, tokenizer, dtype, opset, tmp, source))
        if dtype == "bfloat16":
            info("bfloat16 graph written and checked with onnx; ONNX Runtime's CPU provider cannot run it (no bfloat16 "
                 "kernels), so it was not run")
        else:
            err = _verify(tmp, model)
            info(f"checked with ONNX Runtime: logits within {err:.1e} of the model's")
    info(f"exported the decoder graph ({cfg.n_layer} layers, {dtype}, opset {opset}) in "
         f"{time.perf_counter() - t0:.0f} s to {out}")
    return Path(out)


def _require_onnx():
    try:
        import onnx
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise HainaError(f"haina export onnx needs onnx, onnxscript and onnxruntime ({e.name} is missing): "
                         "pip install 'haina[export]'") from None
    return onnx


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's chatter (warnings, log lines about optional packages) for the duration."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _trace(graph: DecoderGraph, opset: int):
    """The ONNXProgram of `graph` with dynamic batch, sequence and past length."""
    cfg = graph.model.cfg
    # Sample sizes of at least 2 (torch.export specializes sizes 0 and 1) that fit learned positions: 2 + 2 <= 4.
    B, T = 2, 2
    P = min(3, cfg.block_size - T)
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    dtype = next(graph.parameters()).dtype
    past = tuple(torch.zeros(B, cfg.kv_heads, P, cfg.head_dim, dtype=dtype) for _ in range(2 * cfg.n_layer))
    batch, seq, past_len = (torch.export.Dim(n) for n in ("batch", "sequence", "past_length"))
    shapes = {"input_ids": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past_len} for _ in past)}
    names_in, names_out = io_names(cfg.n_layer)
    try:
        with _quiet(), torch.no_grad():
            return torch.onnx.export(graph, (ids, *past), None, input_names=names_in, output_names=names_out,
                                     dynamic_shapes=shapes, opset_version=opset, dynamo=True, verbose=False)
    except Exception as e:  # the exporter's own error types; the first line says what it could not translate
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise HainaError(f"torch.onnx could not export this model ({first[:200]}); report it with --debug's "
                         "traceback") from e


def _spec(model: Transformer, tokenizer: Tokenizer | None, dtype: str, opset: int, tmp: Path,
          source: dict | None) -> dict:
    """haina_onnx.json: everything a runtime needs to call the graph, read by haina.generate.onnx_backend."""
    cfg = model.cfg
    names_in, names_out = io_names(cfg.n_layer)
    L = cfg.n_layer
    cache_shape = ["batch", cfg.kv_heads, "past_length", cfg.head_dim]
    return {
        "format": FORMAT, "version": FORMAT_VERSION,
        "model": MODEL_FILE,
        "external_data": sorted(p.name for p in tmp.iterdir() if p.name.startswith(MODEL_FILE + ".")),
        "opset": opset, "dtype": dtype,
        "vocab_size": cfg.vocab_size, "context_length": cfg.block_size,
        "n_layer": L, "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "inputs": {"input_ids": names_in[0],
                   "shapes": {"input_ids": ["batch", "sequence"], "past": cache_shape},
                   "dtypes": {"input_ids": "int64", "past": dtype}},
        "outputs": {"logits": names_out[0],
                    "shapes": {"logits": ["batch", "sequence", cfg.vocab_size],
                               "present": ["batch", cfg.kv_heads, "past_length + sequence", cfg.head_dim]},
                    "dtypes": {"logits": "float32", "present": dtype}},
        "cache": {"key_inputs": names_in[1:1 + L], "value_inputs": names_in[1 + L:],
                  "key_outputs": names_out[1:1 + L], "value_outputs": names_out[1 + L:],
                  "layout": "(batch, kv_heads, past_length, head_dim) per layer; keys after rotary embedding",
                  "prefill": "past tensors of past_length 0",
                  "decode": "feed present_key.{i} / present_value.{i} back as past_key.{i} / past_value.{i}"},
        "positions": "not an input: token t of input_ids has position past_length + t; attention is causal over "
                     "the past and the new tokens, with no padding mask (the rows of a batch share one length)",
        "tokenizer": "tokenizer" if tokenizer is not None else None,
        "eos_token_id": tokenizer.eos_id if tokenizer is not None else None,
        "bos_token_id": tokenizer.bos_id if tokenizer is not None else None,
        "architecture": cfg.to_dict(),
        "source": source or {},
    }


def _verify(tmp: Path, model: Transformer) -> float:
    """Run the written graph (a prefill, then one decode step) and compare its logits with the model's."""
    decoder = OnnxDecoder(tmp, device="cpu")
    cfg = model.cfg
    seq = torch.randint(0, cfg.vocab_size, (1, min(6, cfg.block_size)), generator=torch.Generator().manual_seed(0))
    first, cache = decoder(seq[:, :-1].numpy(), decoder.empty_cache(1))
    last, _ = decoder(seq[:, -1:].numpy(), cache)
    got = torch.from_numpy(np.concatenate([first, last], axis=1))
    with torch.no_grad():
        want = model(seq).float()
    err = (got - want).abs().max().item()
    # float16 rounds each of its ~10 mantissa bits; the two runtimes order their sums differently.
    tol = (1e-3 if model.lm_head.weight.dtype == torch.float32 else 5e-2) * (1 + want.abs().max().item())
    if not err <= tol:
        raise HainaError(f"the exported graph's logits differ from the model's by {err:.3g} (tolerance {tol:.3g}); "
                         "nothing was written, please report this model's config")
    return err


def export_onnx_command(checkpoint: str, out: str, dtype: Literal["float32", "float16", "bfloat16"] = "float32",
                        adapter: str | None = None, opset: int = MIN_OPSET, overwrite: bool = False) -> None:
    """Export a checkpoint as an ONNX decoder graph with its KV cache, for ONNX Runtime.

    Writes model.onnx (dynamic batch, sequence and past length), the tokenizer, and haina_onnx.json, which says
    how to call the graph (input and output names, cache layout, dtype, special tokens). Run it with
    `haina generate --backend onnxruntime --checkpoint OUT`.

    Args:
        checkpoint: a checkpoint directory or a training run directory (its best checkpoint); a LoRA run's
            adapters are merged into the exported weights.
        out: the directory to write (an earlier `export onnx` output there is replaced whole; anything else needs
            --overwrite).
        dtype: element type of the graph's weights and cache (float16 halves it; ONNX Runtime's CPU provider
            cannot run bfloat16).
        adapter: a LoRA run or checkpoint directory trained on --checkpoint, merged into the exported weights.
        opset: the ONNX opset version, 18 or newer.
        overwrite: replace an existing OUT that is not an `export onnx` output (never one that is, holds or lies
            inside the checkpoint).
    """
    from haina.model.checkpoint import load_model
    from haina.model.lora import has_lora, merge_lora

    _require_onnx()
    if dtype not in DTYPES:
        raise HainaError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    if opset < MIN_OPSET:
        raise HainaError(f"--opset {opset} is too old for this export; use {MIN_OPSET} or newer")
    if adapter is not None and not Path(adapter).exists():
        raise HainaError(f"--adapter {adapter} not found; point it at a LoRA run or checkpoint directory")
    inputs = tuple(p for p in (checkpoint, adapter) if p is not None)
    check_output(out, COMMAND, inputs=inputs, overwrite=overwrite)  # before loading the model
    model, tokenizer = load_model(checkpoint, adapter=adapter)  # as stored: merged before any cast
    if has_lora(model):
        with torch.no_grad():
            merge_lora(model)
        info("the LoRA adapters are merged into the exported weights")
    if tokenizer is None:
        info("the checkpoint has no tokenizer: exporting the graph only (generate needs one)")
    source = {"checkpoint": str(Path(checkpoint).resolve()),
              "adapter": str(Path(adapter).resolve()) if adapter is not None else None}
    export_onnx(model, tokenizer, out, dtype, opset=opset, overwrite=overwrite, inputs=inputs, source=source)
