"""LoRA: low-rank adapters on the Transformer's Linear layers, their files, and merging them back.

An adapted Linear keeps its frozen weight W and adds, for each targeted range of output rows,
`scale · B @ A` with A (r, in) and B (rows, r); B starts at zero, so a fresh adapter changes nothing.
haina fuses q/k/v into `attn.qkv` and SwiGLU's gate/up into `mlp.fc`, so an adapter may cover a
slice of a fused matrix: targeting `q` adds a delta to the query rows only, exactly as a LoRA on a
separate `q_proj` would, which is what lets `haina.export.peft` write PEFT's format without loss.

Target names (`LoRAConfig.targets`) and what they adapt in every block:

    q, k, v     the query / key / value rows of attn.qkv (one adapter each); qkv = q, k, v
    o           attn.proj
    gate, up    the two halves of SwiGLU's mlp.fc (one adapter each)
    fc          the whole mlp.fc as one adapter (for SwiGLU: gate and up together)
    down        mlp.proj;  proj = attn.proj and mlp.proj (GPT-2's c_proj naming)
    all         q, k, v, o, down and gate, up (SwiGLU) or fc: one adapter per projection, as Llama names them

The LM head and the embeddings are never adapted. An adapter directory (inside a training
checkpoint) holds `adapter.safetensors` (the A and B tensors, e.g. `blocks.0.attn.qkv.lora.q.A`)
and `adapter_config.json` (the LoRA config, the model config, and a hash of the base weights it was
trained on, so it is never applied to another base by mistake).

Training and single-adapter inference use `LoRALinear`. A server holding several adapters on one base
uses `load_adapters`: its `MultiLoRALinear` layers stack every adapter's A and B and add, per batch
row, the delta of the adapter an `AdapterSelection` names for that row, so requests for different
adapters share a batch.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from haina.core.checksums import verify_checksums
from haina.core.config import from_dict, to_dict
from haina.core.errors import HainaError
from haina.core.io import atomic_path, read_json, write_json
from haina.core.log import info
from haina.model.checkpoint import WEIGHTS, read_weights, resolve_checkpoint
from haina.model.config import ModelConfig
from haina.model.transformer import Transformer

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "haina-lora/1"
TARGETS = ("q", "k", "v", "qkv", "o", "gate", "up", "fc", "down", "proj", "all")
_MARK = ".lora."  # in the state-dict name of every adapter tensor, and of no base tensor

Range = tuple[int, int]  # output rows [start, stop) of a Linear's weight


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Low-rank adaptation; `r = 0` turns it off (full fine-tuning).

    Args:
        r: rank of every adapter; 0 = no LoRA.
        alpha: the update is scaled by alpha / r (alpha / sqrt(r) with rslora).
        dropout: dropout on an adapter's input during training.
        targets: what to adapt in every block (see the module docstring); a comma-separated string is accepted.
        rslora: rank-stabilized scaling, alpha / sqrt(r), so larger ranks do not shrink the update.
    """

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("all",)
    rslora: bool = False

    def __post_init__(self) -> None:
        targets = self.targets.split(",") if isinstance(self.targets, str) else self.targets
        # Normalized here too (not only by from_dict), so LoRAConfig(targets="q,v") in Python means the same.
        targets = tuple(dict.fromkeys(str(t).strip() for t in targets if str(t).strip()))
        object.__setattr__(self, "targets", targets)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
            raise HainaError(f"lora.r must be a non-negative integer (0 turns LoRA off), got {self.r!r}")
        if not self.alpha > 0:
            raise HainaError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise HainaError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not targets:
            raise HainaError(f"lora.targets is empty; name what to adapt from {', '.join(TARGETS)}")
        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            raise HainaError(f"lora.targets: unknown target '{unknown[0]}'; choose from {', '.join(TARGETS)}")

    @property
    def scale(self) -> float:
        """The factor on B @ A; 0 when LoRA is off."""
        if self.r == 0:
            return 0.0
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    @classmethod
    def from_dict(cls, data: dict) -> LoRAConfig:
        return from_dict(cls, data, where="lora.")

    def to_dict(self) -> dict:
        return to_dict(self)


