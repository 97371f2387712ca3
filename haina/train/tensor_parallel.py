"""Tensor parallelism (DTensor) applied to a single-device Transformer from outside, as torchtitan does.

Each block's attention and MLP are split over the `tp` ranks of a mesh dimension (Megatron's scheme): the
fused `qkv` and `fc` projections are column-parallel (each rank computes its own heads and its slice of the
MLP), the output projections `proj` are row-parallel (each rank multiplies its slice; an all-reduce sums
them). Embeddings, norms and the LM head stay plain tensors, replicated and computed alike on every rank.

The catch is the fusion. `ColwiseParallel` gives rank r the r-th contiguous block of a weight's rows, and
the fused `qkv` rows are all the query heads, then the key heads, then the value heads: rank 0 would get
query heads only. So the rows are first permuted into a *TP layout* where rank r's block is
[its n_head/tp query heads; its n_kv/tp key heads; its value heads] (and [gate_r; up_r] for SwiGLU's fused
`fc`). Each attention module is then told its local head counts, and the model's own
`view(B, T, nh + 2·nkv, hs)` / `split` / `chunk(2)` compute exactly the heads the rank holds. With grouped
key/value heads, query head i uses key head i // (n_head / n_kv): the local query heads of rank r are the
ones that use its local key heads, so the grouping holds locally too.

The permutation is internal: checkpoints hold the plain layout. `from_tp_layout` / `to_tp_layout` convert
whole weights (and optimizer state) by the names `Transformer.weights()` uses, and `full_weights` /
`load_full_weights` gather and load them through torch.distributed.checkpoint's state-dict functions.

Mixed lists of DTensor and plain parameters need care in two places: the gradient norm (`clip_grad_norm_`
here, as torch's own refuses them) and the fused or foreach AdamW (`split_param_groups`: one group per kind).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from haina.core.errors import HainaError
from haina.model.config import ModelConfig

# The fused projections whose rows are permuted, by the (suffix of the) names `Transformer.weights()` uses.
_QKV = re.compile(r"(?:.*\.)?blocks\.\d+\.attn\.qkv\.(?:weight|bias)")
_FC = re.compile(r"(?:.*\.)?blocks\.\d+\.mlp\.fc\.(?:weight|bias)")
# The layers each block splits, and how.
_COLUMN = ("attn.qkv", "mlp.fc")
_ROW = ("attn.proj", "mlp.proj")


# ----------------------------------------------------------------- checks
def check_tensor_parallel(model_cfg: ModelConfig, tp: int) -> None:
    """A one-line HainaError when `tp` ranks cannot split `model_cfg`'s heads and MLP evenly; None if they can."""
    if tp < 1:
        raise HainaError(f"parallel.tp must be at least 1, got {tp}")
    sizes = {"n_head": model_cfg.n_head, "n_kv_head": model_cfg.kv_heads, "ffn_dim": model_cfg.ffn_dim}
    bad = [f"{name}={value}" for name, value in sizes.items() if value % tp]
    if bad:
        g = math.gcd(*sizes.values())
        fits = ", ".join(str(d) for d in range(1, g + 1) if g % d == 0)
        raise HainaError(f"parallel.tp={tp} does not divide the model's {' and '.join(bad)}: each rank takes whole "
                         f"heads and an equal slice of the MLP; use parallel.tp in {fits}")


def _check_layers(model: nn.Module) -> None:
    """A one-line HainaError for a model whose blocks hold layers other than plain nn.Linear projections."""
    from torch.distributed.tensor import DTensor

    blocks = getattr(model, "blocks", None)
    if not isinstance(model, nn.Module) or not isinstance(blocks, nn.ModuleList):
        raise HainaError(f"tensor parallelism splits a haina Transformer's blocks; {type(model).__name__} has none")
    for i, block in enumerate(blocks):
        for path in _COLUMN + _ROW:
            layer = block.get_submodule(path)
            # An adapter, a quantized layer or a packed Linear (its `forward` replaced on the instance) computes
            # something a DTensor weight would not reach.
            if type(layer) is not nn.Linear or "forward" in vars(layer):
                raise HainaError(f"tensor parallelism cannot split blocks.{i}.{path}, a {type(layer).__name__}"
                                 f"{' with a replaced forward (packed linears?)' if type(layer) is nn.Linear else ''}"
                                 "; it splits plain nn.Linear layers only, not adapters, quantized or packed ones")
            if isinstance(layer.weight, DTensor):
                raise HainaError(f"blocks.{i}.{path} is already distributed; apply tensor parallelism once, "
                                 "before FSDP")


