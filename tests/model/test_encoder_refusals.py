"""Commands that predict next tokens refuse an encoder (causal: false) in one line instead of producing numbers or
files that mean nothing."""

import pytest
import torch

from haina.cli import main
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.tokenizer.train import train_bpe


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder")
    tok = train_bpe(["the cat sat on the mat. " * 30] * 3, vocab_size=270)
    cfg = ModelConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=32, norm="rmsnorm", pos="rope",
                      mlp="swiglu", bias=False, causal=False)
    torch.manual_seed(0)
    save_model(root / "enc", Transformer(cfg), tok)
    (root / "text.txt").write_text("the cat sat on the mat.\n" * 20)
    (root / "sft.jsonl").write_text('{"prompt": "the cat", "response": "sat"}\n' * 10)
    return root


@pytest.mark.parametrize("argv", [
    "eval lm --checkpoint {r}/enc --data {r}/text.txt --out {r}/out --device cpu",
    "finetune sft --base {r}/enc --data {r}/sft.jsonl --out {r}/out --train.device=cpu",
    "export gguf --checkpoint {r}/enc --out {r}/out.gguf",
    "export onnx --checkpoint {r}/enc --out {r}/out",
    "generate --checkpoint {r}/enc --prompt the --device cpu",
])
def test_next_token_commands_refuse_an_encoder(encoder, argv, capsys):
    assert main(argv.format(r=encoder).split()) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "encoder (causal: false)" in err[0], err
    assert not (encoder / "out").exists() and not (encoder / "out.gguf").exists()
