"""Normalize: Unicode NFC, control characters, whitespace runs, optional mojibake repair.

Every later stage (filters, hashes, MinHash) sees normalized text, so two documents that differ
only in how an 'é' was encoded or in trailing spaces count as the same document.
"""

from __future__ import annotations

import re
import unicodedata

from haina.data.prepare.config import NormalizeConfig

# C0/C1 controls except tab and newline, plus zero-width and BOM characters that render as nothing.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u2028\u2029\u2060\ufeff]")
# Whitespace other than newlines (tabs, NBSP, ideographic space …), single plain spaces excepted so that
# the common case substitutes nothing.
_SPACES = re.compile(r"[^\S\n]{2,}|[^\S \n]")
_TRAILING = re.compile(r" \n ?|\n ")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text: str, cfg: NormalizeConfig) -> str:
    """Return `text` normalized per `cfg`; an all-whitespace text becomes ''."""
    if cfg.fix_mojibake:
        import ftfy

        text = ftfy.fix_text(text, normalization="NFC")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if cfg.strip_control:
        text = _CONTROL.sub("", text)
    if cfg.nfc and not text.isascii():
        text = unicodedata.normalize("NFC", text)
    if cfg.collapse_whitespace:
        # The `in` tests (C speed) skip regex passes that would change nothing, the common case.
        if not text.isascii() or "\t" in text or "  " in text:
            text = _SPACES.sub(" ", text)
        if " \n" in text or "\n " in text:
            text = _TRAILING.sub("\n", text)
        # Paragraph breaks (a blank line) carry meaning for the repetition rules; more than one is noise.
        if "\n\n\n" in text:
            text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def normalize_stage(docs: list[dict], cfg: NormalizeConfig, stats: dict) -> tuple[list[dict], list[dict]]:
    """Normalize a batch; documents left empty are dropped with reason 'empty'."""
    kept, dropped = [], []
    for doc in docs:
        doc["text"] = normalize_text(doc["text"], cfg)
        if doc["text"]:
            kept.append(doc)
        else:
            doc["reason"] = "empty"
            dropped.append(doc)
    return kept, dropped
