"""BERT through `haina import hf` / `haina export hf`: logits equal to transformers' (1e-4, fp32), padded or not.

Random tiny `BertForMaskedLM` and `BertModel` directories with a WordPiece tokenizer built here from a generated
vocabulary (nothing is downloaded) are imported through the CLI, compared with `transformers`, exported back and
loaded by `transformers` again; an imported BertModel is then fine-tuned by `haina finetune classify` and used by
`haina classify`.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

from haina.cli import main
from haina.core.errors import HainaError
from haina.export.hf import export_hf
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import load_model
from haina.model.hf import from_hf_config, hf_layout
from haina.model.hf_import import import_hf
from haina.train.mlm import MLMMasking, with_mask_token

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "a", "film", "day", "meal", "story", "was", "felt", "quite", "very", "so", "and", "good", "bad",
         "cat", "sat", "on", "mat"]
VOCAB = SPECIALS + WORDS + list("abcdefghijklmnopqrstuvwxyz") + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
VOCAB += [f"w{i}" for i in range(97 - len(VOCAB))]  # 97 in all: odd, so no shape lines up by accident
MODELS = {  # name -> (class, config changes)
    "mlm-tied": (BertForMaskedLM, {}),
    "mlm-untied-tanh-gelu": (BertForMaskedLM, {"tie_word_embeddings": False, "hidden_act": "gelu_new",
                                               "type_vocab_size": 3}),
    "base": (BertModel, {}),
}


def _tokenizer_files(d) -> None:
    """BERT's WordPiece pipeline over VOCAB: tokenizer.json, vocab.txt and a BERT tokenizer_config.json."""
    tok = HFTokenizer(models.WordPiece({t: i for i, t in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(d / "tokenizer.json"))
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    roles = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
             "mask_token": "[MASK]"}
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                                                         "model_max_length": 40, **roles}))


