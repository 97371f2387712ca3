"""Several LoRA adapters over one base, for serving: each batch row adds its own adapter's delta.

`load_adapters` stacks adapters trained on the same base (`haina.model.lora`) into `MultiLoRALinear`
layers; the generation engine picks each row's adapter through the model's `AdapterSelection` before
every call, so requests for different adapters share a batch. Training and single-adapter inference
use `haina.model.lora.LoRALinear`, which has no selection to consult.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from haina.core.errors import HainaError
from haina.model.lora import (
    ADAPTER_WEIGHTS,
    LoRAConfig,
    Range,
    adapter_layout,
    check_adapter_base,
    check_adapter_layout,
    has_lora,
    lora_fields,
    lora_plan,
    read_adapter,
)
from haina.model.transformer import Transformer


class AdapterSelection:
    """Which adapter each row of a model's next call uses: one object shared by all its MultiLoRALinears.

    The generation engine sets it before every forward or decode call. The common cases stay cheap: when
    every row agrees, the layers add nothing (the base alone) or one adapter's low-rank product (for any
    batch size, so a stale setting cannot mismatch a later call's shape); only a batch whose rows differ
    builds a per-row index, and the layers then gather each row's A and B and multiply batch-wise.

    Args:
        count: how many adapters the model holds (indices 0..count-1).
    """

    def __init__(self, count: int):
        self.count = count
        self.slot = 0  # the stack slot of every row when `rows` is None; slot 0 holds zeros (the base)
        self.rows: torch.Tensor | None = None  # (B,) the stack slot of each row, when the rows differ

    def select(self, adapters: int | Sequence[int], device: str | torch.device | None = None) -> None:
        """Choose the adapter of every row (an int) or of each row (a sequence); -1 is the base alone."""
        choice = [adapters] if isinstance(adapters, int) else list(adapters)
        bad = next((a for a in choice if not -1 <= a < self.count), None)
        if bad is not None:
            raise HainaError(f"adapter index {bad} is out of range: the model holds {self.count} adapter(s), "
                             f"0..{self.count - 1}, and -1 is the base")
        if all(a == choice[0] for a in choice):
            self.slot, self.rows = (choice[0] + 1 if choice else 0), None
        else:
            self.rows = torch.tensor([a + 1 for a in choice], device=device)


class MultiLoRALinear(nn.Linear):
    """A frozen Linear holding several adapters at once, for serving: each batch row adds its own one's delta.

    Built by `load_adapters`, never trained. For each span of output rows that any adapter targets, the
    adapters' A and B are stacked, transposed so that no transpose runs per call, with the scale folded
    into B: `At` (n + 1, in, r) and `Bt` (n + 1, r, rows), slot 0 all zeros for the base and slot i + 1
    for adapter i. An adapter that does not target a span, or has a smaller rank than the largest, has
    zeros there, which add exactly nothing. The stacks are non-persistent buffers: they follow the model
    to a device or dtype but stay out of its state dict (and so out of the base's hash).
    """

    def __init__(self, base: nn.Linear, spans: list[Range], *, count: int, rank: int, selection: AdapterSelection):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.spans, self.selection = list(spans), selection
        w = base.weight
        for k, (start, stop) in enumerate(self.spans):
            self.register_buffer(f"At{k}", torch.zeros(count + 1, self.in_features, rank, device=w.device,
                                                       dtype=w.dtype), persistent=False)
            self.register_buffer(f"Bt{k}", torch.zeros(count + 1, rank, stop - start, device=w.device,
                                                       dtype=w.dtype), persistent=False)

    def put(self, adapter: int, span: Range, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        """Store adapter `adapter`'s A (r, in) and B (rows, r) for `span`, zero-padded to the stack's rank."""
        k, r = self.spans.index(span), A.shape[0]
        At, Bt = self._buffers[f"At{k}"], self._buffers[f"Bt{k}"]
        with torch.no_grad():
            At[adapter + 1, :, :r] = A.t().to(At)
            Bt[adapter + 1, :r] = (scale * B.float()).t().to(Bt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        sel = self.selection
        slot = sel.slot if sel.rows is None else sel.rows
        if sel.rows is None and slot == 0:
            return y  # the base alone: nothing to add
        if sel.rows is not None and (x.dim() != 3 or x.shape[0] != sel.rows.shape[0]):
            raise HainaError(f"the adapter selection has {sel.rows.shape[0]} rows but the call has input "
                             f"{tuple(x.shape)}; select the adapters of this call's rows first")
        for k, (start, stop) in enumerate(self.spans):
            # One slot: x @ (in, r) @ (r, rows). A slot per row: At[rows] gathers (B, in, r) and the same
            # product runs batch-wise, (B, T, in) @ (B, in, r) @ (B, r, rows).
            y[..., start:stop].add_(x @ self._buffers[f"At{k}"][slot] @ self._buffers[f"Bt{k}"][slot])
        return y

    def extra_repr(self) -> str:
        count, _, rank = self._buffers["At0"].shape
        return f"{super().extra_repr()}, adapters={count - 1}, r={rank}, spans={self.spans}"


def adapter_selection(model: nn.Module) -> AdapterSelection | None:
    """The selection shared by a model's MultiLoRALinears (see `load_adapters`); None when it has none."""
    return next((m.selection for m in model.modules() if isinstance(m, MultiLoRALinear)), None)


def load_adapters(model: Transformer, paths: Sequence[str | Path], *, check_base: bool = True) -> list[LoRAConfig]:
    """Stack the adapters of directories `paths` into `model` to serve them together; returns their configs.

    Adapter i is chosen for each row of a call through `adapter_selection(model).select(...)` (-1, the
    default, is the base alone), so requests for different adapters share a batch. Every adapter must
    have been trained on this base (checked as `load_adapter` does, the base hashed once). Ranks may
    differ: every stack has the largest rank, smaller ones padded with zeros, so a mixed batch is one
    gather and one batched product per span rather than one per rank group. Targets may differ too: a
    module gets every span any adapter targets. For training or a single adapter use `load_adapter`,
    whose layers have no selection to consult.
    """
    if not paths:
        raise HainaError("no adapters given; name at least one adapter directory")
    if has_lora(model) or adapter_selection(model) is not None:
        raise HainaError("the model already has LoRA adapters; load adapters into a plain base model")
    hashes: dict[str, str] = {}
    loaded = []
    for path in map(Path, paths):
        data, weights = read_adapter(path)
        if check_base:
            check_adapter_base(model, data, path, hashes)
        cfg = LoRAConfig.from_dict(lora_fields(data))
        plan = lora_plan(model.cfg, cfg.targets)
        check_adapter_layout(adapter_layout(model, plan, cfg.r), weights, str(path / ADAPTER_WEIGHTS))
        loaded.append((cfg, plan, weights))
    spans: dict[str, list[Range]] = {}
    for _, plan, _ in loaded:
        for module, parts in plan.items():
            known = spans.setdefault(module, [])
            known += [span for span in parts.values() if span not in known]
    selection = AdapterSelection(len(loaded))
    rank = max(cfg.r for cfg, _, _ in loaded)
    for i, block in enumerate(model.blocks):
        for module, module_spans in spans.items():
            parent_name, attr = module.split(".")
            parent = getattr(block, parent_name)
            old = getattr(parent, attr)
            layer = MultiLoRALinear(old, module_spans, count=len(loaded), rank=rank, selection=selection)
            for a, (cfg, plan, weights) in enumerate(loaded):
                for name, span in plan.get(module, {}).items():
                    prefix = f"blocks.{i}.{module}.lora.{name}."
                    layer.put(a, span, weights[prefix + "A"], weights[prefix + "B"], cfg.scale)
            setattr(parent, attr, layer.train(old.training))
    return [cfg for cfg, _, _ in loaded]


__all__ = ["AdapterSelection", "MultiLoRALinear", "adapter_selection", "load_adapters"]
