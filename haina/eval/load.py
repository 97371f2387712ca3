"""Loading what an evaluation needs: the model (with its adapter), its tokenizer, the device and precision."""

from __future__ import annotations

import torch

from haina.core.device import DTypeName as DType
from haina.core.errors import HainaError
from haina.model import Transformer
from haina.tokenizer import Tokenizer


def load_for_eval(checkpoint: str, adapter: str | None = None, device: str = "auto", dtype: DType = "float32",
                  need_tokenizer: bool = True) -> tuple[Transformer, Tokenizer | None, torch.device]:
    """(model in eval mode, tokenizer, device) for `--checkpoint` plus `--adapter`.

    Args:
        checkpoint: a checkpoint or run directory (a LoRA run loads its recorded base).
        adapter: LoRA adapters trained on that base, applied on top.
        device: auto, cpu, cuda, cuda:1 or mps.
        dtype: the precision of the weights; float16 needs CUDA or MPS.
        need_tokenizer: a checkpoint without a tokenizer is a one-line error.
    """
    from haina.core.device import resolve_device, resolve_dtype
    from haina.generate.command import check_adapter_path
    from haina.model.checkpoint import load_model

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    check_adapter_path(adapter)
    model, tok = load_model(checkpoint, device=dev, dtype=torch_dtype, adapter=adapter)
    if need_tokenizer and tok is None:
        raise HainaError(f"checkpoint {checkpoint} has no tokenizer/ directory; evaluation needs one to read text")
    return model, tok, dev
