"""Tokenizers: byte-level BPE and character vocabularies in Hugging Face's tokenizer.json format."""

from haina.tokenizer.tokenizer import EOT, Tokenizer

__all__ = ["EOT", "Tokenizer"]
