"""Every filter rule on hand-made documents that should fail it, and ones that should pass."""

import pytest

from haina.data.prepare.config import C4Config, GopherQualityConfig, PrepareConfig, RepetitionConfig
from haina.data.prepare.filters import (
    c4_filter,
    filter_document,
    gopher_quality,
    gopher_repetition,
    is_no_space_script,
    words_of,
)

SENTENCES = [
    "The river ran past the old mill and into the town.",
    "Children played with a red ball near the water.",
    "Their parents talked about the weather and the harvest.",
    "A baker sold warm bread to everyone that passed by.",
    "In the evening the lamps were lit one by one.",
    "Nobody could remember a quieter summer than that one.",
    "The mayor wrote letters to each of the neighbouring villages.",
    "Travellers arrived with stories of mountains far to the north.",
    "Some of them stayed for a week, others left the next morning.",
    "By autumn the fields were golden and ready to be cut.",
]
PROSE = " ".join(SENTENCES[:5]) + "\n\n" + " ".join(SENTENCES[5:])  # ~100 words, 10 sentences, 2 paragraphs

CHINESE = ("北京是中华人民共和国的首都，也是全国的政治中心和文化中心。这座城市有三千多年的建城史，"
           "留下了许多著名的古迹，例如故宫、天坛和颐和园。每年都有大量游客从世界各地来到这里参观。\n\n"
           "近年来，北京的交通发展很快，地铁线路已经覆盖了城市的大部分地区。人们可以方便地乘坐地铁上班、"
           "上学和购物。与此同时，政府也在努力改善空气质量，让居民的生活环境变得更好。")

CODE = '''def add(a, b):
    """Return the sum of a and b."""
    return {"sum": a + b}


class Counter:
    def __init__(self):
        self.n = 0
'''


def quality(text, **changes):
    cfg = GopherQualityConfig(**changes)
    ns = is_no_space_script(text)
    return gopher_quality(text, words_of(text, ns), ns, cfg)


def repetition(text, **changes):
    return gopher_repetition(text, words_of(text, is_no_space_script(text)), RepetitionConfig(**changes))


def c4(text, code=False, **changes):
    stats = {}
    out, reason = c4_filter(text, C4Config(**changes), code, stats)
    return out, reason, stats


# --- Gopher quality -----------------------------------------------------------------------------------------

def test_prose_passes_every_rule():
    assert quality(PROSE) is None
    assert repetition(PROSE) is None
    assert c4(PROSE)[1] is None


def test_gopher_min_and_max_words():
    assert quality(" ".join(SENTENCES[:3])) == "gopher_min_words"
    assert quality(PROSE, max_words=60) == "gopher_max_words"
    assert quality(PROSE, min_words=60) is None


def test_gopher_mean_word_length():
    short = " ".join(["a an the of to be it is"] * 10) + " and that have with"
    assert quality(short) == "gopher_mean_word_length"
    long = " ".join(["extraordinarily incomprehensibilities the and"] * 20)
    assert quality(long) == "gopher_mean_word_length"


def test_gopher_symbol_ratio_hashes_and_ellipses():
    assert quality(PROSE + " " + "#tag " * 15) == "gopher_symbol_ratio"
    assert quality(PROSE + " wait... " * 15) == "gopher_symbol_ratio"
    assert quality(PROSE + " #one #two") is None


def test_gopher_bullet_lines():
    bullets = "\n".join(f"- {s}" for s in SENTENCES) + "\n" + "\n".join(f"• {s}" for s in SENTENCES)
    assert quality(bullets) == "gopher_bullet_lines"
    half = "\n".join(f"- {s}" if i % 2 else s for i, s in enumerate(SENTENCES * 2))
    assert quality(half) is None


def test_gopher_ellipsis_lines():
    lines = "\n".join(s[:-1] + "..." if i % 2 else s for i, s in enumerate(SENTENCES * 2))
    assert quality(lines, max_symbol_word_ratio=1.0) == "gopher_ellipsis_lines"
    few = "\n".join(s[:-1] + "..." if i == 0 else s for i, s in enumerate(SENTENCES * 2))
    assert quality(few) is None


def test_gopher_alpha_words():
    numbers = PROSE + " " + " ".join(str(i) for i in range(40))
    assert quality(numbers) == "gopher_alpha_words"
    assert quality(PROSE + " 1 2 3 4 5") is None


def test_gopher_stop_words():
    no_stop = " ".join(w for w in PROSE.replace(".", "").split()
                       if w.lower() not in {"the", "be", "to", "of", "and", "that", "have", "with"})
    assert quality(no_stop + " " + no_stop) == "gopher_stop_words"
    assert quality(no_stop + " " + no_stop + " the river and the mill") is None


# --- Gopher repetition --------------------------------------------------------------------------------------

def test_repetition_duplicate_lines_and_paragraphs():
    lines = "\n".join(SENTENCES[:4] + ["Click here to subscribe now."] * 4)
    assert repetition(lines) == "repetition_dup_lines"
    paras = "\n\n".join(SENTENCES[:3] + [SENTENCES[3]] * 3)
    assert repetition(paras) == "repetition_dup_paragraphs"


