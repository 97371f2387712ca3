"""Loading what an evaluation needs: the model (with its adapter), its tokenizer, the device and precision."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from haina.core.device import DTypeName as DType
from haina.core.errors import HainaError
from haina.model import Transformer
from haina.tokenizer import Tokenizer


def load_for_eval(checkpoint: str | Sequence[str], adapter: str | None = None, device: str = "auto",
                  dtype: DType = "float32", need_tokenizer: bool = True,
                  weights: Sequence[float] | None = None) -> tuple[Transformer, Tokenizer | None, torch.device]:
    """(model in eval mode, tokenizer, device) for `--checkpoint` plus `--adapter`.

    Args:
        checkpoint: a checkpoint or run directory (a LoRA run loads its recorded base); several load as one
            `haina.generate.ensemble.Ensemble`, which scores like a single model.
        adapter: LoRA adapters trained on that base, applied on top (a single checkpoint only).
        device: auto, cpu, cuda, cuda:1 or mps.
        dtype: the precision of the weights; float16 needs CUDA or MPS.
        need_tokenizer: a checkpoint without a tokenizer is a one-line error.
        weights: an ensemble's weights, one per checkpoint (default: equal).
    """
    from haina.core.device import resolve_device, resolve_dtype
    from haina.generate.command import check_adapter_path
    from haina.generate.ensemble import as_checkpoints, load_ensemble

    paths = as_checkpoints(checkpoint)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    check_adapter_path(adapter)
    model, tok = load_ensemble(paths, weights, device=dev, dtype=torch_dtype, adapter=adapter)
    if need_tokenizer and tok is None:
        raise HainaError(f"checkpoint {paths[0]} has no tokenizer/ directory; evaluation needs one to read text")
    return model, tok, dev
