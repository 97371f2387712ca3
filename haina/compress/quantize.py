"""`haina compress quantize`: a checkpoint whose block Linears hold int8 or int4 weights.

The layers and their storage are `haina.model.quant`'s; this module loads the float checkpoint (a LoRA
run's adapters merged into their base first, as `export hf` does), replaces the layers, and writes the
result through `haina.core.output` as a checkpoint directory like any other: model.safetensors (plain
integer tensors and bfloat16 scales), config.yaml with a `quantization` section, the tokenizer and
checksums. `load_model` reads that section and rebuilds the same layers.

What a method costs in quality is printed next to what it saves: the next-token agreement and KL divergence
between the float and the quantized model on a few windows of random tokens. That is a quick check that
nothing broke, not a measurement: perplexity on held-out text is `haina eval lm` (and benchmarks/compress.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from haina.core.errors import HainaError
from haina.core.log import info
from haina.model.quant import Method, QuantConfig, QuantLinear, check_group_size, quantizable, quantize_model

COMMAND = "compress quantize"
_PROBE_ROWS, _PROBE_TOKENS = 2, 128  # the random windows of the agreement check


def quantize_command(checkpoint: str, out: str, method: Method, group_size: int = 64, adapter: str | None = None,
                     overwrite: bool = False) -> None:
    """Quantize a checkpoint's block Linears to int8 or int4; the result loads wherever a checkpoint does.

    Every Linear inside the blocks (attention qkv and output projections, the MLP) is quantized; the
    embeddings, norms and the LM head stay in the checkpoint's float type. Prints the size saved and a quick
    check of the logits against the float model; measure perplexity with `haina eval lm` on the result.

    Args:
        checkpoint: a float checkpoint or run directory (a LoRA run: its adapters are merged into its base first).
        out: the checkpoint directory to write (an earlier `compress quantize` output there is replaced whole;
            anything else needs --overwrite).
        method: int8-weight (int8 weights, one scale per output channel), int8-dynamic (the same weights, and
            activations rounded to int8 per token at run time), or int4-weight (4-bit weights, a scale and zero
            per group of --group-size inputs).
        group_size: inputs per group of int4-weight: 32, 64, 128 or 256; it must divide every layer's inputs
            (unused by the int8 methods).
        adapter: LoRA adapters trained on --checkpoint, merged into it before quantizing.
        overwrite: replace an existing OUT that is not a `compress quantize` output (never the checkpoint itself).
    """
    from haina.core.output import check_output, output_dir
    from haina.model.checkpoint import load_model, load_quantization, resolve_checkpoint, save_model
    from haina.model.lora import has_lora, merge_lora

    cfg = QuantConfig(method=method, group_size=group_size if method == "int4-weight" else None)
    inputs = [p for p in (checkpoint, adapter) if p]
    check_output(out, COMMAND, inputs=inputs, overwrite=overwrite)  # before the model is loaded
    done = load_quantization(checkpoint)
    if done is not None:
        raise HainaError(f"{checkpoint} is already quantized ({_describe(done)}); quantize the float checkpoint it "
                         "was made from instead")
    model, tokenizer = load_model(checkpoint, adapter=adapter)
    if has_lora(model):
        merge_lora(model)
        info("the checkpoint is a LoRA run: its adapters are merged into the base before quantizing "
             "(haina finetune merge writes the merged float checkpoint)")
    check_group_size(model, cfg)
    float_bytes = sum(layer.weight.numel() * layer.weight.element_size() for _, layer in quantizable(model))
    probe = _probe_ids(model)
    with torch.no_grad():
        before = model(probe).float()
        names = quantize_model(model, cfg)
        after = model(probe).float()
    agree, kl = _agreement(before, after)
    int_bytes = sum(_stored_bytes(m) for m in model.modules() if isinstance(m, QuantLinear))
    source = {"checkpoint": str(resolve_checkpoint(checkpoint).resolve())}
    if adapter:
        source["adapter"] = str(Path(adapter).resolve())
    with output_dir(out, COMMAND, inputs=inputs, overwrite=overwrite) as tmp:
        save_model(tmp, model, tokenizer, extra_config={"quantization": cfg.to_dict(), "source": source})
        size = (tmp / "model.safetensors").stat().st_size
    dtype = str(model.tok_emb.weight.dtype).removeprefix("torch.")
    info(f"quantized {len(names)} Linears ({_describe(cfg)}): their weights {float_bytes / 2**20:.2f} -> "
         f"{int_bytes / 2**20:.2f} MiB ({float_bytes / max(int_bytes, 1):.1f}x smaller); embeddings, norms and the "
         f"LM head kept in {dtype}; model.safetensors {size / 2**20:.2f} MiB")
    info(f"on {_PROBE_ROWS} windows of {probe.shape[1]} random tokens: the next token agrees with the float model's "
         f"at {agree:.1%} of positions, mean KL {kl:.4f} nats (perplexity on real text: haina eval lm)")
    info(f"wrote {out}")


def _describe(cfg: QuantConfig) -> str:
    return cfg.method + (f", group size {cfg.group_size}" if cfg.group_size else "")


def _stored_bytes(layer: QuantLinear) -> int:
    """Bytes of a quantized layer's weight as stored: its integers, scales and zeros (not its bias)."""
    tensors = [layer.qweight, layer.scale] + ([layer.zero] if layer.zero is not None else [])
    return sum(t.numel() * t.element_size() for t in tensors)


def _probe_ids(model: nn.Module) -> torch.Tensor:
    """A fixed batch of random token ids, as long as the model's context allows (up to _PROBE_TOKENS)."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    device = model.tok_emb.weight.device
    return torch.randint(0, cfg.vocab_size, (_PROBE_ROWS, min(_PROBE_TOKENS, cfg.block_size)), generator=gen).to(device)


def _agreement(before: torch.Tensor, after: torch.Tensor) -> tuple[float, float]:
    """(share of positions with the same most likely token, mean KL(before || after) in nats)."""
    same = (before.argmax(-1) == after.argmax(-1)).float().mean()
    p, q = before.log_softmax(-1), after.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    return float(same), float(kl)


__all__ = ["COMMAND", "quantize_command"]
