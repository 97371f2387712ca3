"""Inference on a CPU through oneDNN-packed copies of the Linear weights.

PyTorch's plain `F.linear` on a CPU hands each product to a BLAS that re-packs the weight on every call.
oneDNN can pack a weight once into the blocked layout its kernels read (what `torch.compile` does for
frozen CPU linears). Measured on 2 AVX-512 cores (fp32, torch 2.13), a (rows × 256) · (256 × 768)
product took 3.8 ms plain and 1.6 ms packed at 2,048 rows, 0.136 and 0.066 ms at 64 rows, the same at 8
rows and slightly longer packed at one row: so the packed path serves products of at least `MIN_ROWS`
rows (prefill, perplexity windows, batched scoring) and leaves small ones (a decode step) to the plain
call.

`pack_linears(model)` (or `packed_linears(model)` for one block) is applied from outside: the model code
stays plain `nn.Linear`. `haina eval lm` scores through it and a classifier loaded for inference runs on it;
the generation engine does not, because its greedy outputs must not depend on how many rows a step holds
(a packed and a plain product round differently, and the row count decides which one runs). Each packed
layer keeps its module, parameters and state dict; only its `forward` changes. Calls with autograd take the
plain path unless the layers were packed with `train=True` (the trainer does so for fp32 CPU training): then
forward and input gradient run on oneDNN, the weight packed at each call since every step changes it. The
packed copy of inference follows the weight: replaced, or updated in place by an op that bumps its version
counter, it is packed again at the next call (a fused optimizer step does not bump it: a model being trained is
packed with `train=True`, whose calls without autograd pack at each call too). Layers that are not plain fp32 CPU `nn.Linear` (LoRA and quantized
layers, half precision, GPUs) are left alone, and so is everything once the copies would pass
`max_bytes`: the price is one extra copy of the weights packed.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 16  # fewer rows than this: the plain product is as fast (measured above)
# Training packs each weight at every call (and Wᵀ for the input gradient), which costs time and allocator churn:
# on 2 cores it paid off for pretraining windows (8 × 256 rows: 1.33x the step rate) and lost for short padded
# fine-tuning batches (~300 rows: 0.9x the rate, 1.9x the memory added by training). Below this, training is plain.
TRAIN_MIN_ROWS = 1024
# oneDNN keeps a primitive (and its memory) per product shape: batches of ever-changing length (classification,
# fine-tuning) grew a training process by ~120 MiB over 400 steps. A layer that has met this many row counts
# computes the rest plainly; fixed shapes (pretraining windows, perplexity windows) stay packed.
MAX_SHAPES = 8
MAX_PACKED_BYTES = 1 << 30  # extra memory the copies may take, all layers together
_ROWS_HINT = 64  # the row count oneDNN picks its layout for; it serves any number of rows


class _PackedLinear(torch.autograd.Function):
    """y = x·Wᵀ + b with autograd, the weight packed at each call (a training step changes it every time).

    Forward and the input gradient (g·W, a product with the packed Wᵀ) run on oneDNN; the weight gradient
    (gᵀ·x) stays a plain matmul, which packing did not speed up (measured).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), _ROWS_HINT)
        y = torch.ops.mkldnn._linear_pointwise(x2, packed, None if b is None else b.detach(), "none", [], "")
        ctx.save_for_backward(x2, w)
        ctx.x_shape, ctx.has_bias = x.shape, b is not None
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x2, w = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            wt = torch.ops.mkldnn._reorder_linear_weight(w.detach().t().contiguous(), _ROWS_HINT)
            gx = torch.ops.mkldnn._linear_pointwise(g2, wt, None, "none", [], "").view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            gw = g2.t() @ x2
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


class _Pack:
    """One layer's packed weight and the (data pointer, version) of the weight it was packed from."""

    __slots__ = ("failed", "packed", "rows", "stamp", "train")

    def __init__(self, train: bool = False) -> None:
        self.packed: torch.Tensor | None = None
        self.stamp: tuple[int, int] | None = None
        self.failed = False
        self.train = train  # products with autograd go through `_PackedLinear` too
        self.rows: set[int] = set()  # the row counts this layer has computed packed (at most MAX_SHAPES)

    def __deepcopy__(self, memo) -> _Pack:
        return _Pack(self.train)  # a copied module packs its own (copied) weight at its first call


