"""`haina compress prune`: exact row sparsity, Wanda's scores, head/channel surgery, the saved checkpoint, errors."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from haina.compress.prune import prune_command, prune_rows
from haina.core.config import load_yaml
from haina.core.errors import HainaError
from haina.core.output import read_manifest
from haina.generate.engine import Engine
from haina.generate.sampling import SamplingParams
from haina.generate.text import TextGenerator
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import load_model, save_model
from haina.model.lora import LoRAConfig, apply_lora, base_weights_hash, merge_lora, save_adapter
from haina.tokenizer.train import train_bpe

TEXT = ["the cat sat on the mat and the dog ran to the park. " * 12,
        "To be, or not to be, that is the question. " * 12, "a stitch in time saves nine, they said. " * 12]
# GPT-2 style (plain multi-head attention, GELU, biases) and Llama style with two key/value groups of two heads.
MHA = ModelConfig(vocab_size=320, block_size=64, n_layer=2, n_head=4, n_embd=64, bias=True)
GQA = ModelConfig(vocab_size=320, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, norm="rmsnorm",
                  pos="rope", mlp="swiglu", bias=True)
FAST = {"calibration_tokens": 256}


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXT, vocab_size=300)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calibration.txt"
    path.write_text("".join(f"{t}\n" for t in TEXT * 3))
    return path


def _save(tmp_path, cfg, tok, name="base", edit=None):
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.normal_(0, 0.05)
        if edit is not None:
            edit(model)
    save_model(tmp_path / name, model, tok)
    return tmp_path / name, model


def _ids(n=24) -> torch.Tensor:
    return torch.randint(0, 300, (2, n), generator=torch.Generator().manual_seed(1))


def _linears(model):
    return [(f"blocks.{i}.{n}", m) for i, b in enumerate(model.blocks) for n, m in b.named_modules()
            if isinstance(m, nn.Linear)]


def _greedy(model, tok, n=8) -> list[int]:
    """The greedy continuation's token ids through the engine (KV cache and all)."""
    (res,), = TextGenerator(Engine(model, eos_token_id=tok.eos_id), tok).generate(
        ["the cat"], SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
    return res.token_ids


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_zeroes_the_same_share_of_every_row(tmp_path, tok, text, method):
    ckpt, dense = _save(tmp_path, MHA, tok)
    out = tmp_path / method
    prune_command(str(ckpt), str(out), method, sparsity=0.3, calibration=[str(text)], **FAST)
    pruned, _ = load_model(out)
    for name, lin in _linears(pruned):
        zeros = (lin.weight == 0).sum(dim=1)
        assert (zeros == round(0.3 * lin.in_features)).all(), name  # 19 of 64 inputs, 77 of 256
    assert torch.equal(pruned.tok_emb.weight, dense.tok_emb.weight)  # embeddings and head are not block Linears
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method and report["sparsity"] == 0.3
    assert report["parameters"]["before"] == report["parameters"]["after"]  # dense storage: same count, same size
    assert report["perplexity"]["after"] != report["perplexity"]["before"] and report["perplexity"]["held_out_tokens"]
    assert load_yaml(out / "config.yaml")["pruning"][-1]["method"] == method
    assert read_manifest(out)["command"] == "compress prune"


def test_wanda_weighs_each_weight_by_its_input_norm(tmp_path, tok, text):
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    magnitude = w.clone()
    prune_rows(magnitude, w.abs(), 0.5)
    assert magnitude.tolist() == [[0.0, 0.0, 3.0, 4.0]]
    wanda = w.clone()
    prune_rows(wanda, w.abs() * torch.tensor([10.0, 1.0, 1.0, 0.1]), 0.5)  # a loud first input, a quiet last one
    assert wanda.tolist() == [[1.0, 0.0, 3.0, 0.0]]

    # On a model whose input features differ in scale, the two keep different weights.
    ckpt, _ = _save(tmp_path, MHA, tok)
    masks = {}
    for method in ("magnitude", "wanda"):
        prune_command(str(ckpt), str(tmp_path / method), method, sparsity=0.5, calibration=[str(text)], **FAST)
        masks[method] = [lin.weight == 0 for _, lin in _linears(load_model(tmp_path / method)[0])]
    assert any(not torch.equal(a, b) for a, b in zip(masks["magnitude"], masks["wanda"]))


@pytest.mark.parametrize("cfg,method,ratio,shape", [
    (MHA, "heads", 0.25, {"n_head": 3, "kv_heads": 3, "head_dim": 16}),
    (GQA, "heads", 0.5, {"n_head": 2, "kv_heads": 1, "head_dim": 16}),
    (MHA, "ffn", 0.5, {"ffn_dim": 128}),
    (GQA, "ffn", 0.25, {"ffn_dim": 144}),  # swiglu: 192 channels, each a gate and an up row
], ids=["heads-mha", "heads-gqa", "ffn-gelu", "ffn-swiglu"])
def test_structured_pruning_saves_a_smaller_model_that_loads_and_generates(tmp_path, tok, text, cfg, method, ratio,
                                                                          shape):
    ckpt, dense = _save(tmp_path, cfg, tok)
    out = tmp_path / "pruned"
    prune_command(str(ckpt), str(out), method, ratio=ratio, calibration=[str(text)], **FAST)
    model, tok2 = load_model(out)
    assert {k: getattr(model.cfg, k) for k in shape} == shape and model.cfg.n_embd == cfg.n_embd
    assert model.num_params() < dense.num_params()
    assert (out / "model.safetensors").stat().st_size < (ckpt / "model.safetensors").stat().st_size
    assert len(_greedy(model, tok2)) == 8
    report = json.loads((out / "report.json").read_text())
    assert report["parameters"] == {"before": dense.num_params(), "after": model.num_params()}
    assert len(report["removed"]) == cfg.n_layer and report["ratio"] == ratio


def _zero_head(head_cols):
    def edit(model):
        for b in model.blocks:
            b.attn.proj.weight[:, head_cols] = 0.0  # the head is computed, and adds nothing to the residual stream
    return edit


def _zero_channels(channels):
    def edit(model):
        for b in model.blocks:
            b.mlp.proj.weight[:, channels] = 0.0
    return edit


CHANNELS = sorted(torch.randperm(256, generator=torch.Generator().manual_seed(3))[:64].tolist())


@pytest.mark.parametrize("cfg,method,ratio,edit,removed", [
    (MHA, "heads", 0.25, _zero_head(slice(16, 32)), [1]),  # head 1 of 4
    (GQA, "heads", 0.5, _zero_head(slice(32, 64)), [1]),  # group 1: query heads 2 and 3 (and key/value head 1)
    (MHA, "ffn", 0.25, _zero_channels(CHANNELS), CHANNELS),
], ids=["mha-head", "gqa-group", "ffn-channels"])
def test_removing_what_adds_nothing_leaves_the_logits_unchanged(tmp_path, tok, cfg, method, ratio, edit, removed):
    ckpt, original = _save(tmp_path, cfg, tok, edit=edit)
    out = tmp_path / "pruned"
    prune_command(str(ckpt), str(out), method, ratio=ratio, **FAST)  # calibration: the standard-library corpus
    report = json.loads((out / "report.json").read_text())
    assert report["removed"] == [removed] * cfg.n_layer and "standard-library" in report["calibration"]
    pruned, _ = load_model(out)
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), original(x), atol=1e-5, rtol=1e-5)
    assert _greedy(pruned, tok, 12) == _greedy(original, tok, 12)  # through the KV cache too
    assert abs(report["perplexity"]["after"] / report["perplexity"]["before"] - 1) < 1e-4


