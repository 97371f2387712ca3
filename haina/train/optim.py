"""AdamW with weight decay on matrices only, and gradient clipping."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for tensors of ≥ 2 dimensions, none for the rest.

    Weight matrices and embeddings (2-D) are decayed; biases and norm gains (1-D) are not, since
    pulling a gain towards zero or a bias towards the origin is not regularization (nanoGPT, GPT-3).
    Parameters without `requires_grad` (frozen by LoRA, say) are left out; a parameter shared by
    two names (tied embeddings) appears once.
    """
    decay, no_decay, seen = [], [], set()
    for _, p in named_params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_adamw(named_params: Iterable[tuple[str, nn.Parameter]], *, lr: float, weight_decay: float,
                betas: tuple[float, float], eps: float, device: torch.device, by_mesh: bool = False) -> torch.optim.AdamW:
    """AdamW over `named_params`, with the fused kernel (all tensors in one pass) on CUDA and CPU.

    On CPU the default per-tensor loop cost 13 ms a step on the quickstart model against 5 ms fused
    (benchmarks/finetune.py's profile), a tenth of a fine-tuning step. MPS keeps the default.
    `by_mesh`: one group per device mesh (tensor parallelism mixes split and plain parameters, which one
    fused kernel refuses).
    """
    groups = param_groups(named_params, weight_decay)
    if not groups:
        raise ValueError("no trainable parameters")
    if by_mesh:
        from haina.train.tensor_parallel import split_param_groups

        groups = split_param_groups(groups)
    extra = {"fused": True} if device.type in ("cuda", "cpu") else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **extra)


def clip_gradients(params: list[nn.Parameter], max_norm: float, device: torch.device, mixed: bool = False) -> torch.Tensor:
    """Clip the gradients of `params` to `max_norm` (0: leave them); their global norm before clipping, a number.

    `mixed`: tensor parallelism mixes split (DTensor) and plain parameters, whose norm torch's own function refuses.
    """
    if mixed:
        from haina.train.tensor_parallel import clip_grad_norm_

        return clip_grad_norm_(params, max_norm)
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)
    # FSDP2's gradients are DTensors, and so is their norm (already over all shards): the log needs a number.
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


__all__ = ["build_adamw", "clip_gradients", "param_groups"]
