"""Integer weights for the Transformer's block Linears: the layers a quantized checkpoint rebuilds on load.

`haina compress quantize` replaces every Linear inside the blocks (attention qkv and proj, the MLP's fc and
proj) with a `QuantLinear`; the embeddings, the norms and the LM head stay float. The embeddings are a
lookup, with no matmul to speed up, and the head (often tied to them) is the layer whose errors reach the
logits unfiltered; on a small vocabulary model it is also already run from a pre-packed copy
(`haina.generate.head`). Methods:

    int8-weight    int8 weights, one scale per output channel (symmetric, ±127); activations stay float
    int8-dynamic   the same weights; each call also rounds its activations to int8, one scale per row
                   (token), and multiplies integers with integers (int32 sums)
    int4-weight    4-bit weights in groups of `group_size` inputs, asymmetric: w ≈ (q − 8) · scale + zero,
                   one (scale, zero) per group, two values per byte

A checkpoint stores plain tensors under each layer's name, nothing pickled: `qweight` int8 (out, in), or
uint8 (out, in / 2) with the even input's value in the low nibble; `scale` bfloat16 (out,) or
(out, in / group); `zero` bfloat16 (out, in / group) for int4; `bias` as the model's. Its config.yaml
records the method in a `quantization:` section (`QuantConfig`), which is how `load_model` knows to build
these layers before it reads the weights. Scales are bfloat16 because torch's CPU kernels take them so:
the stored model is then exactly the one computed.

Kernels. On a CPU, float32 or bfloat16 activations go through torch's own kernels: `_weight_int8pack_mm`
and `_weight_int4pack_mm_for_cpu` in bfloat16 (both have only a scalar path for float32 activations, 15-40x
slower than a float matmul, so activations are rounded to bfloat16 on the way in and the outputs on the way
out), and `_int_mm` for int8-dynamic. Greedy decoding of the quickstart model on one AVX-512 core (5
interleaved rounds, a busy machine) ran at 2.0x (int8-weight), 1.6x (int8-dynamic) and 2.1x (int4-weight) the
float model's tokens/s at batch 1, 1.4x, 1.3x and 1.6x at batch 16. torchao's `quantize_` (0.18) on the same
layers, measured the same way, is slower and is not used: int8 weight-only 1.2x (1.2x at batch 16), int8
dynamic 0.4x (0.9x); its int4 layers need the `mslk` kernels package; and its layers are tensor subclasses,
which safetensors cannot hold. Anywhere else (a GPU, float16, shapes a kernel refuses) the weight is
dequantized at each call: correct on every device, not fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from haina.core.config import from_dict, to_dict
from haina.core.errors import HainaError
from haina.model.config import ModelConfig
from haina.model.transformer import Transformer

Method = Literal["int8-dynamic", "int8-weight", "int4-weight"]
METHODS: tuple[str, ...] = get_args(Method)
GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 kernel takes
FORMAT = "haina-quant/1"
SECTION = "quantization"  # the config.yaml section a quantized checkpoint records its QuantConfig in
_SCALE_DTYPE = torch.bfloat16


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How a checkpoint's block Linears are quantized.

    Args:
        method: int8-weight, int8-dynamic or int4-weight (see the module docstring).
        group_size: inputs per (scale, zero) group of int4-weight: 32, 64, 128 or 256; None for the int8
            methods (one scale per output channel).
        format: the storage layout's version.
    """

    method: Method
    group_size: int | None = None
    format: str = FORMAT

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise HainaError(f"unknown quantization method '{self.method}'; choose one of {', '.join(METHODS)}")
        if self.format != FORMAT:
            raise HainaError(f"quantization format '{self.format}' is not one this haina reads ({FORMAT}); "
                             "quantize the original checkpoint again with this version")
        if self.method == "int4-weight":
            if self.group_size not in GROUP_SIZES:
                raise HainaError(f"--group-size {self.group_size} is not one int4-weight takes; choose one of "
                                 f"{', '.join(map(str, GROUP_SIZES))}")
        elif self.group_size is not None:
            raise HainaError(f"{self.method} has one scale per output channel; a group size is for int4-weight only")

    @classmethod
    def from_dict(cls, data: dict) -> QuantConfig:
        return from_dict(cls, data, where=f"{SECTION}.")

    def to_dict(self) -> dict:
        return to_dict(self)


