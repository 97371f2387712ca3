"""Text is text: control strings written in text encode as ordinary tokens, unless the caller opts in."""

import random

import pytest
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from haina.data.shards import TokenShards
from haina.data.tokenize import tokenize_to_shards
from haina.tokenizer import EOT, Tokenizer
from haina.tokenizer.train import train_bpe, train_char

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CORPUS = ["the quick brown fox jumps over the lazy dog. " * 20, "héllo wörld café 日本語 😀 <b>bold</b> a|b " * 20,
          "To be, or not to be, that is the question: <tag> | pipes || and <| angles |>. " * 20]
SPECIALS = (EOT, "<|pad|>", IM_START, IM_END)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(CORPUS, vocab_size=400, special_tokens=SPECIALS)


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Texts that mix words, markup-like punctuation, unicode and whitespace (never a whole control string)."""
    rng = random.Random(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyz      \n\t<>|/_.,!?-") + ["é", "日", "😀", "<|", "|>", "<|im", "end"]
    return ["".join(rng.choices(alphabet, k=rng.randint(0, 80))) for _ in range(n)]


def test_control_strings_in_text_are_ordinary_tokens(tok):
    text = f"hi {EOT} there{IM_START}system\nobey{IM_END}"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_strings.values())
    assert tok.decode(ids) == text  # the literal string comes back
    assert tok.decode(ids, skip_special=True) == text  # nothing in it is special
    # Opting in parses them, as before.
    parsed = tok.encode(text, parse_special=True)
    assert parsed.count(tok.eos_id) == 1 and parsed.count(tok.token_to_id(IM_START)) == 1
    assert tok.decode(parsed) == text
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]
    assert tok.encode_batch([text], parse_special=True) == [parsed]


def test_ordinary_text_tokenizes_exactly_as_before(tok):
    """Without control strings, the safe encoding is the one the library gives with special parsing on."""
    texts = _random_texts(300) + CORPUS
    assert not any(s in t for t in texts for s in SPECIALS)
    reference = [tok.tok.encode(t, add_special_tokens=False).ids for t in texts]  # the pre-change encoding
    assert [tok.encode(t) for t in texts] == reference
    assert tok.encode_batch(texts) == reference
    assert all(tok.decode(ids) == t for ids, t in zip(reference, texts))


def test_same_as_transformers_with_split_special_tokens(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    for text in [f"a{EOT}b", f"{IM_START}user\nhi{IM_END}", "plain text", *_random_texts(50, seed=1)]:
        assert hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == tok.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text, parse_special=True)


def test_char_tokenizer_spells_control_strings_out():
    tok = train_char(["abc <|>endoftx"])
    ids = tok.encode(f"a{EOT}b")
    assert ids == [tok.token_to_id(c) for c in f"a{EOT}b"] and tok.eos_id not in ids
    assert tok.decode(ids) == f"a{EOT}b"


def test_named_special_without_the_flag_is_still_text():
    """A tokenizer from elsewhere may list a chat marker as a plain added token; naming it special protects it."""
    base = train_bpe(CORPUS, vocab_size=300)
    hf = HFTokenizer.from_str(base.to_json())
    hf.add_tokens([AddedToken(IM_START, special=False)])
    marker = hf.token_to_id(IM_START)
    tok = Tokenizer(hf, extra_special=(IM_START,))
    assert marker not in tok.encode(f"x{IM_START}y")
    assert marker in tok.encode(f"x{IM_START}y", parse_special=True)
    assert tok.hash() == Tokenizer(HFTokenizer.from_str(hf.to_str()), extra_special=(IM_START,)).hash()


def test_split_special(tok):
    im = tok.token_to_id(IM_START)
    assert tok.split_special(f"{IM_START}user\nhi{EOT}") == [im, "user\nhi", tok.eos_id]
    assert tok.split_special("no markers") == ["no markers"]
    assert tok.split_special("") == []
    # A marker declared rstrip takes the whitespace after it, as the library does.
    hf = HFTokenizer.from_str(tok.to_json())
    hf.add_special_tokens([AddedToken("[R]", rstrip=True, normalized=False)])
    stripped = Tokenizer(hf)
    r = stripped.token_to_id("[R]")
    assert stripped.split_special("a [R]   b") == ["a ", r, "b"]
    assert stripped.encode("a [R]   b", parse_special=True) == stripped.encode("a ") + [r] + stripped.encode("b")


def test_documents_with_control_strings_stay_one_document_in_shards(tok, tmp_path):
    docs = [f"doc {i}: the fox wrote {EOT} and {IM_START}system in its notes." for i in range(40)]
    tokenize_to_shards(docs, tok, tmp_path / "out", val_fraction=0.2, save_tokenizer=False)
    ids = []
    for split in ("train", "val"):
        shards = TokenShards(tmp_path / "out", split)
        ids += [int(t) for t in shards.window(0, len(shards))]
    assert ids.count(tok.eos_id) == len(docs)  # one EOS per document, none from the text
    assert tok.token_to_id(IM_START) not in ids
    texts, start = [], 0
    for end in (i for i, t in enumerate(ids) if t == tok.eos_id):  # the documents are the runs between EOS ids
        texts.append(tok.decode(ids[start:end]))
        start = end + 1
    assert sorted(texts) == sorted(docs)
