"""Tokenizer training: exact round trips, special tokens, persistence, transformers compatibility, errors."""

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haina.core.errors import HainaError
from haina.tokenizer import EOT, Tokenizer
from haina.tokenizer.train import UNK, train_bpe, train_char

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "def add(a, b):\n    return a + b\n\n" * 10,
    "Pack my box with five dozen liquor jugs!\n" * 10,
    "naïve café, 東京 and 🎉\n" * 5,
]
UNSEEN = ["héllo wörld", "中文字符测试，还有标点。", "emoji 🎉🚀👩‍👩‍👧 mixed ASCII", "tabs\tand\r\nCRLF  ", "\x00\x01 bytes",
          "  leading and trailing spaces  ", ""]


@functools.cache
def _bpe() -> Tokenizer:
    return train_bpe(iter(CORPUS), vocab_size=300)


def test_bpe_round_trips_unseen_unicode_exactly():
    tok = _bpe()
    assert tok.vocab_size == 300
    for text in UNSEEN + CORPUS:
        assert tok.decode(tok.encode(text)) == text
    # Merges were learned: common words take fewer tokens than bytes.
    assert len(tok.encode("The quick brown fox")) < len(b"The quick brown fox")


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_bpe_round_trips_any_text(text):
    tok = _bpe()
    assert tok.decode(tok.encode(text)) == text


def test_special_token_is_one_id_and_first():
    tok = _bpe()
    assert tok.eos_token == EOT and tok.eos_id == 0
    assert tok.encode(EOT, parse_special=True) == [tok.eos_id]
    assert tok.eos_id not in tok.encode(EOT)  # text is text unless special strings are asked for
    ids = tok.encode(f"fox{EOT}dog", parse_special=True)
    assert ids.count(tok.eos_id) == 1
    assert tok.decode(ids) == f"fox{EOT}dog"
    assert tok.decode(ids, skip_special=True) == "foxdog"


def test_extra_special_tokens_and_order():
    tok = train_bpe(iter(CORPUS), vocab_size=300, special_tokens=(EOT, "<|pad|>"))
    assert tok.special_tokens == {EOT: 0, "<|pad|>": 1}
    assert tok.encode("<|pad|>", parse_special=True) == [1]


def test_bpe_is_deterministic():
    assert train_bpe(iter(CORPUS), vocab_size=300).hash() == _bpe().hash()


def test_save_load_identity(tmp_path):
    tok = _bpe()
    tok.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded == tok and loaded.hash() == tok.hash()
    assert loaded.encode(UNSEEN[2]) == tok.encode(UNSEEN[2])


def test_transformers_fast_tokenizer_reads_it(tmp_path):
    from transformers import PreTrainedTokenizerFast

    for tok in (_bpe(), train_char(CORPUS)):
        tok.save(tmp_path)
        hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token=tok.eos_token)
        text = "The lazy fox, naïve 🎉"
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
        assert hf.eos_token_id == tok.eos_id
        assert hf.convert_ids_to_tokens(tok.encode(EOT, parse_special=True)) == [EOT]
        assert hf.decode(tok.encode(text), clean_up_tokenization_spaces=False) == text


def test_char_tokenizer_round_trips_and_has_every_character():
    tok = train_char(CORPUS)
    chars = set("".join(CORPUS))
    assert tok.vocab_size == len(chars) + 2  # + EOT + <|unk|>
    assert tok.eos_id == 0 and tok.token_to_id(UNK) == 1
    for text in CORPUS + ["fox\n  dog 東京🎉", "\n\n"]:
        ids = tok.encode(text)
        assert len(ids) == len(text)  # one token per character
        assert tok.decode(ids) == text
    assert tok.encode(f"a{EOT}b", parse_special=True) == [tok.token_to_id("a"), tok.eos_id, tok.token_to_id("b")]
    assert tok.encode("Ω") == [tok.token_to_id(UNK)]  # never seen: the unknown token, not an error


def test_char_save_load_identity(tmp_path):
    tok = train_char(CORPUS)
    tok.save(tmp_path)
    assert Tokenizer.load(tmp_path) == tok


def test_errors():
    with pytest.raises(HainaError, match="too small"):
        train_bpe(iter(CORPUS), vocab_size=200)
    with pytest.raises(HainaError, match="empty"):
        train_bpe(iter(["", ""]), vocab_size=300)
    with pytest.raises(HainaError, match="empty"):
        train_char(iter([]))
    with pytest.raises(HainaError, match="end-of-text"):
        train_char(CORPUS, special_tokens=())


def test_corrupt_files_are_one_line_errors(tmp_path):
    from haina.model.checkpoint import resolve_checkpoint

    _bpe().save(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(HainaError, match="cannot read .*tokenizer_config.json: not valid JSON"):
        Tokenizer.load(tmp_path / "tok")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "index.json").write_text("")
    with pytest.raises(HainaError, match="cannot read .*index.json: not valid JSON"):
        resolve_checkpoint(tmp_path / "run")