def _packable(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (type(m) is nn.Linear and isinstance(w, torch.Tensor) and w.device.type == "cpu"
            and w.dtype == torch.float32 and w.dim() == 2)


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w, b, pack = self.weight, self.bias, self._haina_pack
    if pack.failed or x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() < MIN_ROWS * x.shape[-1]:
        return F.linear(x, w, b)
    grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad))
    if pack.train and x.numel() < TRAIN_MIN_ROWS * x.shape[-1]:
        return F.linear(x, w, b)  # a model in training: its short products (and evaluations) stay plain
    if grad and not pack.train:
        return F.linear(x, w, b)
    rows = x.numel() // x.shape[-1]
    if rows not in pack.rows:
        if len(pack.rows) >= MAX_SHAPES:
            return F.linear(x, w, b)
        pack.rows.add(rows)
    if pack.stamp is None:  # the first packed call: pack once, which also proves the ops work on this torch
        _repack(w, pack)
        if pack.failed:
            return F.linear(x, w, b)
    if grad:
        return _PackedLinear.apply(x, w, b)
    bias = None if b is None else b.detach()
    if pack.train:
        # A model in training changes its weights between calls, and a fused optimizer step does so without
        # bumping the tensors' version counter: the stamp cannot tell, so an evaluation packs at each call.
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), _ROWS_HINT)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    if pack.stamp != (w.data_ptr(), w._version):
        _repack(w, pack)
        if pack.failed:
            return F.linear(x, w, b)
    return torch.ops.mkldnn._linear_pointwise(x, pack.packed, bias, "none", [], "")


def pack_weight(w: torch.Tensor, rows_hint: int, probe_rows: int = MIN_ROWS) -> torch.Tensor | None:
    """A (out, in) fp32 CPU weight in oneDNN's packed layout for products of about `rows_hint` rows, checked once
    against the plain product on `probe_rows` random rows; None if this torch lacks the ops or they disagree."""
    weight = w.detach()
    try:  # private ops (torch's inductor uses them): a torch without them raises here
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)
            probe = torch.randn(probe_rows, weight.shape[1], generator=torch.Generator().manual_seed(0))
            got = torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
            ok = torch.allclose(got, probe @ weight.t(), rtol=1e-4, atol=1e-4)
    except (RuntimeError, AttributeError, NotImplementedError):
        return None
    return packed if ok else None


def _repack(w: torch.Tensor, pack: _Pack) -> None:
    """Pack the weight (`pack_weight`); on any failure the layer stays plain."""
    pack.packed = pack_weight(w, _ROWS_HINT)
    pack.stamp = None if pack.packed is None else (w.data_ptr(), w._version)
    pack.failed = pack.packed is None


def pack_linears(model: nn.Module, *, max_bytes: int = MAX_PACKED_BYTES, train: bool = False) -> int:
    """Route the inference products of `model`'s plain fp32 CPU Linear layers through packed weights.

    With `train`, products with autograd (a training step) go through oneDNN too, the weight packed at each
    call (`_PackedLinear`). Returns the number of layers packed (0 where oneDNN is unavailable). Idempotent;
    `unpack_linears` undoes it. The weights are packed lazily, at each layer's first large enough call.
    """
    if not torch.backends.mkldnn.is_available():
        return 0
    budget, count = max_bytes, 0
    for m in model.modules():
        if "_haina_pack" in m.__dict__:
            m._haina_pack.train = m._haina_pack.train or train
            count += 1
            continue
        if not _packable(m):
            continue
        size = m.weight.numel() * m.weight.element_size()
        if size > budget:
            continue
        budget -= size
        m._haina_pack = _Pack(train)
        # A bound method in the instance dict: `nn.Module.__call__` calls it, hooks still fire, and a deepcopy
        # of the module rebinds it to the copy (copy.deepcopy copies bound methods with their instance).
        m.forward = types.MethodType(_packed_forward, m)
        count += 1
    return count


@contextlib.contextmanager
def packed_linears(model: nn.Module, *, max_bytes: int = MAX_PACKED_BYTES) -> Iterator[int]:
    """`pack_linears` for the duration of a block (yields the number of layers packed); the copies are freed after.

    Layers that were packed before the block stay packed.
    """
    before = {id(m) for m in model.modules() if "_haina_pack" in m.__dict__}
    count = pack_linears(model, max_bytes=max_bytes)
    try:
        yield count
    finally:
        for m in model.modules():
            if "_haina_pack" in m.__dict__ and id(m) not in before:
                del m.forward
                del m._haina_pack


def unpack_linears(model: nn.Module) -> None:
    """Undo `pack_linears`: every layer computes with its plain weight again and the copies are freed."""
    for m in model.modules():
        if "_haina_pack" in m.__dict__:
            del m.forward
            del m._haina_pack
