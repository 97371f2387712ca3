"""haina.export.hf / haina.model.hf: what has no Hugging Face equivalent, tokenizers, dtypes, safe output."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from safetensors import safe_open

from haina.core.errors import HainaError
from haina.export.hf import export_hf, import_hf, load_hf_tokenizer
from haina.model import ModelConfig, Transformer
from haina.model.hf import from_hf_config, hf_layout
from haina.tokenizer.train import train_bpe

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = ["The quick brown fox jumps over the lazy dog. Ünïcödé — ✓ 日本語. " * 8] * 4


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_bpe(TEXT, vocab_size=330, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"))
    tok.pad_token = "<|pad|>"
    tok.chat_template = CHATML
    return tok


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 340, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32, **kw})


@pytest.mark.parametrize("changes, named", [
    ({"pos": "sinusoidal"}, "pos=sinusoidal"),
    ({"mlp": "relu"}, "mlp=relu"),
    ({"pos": "rope"}, "pos=rope"),  # layernorm + rope + gelu
    ({"norm": "rmsnorm", "pos": "rope", "mlp": "gelu"}, "mlp=gelu"),
])
def test_layouts_without_equivalent_are_refused_by_name(changes, named):
    with pytest.raises(HainaError, match=named) as e:
        hf_layout(_cfg(**changes))
    assert "\n" not in str(e.value)


def test_layouts_with_equivalent():
    assert hf_layout(_cfg()) == "gpt2"
    assert hf_layout(_cfg(norm="rmsnorm", pos="rope", mlp="swiglu", n_kv_head=1, bias=True)) == "llama"


def test_gpt2_layout_refuses_grouped_kv_heads():
    with pytest.raises(HainaError, match="n_kv_head"):
        hf_layout(_cfg(n_kv_head=1))


def test_import_refuses_unknown_model_types_and_options():
    with pytest.raises(HainaError, match="supported: llama, mistral, gpt2, bert"):
        from_hf_config({"model_type": "t5"})
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 16, "num_attention_heads": 2,
            "num_hidden_layers": 1, "intermediate_size": 32}
    with pytest.raises(HainaError, match="rope scaling 'llama3'"):
        from_hf_config({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(HainaError, match="attention_bias=True with mlp_bias=False"):
        from_hf_config({**base, "attention_bias": True})
    with pytest.raises(HainaError, match="sliding"):
        from_hf_config({**base, "model_type": "mistral", "sliding_window": 8, "max_position_embeddings": 64})
    with pytest.raises(HainaError, match="gelu_new"):
        from_hf_config({"model_type": "gpt2", "vocab_size": 10, "n_embd": 16, "n_head": 2, "n_layer": 1,
                        "activation_function": "relu"})


def test_tokenizer_exports_as_pretrained_fast_with_chat_template(tokenizer, tmp_path):
    torch.manual_seed(0)
    export_hf(Transformer(_cfg()), tokenizer, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert isinstance(hf_tok, transformers.PreTrainedTokenizerFast)
    text = "fox 日本語 ✓ lazy<|im_end|>"
    # transformers parses special strings in text by default, haina only when asked: the same ids either way.
    assert hf_tok.encode(text, add_special_tokens=False) == tokenizer.encode(text, parse_special=True)
    assert hf_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == tokenizer.encode(text)
    assert hf_tok.decode(tokenizer.encode(text)) == text
    assert (hf_tok.eos_token, hf_tok.pad_token) == ("<|endoftext|>", "<|pad|>")
    assert hf_tok.eos_token_id == tokenizer.eos_id
    messages = [{"role": "user", "content": "hi"}]
    rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tokenizer.eos_id and gen["pad_token_id"] == tokenizer.pad_id


def test_tokenizer_imports_from_transformers_save_pretrained(tokenizer, tmp_path):
    """transformers itself writes the chat template to chat_template.jinja; the import finds it."""
    export_hf(Transformer(_cfg()), tokenizer, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf_tok.save_pretrained(tmp_path / "resaved")
    back = load_hf_tokenizer(tmp_path / "resaved")
    assert back is not None
    assert back.chat_template == CHATML
    assert back.eos_token == "<|endoftext|>" and back.pad_token == "<|pad|>"
    assert back.encode(TEXT[0]) == tokenizer.encode(TEXT[0])


@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_export_dtype(dtype, torch_dtype, tmp_path):
    torch.manual_seed(0)
    model = Transformer(_cfg(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False))
    export_hf(model, None, tmp_path / "hf", dtype=dtype)
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch_dtype}  # noqa: SIM118 - safe_open is not iterable
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    x = torch.randint(0, 340, (1, 8))
    with torch.no_grad():
        # Only rounding of the weights separates them.
        torch.testing.assert_close(hf(input_ids=x).logits, model(x), atol=2e-2, rtol=0)
    back, _ = import_hf(tmp_path / "hf")
    assert back.tok_emb.weight.dtype == torch.float32


def test_export_never_replaces_a_foreign_directory(tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(HainaError, match="not a haina output.*--overwrite"):
        export_hf(Transformer(_cfg()), None, precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    # A previous export is replaced whole, with no leftovers.
    export_hf(Transformer(_cfg()), None, tmp_path / "hf")
    (tmp_path / "hf" / "stale.bin").write_text("x")
    export_hf(Transformer(_cfg()), None, tmp_path / "hf")
    assert not (tmp_path / "hf" / "stale.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "home"]  # no temp dirs left behind


def test_refused_export_writes_nothing(tmp_path):
    with pytest.raises(HainaError):
        export_hf(Transformer(_cfg(pos="sinusoidal")), None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_import_errors_are_clear(tmp_path):
    with pytest.raises(HainaError, match="not found"):
        import_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HainaError, match="no config.json"):
        import_hf(tmp_path / "empty")
    export_hf(Transformer(_cfg(tie_embeddings=False)), None, tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(HainaError, match="cannot read weights"):
        import_hf(tmp_path / "hf")


def test_tokenizer_imports_from_slow_gpt2_files(tokenizer, tmp_path):
    """A directory with only vocab.json + merges.txt is converted through transformers."""
    tokenizer.tok.model.save(str(tmp_path))
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    vocab.update({t: i for t, i in tokenizer.special_tokens.items()})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer",
                                                                "eos_token": "<|endoftext|>"}))
    back = load_hf_tokenizer(tmp_path)
    assert back is not None and back.eos_token == "<|endoftext|>"
    text = "The lazy fox ✓"
    assert back.encode(text) == tokenizer.encode(text)
    assert back.decode(back.encode(text)) == text


def test_commands_never_replace_their_source_or_a_training_run(tmp_path):
    """--out is replaced whole: a haina checkpoint, a run directory or the source must survive."""
    from haina.export.hf import export_hf_command, import_hf_command
    from haina.model.checkpoint import save_model

    save_model(tmp_path / "ckpt", Transformer(_cfg()))
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    for out in (tmp_path / "ckpt", run, tmp_path):
        with pytest.raises(HainaError, match="choose another --out"):
            export_hf_command(str(tmp_path / "ckpt"), str(out))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before
    assert (run / "checkpoints").is_dir()

    export_hf_command(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    export_hf_command(str(tmp_path / "ckpt"), str(tmp_path / "hf"))  # an earlier export is replaced
    for out in (tmp_path / "hf", run):
        with pytest.raises(HainaError, match="choose another --out"):
            import_hf_command(str(tmp_path / "hf"), str(out))
    assert (tmp_path / "hf" / "config.json").is_file() and not (tmp_path / "hf" / "config.yaml").exists()
    import_hf_command(str(tmp_path / "hf"), str(tmp_path / "back"))
    import_hf_command(str(tmp_path / "hf"), str(tmp_path / "back"))  # an earlier import is replaced