def test_repetition_duplicate_line_and_paragraph_chars():
    big = "This long line repeats itself and carries many characters with it every single time it appears."
    lines = "\n".join(SENTENCES + [big, big, big])
    assert repetition(lines, max_dup_para_char_frac=0) == "repetition_dup_line_chars"
    assert repetition(lines, max_dup_para_char_frac=0, max_dup_line_char_frac=0, max_top_2gram_char_frac=0,
                      max_top_3gram_char_frac=0, max_top_4gram_char_frac=0) is not None  # caught by n-grams
    paras = "\n\n".join(SENTENCES + [big, big, big])
    assert repetition(paras) == "repetition_dup_paragraph_chars"


def test_repetition_top_ngrams():
    text = PROSE + " " + "buy now " * 40
    assert repetition(text) == "repetition_top_2gram"
    assert repetition(text, max_top_2gram_char_frac=0) == "repetition_top_3gram"
    assert repetition(text, max_top_2gram_char_frac=0, max_top_3gram_char_frac=0) == "repetition_top_4gram"


def test_repetition_duplicate_ngrams():
    phrase = "the quick brown fox jumps over the lazy dog near the barn"
    text = PROSE + " " + " ".join(f"{phrase} {w}" for w in ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"])
    off = {f"max_top_{n}gram_char_frac": 0 for n in (2, 3, 4)}
    assert repetition(text, **off) == "repetition_dup_5gram"
    off.update({f"max_dup_{n}gram_char_frac": 0 for n in (5, 6, 7, 8, 9)})
    assert repetition(text, **off) == "repetition_dup_10gram"
    assert repetition(PROSE, **off) is None


# --- C4 -----------------------------------------------------------------------------------------------------

def test_c4_lorem_ipsum_and_curly_braces():
    assert c4(PROSE + "\nLorem ipsum dolor sit amet, consectetur.")[1] == "c4_lorem_ipsum"
    assert c4(PROSE + "\nUse {braces} in templates like this one.")[1] == "c4_curly_braces"


def test_c4_line_rules_remove_lines_and_count_them():
    text = "\n".join([*SENTENCES[:6], "Home | About | Contact", "Too short.", "Enable JavaScript to view this page.",
                      "Read our privacy policy before you continue.", "A citation here[12] is removed."])
    out, reason, stats = c4(text)
    assert reason is None
    assert "Home | About" not in out and "Too short." not in out
    assert "JavaScript" not in out and "privacy policy" not in out
    assert "A citation here is removed." in out and "[12]" not in out
    assert stats == {"c4_lines_no_terminal_punct": 1, "c4_lines_few_words": 1, "c4_lines_javascript": 1,
                     "c4_lines_policy": 1}


def test_c4_min_sentences_and_long_words():
    assert c4(" ".join(SENTENCES[:3]))[1] == "c4_min_sentences"
    assert c4(" ".join(SENTENCES[:3]), min_sentences=3)[1] is None
    _, reason, stats = c4(PROSE + "\nThis line has a " + "x" * 1001 + " word.")
    assert reason is None and stats["c4_lines_long_word"] == 1
    assert c4("No terminal punctuation anywhere\nNor here")[1] == "c4_no_lines_left"


def test_c4_code_mode_keeps_code():
    out, reason, _ = c4(CODE)
    assert reason == "c4_curly_braces"
    out, reason, _ = c4(CODE, code=True)
    assert reason is None and out == CODE.strip()


# --- scripts without spaces, and the whole filter stage ------------------------------------------------------

def test_chinese_prose_passes_all_filters():
    assert is_no_space_script(CHINESE) and not is_no_space_script(PROSE)
    doc = {"text": CHINESE}
    assert filter_document(doc, PrepareConfig(), ("repetition", "gopher", "c4"), {}) is None
    assert doc["text"] == CHINESE  # no line removed


def test_chinese_rules_still_apply():
    short = "北京是首都。"
    assert quality(short) == "gopher_min_words"
    spam = "\n".join(["点击这里购买最便宜的手机。"] * 8)
    assert repetition(spam) == "repetition_dup_paragraphs" or repetition(spam) == "repetition_dup_lines"
    out, _, stats = c4(CHINESE + "\n好的")
    assert "好的" not in out and stats["c4_lines_no_terminal_punct"] == 1


def test_code_corpus_passes_with_code_flag():
    cfg = PrepareConfig(code=True, filters=("c4", "repetition"))
    assert filter_document({"text": CODE}, cfg, cfg.filters, {}) is None
    cfg = PrepareConfig(filters=("c4",))
    assert filter_document({"text": CODE}, cfg, cfg.filters, {}) == "c4_curly_braces"


@pytest.mark.parametrize("name", ["gopher", "c4", "repetition"])
def test_each_filter_alone_passes_prose(name):
    cfg = PrepareConfig(filters=(name,))
    assert filter_document({"text": PROSE}, cfg, cfg.filters, {}) is None


def test_gopher_min_words_zero_and_a_document_of_symbols_only():
    cfg = GopherQualityConfig(min_words=0)
    assert gopher_quality("- * #", ["-", "*", "#"], False, cfg) is not None  # dropped by a rule, no ZeroDivisionError