def _randomize(model) -> None:
    """transformers starts LayerNorms at 1 and biases at 0: move them, so that their mapping is checked."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.eval()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """name -> (transformers model, its saved directory, the haina checkpoint `haina import hf` made of it)."""
    root = tmp_path_factory.mktemp("bert")
    out = {}
    for name, (cls, changes) in MODELS.items():
        torch.manual_seed(0)
        hf = cls(BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=40, initializer_range=0.2, **changes))
        _randomize(hf)
        hf.save_pretrained(root / name)
        _tokenizer_files(root / name)
        assert main(["import", "hf", "--path", str(root / name), "--out", str(root / f"{name}-haina")]) == 0
        out[name] = (hf, root / name, root / f"{name}-haina")
    return out


def _ids(B: int = 3, T: int = 13) -> torch.Tensor:
    return torch.randint(0, len(VOCAB), (B, T), generator=torch.Generator().manual_seed(2))


def _hf_out(hf, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        out = hf(input_ids=x, attention_mask=mask)
    return out.logits if isinstance(hf, BertForMaskedLM) else out.last_hidden_state


def _haina_out(model: Transformer, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    attn = None if mask is None else mask.bool()[:, None, None, :].expand(x.shape[0], 1, x.shape[1], x.shape[1])
    with torch.no_grad():
        return model(x, attn_mask=attn) if model.cfg.mlm_head else model.hidden_states(x, attn_mask=attn)


@pytest.mark.parametrize("name", list(MODELS))
def test_import_matches_transformers_with_and_without_padding(dirs, name):
    hf, _, ckpt = dirs[name]
    model, tok = load_model(ckpt)
    model.eval()
    cfg = model.cfg
    assert (cfg.causal, cfg.norm_position, cfg.embed_norm, cfg.norm_eps) == (False, "post", True, 1e-12)
    assert cfg.mlm_head == (name != "base") and cfg.mlp == ("gelu" if "tanh" in name else "gelu_exact")
    assert cfg.tie_embeddings == (name != "mlm-untied-tanh-gelu") and cfg.type_vocab_size == (3 if "untied" in name
                                                                                             else 2)
    x = _ids()
    ours, theirs = _haina_out(model, x), _hf_out(hf, x)
    assert ours.shape == theirs.shape and ours.std() > 0.1  # far from uniform: agreeing within 1e-4 means something
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)

    # Right-padded rows of 13, 7 and 1 tokens: the real positions agree with transformers' under its attention mask,
    # and with each row run alone.
    lengths = [13, 7, 1]
    mask = (torch.arange(13)[None, :] < torch.tensor(lengths)[:, None]).long()
    padded = x.masked_fill(mask == 0, tok.pad_id)
    ours, theirs = _haina_out(model, padded, mask), _hf_out(hf, padded, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-5)
    for row, n in enumerate(lengths):
        torch.testing.assert_close(ours[row, :n], _haina_out(model, x[row:row + 1, :n])[0], atol=1e-5, rtol=1e-5)


def test_imported_tokenizer_knows_berts_special_tokens(dirs):
    _, hf_dir, ckpt = dirs["mlm-tied"]
    _, tok = load_model(ckpt)
    assert (tok.eos_token, tok.pad_token, tok.pad_id) == ("[SEP]", "[PAD]", 0)
    assert set(tok.special_strings) >= set(SPECIALS)
    assert tok.post_processor_tokens() == ([2], [3])  # [CLS] ... [SEP], as transformers encodes a sentence
    text = "The cat sat on the mat, so good"
    assert tok.encode(text, add_special_tokens=True) == AutoTokenizer.from_pretrained(hf_dir)(text)["input_ids"]
    # MLM training (continued pretraining of the import) uses BERT's own [MASK] and adds no token.
    assert with_mask_token(tok, len(VOCAB)) is tok
    assert MLMMasking.from_tokenizer(tok).mask_id == VOCAB.index("[MASK]")


@pytest.mark.parametrize("name", list(MODELS))
def test_export_is_the_imported_model(dirs, tmp_path, name):
    hf, hf_dir, ckpt = dirs[name]
    assert main(["export", "hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]) == 0
    auto = AutoModelForMaskedLM if name != "base" else AutoModel
    again = auto.from_pretrained(tmp_path / "out").eval()
    assert type(again) is type(hf)
    x = _ids()
    torch.testing.assert_close(_hf_out(again, x), _hf_out(hf, x), atol=1e-5, rtol=1e-5)
    # Every tensor comes back as it was (the base model's pooler is left behind on import), but for the head's
    # `bias` of an untied model, which transformers >= 5 keeps beside the decoder's bias and never reads.
    before, after = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert set(after) == {k for k in before if not k.startswith("pooler.")}
    for k, v in after.items():
        assert torch.equal(v, before[k]) or (k == "cls.predictions.bias" and "untied" in name), k
    tok, orig = AutoTokenizer.from_pretrained(tmp_path / "out"), AutoTokenizer.from_pretrained(hf_dir)
    assert (tok.cls_token, tok.sep_token, tok.mask_token, tok.unk_token, tok.pad_token) == \
        ("[CLS]", "[SEP]", "[MASK]", "[UNK]", "[PAD]")
    assert tok("the film was bad")["input_ids"] == orig("the film was bad")["input_ids"]
    assert not (tmp_path / "out" / "generation_config.json").exists()  # an encoder generates nothing


def test_an_old_style_directory_imports_too(dirs, tmp_path):
    """TensorFlow-era names (LayerNorm gamma/beta), no `architectures`, only vocab.txt: the same model."""
    hf, hf_dir, _ = dirs["mlm-tied"]
    old = tmp_path / "old"
    old.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    config.pop("architectures")
    (old / "config.json").write_text(json.dumps(config))
    weights = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in load_file(hf_dir / "model.safetensors").items()}
    save_file(weights, str(old / "model.safetensors"))
    for name in ("vocab.txt", "tokenizer_config.json"):
        (old / name).write_text((hf_dir / name).read_text())
    model, tok = import_hf(old)
    assert model.cfg.mlm_head
    x = _ids()
    torch.testing.assert_close(_haina_out(model, x), _hf_out(hf, x), atol=1e-4, rtol=1e-5)
    assert tok is not None and tok.eos_token == "[SEP]"
    assert tok.encode("the cat sat", add_special_tokens=True) == [2, *tok.encode("the cat sat"), 3]


def test_a_haina_built_bert_exports_with_zero_biases_and_token_types(tmp_path):
    """A BERT-shaped encoder made in haina (no biases, no token types) exports as zeros, which compute the same."""
    cfg = ModelConfig(vocab_size=97, block_size=40, n_layer=2, n_head=4, n_embd=32, causal=False, bias=False,
                      norm_position="post", embed_norm=True, mlp="gelu_exact", mlm_head=True, init_std=0.3)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    export_hf(model, None, tmp_path / "out")
    hf = BertForMaskedLM.from_pretrained(tmp_path / "out").eval()
    x = _ids()
    torch.testing.assert_close(_haina_out(model, x), _hf_out(hf, x), atol=1e-4, rtol=1e-5)


def test_what_has_no_equivalent_is_refused_in_one_line():
    encoder = ModelConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, n_embd=16, causal=False)
    with pytest.raises(HainaError, match=r"^an encoder \(causal: false\) has no Llama or GPT-2 equivalent.*"
                                         r"norm_position=pre, embed_norm=False"):
        hf_layout(encoder)
    with pytest.raises(HainaError, match="causal model with norm_position=post, embed_norm=True"):
        hf_layout(ModelConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, n_embd=16, norm_position="post",
                              embed_norm=True))
    with pytest.raises(HainaError, match="swiglu"):
        ModelConfig(mlm_head=True, mlp="swiglu", norm="rmsnorm", pos="rope")
    base = {"model_type": "bert", "vocab_size": 97, "hidden_size": 16, "num_attention_heads": 2,
            "num_hidden_layers": 1, "intermediate_size": 32}
    assert from_hf_config(base).causal is False
    for change, message in (({"is_decoder": True}, "is_decoder"), ({"hidden_act": "silu"}, "hidden_act 'silu'"),
                            ({"position_embedding_type": "relative_key"}, "relative_key")):
        with pytest.raises(HainaError, match=message):
            from_hf_config({**base, **change})


def test_post_norm_decode_through_a_cache_matches_forward():
    """Block.decode's post-norm path (a causal model with BERT's blocks) computes what forward does."""

    class Cache:  # keys and values appended per layer; one token per step needs no mask
        def __init__(self):
            self.kv = {}

        def update(self, layer, k, v):
            if layer in self.kv:
                k, v = torch.cat([self.kv[layer][0], k], dim=2), torch.cat([self.kv[layer][1], v], dim=2)
            self.kv[layer] = (k, v)
            return k, v, None

    cfg = ModelConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=16, norm_position="post",
                      embed_norm=True, type_vocab_size=2, mlp="gelu_exact", init_std=0.3)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    x = _ids(B=1, T=9)
    cache = Cache()
    with torch.no_grad():
        full = model(x)[0]
        steps = [model.decode(x[:, t:t + 1], positions=torch.tensor([[t]]), cache=cache)[0] for t in range(9)]
    torch.testing.assert_close(torch.stack(steps), full, atol=1e-5, rtol=1e-5)


def test_finetune_classify_an_imported_bert_then_classify(dirs, tmp_path, capsys):
    _, hf_dir, _ = dirs["base"]
    rng = random.Random(0)
    rows = []
    for i in range(64):
        label = rng.choice(["pos", "neg"])
        words = rng.choices(WORDS[:11], k=rng.randint(2, 5))
        words.insert(rng.randint(0, len(words)), "good" if label == "pos" else "bad")
        rows.append({"id": i, "text": " ".join(words), "label": label})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    assert main(["finetune", "classify", "--base", str(hf_dir), "--data", str(tmp_path / "train.jsonl"),
                 "--out", str(run), "--classify.pooling=first", "--train.max_steps=6", "--train.batch_size=8",
                 "--train.lr=1e-3", "--train.warmup_steps=1", "--train.eval_every=3", "--train.save_every=6",
                 "--train.device=cpu", "--train.tensorboard=false"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert 0.0 <= report["accuracy"] <= 1.0 and "macro_f1" in report
    capsys.readouterr()
    assert main(["classify", "--checkpoint", str(run), "--text", "the film was good"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["label"] in ("pos", "neg") and abs(sum(line["probabilities"].values()) - 1) < 1e-5
