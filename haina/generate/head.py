"""The LM head of the engine's decode step: on a CPU, a oneDNN matmul over a pre-packed copy of the weight.

A decode step multiplies a few rows (one per running sequence) by the (vocab, n_embd) LM head. For
such a short, wide product MKL re-packs the whole weight on every call, so on a small model the head
cost a batched step as much as a fifth of its time. oneDNN can pack the weight once, as PyTorch's
own compiler does for frozen CPU linears. Measured on 2 AVX2 cores for a 8192 x 320 head, that
makes the head 1.3-3x faster at 2-32 rows (about the same for one row) and a batched engine about
9% faster end to end, at the price of one copy of the head's weight.

Everything else (GPUs, other dtypes, a head replaced by an adapter or with a bias, a torch without
oneDNN, a head above `MAX_PACKED_BYTES`) uses the head module as it is. The copy follows the
model: if the weight is updated in place or replaced (training between generations, a new
checkpoint loaded), or the head module itself is swapped, it is packed again at the next call.
"""

from __future__ import annotations

import torch
from torch import nn

from haina.model.packed import pack_weight

# A second copy of a larger head (a 128k vocabulary at fp32) costs more memory than a CPU server should
# spend on it unasked; such heads run unchanged.
MAX_PACKED_BYTES = 256 * 2**20
_PACK_ROWS_HINT = 16  # the batch size oneDNN picks its layout for; it serves any number of rows


class DecodeHead:
    """`head(x)`: logits (B, V) of final hidden states (B, C), as `model.lm_head(x)` computes them."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._reset(model.lm_head)

    @property
    def packed(self) -> bool:
        """Whether calls go through the packed copy (else through the head module)."""
        return self._packed is not None

    def _reset(self, lm_head: nn.Module) -> None:
        self.lm_head = lm_head
        self._packed: torch.Tensor | None = None
        self._stamp: tuple[int, int] | None = None  # (data pointer, version) of the weight that was packed
        if self._can_pack():
            self._pack()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.model.lm_head is not self.lm_head:
            self._reset(self.model.lm_head)
        if self._packed is not None:
            w = self.lm_head.weight
            if self._stamp != (w.data_ptr(), w._version):
                self._pack()  # a failure leaves the head on the plain path from now on
        if self._packed is None:
            return self.lm_head.forward(x)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, None, "none", [], "")

    def _can_pack(self) -> bool:
        head = self.lm_head
        if type(head) is not nn.Linear or head.bias is not None:
            return False
        w = head.weight
        return (w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2
                and w.numel() * w.element_size() <= MAX_PACKED_BYTES and torch.backends.mkldnn.is_available())

    def _pack(self) -> None:
        """Pack the current weight (`haina.model.packed.pack_weight`); on any failure, stay unpacked."""
        w = self.lm_head.weight
        self._packed = pack_weight(w, _PACK_ROWS_HINT, probe_rows=2)
        self._stamp = None if self._packed is None else (w.data_ptr(), w._version)