# ---------------------------------------------------------------------------------------- which rows
def lora_plan(cfg: ModelConfig, targets: tuple[str, ...]) -> dict[str, dict[str, Range]]:
    """What `targets` adapt in each block: module name in the block -> {adapter name: output rows}.

    Raises HainaError when no target applies to this architecture (`gate` on a GELU model, say).
    """
    hs, swiglu = cfg.head_dim, cfg.mlp == "swiglu"
    q, kv, hidden = cfg.n_head * hs, cfg.kv_heads * hs, cfg.ffn_dim
    rows = {"q": ("attn.qkv", (0, q)), "k": ("attn.qkv", (q, q + kv)), "v": ("attn.qkv", (q + kv, q + 2 * kv)),
            "o": ("attn.proj", (0, cfg.n_embd)), "fc": ("mlp.fc", (0, 2 * hidden if swiglu else hidden)),
            "down": ("mlp.proj", (0, cfg.n_embd))}
    if swiglu:  # gate first, as layers.activate chunks it
        rows |= {"gate": ("mlp.fc", (0, hidden)), "up": ("mlp.fc", (hidden, 2 * hidden))}
    groups = {"qkv": ("q", "k", "v"), "proj": ("o", "down"),
              "all": ("q", "k", "v", "o", *(("gate", "up") if swiglu else ("fc",)), "down")}
    plan: dict[str, dict[str, Range]] = {}
    for target in targets:
        for name in groups.get(target, (target,)):
            if name in rows:
                module, span = rows[name]
                # o, down and fc adapt a whole matrix: one adapter, keyed "all".
                whole = name in ("o", "down", "fc")
                plan.setdefault(module, {})["all" if whole else name] = span
    for parts in plan.values():
        if "all" in parts and len(parts) > 1:  # `fc` named with gate/up: one adapter for the whole matrix
            for name in [p for p in parts if p != "all"]:
                del parts[name]
    if not plan:
        names = [t for t in TARGETS if t in rows or t in groups]
        raise HainaError(f"--lora.targets={','.join(targets)} names no module of this model; choose from "
                         f"{', '.join(names)}")
    return plan


# ---------------------------------------------------------------------------------------- layers
class LoRAPart(nn.Module):
    """One adapter: rows start:stop of a Linear's output gain scale · B @ A · x."""

    def __init__(self, in_features: int, span: Range, r: int, *, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.start, self.stop = span
        self.A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(self.stop - self.start, r, device=device, dtype=dtype))
        # PEFT's initialization (nn.Linear's default for A, B = 0): a fresh adapter is an exact no-op.
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return f"rows={self.start}:{self.stop}, r={self.A.shape[0]}"


