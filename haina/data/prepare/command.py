"""`haina data prepare`: the command-line face of `prepare_documents`."""

from __future__ import annotations

import inspect
from typing import Literal

from haina.core.config import from_dict, load_yaml, merge, parse_overrides
from haina.core.log import info
from haina.data.prepare.config import Format, PrepareConfig
from haina.data.prepare.pipeline import prepare_documents


def prepare(input: list[str], out: str, format: Format = "auto", text_field: str = "text", label_field: str = "label", filters: str = "gopher,c4,repetition",
            dedup: str = "exact,minhash", minhash_threshold: float = 0.8, minhash_perm: int = 128,
            pii: bool = False, val_fraction: float = 0.05, test_fraction: float = 0.0, workers: int = 0,
            resume: bool = False, split_lines: bool = False, split_paragraphs: bool = False,
            config: str | None = None, code: bool = False,
            output_format: Literal["jsonl", "parquet"] = "jsonl", overwrite: bool = False,
            overrides: list[str] = ()) -> int:
    """Clean, filter, deduplicate and split raw documents, with a report and every drop kept.

    Reads files, directories and globs (.txt, .jsonl/.json, .csv/.tsv, .parquet, Hugging Face
    datasets saved with save_to_disk; .gz/.zst/.bz2 transparently), normalizes Unicode and
    whitespace, applies the Gopher quality, Gopher repetition and C4 rules, optionally scrubs PII,
    removes exact and MinHash near-duplicates (first occurrence kept), splits by content hash
    (stratified by label) and writes OUT/train, OUT/val, OUT/test as zstd JSON-lines (or Parquet)
    shards, OUT/rejects/<reason>.jsonl.zst, OUT/report.json and OUT/report.md. Thresholds come from
    --config (a YAML such as recipes/data/default.yaml) and dotted overrides such as
    --gopher.min_words=20 or --c4.min_sentences=0; options that differ from their defaults
    override the file.

    Args:
        input: input files, directories (read recursively) and glob patterns.
        out: output directory; built beside it and swapped in at the end. An earlier `data prepare`
            output there is replaced; anything else is refused unless --overwrite.
        format: input format; auto decides by file extension.
        text_field: the field or column holding the text.
        label_field: the field or column holding a label (used when present).
        filters: comma list of quality filters: gopher, c4, repetition, or none.
        dedup: comma list of dedup methods: exact, minhash, or none.
        minhash_threshold: Jaccard similarity above which two documents are near-duplicates.
        minhash_perm: MinHash permutations.
        pii: replace e-mails, phones, IPs, payment cards, IBANs, US SSNs, PRC IDs and secrets with placeholders
            (`<EMAIL>` …) before anything is written, rejects included.
        val_fraction: share of documents for validation.
        test_fraction: share of documents for test.
        workers: worker processes for reading and filtering (0 = all cores).
        resume: continue an interrupted run from its work kept in .OUT.haina-partial/ beside OUT,
            skipping input files already done.
        split_lines: in .txt files, every line is a document.
        split_paragraphs: in .txt files, every blank-line-separated paragraph is a document.
        config: YAML file of settings and filter thresholds.
        code: the corpus is source code: turn off C4's curly-brace, javascript and per-line prose rules.
        output_format: shard format of train/val/test.
        overwrite: replace an existing OUT that is not a `data prepare` output (never one that is, holds or
            lies inside an input).
    """
    given = {"format": format, "text_field": text_field, "label_field": label_field, "filters": filters,
             "dedup": dedup, "minhash_threshold": minhash_threshold, "minhash_perm": minhash_perm, "pii": pii,
             "val_fraction": val_fraction, "test_fraction": test_fraction, "workers": workers,
             "split_lines": split_lines, "split_paragraphs": split_paragraphs, "code": code,
             "output_format": output_format}
    defaults = {k: p.default for k, p in inspect.signature(prepare).parameters.items()}
    data = load_yaml(config) if config else {}
    # Without a config file every option counts; with one, only options changed from their defaults do.
    data = merge(data, {k: v for k, v in given.items() if not config or v != defaults[k]})
    data = merge(data, parse_overrides(list(overrides)))
    cfg = from_dict(PrepareConfig, data)
    report = prepare_documents(input, out, cfg, resume=resume, overwrite=overwrite)
    d = report["documents"]
    splits = ", ".join(f"{s} {v['documents']:,}" for s, v in report["splits"].items() if v["documents"])
    info(f"kept {d['kept']:,} of {d['in']:,} documents ({splits}); report: {out}/report.md")
    return 0


__all__ = ["PrepareConfig", "prepare", "prepare_documents"]