@pytest.mark.parametrize("cfg,kwargs,message", [
    (MHA, {"method": "heads", "ratio": 0.9}, "--ratio 0.9 would remove all 4 attention heads of every layer"),
    (GQA, {"method": "heads", "ratio": 0.2}, ("--ratio 0.2 of the 2 key/value groups (2 query heads each) per "
                                              "layer removes none")),
    (dataclasses.replace(GQA, n_kv_head=1), {"method": "heads", "ratio": 0.5},
     "every layer has a single one of its key/value groups"),
    (MHA, {"method": "ffn", "ratio": 1.0}, "--ratio 1 is not in (0, 1)"),
    (MHA, {"method": "wanda", "sparsity": 1.0}, "--sparsity 1 is not in (0, 1)"),
    (MHA, {"method": "magnitude", "sparsity": 0.0}, "--sparsity 0 is not in (0, 1)"),
    (MHA, {"method": "random"}, "unknown pruning method 'random'"),
], ids=["all-heads", "no-group", "mqa", "ratio-1", "sparsity-1", "sparsity-0", "method"])
def test_bad_options_are_one_line_errors_that_write_nothing(tmp_path, tok, cfg, kwargs, message):
    ckpt, _ = _save(tmp_path, cfg, tok)
    with pytest.raises(HainaError) as e:
        prune_command(str(ckpt), str(tmp_path / "out"), **kwargs, **FAST)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_quantized_checkpoint_and_too_little_text_are_refused(tmp_path, tok):
    from haina.compress.quantize import quantize_command

    ckpt, _ = _save(tmp_path, MHA, tok)
    quantize_command(str(ckpt), str(tmp_path / "q"), "int8-weight")
    with pytest.raises(HainaError, match=r"^\S+ is quantized \(int8-weight\); prune the float checkpoint"):
        prune_command(str(tmp_path / "q"), str(tmp_path / "out"), "heads")
    short = tmp_path / "short.txt"
    short.write_text("cat\n")
    with pytest.raises(HainaError, match=r"holds only \d+ tokens; give more text"):
        prune_command(str(ckpt), str(tmp_path / "out"), "wanda", calibration=[str(short)], **FAST)
    assert not (tmp_path / "out").exists()