class LoRALinear(nn.Linear):
    """A Linear plus low-rank adapters on ranges of its output rows.

    The weight and bias are the replaced Linear's own Parameter objects, so their state-dict names
    stay `...qkv.weight` and a base checkpoint loads into the adapted model unchanged.
    """

    def __init__(self, base: nn.Linear, parts: dict[str, Range], *, r: int, scale: float, dropout: float = 0.0):
        # Built on the meta device: nothing is allocated for the weight that is replaced at once by the base's.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.scale, self.dropout = scale, dropout
        w = base.weight
        self.lora = nn.ModuleDict({name: LoRAPart(base.in_features, span, r, device=w.device, dtype=w.dtype)
                                   for name, span in parts.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        h = F.dropout(x, self.dropout) if self.training and self.dropout else x
        for part in self.lora.values():
            # Into the part's rows in place: no full-width zero-padded delta is built. Safe under autograd,
            # since F.linear's backward does not need its output.
            y[..., part.start:part.stop].add_(F.linear(F.linear(h, part.A), part.B), alpha=self.scale)
        return y

    def delta(self) -> torch.Tensor:
        """scale · B @ A for every part, as a (out, in) float32 matrix to add to the weight."""
        d = torch.zeros(self.out_features, self.in_features, device=self.weight.device, dtype=torch.float32)
        for part in self.lora.values():
            d[part.start:part.stop] += self.scale * (part.B.float() @ part.A.float())
        return d


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def apply_lora(model: Transformer, cfg: LoRAConfig) -> list[str]:
    """Replace the targeted Linears of every block with LoRALinears and freeze all base parameters.

    Only the adapters' A and B stay trainable. Returns the names of the adapted modules.
    """
    if cfg.r < 1:
        raise HainaError("LoRA is off (lora.r=0); set lora.r to the adapter rank, e.g. --lora.r=8")
    from haina.model.lora_serving import adapter_selection  # it builds on this module

    if has_lora(model) or adapter_selection(model) is not None:
        raise HainaError("the model already has LoRA adapters; apply LoRA once, or merge_lora first")
    plan = lora_plan(model.cfg, cfg.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for i, block in enumerate(model.blocks):
        for path, parts in plan.items():
            parent_name, attr = path.split(".")
            parent = getattr(block, parent_name)
            old = getattr(parent, attr)
            new = LoRALinear(old, parts, r=cfg.r, scale=cfg.scale, dropout=cfg.dropout)
            # A new module starts in training mode; it must follow the model's (no adapter dropout in eval).
            setattr(parent, attr, new.train(old.training))
            names.append(f"blocks.{i}.{path}")
    return names


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its weight (W[rows] += scale · B @ A) and put plain Linears back, in place.

    The merged model computes what the adapted one did, with no adapter overhead; its parameters keep the
    requires_grad flags they had (frozen after `apply_lora`).
    """
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, LoRALinear):
                module.weight.add_(module.delta().to(module.weight.dtype))
                plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                  device="meta")
                plain.weight, plain.bias = module.weight, module.bias
                plain.train(module.training)
                parent_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent_name), attr, plain)
    return model


# ---------------------------------------------------------------------------------------- state
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only (`blocks.0.attn.qkv.lora.q.A`, ...), detached."""
    return {k: v.detach() for k, v in model.state_dict().items() if _MARK in k}


def load_adapter_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], where: str = "the adapter") -> None:
    """Copy adapter tensors into an adapted model; every name and shape must match (strict)."""
    expected = adapter_state_dict(model)
    check_adapter_layout({k: tuple(v.shape) for k, v in expected.items()}, sd, where)
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(sd[k])


def check_adapter_layout(expected: dict[str, tuple[int, ...]], sd: dict[str, torch.Tensor], where: str) -> None:
    """One line naming the first missing, unexpected or misshapen tensor of `sd` against `expected` shapes."""
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected else \
            f"{wrong[0]} is {tuple(sd[wrong[0]].shape)}, the model expects {expected[wrong[0]]}"
        raise HainaError(f"{where} does not fit this model's LoRA layout ({detail}); load it with the "
                         "adapter_config.json saved beside it")


def adapter_layout(model: Transformer, plan: dict[str, dict[str, Range]], r: int) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the tensors an adapter of rank r with this plan holds for `model`."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i, block in enumerate(model.blocks):
        for module, parts in plan.items():
            in_features = block.get_submodule(module).in_features
            for name, (start, stop) in parts.items():
                prefix = f"blocks.{i}.{module}.lora.{name}."
                shapes[prefix + "A"], shapes[prefix + "B"] = (r, in_features), (stop - start, r)
    return shapes


def base_weights_hash(model: Transformer) -> str:
    """sha256 over the base weights' names, shapes and values, rounded to bfloat16.

    Rounding to bfloat16 makes the hash the same whether the base is held in float32 or bfloat16 (a model
    trained in float32 and served in bfloat16 is the same base); any other base differs in far more than
    rounding, so it is still told apart.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.weights().items()):
        if _MARK in name:
            continue
        h.update(f"{name}:{tuple(t.shape)};".encode())
        t = t.detach()
        if t.is_floating_point():
            t = t.to(torch.bfloat16).view(torch.int16)  # numpy has no bfloat16; the bits are what is hashed
        h.update(t.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- files
def save_adapter(out_dir: str | Path, model: Transformer, cfg: LoRAConfig, *, base_hash: str,
                 base: str | Path | None = None) -> None:
    """Write `adapter.safetensors` and `adapter_config.json` into `out_dir`, each atomically, config last.

    Args:
        out_dir: the directory (a training checkpoint); created if needed.
        model: the adapted model.
        cfg: the LoRA config it was adapted with.
        base_hash: `base_weights_hash` of the base, computed before training changed anything.
        base: where the base model came from, named in messages about a mismatch.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    if not weights:
        raise HainaError("the model has no LoRA adapters to save; apply_lora first")
    with atomic_path(out / ADAPTER_WEIGHTS) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt", "producer": "haina"})
    write_json(out / ADAPTER_CONFIG, {"format": FORMAT, **cfg.to_dict(), "base_hash": base_hash,
                                      "base": None if base is None else str(base), "model": model.cfg.to_dict()})


def is_adapter_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / ADAPTER_WEIGHTS).is_file() and (path / ADAPTER_CONFIG).is_file()


