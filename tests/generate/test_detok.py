"""Incremental detokenization and stop-string matching."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from haina.core.errors import HainaError
from haina.generate.detok import IncrementalDetokenizer, StopStringMatcher, check_stop_strings
from haina.tokenizer.train import train_bpe, train_char

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "héllo wörld — ünïcödé naïve café " * 20,
    "日本語のテキストです。中文文本。한국어 텍스트 " * 20,
    "emoji 😀😃🎉 ✓ € ≠ ∑ " * 20,
]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, vocab_size=400)


def _stream(tok, ids, chunks, skip_special=True):
    detok = IncrementalDetokenizer(tok, skip_special=skip_special)
    deltas, i = [], 0
    for size in chunks:
        deltas.append(detok.add(ids[i:i + size]))
        i += size
    deltas.append(detok.add(ids[i:]))
    deltas.append(detok.flush())
    return deltas


def test_split_multibyte_char_is_held_back(bpe):
    ids = bpe.encode("a😀b")
    euro = [i for i in ids if bpe.decode([i]) not in ("a", "b")]
    assert len(euro) >= 2, "the emoji should be split over several byte tokens for this test to mean anything"
    detok = IncrementalDetokenizer(bpe)
    out = [detok.add([i]) for i in ids]
    assert all("\ufffd" not in d for d in out)
    assert "".join(out) + detok.flush() == "a😀b"
    assert "😀" in out  # emitted whole, in one delta, once its last byte arrived


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"),
                    max_size=40),
       seed=st.integers(0, 2**16))
def test_deltas_concatenate_to_full_decode(bpe, text, seed):
    ids = bpe.encode(text)
    rng = random.Random(seed)
    chunks = [rng.randint(1, 3) for _ in range(len(ids))]
    deltas = _stream(bpe, ids, chunks)
    assert "".join(deltas) == bpe.decode(ids, skip_special=True)
    assert not any("\ufffd" in d for d in deltas)  # never a broken character on the way


def test_special_tokens_skipped_and_kept(bpe):
    ids = bpe.encode("hi") + [bpe.eos_id] + bpe.encode("yo")
    assert "".join(_stream(bpe, ids, [1] * len(ids))) == "hiyo"
    detok = IncrementalDetokenizer(bpe, skip_special=False)
    assert detok.add(ids) + detok.flush() == "hi<|endoftext|>yo"


def test_broken_bytes_flushed_and_not_duplicated(bpe):
    # A lone lead byte never completes: held until flush, then shown as U+FFFD exactly once.
    lead = bpe.token_to_id("â")  # byte 0xE2 in the byte-level alphabet
    detok = IncrementalDetokenizer(bpe)
    got = detok.add(bpe.encode("x")) + detok.add([lead])
    assert got == "x"
    assert detok.flush() == "\ufffd"
    assert detok.add(bpe.encode("y")) == "y"


def test_char_tokenizer():
    tok = train_char(["abc déf"])
    ids = tok.encode("déf abc")
    assert "".join(_stream(tok, ids, [1] * len(ids))) == "déf abc"


def test_stop_split_across_deltas():
    m = StopStringMatcher(["STOP"])
    assert m.feed("hello S") == ("hello ", False)
    assert m.feed("TO") == ("", False)
    assert m.feed("P and more") == ("", True)
    assert m.feed("anything") == ("", True)
    assert m.flush() == ""


def test_held_prefix_released_when_not_a_stop():
    m = StopStringMatcher(["</s>", "END"])
    assert m.feed("a</") == ("a", False)
    assert m.feed("x") == ("</x", False)
    assert m.feed("EN") == ("", False)
    assert m.flush() == "EN"


def test_earliest_stop_wins_and_text_ends_before_it():
    m = StopStringMatcher(["cd", "abc", "b"])
    assert m.feed("xxa") == ("xx", False)
    assert m.feed("bcd") == ("", True)
    assert m.hit == "abc"  # starts first, though "b" ends first



def test_overlapping_prefix():
    m = StopStringMatcher(["aab"])
    assert m.feed("a") == ("", False)
    assert m.feed("a") == ("", False)
    assert m.feed("a") == ("a", False)  # "aaa": the first a cannot start "aab" any more
    assert m.feed("b") == ("", True)


@given(text=st.text(alphabet="abc", max_size=30), cuts=st.lists(st.integers(0, 30), max_size=5))
def test_matcher_equals_plain_find(text, cuts):
    stops = ["abc", "cc"]
    pieces, last = [], 0
    for c in sorted(cuts):
        pieces.append(text[last:c])
        last = max(last, c)
    pieces.append(text[last:])
    m = StopStringMatcher(stops)
    out, hit = "", False
    for p in pieces:
        o, hit = m.feed(p)
        out += o
        if hit:
            break
    if not hit:
        out += m.flush()
    found = [i for s in stops if (i := text.find(s)) >= 0]
    assert hit == bool(found)
    assert out == (text[:min(found)] if found else text)


def test_check_stop_strings():
    assert check_stop_strings("x") == ["x"]
    assert check_stop_strings(None) == []
    with pytest.raises(HainaError, match="must be strings"):
        check_stop_strings(["ok", 3])
    with pytest.raises(HainaError, match="string or a list"):
        check_stop_strings({"a": 1})
    with pytest.raises(HainaError, match="empty"):
        StopStringMatcher([""])


def test_sentencepiece_style_decoder_keeps_spaces():
    # Metaspace decoders drop the leading space of a text: decoding tokens one by one would lose every space.
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from haina.tokenizer import EOT, Tokenizer

    hf = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    hf.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, special_tokens=[EOT, "<unk>", *bytes_]))
    tok = Tokenizer(hf)
    text = "the lazy fox, naïve 🐍 dog"
    ids = tok.encode(text)
    assert sum(tok.id_to_token(i).startswith("<0x") for i in ids) >= 4  # the snake went through byte fallback
    # The trainer can only add the byte tokens as special tokens, so keep special tokens in the text here.
    deltas = _stream(tok, ids, [1] * len(ids), skip_special=False)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
