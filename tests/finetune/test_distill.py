"""`haina finetune distill`: the soft loss pulls the student to the teacher, α = 0 is plain training, top-k works."""

import json
from pathlib import Path

import pytest
import torch

from haina.cli import main
from haina.core.config import from_dict, load_yaml
from haina.core.errors import HainaError
from haina.data.shards import TokenShards
from haina.data.tokenize import tokenize_to_shards
from haina.finetune.config import DistillConfig
from haina.finetune.distill import DistillTrainer, TeacherTopK, soft_kl, topk_kl
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import load_model, read_weights, save_model
from haina.model.transformer import lm_loss
from haina.tokenizer import EOT
from haina.tokenizer.train import train_bpe
from haina.train.config import TrainConfig
from haina.train.trainer import Trainer

BLOCK, VOCAB = 32, 320


def documents(chars: int = 60_000) -> list[str]:
    """The language reference that ships with Python (pydoc topics), one document per topic."""
    from pydoc_data.topics import topics

    docs, n = [], 0
    for key in sorted(topics):
        docs.append(topics[key])
        n += len(topics[key])
        if n >= chars:
            break
    return docs


def train_config(**kw) -> TrainConfig:
    base = {"batch_size": 8, "block_size": BLOCK, "max_steps": 20, "warmup_steps": 3, "lr": 3e-3, "min_lr": 3e-4,
            "eval_every": 10, "eval_batches": 4, "save_every": 0, "tensorboard": False, "device": "cpu",
            "log_every": 100}
    return TrainConfig(**{**base, **kw})