def test_a_lora_run_is_merged_before_pruning(tmp_path, tok, text):
    ckpt, base = _save(tmp_path, GQA, tok)
    adapted = copy.deepcopy(base)
    lora = LoRAConfig(r=2, targets=("q", "down"))
    apply_lora(adapted, lora)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".lora." in name:
                p.normal_(0, 0.3)
    save_adapter(tmp_path / "adapter", adapted, lora, base_hash=base_weights_hash(base), base=ckpt)
    prune_command(str(ckpt), str(tmp_path / "p"), "magnitude", sparsity=0.5, adapter=str(tmp_path / "adapter"),
                  calibration=[str(text)], **FAST)
    merge_lora(adapted)  # what the command should have pruned: the merged weights, so no adapter refills a zero
    with torch.no_grad():
        for _, lin in _linears(adapted):
            prune_rows(lin.weight, lin.weight.abs(), 0.5)
    pruned, _ = load_model(tmp_path / "p")
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), adapted(x))


def test_shards_calibrate_and_the_recipe_recovers_through_the_cli(tmp_path, tok):
    """The command line end to end: prune with token shards, generate, recover with the recipe; an error exits 2."""
    from haina.data.tokenize import tokenize_to_shards

    ckpt, _ = _save(tmp_path, GQA, tok)
    shards = tmp_path / "shards"
    tokenize_to_shards({"train": TEXT * 20, "val": TEXT * 2}, tok, shards)

    def haina(*args):
        return subprocess.run([sys.executable, "-m", "haina.cli", *map(str, args)], capture_output=True, text=True,
                              timeout=180, check=False)

    out = tmp_path / "pruned"
    r = haina("compress", "prune", "--checkpoint", ckpt, "--out", out, "--method", "ffn", "--ratio", "0.5",
              "--calibration", shards, "--calibration-tokens", "512")
    assert r.returncode == 0, r.stderr
    assert "removed 96 FFN channels per layer" in r.stderr
    report = json.loads((out / "report.json").read_text())
    assert "val split" in report["calibration"] and report["calibration_tokens"] == 512
    r = haina("finetune", "continue", "--config", "prune-recover", "--base", out, "--data", shards, "--out",
              tmp_path / "recovered", "--train.max_steps=2", "--train.batch_size=2", "--train.eval_batches=1",
              "--train.device=cpu", "--train.warmup_steps=1")
    assert r.returncode == 0, r.stderr
    recovered, rtok = load_model(tmp_path / "recovered")
    assert recovered.cfg.ffn_dim == 96 and len(_greedy(recovered, rtok)) == 8

    r = haina("compress", "prune", "--checkpoint", ckpt, "--out", tmp_path / "bad", "--method", "heads", "--ratio",
              "0.95")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --ratio 0.95 would remove all 2 key/value groups")
    assert not (tmp_path / "bad").exists()