def recorded_quantization(config: dict, where: str) -> QuantConfig | None:
    """The `QuantConfig` a checkpoint's config.yaml mapping records, or None for a float checkpoint."""
    section = config.get(SECTION)
    if section is None:
        return None
    if not isinstance(section, dict):
        raise HainaError(f"{where}: '{SECTION}' must be a mapping (method, group_size, format)")
    try:
        return QuantConfig.from_dict(section)
    except HainaError as e:
        raise HainaError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------- numerics
def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) values in 0..15 -> (out, in / 2) uint8, input 2i in the low nibble and 2i + 1 in the high one."""
    pairs = q.to(torch.uint8).view(q.shape[0], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `_pack_int4`: (out, in / 2) uint8 -> (out, in) uint8 in 0..15."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).view(packed.shape[0], -1)


def quantize_weight(w: torch.Tensor, method: str, group_size: int | None) -> dict[str, torch.Tensor]:
    """A float weight (out, in) as the integer tensors and scales a `QuantLinear` stores."""
    w = w.detach().float()
    if method in ("int8-weight", "int8-dynamic"):
        # The scale is rounded to its stored type before the weights are divided by it, so that
        # dequantizing with the stored scale gives back exactly the grid the integers were chosen on.
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(_SCALE_DTYPE)
        q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return {"qweight": q, "scale": scale}
    out, inp = w.shape
    groups = w.view(out, inp // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12).to(_SCALE_DTYPE)
    zero = (lo + 8 * scale.float()).to(_SCALE_DTYPE)  # the value of q = 8, mid-range
    q = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
    return {"qweight": _pack_int4(q.view(out, inp)), "scale": scale, "zero": zero}


def dequantize_weight(method: str, group_size: int | None, qweight: torch.Tensor, scale: torch.Tensor,
                      zero: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight (out, in) the stored tensors stand for."""
    if method != "int4-weight":
        return (qweight.float() * scale.float()[:, None]).to(dtype)
    q = _unpack_int4(qweight).float()
    out, inp = q.shape
    w = (q.view(out, inp // group_size, group_size) - 8) * scale.float()[..., None] + zero.float()[..., None]
    return w.view(out, inp).to(dtype)


# ---------------------------------------------------------------------------------------- the layer
class QuantLinear(nn.Module):
    """A Linear (inference only) whose weight is stored as integers with scales; `forward` is `F.linear`'s.

    Build one from a float Linear with `from_linear`, or empty (for `load_state_dict`) with the constructor.
    The CPU kernels' own weight layouts are made from the stored tensors at the first call and remade after
    the module is moved or loaded (`_apply`, `_load_from_state_dict`); the stored tensors are read-only.
    int4's layout (the CPU kernel's: a detail of torch that may change between versions, so it is not what is
    stored) is a second copy of the weight: at run time an int4 layer holds about 1 byte per weight, not 0.5.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, method: str,
                 group_size: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if method == "int4-weight" and (group_size is None or in_features % group_size):
            raise HainaError(f"group size {group_size} does not divide the layer's {in_features} inputs")
        self.in_features, self.out_features = in_features, out_features
        self.method, self.group_size = method, group_size
        int4 = method == "int4-weight"
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2 if int4 else in_features,
                                                    dtype=torch.uint8 if int4 else torch.int8, device=device))
        scale_shape = (out_features, in_features // group_size) if int4 else (out_features,)
        self.register_buffer("scale", torch.ones(scale_shape, dtype=_SCALE_DTYPE, device=device))
        self.register_buffer("zero", torch.zeros(scale_shape, dtype=_SCALE_DTYPE, device=device) if int4 else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._kernel: _Kernel | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str, group_size: int | None = None) -> QuantLinear:
        """The quantized counterpart of a float `linear` (its bias kept in the linear's dtype)."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, method=method,
                    group_size=group_size, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for name, t in quantize_weight(w, method, group_size).items():
                getattr(layer, name).copy_(t)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer.train(linear.training)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (out, in) this layer multiplies by."""
        return dequantize_weight(self.method, self.group_size, self.qweight, self.scale, self.zero, dtype)

    def nbytes(self) -> int:
        """Bytes this layer holds: its stored tensors, and the CPU kernel's own copies once a call has made them."""
        tensors = {id(t): t for t in (self.qweight, self.scale, self.zero, self.bias) if t is not None}
        if self._kernel is not None:
            tensors |= {id(t): t for t in (self._kernel.packed, self._kernel.scale) if t is not None}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"method={self.method}{group}")

    def _apply(self, fn, recurse=True):
        self._kernel = None  # moved or cast: the kernel layouts are made again from the new tensors
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel = None
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in): the kernels take matrices
        if self._kernel is None:
            self._kernel = _Kernel(self)
        y = self._kernel(self, rows)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


class _Kernel:
    """The fastest of torch's kernels that works for one QuantLinear where it lives, or dequantize-and-matmul.

    Each kernel is checked once against the dequantized weight on a probe (as `haina.generate.head` does
    for its packed head): a torch whose private kernels are missing, refuse the shape, or read their
    operands differently falls back to the plain path instead of computing something else.
    """

    def __init__(self, layer: QuantLinear):
        self.fast = False
        self.scale: torch.Tensor | None = None
        self.packed: torch.Tensor | None = None
        if layer.qweight.device.type == "cpu":
            try:  # plain tensors even when first called under inference_mode, so the layer can still be copied
                with torch.inference_mode(False), torch.no_grad():
                    self._prepare(layer)
                    self.fast = self._agrees(layer)
            except (RuntimeError, AttributeError, NotImplementedError):
                self.fast = False
            if not self.fast:
                self.scale = self.packed = None

    def _prepare(self, layer: QuantLinear) -> None:
        if layer.method == "int8-dynamic":
            self.scale = layer.scale.float()
        elif layer.method == "int8-weight":
            self.scale = layer.scale.to(torch.bfloat16)
        else:  # the CPU int4 kernel's own layout, and its (groups, out, 2) table of scales and zeros
            self.packed = torch._convert_weight_to_int4pack_for_cpu(_unpack_int4(layer.qweight).to(torch.int32), 1)
            self.scale = torch.stack([layer.scale, layer.zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)

    def _agrees(self, layer: QuantLinear) -> bool:
        probe = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
        got = self._fast(layer, probe).float()
        want = probe.to(torch.bfloat16).float() @ layer.dequantized().t()
        return bool(torch.allclose(got, want, rtol=5e-2, atol=5e-2 * float(want.abs().max()) + 1e-6))

    def __call__(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        if self.fast and x.dtype in _KERNEL_DTYPES:
            return self._fast(layer, x)
        if layer.method == "int8-dynamic":  # the same integer arithmetic in float32 (float16 sums would overflow)
            xq, sx = _quantize_rows(x)
            y = F.linear(xq.float(), layer.qweight.float())
            return (y * (sx * layer.scale.float())).to(x.dtype)
        return F.linear(x, layer.dequantized(x.dtype))

    def _fast(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        if layer.method == "int8-dynamic":
            xq, sx = _quantize_rows(x)
            return (torch._int_mm(xq, layer.qweight.t()) * (sx * self.scale)).to(x.dtype)  # int32 sums -> float
        xb = x.to(torch.bfloat16)
        if layer.method == "int8-weight":
            y = torch._weight_int8pack_mm(xb, layer.qweight, self.scale)
        else:
            y = torch._weight_int4pack_mm_for_cpu(xb, self.packed, layer.group_size, self.scale)
        return y.to(x.dtype)


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x (N, in) as int8 (symmetric, one scale per row) and their float32 scales (N, 1)."""
    # Few ops, each in place where it can be: at one row per call (decoding) their count is the cost.
    xf = x.float()
    sx = torch.linalg.vector_norm(xf, ord=float("inf"), dim=-1, keepdim=True).clamp_(min=1e-12).div_(127)
    return torch.round(xf / sx).to(torch.int8), sx  # |x / sx| <= 127 by construction: no clamp needed


# ---------------------------------------------------------------------------------------- whole models
def quantizable(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of the Linears `quantize_model` replaces: every Linear inside `model.blocks`."""
    return [(f"blocks.{i}.{name}", m) for i, block in enumerate(model.blocks)
            for name, m in block.named_modules() if isinstance(m, nn.Linear)]


def check_group_size(model: nn.Module, cfg: QuantConfig) -> None:
    """A one-line error unless `cfg`'s group size divides the inputs of every layer to quantize."""
    if cfg.group_size is None:
        return
    layers = quantizable(model)
    for name, layer in layers:
        if layer.in_features % cfg.group_size:
            fits = [str(g) for g in GROUP_SIZES if all(lay.in_features % g == 0 for _, lay in layers)]
            hint = f"choose {' or '.join(fits)}" if fits else "this model's layers take no int4 group size; use int8"
            raise HainaError(f"--group-size {cfg.group_size} does not divide the {layer.in_features} inputs of "
                             f"{name}; {hint}")


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, layer)


def quantize_model(model: nn.Module, cfg: QuantConfig) -> list[str]:
    """Replace every block Linear with its `QuantLinear`, in place; returns the names replaced."""
    check_group_size(model, cfg)
    names = []
    for name, layer in quantizable(model):
        if type(layer) is not nn.Linear:  # a LoRALinear: its adapters would be dropped without a word
            raise HainaError(f"{name} is a {type(layer).__name__}, not a plain Linear; merge its adapters first")
        _replace(model, name, QuantLinear.from_linear(layer, cfg.method, cfg.group_size))
        names.append(name)
    return names


def build_quantized(model_cfg: ModelConfig, cfg: QuantConfig) -> Transformer:
    """A Transformer with `QuantLinear`s in its blocks, every tensor uninitialized, for a checkpoint to load into.

    It is built on the meta device and only then given memory, so the float model it stands for never exists:
    loading a quantized checkpoint takes the memory of the quantized model. Uninitialized is safe because
    `Transformer.load_weights` refuses weights that miss any tensor, and the Transformer has no buffers of its own.
    """
    with torch.device("meta"):
        model = Transformer(model_cfg)
        check_group_size(model, cfg)
        for name, layer in quantizable(model):
            _replace(model, name, QuantLinear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                              method=cfg.method, group_size=cfg.group_size))
    model.to_empty(device="cpu")
    if model_cfg.tie_embeddings:  # to_empty gives every parameter a tensor of its own, which unties the head
        model.lm_head.weight = model.tok_emb.weight
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Put float Linears holding the dequantized weights back, in place (for exporters that need floats)."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, QuantLinear):
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype,
                              device=layer.qweight.device)
            with torch.no_grad():
                plain.weight.copy_(layer.dequantized(dtype))
                if layer.bias is not None:
                    plain.bias.copy_(layer.bias)
            _replace(model, name, plain.train(layer.training))
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def refuse_quantized(model: nn.Module, what: str, where: str) -> None:
    """A one-line HainaError when `what` (a command that needs float weights) meets a quantized model."""
    if is_quantized(model):
        raise HainaError(f"{what} needs float weights, and {where} is quantized (`haina compress quantize`); use "
                         "the checkpoint it was quantized from")


__all__ = [
    "FORMAT",
    "GROUP_SIZES",
    "METHODS",
    "SECTION",
    "QuantConfig",
    "QuantLinear",
    "build_quantized",
    "check_group_size",
    "dequantize_model",
    "dequantize_weight",
    "is_quantized",
    "quantizable",
    "quantize_model",
    "quantize_weight",
    "recorded_quantization",
    "refuse_quantized",
]