def tiny(n_layer: int, n_embd: int, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=n_layer, n_head=2, n_embd=n_embd))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Models this small gain nothing from more threads, and on a busy machine torch's threads wait for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shards, a briefly trained teacher, an untrained student of its tokenizer and one of another tokenizer."""
    root = tmp_path_factory.mktemp("distill")
    docs = documents()
    tok = train_bpe(docs, vocab_size=VOCAB, special_tokens=(EOT,))
    tokenize_to_shards(docs, tok, root / "data", val_fraction=0.1)
    teacher, shards = tiny(2, 64, seed=0), TokenShards(root / "data", "train")
    optimizer, g = torch.optim.AdamW(teacher.parameters(), lr=3e-3), torch.Generator().manual_seed(0)
    for _ in range(120):  # a brief pretraining: the teacher must know more than a fresh student
        x, y = shards.get_batch(16, BLOCK, g)
        lm_loss(teacher(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    save_model(root / "teacher", teacher, tok)
    save_model(root / "student", tiny(1, 32, seed=1), tok)
    other = train_bpe(docs[::-1][:20], vocab_size=300, special_tokens=(EOT,))
    save_model(root / "stranger", tiny(1, 32, seed=1), other)
    return root


def distill_args(world: Path, out: Path, *more: str, student: tuple[str, ...] | None = None) -> list[str]:
    student = ("--base", str(world / "student")) if student is None else student
    return ["finetune", "distill", "--teacher", str(world / "teacher"), "--data", str(world / "data"), "--out",
            str(out), *student, "--train.max_steps=20", "--train.batch_size=8", "--train.warmup_steps=3",
            "--train.lr=3e-3", "--train.min_lr=3e-4", "--train.eval_every=10", "--train.eval_batches=4",
            "--train.device=cpu", "--train.tensorboard=false", "--train.save_every=0", *more]


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_the_soft_loss_pulls_the_student_to_the_teacher(world, tmp_path, capsys):
    plain, taught = tmp_path / "plain", tmp_path / "taught"
    assert main(distill_args(world, plain, "--alpha", "0")) == 0
    assert main(distill_args(world, taught, "--alpha", "0.9", "--temperature", "1.0")) == 0
    p, t = report(plain)["distill"], report(taught)["distill"]
    assert p["kl"]["before"] == t["kl"]["before"]  # the same student at the start
    assert t["kl"]["after"] < t["kl"]["before"] and t["kl"]["after"] < p["kl"]["after"] - 0.03, (p, t)
    # Same student, steps and data: the teacher's soft targets teach more than the labels alone.
    assert report(taught)["val_loss"] < report(plain)["val_loss"] - 0.03
    assert t["teacher_val_loss"] < report(taught)["val_loss"]  # the teacher is the better model here
    assert "KL(teacher ‖ student) on val" in capsys.readouterr().out


def test_alpha_zero_is_exactly_plain_training(world, tmp_path):
    assert main(distill_args(world, tmp_path / "distill", "--alpha", "0")) == 0
    model, tok = load_model(world / "student")
    shards = world / "data"
    cfg = from_dict(TrainConfig, load_yaml(tmp_path / "distill" / "config.yaml")["train"])  # the run's own settings
    plain = Trainer(model.train(), cfg, tmp_path / "plain", train_data=TokenShards(shards, "train"),
                    val_data=TokenShards(shards, "val"), tokenizer=tok)
    expected = plain.fit()
    got = report(tmp_path / "distill")
    weights = read_weights(Path(got["checkpoint"]) / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in plain.model.weights().items())
    assert got["val_loss"] == expected["val_loss"]


def test_top_k_path_runs_and_its_loss_is_finite(world, tmp_path):
    out = tmp_path / "topk"
    assert main(distill_args(world, out, "--top-k", "8", "--alpha", "0.9")) == 0
    r = report(out)
    assert r["distill"]["topk_windows"] > 0 and r["distill"]["top_k"] == 8
    losses = [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert losses and all(torch.isfinite(torch.tensor(x)) for x in losses)
    assert r["distill"]["kl"]["after"] < r["distill"]["kl"]["before"]


def test_top_k_kl_is_the_exact_kl_when_k_is_the_vocabulary():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g) * 3
    values, indices = teacher.topk(11, dim=-1)
    torch.testing.assert_close(topk_kl(student, values, indices, 2.0), soft_kl(student, teacher, 2.0))
    values, indices = teacher.topk(3, dim=-1)
    assert (topk_kl(student, values, indices, 2.0) >= 0).all()
    assert (soft_kl(teacher, teacher, 2.0).abs() < 1e-5).all()


def test_top_k_windows_hold_the_teachers_top_logits(world):
    teacher, _ = load_model(world / "teacher")
    shards = TokenShards(world / "data", "train")
    topk = TeacherTopK.compute(teacher, shards, k=4, batch_size=8, block_size=BLOCK, device=torch.device("cpu"),
                               precision="fp32", max_windows=20)
    assert len(topk) == 20 and topk.values.dtype == torch.float16 and topk.indices.dtype == torch.int32
    batch = topk.get_batch(3, BLOCK, torch.Generator().manual_seed(0))
    assert torch.equal(batch["x"][:, 1:], batch["y"][:, :-1])
    with torch.no_grad():
        values, indices = teacher(batch["x"]).topk(4, dim=-1)
    torch.testing.assert_close(batch["top_values"].float(), values, atol=1e-2, rtol=1e-3)
    assert torch.equal(batch["top_indices"].long(), indices)
    again = topk.get_batch(3, BLOCK, torch.Generator().manual_seed(0))
    assert torch.equal(again["x"], batch["x"])  # the draw is the generator's


def test_the_teacher_gets_no_gradients_and_is_never_saved(world, tmp_path):
    teacher, tok = load_model(world / "teacher")
    teacher.train().requires_grad_(True)  # as load_base gives it: the trainer must freeze it
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, _ = load_model(world / "student")
    shards = world / "data"
    trainer = DistillTrainer(student.train(), train_config(max_steps=2), tmp_path / "run",
                             train_data=TokenShards(shards, "train"), val_data=TokenShards(shards, "val"),
                             tokenizer=tok, teacher=teacher, distill=DistillConfig(alpha=0.5, temperature=2.0))
    trainer.fit()
    assert not teacher.training and not any(p.requires_grad or p.grad is not None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in student.parameters()}
    saved = read_weights(tmp_path / "run" / "checkpoints" / "step-0000002" / "model.safetensors")
    assert set(saved) == set(student.weights())


@pytest.mark.parametrize(("student", "expected"), [
    (("--base", "STRANGER"), "is not the student's"),
    (("--base", "STUDENT", "--preset", "tiny"), "one of the two, not both"),
    ((), "one of the two"),
])
def test_bad_students_are_one_line(world, tmp_path, capsys, student, expected):
    names = {"STRANGER": str(world / "stranger"), "STUDENT": str(world / "student")}
    assert main(distill_args(world, tmp_path / "run", student=tuple(names.get(s, s) for s in student))) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_a_preset_student_gets_the_teachers_vocabulary_and_tokenizer(world, tmp_path):
    out = tmp_path / "preset"
    assert main(distill_args(world, out, "--train.max_steps=3", "--train.block_size=32",
                             student=("--preset", "tiny"))) == 0
    model, tok = load_model(out)
    _, teacher_tok = load_model(world / "teacher")
    assert model.cfg.vocab_size == VOCAB and model.cfg.n_embd == ModelConfig.from_name("tiny").n_embd
    assert tok.hash() == teacher_tok.hash()
    assert report(out)["student"] == "preset tiny"


def test_lora_on_a_preset_student_is_refused():
    from haina.finetune.command import load_finetune_config
    from haina.finetune.distill import run_distill

    cfg = load_finetune_config("distill", None, {"preset": "tiny", "data": {"train": ["x"]}}, ["lora.r=4"])
    with pytest.raises(HainaError, match="fresh one"):
        run_distill(cfg)


def test_top_k_resume_equals_an_uninterrupted_run(world, tmp_path):
    fixed = ("--top-k", "8", "--train.decay_steps=8")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(distill_args(world, straight, *fixed, "--train.max_steps=8")) == 0
    assert main(distill_args(world, stopped, *fixed, "--train.max_steps=4")) == 0
    assert main(distill_args(world, stopped, *fixed, "--train.max_steps=8", "--resume")) == 0
    a, b = report(straight), report(stopped)
    assert b["steps"] == 8 and b["steps_this_run"] == 4
    wa, wb = (read_weights(Path(r["checkpoint"]) / "model.safetensors") for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "the resumed run's weights differ from the uninterrupted run's"
    assert a["val_loss"] == b["val_loss"] and a["distill"]["kl"] == b["distill"]["kl"]
