"""Write checkpoints in other ecosystems' formats (Hugging Face `transformers`) and read them back."""

from haina.export.hf import export_hf, import_hf

__all__ = ["export_hf", "import_hf"]