def resolve_adapter(path: str | Path, which: Literal["best", "latest"] = "best") -> Path:
    """An adapter directory from itself or from a run directory, found as `resolve_checkpoint` finds checkpoints."""
    ckpt = resolve_checkpoint(path, which)  # one line for a missing path, a file, a damaged index, nothing inside
    if is_adapter_dir(ckpt):
        return ckpt
    if (ckpt / WEIGHTS).is_file():
        raise HainaError(f"{ckpt} is a full checkpoint without a LoRA adapter (trained with lora.r=0); "
                         "export it with `haina export hf`")
    raise HainaError(f"{ckpt} holds {ADAPTER_WEIGHTS} but no {ADAPTER_CONFIG}; copy the whole LoRA checkpoint "
                     "directory")


def read_adapter_config(path: str | Path) -> dict:
    """The checked `adapter_config.json` of adapter directory `path`.

    `LoRAConfig.from_dict(lora_fields(data))` and `ModelConfig.from_dict(data["model"])` cannot fail on what it
    returns; a missing, damaged or foreign file is a one-line HainaError.
    """
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise HainaError(f"{path} has no {ADAPTER_CONFIG}; point at a LoRA checkpoint directory")
    data = read_json(file, "the adapter's config is damaged; copy the checkpoint again", expect=dict)
    if data.get("format") != FORMAT:
        raise HainaError(f"{file} is not a haina LoRA adapter config (format {data.get('format')!r}, "
                         f"expected '{FORMAT}')")
    if not isinstance(data.get("base_hash"), str) or not isinstance(data.get("base"), (str, type(None))):
        raise HainaError(f"{file} has no 'base_hash' string (or a 'base' that is not a path); the file is damaged")
    if not isinstance(data.get("model"), dict):
        raise HainaError(f"{file} has no 'model' mapping; the file is damaged")
    try:
        LoRAConfig.from_dict(lora_fields(data))
        ModelConfig.from_dict(data["model"])
    except HainaError as e:
        raise HainaError(f"{file}: {e}") from None
    return data


def lora_fields(data: dict) -> dict:
    """The LoRAConfig fields of an adapter config (which also holds the hash and the model config)."""
    return {f.name: data[f.name] for f in fields(LoRAConfig) if f.name in data}


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter directory's checked config and its tensors (checksums verified when the checkpoint has them)."""
    path = Path(path)
    verify_checksums(path, only=(ADAPTER_CONFIG, ADAPTER_WEIGHTS))
    data = read_adapter_config(path)
    return data, read_weights(path / ADAPTER_WEIGHTS)


def load_adapter(model: Transformer, path: str | Path, *, check_base: bool = True) -> LoRAConfig:
    """Apply the LoRA recorded in adapter directory `path` to `model` and load its weights; returns its config.

    With `check_base`, a model whose config or weights differ from the base the adapter was trained on is
    refused: the adapter would load but compute nonsense.
    """
    path = Path(path)
    data, weights = read_adapter(path)
    if check_base:
        check_adapter_base(model, data, path, {})
    cfg = LoRAConfig.from_dict(lora_fields(data))
    apply_lora(model, cfg)
    load_adapter_state_dict(model, weights, where=str(path / ADAPTER_WEIGHTS))
    return cfg


def check_adapter_base(model: Transformer, data: dict, path: Path, hashes: dict[str, str]) -> None:
    """Refuse an adapter (its checked config `data`) trained on another base; `hashes` keeps the base's hash."""
    if ModelConfig.from_dict(data["model"]) != model.cfg or _differs(model, data["base_hash"], hashes):
        raise HainaError(f"adapter {path} was trained on another base model (recorded base: "
                         f"{data['base'] or 'unknown'}); pass that model as --checkpoint")


def _differs(model: Transformer, recorded: str, hashes: dict[str, str]) -> bool:
    if any(p.dtype == torch.float16 for p in model.parameters()):
        # float16 rounds differently from bfloat16, so its values cannot reproduce the hash; shapes were checked.
        info("the model is in float16: the adapter's base is checked by config only")
        return False
    if "base" not in hashes:  # hashing reads every weight: once per base, however many adapters it serves
        hashes["base"] = base_weights_hash(model)
    return hashes["base"] != recorded


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "TARGETS", "LoRAConfig", "LoRALinear", "LoRAPart", "adapter_layout",
           "adapter_state_dict", "apply_lora", "base_weights_hash", "check_adapter_base", "check_adapter_layout",
           "has_lora", "is_adapter_dir", "load_adapter", "load_adapter_state_dict", "lora_fields", "lora_plan",
           "merge_lora", "read_adapter", "read_adapter_config", "resolve_adapter", "save_adapter"]