# ----------------------------------------------------------------- the TP layout
def _row_orders(model_cfg: ModelConfig, tp: int) -> dict[str, torch.Tensor]:
    """For each fused projection, the plain-layout row that each TP-layout row takes ('qkv', and 'fc' for swiglu)."""
    nh, nkv, hs = model_cfg.n_head, model_cfg.kv_heads, model_cfg.head_dim
    rows = torch.arange((nh + 2 * nkv) * hs).view(nh + 2 * nkv, hs)
    q, k, v = (part.chunk(tp) for part in rows.split([nh, nkv, nkv]))
    orders = {"qkv": torch.cat([torch.cat([q[r], k[r], v[r]]) for r in range(tp)]).flatten()}
    if model_cfg.mlp == "swiglu":
        gate, up = (part.chunk(tp) for part in torch.arange(2 * model_cfg.ffn_dim).chunk(2))
        orders["fc"] = torch.cat([torch.cat([gate[r], up[r]]) for r in range(tp)])
    return orders


def _permute(tensors: dict[str, Any], model_cfg: ModelConfig, tp: int, inverse: bool) -> dict[str, Any]:
    check_tensor_parallel(model_cfg, tp)
    if tp == 1:
        return dict(tensors)
    orders = _row_orders(model_cfg, tp)
    if inverse:
        orders = {k: o.argsort() for k, o in orders.items()}
    out = {}
    for name, t in tensors.items():
        kind = "qkv" if _QKV.fullmatch(name) else "fc" if _FC.fullmatch(name) else None
        order = orders.get(kind)
        # Only whole tensors of the fused row count move: an optimizer's step counter passes through.
        if order is not None and isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == len(order):
            t = t[order.to(t.device)]
        out[name] = t
    return out


def to_tp_layout(weights: dict[str, torch.Tensor], model_cfg: ModelConfig, tp: int) -> dict[str, torch.Tensor]:
    """Plain-layout weights (by `Transformer.weights()` names) -> the TP layout; other tensors are untouched."""
    return _permute(weights, model_cfg, tp, inverse=False)


def from_tp_layout(weights: dict[str, torch.Tensor], model_cfg: ModelConfig, tp: int) -> dict[str, torch.Tensor]:
    """TP-layout weights -> the plain layout: the exact inverse of `to_tp_layout`."""
    return _permute(weights, model_cfg, tp, inverse=True)


