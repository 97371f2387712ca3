"""`PrepareConfig`: every knob of `haina data prepare`, each filter threshold included.

The defaults are the published ones (Gopher: Rae et al. 2021, Table A1; C4: Raffel et al. 2020,
as implemented by datatrove), so `recipes/data/default.yaml` and this file say the same thing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

from haina.core.config import to_dict
from haina.core.errors import HainaError

FILTERS = ("repetition", "gopher", "c4")  # the order FineWeb ran them in (datatrove)
DEDUPS = ("exact", "minhash")
FORMATS = ("auto", "txt", "jsonl", "json", "csv", "tsv", "parquet", "hf")

Format = Literal["auto", "txt", "jsonl", "json", "csv", "tsv", "parquet", "hf"]


@dataclass(frozen=True, kw_only=True)
class NormalizeConfig:
    """Unicode and whitespace normalization, applied before any filter."""

    nfc: bool = True
    fix_mojibake: bool = False  # ftfy.fix_text: repairs 'cafÃ©' → 'café' but costs ~10x the rest of normalize
    strip_control: bool = True
    collapse_whitespace: bool = True


@dataclass(frozen=True, kw_only=True)
class GopherQualityConfig:
    """Gopher quality rules (MassiveText, Rae et al. 2021, section A.1.1)."""

    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # '#' and '...' each, per word
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    stop_words: tuple[str, ...] = ("the", "be", "to", "of", "and", "that", "have", "with")


@dataclass(frozen=True, kw_only=True)
class RepetitionConfig:
    """Gopher repetition rules (Rae et al. 2021, Table A1); a threshold of 0 turns its rule off."""

    max_dup_line_frac: float = 0.3
    max_dup_para_frac: float = 0.3
    max_dup_line_char_frac: float = 0.2
    max_dup_para_char_frac: float = 0.2
    max_top_2gram_char_frac: float = 0.20
    max_top_3gram_char_frac: float = 0.18
    max_top_4gram_char_frac: float = 0.16
    max_dup_5gram_char_frac: float = 0.15
    max_dup_6gram_char_frac: float = 0.14
    max_dup_7gram_char_frac: float = 0.13
    max_dup_8gram_char_frac: float = 0.12
    max_dup_9gram_char_frac: float = 0.11
    max_dup_10gram_char_frac: float = 0.10

    def top_ngrams(self) -> tuple[tuple[int, float], ...]:
        return tuple((n, getattr(self, f"max_top_{n}gram_char_frac")) for n in (2, 3, 4))

    def dup_ngrams(self) -> tuple[tuple[int, float], ...]:
        return tuple((n, getattr(self, f"max_dup_{n}gram_char_frac")) for n in range(5, 11))


@dataclass(frozen=True, kw_only=True)
class C4Config:
    """C4 rules (Raffel et al. 2020): line rules remove lines, page rules drop the document."""

    terminal_punctuation: bool = True  # keep only lines ending in . ! ? " ' (and CJK 。！？)
    min_words_per_line: int = 3
    max_word_length: int = 1000
    min_sentences: int = 5  # after line removal; 0 turns it off
    remove_javascript_lines: bool = True
    remove_policy_lines: bool = True
    remove_citations: bool = True
    lorem_ipsum: bool = True
    curly_braces: bool = True
    policy_phrases: tuple[str, ...] = ("terms of use", "privacy policy", "cookie policy", "uses cookies",
                                       "use of cookies", "use cookies")


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    """Everything `prepare_documents` needs; loadable from YAML with `haina.core.config.from_dict`."""

    format: Format = "auto"
    text_field: str = "text"
    label_field: str = "label"
    split_lines: bool = False
    split_paragraphs: bool = False
    filters: tuple[str, ...] = FILTERS
    dedup: tuple[str, ...] = DEDUPS
    minhash_threshold: float = 0.8
    minhash_perm: int = 128
    minhash_ngram: int = 4  # character n-grams; see dedup.py for why characters and why 4
    pii: bool = False
    code: bool = False  # code corpora: C4's curly-brace, javascript and per-line prose rules are off
    val_fraction: float = 0.05
    test_fraction: float = 0.0
    workers: int = 0  # 0 = every core
    output_format: Literal["jsonl", "parquet"] = "jsonl"
    shard_docs: int = 100_000
    batch_size: int = 512
    imbalance_warning_ratio: float = 10.0  # warn when the largest class outnumbers the smallest this many times
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    gopher: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    repetition: RepetitionConfig = field(default_factory=RepetitionConfig)
    c4: C4Config = field(default_factory=C4Config)

    def __post_init__(self) -> None:
        filters = _names(self.filters, FILTERS, "filter")
        dedup = _names(self.dedup, DEDUPS, "dedup method")
        object.__setattr__(self, "filters", filters)
        object.__setattr__(self, "dedup", dedup)
        if self.split_lines and self.split_paragraphs:
            raise HainaError("choose one of --split-lines and --split-paragraphs, not both")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise HainaError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise HainaError("val_fraction + test_fraction must be below 1 (something has to be left for training)")
        if not 0.0 < self.minhash_threshold < 1.0:
            raise HainaError(f"minhash_threshold must be in (0, 1), got {self.minhash_threshold}")
        if self.minhash_perm < 16:
            raise HainaError(f"minhash_perm must be at least 16, got {self.minhash_perm}")
        if self.minhash_ngram < 1:
            raise HainaError(f"minhash_ngram must be at least 1, got {self.minhash_ngram}")
        if self.workers < 0:
            raise HainaError(f"workers must be 0 (all cores) or positive, got {self.workers}")
        if self.shard_docs < 1 or self.batch_size < 1:
            raise HainaError("shard_docs and batch_size must be positive")

    def fingerprint(self) -> str:
        """A hash of every setting that changes the output (not `workers`), and of haina's version, for --resume.

        The version is in it because the filters and the PII scrubber change between releases: work done by another
        version must be redone, not reused (it could hold text an older scrubber let through).
        """
        from haina import __version__

        d = {**to_dict(dataclasses.replace(self, workers=1)), "haina_version": __version__}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _names(value: tuple[str, ...] | str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    """Normalize a comma list or tuple of names; 'none' (or nothing) means the empty tuple."""
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [s.strip().lower() for s in items if s and s.strip()]
    if items in ([], ["none"]):
        return ()
    for s in items:
        if s not in known:
            raise HainaError(f"unknown {what} '{s}'; choose from {', '.join(known)} (comma-separated) or 'none'")
    # The canonical order, however they were listed: the same flags always give the same pipeline.
    return tuple(k for k in known if k in items)
