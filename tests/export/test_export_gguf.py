"""haina.export.gguf: GGUF files read back with gguf's reader, a numpy llama.cpp-style forward, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from tokenizers import Regex, pre_tokenizers

from haina.cli import main
from haina.core.errors import HainaError
from haina.export import gguf as gx
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.model.lora import LoRAConfig, apply_lora, base_weights_hash, merge_lora, save_adapter
from haina.tokenizer import Tokenizer
from haina.tokenizer.train import train_bpe, train_char

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = ["The quick brown fox jumps over the lazy dog. Ünïcödé — ✓ 日本語. 12345 " * 8] * 4
LLAMA = {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu"}
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = train_bpe(TEXT, vocab_size=300, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"))
    tok.pad_token = "<|pad|>"
    tok.chat_template = CHATML
    return tok


def _cfg(**kw) -> ModelConfig:
    # vocab 320 > the tokenizer's 300: the padded rows become unused tokens.
    return ModelConfig(**{"vocab_size": 320, "block_size": 64, "n_layer": 2, "n_head": 4, "n_kv_head": 2,
                          "n_embd": 64, "bias": False, "tie_embeddings": False, "init_std": 0.1, **LLAMA, **kw})


def _model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(_cfg(**kw)).eval()


def _read(path) -> tuple[dict, dict, dict]:
    """(metadata values, tensors as float64 arrays in numpy order, GGML type names) of a GGUF file."""
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    arrays = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64) for t in r.tensors}
    return meta, arrays, {t.name: t.tensor_type.name for t in r.tensors}


def _uninterleave(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of interleave_rope_rows, written independently: even rows first, then odd rows, per head."""
    hs = w.shape[0] // n_heads
    heads = w.reshape(n_heads, hs, *w.shape[1:])
    return np.concatenate([heads[:, 0::2], heads[:, 1::2]], axis=1).reshape(w.shape)


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def llama_cpp_forward(meta: dict, t: dict, ids: list[int]) -> np.ndarray:
    """Logits as llama.cpp's `llama` graph computes them from GGUF tensors: rope on neighbouring pairs (2i, 2i+1)."""
    n_head, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    eps, theta = meta["llama.attention.layer_norm_rms_epsilon"], meta["llama.rope.freq_base"]
    x = t["token_embd.weight"][ids]  # (T, C)
    T, C = x.shape
    hs = C // n_head
    angles = np.arange(T)[:, None] * theta ** (-np.arange(0, hs, 2) / hs)  # (T, hs/2)
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]

    def rope(v):  # (T, h, hs)
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    def lin(h, name):
        return h @ t[name + ".weight"].T + t.get(name + ".bias", 0.0)

    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(meta["llama.block_count"]):
        p = f"blk.{i}."
        h = _rms(x, t[p + "attn_norm.weight"], eps)
        q = rope(lin(h, p + "attn_q").reshape(T, n_head, hs))
        k = np.repeat(rope(lin(h, p + "attn_k").reshape(T, n_kv, hs)), n_head // n_kv, axis=1)
        v = np.repeat(lin(h, p + "attn_v").reshape(T, n_kv, hs), n_head // n_kv, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(hs) + causal
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + lin(np.einsum("hts,shd->thd", att, v).reshape(T, C), p + "attn_output")
        h = _rms(x, t[p + "ffn_norm.weight"], eps)
        gate = lin(h, p + "ffn_gate")
        x = x + lin(gate / (1 + np.exp(-gate)) * lin(h, p + "ffn_up"), p + "ffn_down")
    x = _rms(x, t["output_norm.weight"], eps)
    return x @ t.get("output.weight", t["token_embd.weight"]).T


def _haina_logits(model: Transformer, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].double().numpy()


IDS = [5, 17, 200, 3, 99, 250, 42, 7, 318, 11, 64, 128]


# ---------------------------------------------------------------------------------------- contents
@pytest.mark.parametrize("kw", [{}, {"n_kv_head": None, "tie_embeddings": True, "bias": True},
                                {"n_kv_head": 1, "rope_theta": 500000.0, "norm_eps": 1e-6}],
                         ids=["gqa-untied", "mha-tied-bias", "mqa"])
def test_f32_file_computes_what_haina_computes(tokenizer, tmp_path, kw):
    model = _model(**kw)
    cfg = model.cfg
    types = gx.write_gguf(tmp_path / "m.gguf", model, tokenizer, "f32")
    meta, t, read_types = _read(tmp_path / "m.gguf")
    assert read_types == types and set(types.values()) == {"F32"}

    # Hyperparameters, and the marks of the writer.
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 0
    expect = {"vocab_size": 320, "context_length": 64, "embedding_length": 64, "block_count": 2,
              "feed_forward_length": cfg.ffn_dim, "attention.head_count": 4, "attention.head_count_kv": cfg.kv_heads,
              "rope.dimension_count": 16, "attention.key_length": 16}
    assert {k: meta["llama." + k] for k in expect} == expect
    assert meta["llama.rope.freq_base"] == cfg.rope_theta
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps, rel=1e-6)
    assert meta["haina.command"] == "export gguf" and ModelConfig.from_dict(json.loads(meta["haina.model"])) == cfg

    # Tensors: llama.cpp's names, the head only when untied, biases only when the model has them.
    assert ("output.weight" in t) == (not cfg.tie_embeddings)
    assert ("blk.1.attn_q.bias" in t) == cfg.bias and ("blk.0.ffn_down.bias" in t) == cfg.bias
    assert len(t) == 3 + (0 if cfg.tie_embeddings else 1) + cfg.n_layer * (9 + (7 if cfg.bias else 0)) - 1
    # Undoing the rope interleave gives haina's q and k rows back exactly.
    w = model.weights()
    q, k, v = w["blocks.1.attn.qkv.weight"].split([64, cfg.kv_heads * 16, cfg.kv_heads * 16])
    np.testing.assert_array_equal(_uninterleave(t["blk.1.attn_q.weight"], 4), q.double().numpy())
    np.testing.assert_array_equal(_uninterleave(t["blk.1.attn_k.weight"], cfg.kv_heads), k.double().numpy())
    np.testing.assert_array_equal(t["blk.1.attn_v.weight"], v.double().numpy())
    if cfg.bias:
        qb = w["blocks.0.attn.qkv.bias"][:64]
        np.testing.assert_array_equal(_uninterleave(t["blk.0.attn_q.bias"], 4), qb.double().numpy())

    # The whole model, run as llama.cpp's graph runs it, gives haina's logits.
    np.testing.assert_allclose(llama_cpp_forward(meta, t, IDS), _haina_logits(model, IDS), atol=1e-4, rtol=1e-4)


def test_without_the_interleave_the_scores_differ(tokenizer, tmp_path):
    """The forward above can fail: with q/k rows in haina's order, llama.cpp's rope gives other logits."""
    model = _model()
    gx.write_gguf(tmp_path / "m.gguf", model, tokenizer, "f32")
    meta, t, _ = _read(tmp_path / "m.gguf")
    for i in range(2):
        t[f"blk.{i}.attn_q.weight"] = _uninterleave(t[f"blk.{i}.attn_q.weight"], 4)
        t[f"blk.{i}.attn_k.weight"] = _uninterleave(t[f"blk.{i}.attn_k.weight"], 2)
    assert np.abs(llama_cpp_forward(meta, t, IDS) - _haina_logits(model, IDS)).max() > 1e-3


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q4_0"])
def test_quantized_types_stay_within_their_error(tokenizer, tmp_path, dtype):
    model = _model(tie_embeddings=True, bias=True)
    gx.write_gguf(tmp_path / "m.gguf", model, tokenizer, dtype)
    meta, t, types = _read(tmp_path / "m.gguf")
    exact = dict(gx.gguf_tensors(model.cfg, model.weights()))
    assert set(t) == set(exact)
    main = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[dtype]
    for name, want in exact.items():
        got = t[name]
        assert got.shape == want.shape, name
        if want.ndim == 1:  # norms and biases: f32, exact
            assert types[name] == "F32"
            np.testing.assert_array_equal(got, want)
            continue
        # q4_0 keeps the head (here the tied embedding) at q8_0.
        assert types[name] == ("Q8_0" if dtype == "q4_0" and name == "token_embd.weight" else main), name
        if types[name] == "F16":
            np.testing.assert_array_equal(got, want.astype(np.float16))
            continue
        # Blocks of 32 along a row, one scale each: the error is at most one step (q4_0) or half a step (q8_0),
        # plus the f16 rounding of the scale (2^-11 of it, times at most 8 or 127 steps: < 2^-10 of the block's max).
        blocks = want.reshape(-1, 32)
        amax = np.abs(blocks).max(-1, keepdims=True)
        bound = amax / 8 if types[name] == "Q4_0" else amax / 127 / 2
        bound = bound + amax * 2**-10 + 1e-7
        assert (np.abs(got.reshape(-1, 32) - blocks) <= bound).all(), name
    assert meta["general.file_type"] == {"f16": 1, "q8_0": 7, "q4_0": 2}[dtype]
    assert ("general.quantization_version" in meta) == (dtype != "f16")
    # Still the same model, within the quantization's error.
    got, ref = llama_cpp_forward(meta, t, IDS), _haina_logits(model, IDS)
    tol = {"f16": 1e-3, "q8_0": 2e-2, "q4_0": 0.3}[dtype]
    assert np.abs(got - ref).max() < tol * np.abs(ref).max()


def test_rows_not_a_multiple_of_the_block_stay_f16(tokenizer, tmp_path):
    model = _model(n_embd=48, n_head=3, n_kv_head=1, intermediate_size=64)  # rows of 48: no whole blocks of 32
    types = gx.write_gguf(tmp_path / "m.gguf", model, tokenizer, "q8_0")
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 64
    assert types["blk.0.attn_norm.weight"] == "F32"
    # Untied, q4_0 keeps `output` at q8_0 and quantizes the embedding like the rest.
    rows = np.zeros((320, 64), np.float32)
    assert gx.tensor_type("output.weight", rows, "q4_0", head="output.weight") == Q.Q8_0
    assert gx.tensor_type("token_embd.weight", rows, "q4_0", head="output.weight") == Q.Q4_0


def test_tokenizer_metadata_is_the_haina_tokenizer(tokenizer, tmp_path):
    gx.write_gguf(tmp_path / "m.gguf", _model(), tokenizer, "f16")
    meta, _, _ = _read(tmp_path / "m.gguf")
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    n = tokenizer.vocab_size
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == 320
    assert tokens[:n] == [tokenizer.id_to_token(i) for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, 320)]
    merges = json.loads(tokenizer.to_json())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert len(merges) > 10
    T = gguf.TokenType
    types = meta["tokenizer.ggml.token_type"]
    special = {tokenizer.token_to_id(s) for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")}
    assert {i for i, ty in enumerate(types) if ty == T.CONTROL} == special
    assert {i for i, ty in enumerate(types) if ty == T.UNUSED} == set(range(n, 320))
    assert all(ty == T.NORMAL for i, ty in enumerate(types[:n]) if i not in special)
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.eos_id  # no BOS: GPT-2's convention, never added
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.ggml.padding_token_id"] == tokenizer.pad_id
    assert meta["tokenizer.chat_template"] == CHATML


def test_metadata_has_the_value_types_llama_cpp_reads(tokenizer, tmp_path):
    """llama.cpp's loader checks each key's type: sizes and ids uint32, eps and theta float32, token types int32."""
    gx.write_gguf(tmp_path / "m.gguf", _model(), tokenizer, "q8_0")
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    V = gguf.GGUFValueType
    for key in ("llama.context_length", "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.dimension_count",
                "general.file_type", "general.quantization_version", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.padding_token_id"):
        assert fields[key].types == [V.UINT32], key
    for key in ("llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base"):
        assert fields[key].types == [V.FLOAT32], key
    assert fields["tokenizer.ggml.add_bos_token"].types == [V.BOOL]
    assert fields["tokenizer.ggml.token_type"].types == [V.ARRAY, V.INT32]
    assert fields["tokenizer.ggml.tokens"].types == [V.ARRAY, V.STRING]
    assert fields["tokenizer.ggml.merges"].types == [V.ARRAY, V.STRING]


def test_llama3_pre_tokenizer_is_named_and_others_refused(tokenizer):
    tok = Tokenizer(type(tokenizer.tok).from_str(tokenizer.to_json()), eos_token=tokenizer.eos_token)
    tok.tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(gx.LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert gx.gguf_vocab(tok, 320)["tokenizer.ggml.pre"] == "llama-bpe"
    tok.tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"), pre_tokenizers.ByteLevel(use_regex=False)])
    with pytest.raises(HainaError, match="pre-tokenizer \\(Sequence\\) is not one llama.cpp knows"):
        gx.gguf_vocab(tok, 320)
    with pytest.raises(HainaError, match="tokenizer is WordLevel, not BPE"):
        gx.gguf_vocab(train_char(["abc"]), 320)
    with pytest.raises(HainaError, match="tokenizer has 300 tokens but the model only 100"):
        gx.gguf_vocab(tokenizer, 100)


# ---------------------------------------------------------------------------------------- command and bad input
def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.fixture()
def ckpt(tokenizer, tmp_path):
    save_model(tmp_path / "ckpt", _model(), tokenizer)
    return tmp_path / "ckpt"


@pytest.mark.parametrize("changes, named", [
    ({"norm": "layernorm", "pos": "learned", "mlp": "gelu", "n_kv_head": None}, "norm=layernorm, pos=learned, mlp=gelu"),
    ({"pos": "sinusoidal"}, "pos=sinusoidal"),
    ({"mlp": "gelu"}, "mlp=gelu"),
])
def test_architectures_gguf_cannot_express_are_refused(tokenizer, tmp_path, changes, named):
    save_model(tmp_path / "ckpt", _model(**changes), tokenizer)
    with pytest.raises(HainaError, match=named) as e:
        gx.export_gguf_command(str(tmp_path / "ckpt"), str(tmp_path / "m.gguf"))
    assert _one_line(e).startswith("GGUF export covers the Llama architecture (rmsnorm + rope + swiglu) only")
    assert not (tmp_path / "m.gguf").exists()


def test_lora_run_is_refused_and_merged_with_adapter(tokenizer, tmp_path, ckpt):
    base = _model()
    lora = _model()
    apply_lora(lora, LoRAConfig(r=4, targets=("q", "k", "v", "down")))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if ".lora." in name:
                p.normal_(0, 0.2)
    save_adapter(tmp_path / "run", lora, LoRAConfig(r=4, targets=("q", "k", "v", "down")),
                 base_hash=base_weights_hash(base), base=str(ckpt))
    with pytest.raises(HainaError) as e:
        gx.export_gguf_command(str(tmp_path / "run"), str(tmp_path / "m.gguf"))
    assert _one_line(e) == (f"{tmp_path / 'run'} is a LoRA run, and a GGUF file holds one plain model; pass {ckpt} "
                            f"as --checkpoint and {tmp_path / 'run'} as --adapter to merge the adapters into the "
                            "exported weights")
    assert not (tmp_path / "m.gguf").exists()
    with pytest.raises(HainaError, match="LoRA adapters"):  # the Python API refuses an unmerged model too
        gx.export_gguf(lora, tokenizer, tmp_path / "m.gguf")

    gx.export_gguf_command(str(ckpt), str(tmp_path / "m.gguf"), dtype="f32", adapter=str(tmp_path / "run"))
    meta, t, _ = _read(tmp_path / "m.gguf")
    merged = merge_lora(lora)
    np.testing.assert_allclose(llama_cpp_forward(meta, t, IDS), _haina_logits(merged, IDS), atol=1e-4, rtol=1e-4)
    assert np.abs(_haina_logits(merged, IDS) - _haina_logits(base, IDS)).max() > 1e-2  # the adapters mattered


def test_checkpoints_without_a_bpe_tokenizer_are_refused(tmp_path):
    save_model(tmp_path / "none", _model())
    with pytest.raises(HainaError, match="has no tokenizer, and llama.cpp needs one") as e:
        gx.export_gguf_command(str(tmp_path / "none"), str(tmp_path / "m.gguf"))
    _one_line(e)
    save_model(tmp_path / "char", _model(), train_char(["some text"]))
    with pytest.raises(HainaError, match="WordLevel, not BPE") as e:
        gx.export_gguf_command(str(tmp_path / "char"), str(tmp_path / "m.gguf"))
    _one_line(e)
    assert not (tmp_path / "m.gguf").exists()


def test_out_rules(tmp_path, ckpt):
    out = tmp_path / "m.gguf"
    (tmp_path / "dir").mkdir()
    with pytest.raises(HainaError, match="is a directory; give the path of the .gguf file to write") as e:
        gx.export_gguf_command(str(ckpt), str(tmp_path / "dir"))
    _one_line(e)
    with pytest.raises(HainaError, match="names no file"):
        gx.export_gguf_command(str(ckpt), str(tmp_path / "new") + "/")

    gx.export_gguf_command(str(ckpt), str(out), dtype="q8_0")
    assert gx.written_by_haina(out)
    gx.export_gguf_command(str(ckpt), str(out), dtype="q4_0")  # its own earlier file: replaced
    assert _read(out)[0]["general.file_type"] == 2

    other = tmp_path / "notes.gguf"
    other.write_text("not ours")
    with pytest.raises(HainaError, match="exists and is not a GGUF file written by 'haina export gguf'.*--overwrite"):
        gx.export_gguf_command(str(ckpt), str(other))
    assert other.read_text() == "not ours"
    gx.export_gguf_command(str(ckpt), str(other), overwrite=True)
    assert gx.written_by_haina(other)

    weights = ckpt / "model.safetensors"
    before = weights.read_bytes()
    with pytest.raises(HainaError, match="lies inside the input .*even --overwrite does not replace it"):
        gx.export_gguf_command(str(ckpt), str(weights), overwrite=True)
    assert weights.read_bytes() == before
    with pytest.raises(HainaError, match="is the input"):  # an input file (the Python API takes any inputs)
        gx.check_gguf_output(other, [other], overwrite=True)
    # No temporary file is left behind by any of it.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failure_mid_write_leaves_the_old_file(tokenizer, tmp_path, ckpt, monkeypatch):
    out = tmp_path / "m.gguf"
    gx.export_gguf_command(str(ckpt), str(out), dtype="f16")
    before = out.read_bytes()

    def broken(*a, **k):
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
        with pytest.raises(RuntimeError, match="disk full"):
            gx.export_gguf_command(str(ckpt), str(out), dtype="q8_0")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "m.gguf"]

    # A stranger's file that appears at --out while the export runs is not replaced: the check runs again last.
    def stranger_arrives(self, *a, **k):
        real(self, *a, **k)
        out2.write_text("someone else's")

    out2, real = tmp_path / "late.gguf", gguf.GGUFWriter.write_tensors_to_file
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", stranger_arrives)
    with pytest.raises(HainaError, match="exists and is not a GGUF file written by 'haina export gguf'"):
        gx.export_gguf_command(str(ckpt), str(out2), dtype="f16")
    assert out2.read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "late.gguf", "m.gguf"]


def test_cli(tmp_path, ckpt, capsys):
    r = subprocess.run([sys.executable, "-m", "haina.cli", "export", "gguf", "--checkpoint", str(ckpt), "--out",
                        str(tmp_path / "m.gguf"), "--dtype", "q8_0"], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert "as GGUF (q8_0" in r.stderr
    assert _read(tmp_path / "m.gguf")[0]["general.file_type"] == 7
    # Errors, in this process (the CLI's error path is the same): one line, status 2.
    assert main(["export", "gguf", "--checkpoint", str(ckpt), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: --out {tmp_path} is a directory")