# ----------------------------------------------------------------- applying it
def apply_tensor_parallel(model: nn.Module, tp_mesh: Any) -> None:
    """Split `model`'s blocks over the 1-D device mesh `tp_mesh`, in place.

    The model holds its whole plain-layout weights on this rank's device, the same on every rank (rank 0's are
    the ones distributed). Afterwards every rank computes the same logits as the unsplit model; the `qkv` and
    `fc` weights are DTensors in the TP layout. Apply it before FSDP (`fully_shard` on the data-parallel mesh
    dimension) and before `torch.compile`. Training only: the KV-cache `decode` path bypasses the module hooks
    that redistribute activations.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = tp_mesh.size()
    check_tensor_parallel(model.cfg, tp)
    _check_layers(model)
    if tp == 1:
        return
    orders = _row_orders(model.cfg, tp)
    plan = {**{path: ColwiseParallel() for path in _COLUMN}, **{path: RowwiseParallel() for path in _ROW}}
    with torch.no_grad():
        for block in model.blocks:
            for path, kind in (("attn.qkv", "qkv"), ("mlp.fc", "fc")):
                if kind in orders:
                    layer = block.get_submodule(path)
                    for p in (layer.weight, layer.bias):
                        if p is not None:
                            p.copy_(p[orders[kind].to(p.device)])
            parallelize_module(block, tp_mesh, plan)
            # The model's own reshapes now see this rank's heads only.
            block.attn.n_head //= tp
            block.attn.n_kv //= tp


# ----------------------------------------------------------------- gradients and optimizer
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
    """The global gradient norm of `params` (DTensor and plain gradients mixed), clipping to `max_norm` if > 0.

    DTensor gradients (sharded over the tensor-parallel ranks, or over FSDP's) contribute their whole tensor's
    norm, gathered per (mesh, placements) group in one collective; plain gradients are replicated, the same on
    every rank, and count once. Torch's own `clip_grad_norm_` refuses such mixed lists. Returns a plain 0-d
    tensor, the same on every rank; the clipping coefficient is torch's (max_norm / (norm + 1e-6), at most 1).
    """
    from torch.distributed.tensor import DTensor

    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else None)
    groups: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    norms = []
    for gs in groups.values():
        norm = torch.nn.utils.get_total_norm(gs, norm_type, foreach=foreach)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    device = norms[0].device
    total = torch.nn.utils.get_total_norm([n.to(device) for n in norms], norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite")
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        # The local shards: a DTensor's scaling is its shards' scaling, and no collective is needed.
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        with torch.no_grad():
            for dev in {t.device for t in local}:
                torch._foreach_mul_([t for t in local if t.device == dev], coef.to(dev))
    return total


def split_param_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Optimizer parameter groups split by kind, plain tensors apart from DTensors of each device mesh.

    Fused and foreach AdamW (and SGD) refuse a group that mixes DTensors and plain tensors; they run one kernel
    per group, so one group per kind is enough (`foreach=False` would also work, a loop over tensors). Under
    FSDP on top, the tensor-parallel weights live on the 2-D mesh and the rest on the data-parallel one.
    Each new group keeps its group's options.
    """
    out = []
    for group in groups:
        kinds: dict[Any, list[torch.Tensor]] = {}
        for p in group["params"]:
            kinds.setdefault(getattr(p, "device_mesh", None), []).append(p)
        out += [{**group, "params": params} for params in kinds.values()]
    return out


# ----------------------------------------------------------------- whole weights and optimizer state
def full_weights(model: nn.Module, model_cfg: ModelConfig, tp: int) -> dict[str, torch.Tensor] | None:
    """The model's whole plain-layout weights on rank 0's CPU, by `weights()` names; None on other ranks.

    Every rank must call it (it gathers). Under FSDP, reshard the model first (`Distributed._sharded_again`).
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    names = model.weights().keys()  # a tied head appears once, as the embedding
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    return from_tp_layout({k: full[k] for k in names}, model_cfg, tp)


def load_full_weights(model: nn.Module, model_cfg: ModelConfig, tp: int, weights: dict[str, torch.Tensor]) -> None:
    """Load whole plain-layout weights (the same on every rank) into the tensor-parallel model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # strict=False: a tied head is saved once, as the embedding it shares its tensor with.
    set_model_state_dict(model, to_tp_layout(weights, model_cfg, tp),
                         options=StateDictOptions(full_state_dict=True, strict=False))


def _map_optimizer_state(state: dict[str, Any], fn: Callable[[dict], dict]) -> dict[str, Any]:
    """`fn` applied to each per-parameter field ({name: exp_avg}, {name: exp_avg_sq}, ...) of a named state."""
    per_param = state.get("state", {})
    fields = {f for s in per_param.values() for f in s}
    mapped = {f: fn({name: s[f] for name, s in per_param.items() if f in s}) for f in fields}
    new = {name: {f: mapped[f][name] for f in s} for name, s in per_param.items()}
    return {**state, "state": new}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_cfg: ModelConfig,
                         tp: int) -> dict[str, Any]:
    """The optimizer's whole state keyed by parameter name, moments in the plain layout (rank 0 holds it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))
    return _map_optimizer_state(state, lambda d: from_tp_layout(d, model_cfg, tp))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_cfg: ModelConfig, tp: int,
                              state: dict[str, Any]) -> None:
    """Load a whole, name-keyed optimizer state (plain layout, the same on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, _map_optimizer_state(state, lambda d: to_tp_layout(d, model_cfg, tp)),
                             options=StateDictOptions(full_state_dict=True))


__all__ = ["apply_tensor_parallel", "check_tensor_parallel", "clip_grad_norm_", "from_tp_layout", "full_optimizer_state",
           "full_weights", "load_full_optimizer_state", "load_full_weights", "split_param_groups", "to_tp_layout"]
