"""Text generation metrics: BLEU, chrF, ROUGE and exact match, for a corpus and for each example.

The numbers are those of the reference implementations, called directly: `sacrebleu` for BLEU and chrF
(corpus-level `corpus_bleu` / `corpus_chrf` for the headline, `sentence_bleu` / `sentence_chrf` for each
example) and Google's `rouge-score` for ROUGE-1/2/L F1 (`RougeScorer` with the Porter stemmer; the corpus
value is the mean over examples, as ROUGE is usually reported). Hugging Face `evaluate` is not used: it
downloads its metrics from the hub.

Scales follow the libraries, so numbers compare with papers: BLEU and chrF in [0, 100], ROUGE F1 and
exact match in [0, 1]. Exact match compares after light normalisation only — leading and trailing
whitespace stripped and inner runs of whitespace collapsed to one space; case and punctuation count.

An example may have several references; every metric scores against all of them (BLEU and chrF the
multi-reference way, ROUGE and exact match by the best-matching reference).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

from haina.core.errors import HainaError

__all__ = [
    "HEADLINE",
    "METRICS",
    "check_metric_packages",
    "corpus_scores",
    "exact_match",
    "normalize",
    "parse_metrics",
    "score_names",
    "sentence_scores",
]

# What `--metrics` accepts, and the scores each one yields (ROUGE gives three).
METRICS: dict[str, tuple[str, ...]] = {
    "bleu": ("bleu",),
    "chrf": ("chrf",),
    "rouge": ("rouge1", "rouge2", "rougeL"),
    "exact_match": ("exact_match",),
}
# The one score that stands for a metric in a plot (ROUGE-L: the variant usually quoted alone).
HEADLINE = {"bleu": "bleu", "chrf": "chrf", "rouge": "rougeL", "exact_match": "exact_match"}

_PACKAGES = {"bleu": ("sacrebleu", "sacrebleu"), "chrf": ("sacrebleu", "sacrebleu"),
             "rouge": ("rouge_score", "rouge-score")}


def parse_metrics(metrics: Iterable[str] | None) -> list[str]:
    """The metrics `--metrics` names (`bleu,chrf` and `bleu chrf` both work), in order, without repeats.

    None or empty means all of them. An unknown name is a one-line error listing the known ones.
    """
    if not metrics:
        return list(METRICS)
    names = [m.strip().lower() for item in metrics for m in str(item).split(",") if m.strip()]
    for m in names:
        if m not in METRICS:
            raise HainaError(f"--metrics {m} is not one of {', '.join(METRICS)}")
    if not names:
        raise HainaError(f"--metrics is empty; choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def score_names(metrics: Iterable[str]) -> list[str]:
    """The score names the metrics produce: ["bleu", "rouge1", "rouge2", "rougeL", ...]."""
    return [s for m in metrics for s in METRICS[m]]


def check_metric_packages(metrics: Iterable[str]) -> None:
    """A one-line error when a metric's package is not installed (before any model is loaded)."""
    import importlib.util

    for m in metrics:
        if m in _PACKAGES:
            module, dist = _PACKAGES[m]
            if importlib.util.find_spec(module) is None:
                raise HainaError(f"--metrics {m} needs the {dist} package: pip install 'haina[eval]'")


def normalize(text: str) -> str:
    """Text as exact match compares it: stripped, every run of whitespace one space (case kept)."""
    return re.sub(r"\s+", " ", text).strip()


def exact_match(hypothesis: str, references: Sequence[str]) -> float:
    """1.0 when the normalised hypothesis equals any normalised reference, else 0.0."""
    hyp = normalize(hypothesis)
    return float(any(hyp == normalize(r) for r in references))


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(METRICS["rouge"]), use_stemmer=True)


def _rouge_scores(hypothesis: str, references: Sequence[str]) -> dict[str, float]:
    # score_multi keeps, for each ROUGE type, the reference with the best F1.
    found = _rouge().score_multi(list(references), hypothesis)
    return {k: float(found[k].fmeasure) for k in METRICS["rouge"]}


def sentence_scores(hypothesis: str, references: Sequence[str], metrics: Iterable[str]) -> dict[str, float]:
    """One example's scores: sacrebleu's sentence BLEU and chrF, ROUGE F1, exact match.

    Args:
        hypothesis: the generated text.
        references: one or more reference texts.
        metrics: names from `METRICS`.
    """
    refs = list(references)
    out: dict[str, float] = {}
    for m in metrics:
        if m == "bleu":
            import sacrebleu

            out["bleu"] = float(sacrebleu.sentence_bleu(hypothesis, refs).score)
        elif m == "chrf":
            import sacrebleu

            out["chrf"] = float(sacrebleu.sentence_chrf(hypothesis, refs).score)
        elif m == "rouge":
            out.update(_rouge_scores(hypothesis, refs))
        elif m == "exact_match":
            out["exact_match"] = exact_match(hypothesis, refs)
    return out


def _ref_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: one stream per reference position, None where an example has fewer references."""
    width = max(len(r) for r in references)
    return [[r[j] if j < len(r) else None for r in references] for j in range(width)]


def corpus_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]], metrics: Iterable[str],
                  per_example: Sequence[dict[str, float]] | None = None) -> dict[str, float]:
    """Corpus scores: sacrebleu's corpus BLEU and chrF; ROUGE and exact match averaged over examples.

    Args:
        hypotheses: one generated text per example.
        references: the references of each example (one or more).
        metrics: names from `METRICS`.
        per_example: `sentence_scores` already computed for these examples (saves recomputing the means).
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference lists")
    metrics = list(metrics)
    out: dict[str, float] = {}
    if not hypotheses:
        return {s: float("nan") for s in score_names(metrics)}
    streams = _ref_streams(references) if {"bleu", "chrf"} & set(metrics) else []
    for m in metrics:
        if m == "bleu":
            import sacrebleu

            out["bleu"] = float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)
        elif m == "chrf":
            import sacrebleu

            out["chrf"] = float(sacrebleu.corpus_chrf(list(hypotheses), streams).score)
        else:
            rows = per_example if per_example is not None else [
                sentence_scores(h, r, [m]) for h, r in zip(hypotheses, references)]
            for name in METRICS[m]:
                out[name] = sum(row[name] for row in rows) / len(rows)
    return out
