"""Quality filters: the Gopher quality and repetition rules and the C4 rules.

Each rule returns a reason (a short string naming the rule) or None; the first failing rule names
the drop, so every rule has its own count in the report. Rules that count words need words: in
scripts written without spaces between words (Chinese, Japanese, Thai …) each character counts as
a word, and rules that only make sense for English (stop words, mean word length) are skipped, so
ordinary Chinese prose is never dropped for having "one 300-character word".
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable

from haina.data.prepare.config import C4Config, GopherQualityConfig, PrepareConfig, RepetitionConfig

# Han, Hiragana/Katakana, Thai, Lao, Khmer, Myanmar: scripts that do not separate words with spaces.
_NO_SPACE_CHARS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff"
_NO_SPACE = re.compile(f"[{_NO_SPACE_CHARS}]")
_CJK_TOKENS = re.compile(f"[{_NO_SPACE_CHARS}]|[^\\s{_NO_SPACE_CHARS}]+")
_PUNCT = string.punctuation + "…–—‘’“”«»·•。，、；：！？（）【】《》「」『』"
_WORD_WITH_LETTER = re.compile(r"[^\W\d_]")
_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")
_BULLETS = ("•", "-", "*", "‣", "◦", "▪", "●", "–")
_ELLIPSES = ("...", "…")
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
_END_PUNCT = (".", "!", "?", '"', "'", "。", "！", "？", "”", "」", "』")
_INNER_SENTENCE_ENDS = (". ", "! ", "? ", "。", "！", "？")
_CJK_SENTENCE_ENDS = ("。", "！", "？")


def is_no_space_script(text: str) -> bool:
    """True when over a third of the non-space characters are from scripts without word spaces."""
    if not _NO_SPACE.search(text):  # the fast path for most text
        return False
    n = len(_NO_SPACE.findall(text))
    return n > 0.33 * (len(text) - text.count(" ") - text.count("\n"))


def words_of(text: str, no_space: bool) -> list[str]:
    """Whitespace words; in no-space scripts each such character is its own word."""
    return _CJK_TOKENS.findall(text) if no_space else text.split()


# --- Gopher quality -------------------------------------------------------------------------------------------


def gopher_quality(text: str, words: list[str], no_space: bool, cfg: GopherQualityConfig) -> str | None:
    """The Gopher quality rules; returns the first failed rule's reason or None."""
    n_words = len(words)
    # Most words are all letters (str.isalpha runs in C); only the rest need a closer look. This
    # stage must run at thousands of documents per second per core.
    odd = [w for w in words if not w.isalpha()]
    symbol_words = [w for w in odd if not w.strip(_PUNCT)]
    letterless = sum(1 for w in odd if not _WORD_WITH_LETTER.search(w))
    n_content = n_words - len(symbol_words)  # words that are not only punctuation
    if n_content < cfg.min_words:
        return "gopher_min_words"
    if n_content > cfg.max_words:
        return "gopher_max_words"
    if not no_space and n_content:  # with min_words 0, a document of symbols only has no mean word length
        mean_len = (sum(map(len, words)) - sum(map(len, symbol_words))) / n_content
        if not cfg.min_mean_word_length <= mean_len <= cfg.max_mean_word_length:
            return "gopher_mean_word_length"
    if text.count("#") / n_words > cfg.max_symbol_word_ratio:
        return "gopher_symbol_ratio"
    if (text.count("...") + text.count("…")) / n_words > cfg.max_symbol_word_ratio:
        return "gopher_symbol_ratio"
    lines = text.split("\n")
    if sum(1 for ln in lines if ln.lstrip().startswith(_BULLETS)) / len(lines) > cfg.max_bullet_lines_ratio:
        return "gopher_bullet_lines"
    if sum(1 for ln in lines if ln.rstrip().endswith(_ELLIPSES)) / len(lines) > cfg.max_ellipsis_lines_ratio:
        return "gopher_ellipsis_lines"
    if (n_words - letterless) / n_words < cfg.min_alpha_words_ratio:
        return "gopher_alpha_words"
    if not no_space and cfg.min_stop_words > 0:
        stop = frozenset(cfg.stop_words)
        found = 0
        for w in text.lower().split():
            if w in stop or w.strip(_PUNCT) in stop:
                found += 1
                if found >= cfg.min_stop_words:
                    break
        if found < cfg.min_stop_words:
            return "gopher_stop_words"
    return None


