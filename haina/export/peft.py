"""`haina export peft`: a LoRA adapter as a PEFT adapter directory for the `haina export hf` base.

The output is what `PeftModel.save_pretrained` writes (`adapter_config.json`,
`adapter_model.safetensors`), loadable with `PeftModel.from_pretrained(base, out)` where `base` is
the base checkpoint exported by `haina export hf`. No base weights are needed: the model config in
the adapter's `adapter_config.json` fixes the layout.

haina's adapters cover row ranges of its fused matrices; PEFT adapts whole `transformers` modules.
Each `transformers` module receives the haina adapters whose rows overlap it:

- Llama: q/k/v and gate/up are separate modules, so an adapter on `q` is `q_proj`'s adapter as is,
  and one on the whole fused `mlp.fc` splits into `gate_proj` and `up_proj` (same A, B's halves).
- GPT-2: `c_attn` stays fused, so adapters on q, k and v become one adapter of rank k·r: the A's
  stacked, B block-diagonal (zero blocks where a slice is not adapted), and `rank_pattern` /
  `alpha_pattern` give it the scale of rank r. PEFT's LoRA weights on a Conv1D are (r, in) and
  (out, r) like a Linear's; only the base weight is transposed (`fan_in_fan_out`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from haina.core.errors import HainaError
from haina.core.io import write_json
from haina.core.log import info
from haina.core.output import check_output, output_dir
from haina.model.config import ModelConfig
from haina.model.hf import hf_layout
from haina.model.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapter_state_dict,
    lora_fields,
    read_adapter,
    resolve_adapter,
)
from haina.model.transformer import Transformer

COMMAND = "export peft"


def _hf_modules(cfg: ModelConfig) -> list[tuple[str, str, str, tuple[int, int]]]:
    """(PEFT target name, module path in a transformers layer, haina module in a block, rows of the haina weight)."""
    if hf_layout(cfg) == "llama":
        hs, hidden = cfg.head_dim, cfg.ffn_dim
        q, kv = cfg.n_head * hs, cfg.kv_heads * hs
        return [("q_proj", "self_attn.q_proj", "attn.qkv", (0, q)),
                ("k_proj", "self_attn.k_proj", "attn.qkv", (q, q + kv)),
                ("v_proj", "self_attn.v_proj", "attn.qkv", (q + kv, q + 2 * kv)),
                ("o_proj", "self_attn.o_proj", "attn.proj", (0, cfg.n_embd)),
                ("gate_proj", "mlp.gate_proj", "mlp.fc", (0, hidden)),
                ("up_proj", "mlp.up_proj", "mlp.fc", (hidden, 2 * hidden)),
                ("down_proj", "mlp.down_proj", "mlp.proj", (0, cfg.n_embd))]
    # Both GPT-2 projections are named c_proj: their targets keep the parent so each can be chosen alone.
    c = cfg.n_embd
    return [("c_attn", "attn.c_attn", "attn.qkv", (0, 3 * c)), ("attn.c_proj", "attn.c_proj", "attn.proj", (0, c)),
            ("c_fc", "mlp.c_fc", "mlp.fc", (0, cfg.ffn_dim)), ("mlp.c_proj", "mlp.c_proj", "mlp.proj", (0, c))]


def to_peft(model: Transformer, lora: LoRAConfig,
            base_model: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """PEFT's adapter_config.json and adapter_model.safetensors tensors for an adapted haina model."""
    cfg = model.cfg
    layout = hf_layout(cfg)  # raises first if the architecture has no transformers equivalent
    prefix = "base_model.model." + ("model.layers" if layout == "llama" else "transformer.h")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for i, block in enumerate(model.blocks):
        for target, hf_path, path, (start, stop) in _hf_modules(cfg):
            layer = block.get_submodule(path)
            if not isinstance(layer, LoRALinear):
                continue
            # The adapters writing into rows start:stop; each covers them whole or lies inside them.
            parts = [p for p in layer.lora.values() if p.start < stop and start < p.stop]
            if not parts:
                continue
            A, B = [], []
            for p in parts:
                b = torch.zeros(stop - start, p.B.shape[1], dtype=p.B.dtype)
                lo, hi = max(start, p.start), min(stop, p.stop)
                b[lo - start:hi - start] = p.B.detach().cpu()[lo - p.start:hi - p.start]
                A.append(p.A.detach().cpu())
                B.append(b)
            name = f"{prefix}.{i}.{hf_path}"
            tensors[f"{name}.lora_A.weight"] = torch.cat(A).contiguous()  # (k·r, in)
            tensors[f"{name}.lora_B.weight"] = torch.cat(B, dim=1).contiguous()  # (out, k·r), block-diagonal
            if ranks.setdefault(target, len(parts)) != len(parts):
                raise HainaError(f"blocks of this adapter differ in what they adapt ({target}); it cannot be written "
                                 "as one PEFT config")
    # A module fed by k adapters has rank k·r; its alpha is chosen so PEFT's scale equals haina's for rank r.
    grow = {t: k for t, k in ranks.items() if k > 1}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.r, "lora_alpha": _num(lora.alpha),
              "lora_dropout": lora.dropout, "target_modules": sorted(ranks), "bias": "none",
              "use_rslora": lora.rslora, "fan_in_fan_out": layout == "gpt2", "base_model_name_or_path": base_model,
              "rank_pattern": {t: k * lora.r for t, k in grow.items()},
              "alpha_pattern": {t: _num(lora.alpha * (math.sqrt(k) if lora.rslora else k)) for t, k in grow.items()},
              "modules_to_save": None, "init_lora_weights": True, "inference_mode": True, "use_dora": False,
              "layers_to_transform": None, "layers_pattern": None, "revision": None}
    return config, tensors


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def export_peft(adapter: str | Path, out: str | Path, *, base_model: str | None = None,
                overwrite: bool = False) -> Path:
    """Write the LoRA adapter in directory `adapter` as a PEFT adapter directory `out`; returns `out`.

    Args:
        adapter: a directory holding adapter.safetensors + adapter_config.json.
        out: the directory to create (an existing one is replaced only if it is an earlier `export peft` output).
        base_model: recorded as PEFT's base_model_name_or_path (the exported base's name or path); None for none.
        overwrite: replace an existing `out` of any other kind (never one overlapping `adapter`).
    """
    data, weights = read_adapter(adapter)
    cfg, lora = ModelConfig.from_dict(data["model"]), LoRAConfig.from_dict(lora_fields(data))
    hf_layout(cfg)
    # The layout on the meta device (no memory): checks the tensors' names and shapes and gives every adapter's rows.
    with torch.device("meta"):
        model = Transformer(cfg)
    apply_lora(model, lora)
    dtype = next(iter(weights.values())).dtype  # written as stored (a bfloat16 adapter stays bfloat16)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora.to_empty(device="cpu").to(dtype)
    load_adapter_state_dict(model, weights, where=str(Path(adapter) / "adapter.safetensors"))
    config, tensors = to_peft(model, lora, base_model)
    with output_dir(out, COMMAND, inputs=[adapter], overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt", "producer": "haina"})
        write_json(tmp / "adapter_config.json", config)
    return Path(out)


def export_peft_command(checkpoint: str, out: str, base_model: str | None = None, overwrite: bool = False) -> None:
    """Export a LoRA adapter as a PEFT adapter directory (adapter_config.json + adapter_model.safetensors).

    Load it on the base exported by `haina export hf`: PeftModel.from_pretrained(
    AutoModelForCausalLM.from_pretrained(BASE), OUT). Llama-layout adapters map to q_proj, k_proj, ... and
    GPT-2-layout ones to c_attn, c_proj, c_fc; the computation is the same as haina's.

    Args:
        checkpoint: a LoRA checkpoint directory (adapter.safetensors + adapter_config.json) or a LoRA training run
            directory (its best checkpoint).
        out: the directory to write (an earlier `export peft` output there is replaced whole; anything else needs
            --overwrite).
        base_model: the Hugging Face name or path of the exported base, recorded as base_model_name_or_path.
        overwrite: replace an existing OUT that is not an `export peft` output (never one that is, holds or lies
            inside the checkpoint).
    """
    check_output(out, COMMAND, inputs=[checkpoint], overwrite=overwrite)  # before reading anything
    adapter = resolve_adapter(checkpoint)
    export_peft(adapter, out, base_model=base_model, overwrite=overwrite)
    info(f"exported the LoRA adapter of {adapter} as a PEFT adapter to {out}")