# --- Gopher repetition ----------------------------------------------------------------------------------------


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items seen before, their total characters)."""
    seen: set[str] = set()
    count = chars = 0
    for it in items:
        if it in seen:
            count += 1
            chars += len(it)
        else:
            seen.add(it)
    return count, chars


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return list(zip(*(words[i:] for i in range(n))))


def _ngram_chars(gram: tuple[str, ...]) -> int:
    return sum(map(len, gram)) + len(gram) - 1  # joined with single spaces


def _dup_ngram_chars(grams: list[tuple[str, ...]], n: int) -> int:
    """Characters covered by n-grams that occurred before (non-overlapping, as in Gopher/datatrove)."""
    seen: set[tuple[str, ...]] = set()
    chars = i = 0
    while i < len(grams):
        g = grams[i]
        if g in seen:
            chars += _ngram_chars(g)
            i += n
        else:
            seen.add(g)
            i += 1
    return chars


def _top_ngram(counts: Counter, total: int, frac: float) -> tuple[bool, int]:
    """(whether the most frequent n-gram covers more than `frac` of the text, its count)."""
    top = max(counts.values())
    if top < 2:
        return False, top
    gram = next(g for g, c in counts.items() if c == top)  # the first of the most frequent, as most_common(1)
    return bool(frac) and _ngram_chars(gram) * top / total > frac, top


def gopher_repetition(text: str, words: list[str], cfg: RepetitionConfig) -> str | None:
    """The Gopher repetition rules; returns the first failed rule's reason or None.

    An n-gram that occurs once is not repetition, so a document whose most frequent n-gram is
    unique skips the rules for longer n-grams (none of them can repeat either) — the common case,
    and what keeps this stage fast.
    """
    total = len(text)
    if "\n\n" not in text:
        paragraphs = [text]
    elif "\n\n\n" in text:
        paragraphs = _PARAGRAPHS.split(text)
    else:
        paragraphs = text.split("\n\n")  # str.split is several times faster than re.split
    dup, chars = _duplicates(paragraphs)
    if cfg.max_dup_para_frac and dup / len(paragraphs) > cfg.max_dup_para_frac:
        return "repetition_dup_paragraphs"
    if cfg.max_dup_para_char_frac and chars / total > cfg.max_dup_para_char_frac:
        return "repetition_dup_paragraph_chars"
    lines = [ln for ln in text.split("\n") if ln] or [text]
    dup, chars = _duplicates(lines)
    if cfg.max_dup_line_frac and dup / len(lines) > cfg.max_dup_line_frac:
        return "repetition_dup_lines"
    if cfg.max_dup_line_char_frac and chars / total > cfg.max_dup_line_char_frac:
        return "repetition_dup_line_chars"
    for n, frac in cfg.top_ngrams():
        if len(words) < n:
            return None
        failed, top = _top_ngram(Counter(zip(*(words[i:] for i in range(n)))), total, frac)
        if failed:
            return f"repetition_top_{n}gram"
        if top < 2:
            return None
    for n, frac in cfg.dup_ngrams():
        if len(words) < n:
            return None
        grams = _ngrams(words, n)
        if len(set(grams)) == len(grams):
            return None
        if frac and _dup_ngram_chars(grams, n) / total > frac:
            return f"repetition_dup_{n}gram"
    return None


# --- C4 -------------------------------------------------------------------------------------------------------


def _line_words(line: str, maybe_no_space: bool) -> int:
    if maybe_no_space and is_no_space_script(line):
        return len(_CJK_TOKENS.findall(line))
    return line.count(" ") + 1 if "  " not in line else len(line.split())


def c4_filter(text: str, cfg: C4Config, code: bool, stats: dict) -> tuple[str, str | None]:
    """The C4 rules: returns (text with bad lines removed, reason or None).

    With `code`, the curly-brace page rule and the prose line rules (terminal punctuation,
    words per line, javascript, sentence count) are off: they would delete every line of code.
    """
    low = text.lower()
    if cfg.lorem_ipsum and "lorem ipsum" in low:
        return text, "c4_lorem_ipsum"
    if cfg.curly_braces and not code and "{" in text:
        return text, "c4_curly_braces"
    prose = not code
    # Whole-document `in` tests first: most documents have no javascript or policy line to look for.
    javascript = prose and cfg.remove_javascript_lines and "javascript" in low
    policy = cfg.remove_policy_lines and any(p in low for p in cfg.policy_phrases)
    maybe_no_space = _NO_SPACE.search(text) is not None
    kept: list[str] = []
    sentences = 0
    for line in text.split("\n"):
        stripped = line.strip()
        if not stripped:
            kept.append(line)  # paragraph breaks survive
            continue
        if cfg.max_word_length and len(stripped) > cfg.max_word_length and max(map(len, stripped.split())) > \
                cfg.max_word_length:
            stats["c4_lines_long_word"] = stats.get("c4_lines_long_word", 0) + 1
            continue
        if cfg.remove_citations and "[" in stripped:
            stripped = _CITATION.sub("", stripped).strip()
            line = stripped
        if prose and cfg.terminal_punctuation and (not stripped.endswith(_END_PUNCT) or stripped.endswith("...")):
            stats["c4_lines_no_terminal_punct"] = stats.get("c4_lines_no_terminal_punct", 0) + 1
            continue
        if prose and cfg.min_words_per_line and _line_words(stripped, maybe_no_space) < cfg.min_words_per_line:
            stats["c4_lines_few_words"] = stats.get("c4_lines_few_words", 0) + 1
            continue
        if javascript or policy:
            line_low = stripped.lower()
            if javascript and "javascript" in line_low:
                stats["c4_lines_javascript"] = stats.get("c4_lines_javascript", 0) + 1
                continue
            if policy and any(p in line_low for p in cfg.policy_phrases):
                stats["c4_lines_policy"] = stats.get("c4_lines_policy", 0) + 1
                continue
        if prose:
            # Sentence ends inside the line, plus the line's own end (C4 counted with a sentence splitter).
            inner = sum(map(stripped.count, _INNER_SENTENCE_ENDS))
            sentences += inner + (0 if stripped.endswith(_CJK_SENTENCE_ENDS) else 1)
        kept.append(line)
    out = "\n".join(kept).strip()
    if len(kept) < text.count("\n") + 1 and "\n\n\n" in out:  # removed lines may leave blank runs
        out = _PARAGRAPHS.sub("\n\n", out)
    if not out:
        return out, "c4_no_lines_left"
    if prose and cfg.min_sentences and sentences < cfg.min_sentences:
        return out, "c4_min_sentences"
    return out, None


# --- the stage ------------------------------------------------------------------------------------------------


def make_filter_stage(cfg: PrepareConfig) -> Callable[[list[dict], dict], tuple[list[dict], list[dict]]]:
    """A stage (docs, stats) -> (kept, dropped) running cfg.filters in order; dropped docs get a 'reason'."""
    filters = cfg.filters

    def stage(docs: list[dict], stats: dict) -> tuple[list[dict], list[dict]]:
        kept, dropped = [], []
        for doc in docs:
            reason = filter_document(doc, cfg, filters, stats)
            if reason is None:
                kept.append(doc)
            else:
                doc["reason"] = reason
                dropped.append(doc)
        return kept, dropped

    return stage


def filter_document(doc: dict, cfg: PrepareConfig, filters: tuple[str, ...], stats: dict) -> str | None:
    """Run the filters on one document (C4 may rewrite its text); return a reason or None."""
    text = doc["text"]
    no_space = is_no_space_script(text)
    words = None
    for name in filters:
        if name == "c4":
            text, reason = c4_filter(text, cfg.c4, cfg.code, stats)
            doc["text"] = text
            if reason:
                return reason
            continue
        if words is None:
            words = words_of(text, no_space)  # never empty: normalize dropped blank documents
        if name == "repetition":
            reason = gopher_repetition(text, words, cfg.repetition)
        else:
            reason = gopher_quality(text, words, no_space, cfg.gopher)
        if reason:
            return reason
    return None
