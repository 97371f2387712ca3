"""`haina eval generate`: generations through the engine, scored the way sacrebleu and rouge-score score them.

A random tiny model writes nonsense, so the references of the main runs are built from what it generated
in a first run (greedy decoding repeats itself exactly): some examples match exactly, some partly, and the
expected scores are known. Every number is then recomputed here from outputs.jsonl with the libraries
called directly.
"""

import json

import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer

from haina.cli import main
from haina.core.errors import HainaError
from haina.eval.textmetrics import corpus_scores, exact_match, normalize, parse_metrics, sentence_scores
from haina.generate.chat import DEFAULT_CHAT_TEMPLATE, IM_END, IM_START
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.tokenizer.train import train_bpe

CORPUS = ["the cat sat on the mat and the dog ran to the park. " * 10,
          "To be, or not to be, that is the question. " * 10]
PROMPTS = ["the cat", "to be", "the dog ran", "or not", "the park", "that is"]
ROUGE = ("rouge1", "rouge2", "rougeL")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A 2-layer random model with a byte-level BPE tokenizer and ChatML (peaked logits: no greedy near-ties)."""
    tok = train_bpe(CORPUS, vocab_size=320, special_tokens=("<|endoftext|>", IM_START, IM_END))
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=320, block_size=128, n_layer=2, init_std=0.3)
    out = tmp_path_factory.mktemp("gen") / "tiny"
    save_model(out, Transformer(cfg), tok)
    return out


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _eval(ckpt, data, out, *extra):
    return main(["eval", "generate", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out),
                 "--max-new-tokens", "8", "--device", "cpu", *extra])


def _rows(out):
    return [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def greedy(ckpt, tmp_path_factory):
    """What the model writes greedily for each prompt (a first run, against placeholder references)."""
    tmp = tmp_path_factory.mktemp("greedy")
    data = _jsonl(tmp / "refs.jsonl", [{"id": f"q{i}", "prompt": p, "reference": "the cat sat on the mat"}
                                       for i, p in enumerate(PROMPTS)])
    assert _eval(ckpt, data, tmp / "out") == 0
    rows = _rows(tmp / "out")
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(len(PROMPTS))]
    assert [r["prompt"] for r in rows] == PROMPTS
    return [r["generations"][0] for r in rows]


@pytest.fixture(scope="module")
def scored(ckpt, greedy, tmp_path_factory):
    """A run whose references are built from the greedy outputs: group 'exact' matches, group 'part' half does."""
    tmp = tmp_path_factory.mktemp("scored")
    records = []
    for i, (p, g) in enumerate(zip(PROMPTS, greedy)):
        if i % 2 == 0:
            records.append({"prompt": p, "reference": g, "grp": "exact"})
        else:  # two references, neither equal to the generation
            records.append({"prompt": p, "references": [g + " the cat sat", "the mat " + g[: len(g) // 2]],
                            "grp": "part"})
    data = _jsonl(tmp / "refs.jsonl", records)
    out = tmp / "out"
    assert _eval(ckpt, data, out, "--group-field", "grp", "--noise", "char,word", "--rates", "0", "0.3") == 0
    return out, records


# ---------------------------------------------------------------------------------------------- metrics alone
def test_metrics_equal_the_libraries_called_directly():
    hyps = ["the cat sat on a mat", "a dog ran to  the park", "to be or not"]
    refs = [["the cat sat on the mat", "a cat was on the mat"], ["the dog ran to the park"], ["to be, or not to be"]]
    names = parse_metrics(None)
    per = [sentence_scores(h, r, names) for h, r in zip(hyps, refs)]
    scorer = rouge_scorer.RougeScorer(list(ROUGE), use_stemmer=True)
    for h, r, s in zip(hyps, refs, per):
        assert s["bleu"] == pytest.approx(sacrebleu.sentence_bleu(h, r).score)
        assert s["chrf"] == pytest.approx(sacrebleu.sentence_chrf(h, r).score)
        best = {k: max(scorer.score(x, h)[k].fmeasure for x in r) for k in ROUGE}
        assert {k: s[k] for k in ROUGE} == pytest.approx(best)
    got = corpus_scores(hyps, refs, names)
    streams = [[r[0] for r in refs], [r[1] if len(r) > 1 else None for r in refs]]
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, streams).score)
    assert got["rougeL"] == pytest.approx(sum(p["rougeL"] for p in per) / 3)
    assert got["bleu"] > 0 and got["rouge1"] > 0.5


def test_exact_match_normalises_whitespace_only():
    assert normalize("  a \n b\t") == "a b"
    assert exact_match(" Paris \n", ["paris", "Paris"]) == 1.0
    assert exact_match("Paris.", ["Paris"]) == 0.0  # punctuation and case count
    assert parse_metrics(["bleu,rouge", "bleu"]) == ["bleu", "rouge"]
    with pytest.raises(HainaError, match="meteor"):
        parse_metrics(["meteor"])


# ---------------------------------------------------------------------------------------------- the command
def test_report_matches_sacrebleu_and_rouge_on_saved_outputs(scored):
    out, records = scored
    report = json.loads((out / "report.json").read_text())
    rows = _rows(out)
    assert len(rows) == len(records)
    assert [r["id"] for r in rows] == list(range(1, len(records) + 1))  # no "id": the line number
    hyps = [r["generations"][0] for r in rows]
    refs = [r["references"] for r in rows]
    assert refs == [[rec["reference"]] if "reference" in rec else rec["references"] for rec in records]
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(2)]
    assert report["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score)
    assert report["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, streams).score)
    scorer = rouge_scorer.RougeScorer(list(ROUGE), use_stemmer=True)
    for k in ROUGE:
        mean = sum(max(scorer.score(x, h)[k].fmeasure for x in r) for h, r in zip(hyps, refs)) / len(rows)
        assert report[k] == pytest.approx(mean)
    assert report["exact_match"] == 0.5  # the 'exact' half, and only it
    assert report["bleu"] > 10 and report["rougeL"] > 0.5
    assert report["examples"] == 6 and report["generated_tokens"] == 6 * 8 and report["tokens_per_sec"] > 0
    assert report["kind"] == "generate" and report["details"]["metrics"] == ["bleu", "chrf", "rouge", "exact_match"]
    for row in rows:  # per-example scores are the sentence-level ones
        assert row["scores"][0]["bleu"] == pytest.approx(sacrebleu.sentence_bleu(row["generations"][0],
                                                                                 row["references"]).score, abs=1e-5)
        assert row["finish_reasons"] == ["length"]


def test_group_field_gives_scores_per_group_and_gaps(scored):
    out, _ = scored
    report = json.loads((out / "report.json").read_text())
    groups = report["details"]["groups"]
    assert groups["field"] == "grp" and set(groups["by_group"]) == {"exact", "part"}
    assert groups["by_group"]["exact"]["exact_match"] == 1.0 and groups["by_group"]["part"]["exact_match"] == 0.0
    assert report["gap_exact_match"] == 1.0
    assert groups["gaps"]["exact_match"] == {"gap": 1.0, "max_group": "exact", "min_group": "part"}
    rows = [r for r in _rows(out) if r["grp"] == "part"]
    part_bleu = sacrebleu.corpus_bleu([r["generations"][0] for r in rows],
                                      [[r["references"][0] for r in rows], [r["references"][1] for r in rows]]).score
    assert groups["by_group"]["part"]["bleu"] == pytest.approx(part_bleu)
    assert report["gap_bleu"] == pytest.approx(abs(groups["by_group"]["exact"]["bleu"] - part_bleu))
    assert "## Groups (grp)" in (out / "report.md").read_text()


def test_noise_table_and_plot(scored):
    out, _ = scored
    report = json.loads((out / "report.json").read_text())
    table = report["details"]["noise"]
    assert [(r["noise"], r["rate"]) for r in table] == [("clean", 0.0), ("char", 0.3), ("word", 0.3)]
    assert {k: table[0][k] for k in ("bleu", "exact_match")} == {k: report[k] for k in ("bleu", "exact_match")}
    assert all(set(r) >= {"bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match"} for r in table)
    assert (out / "metric_vs_noise.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "## Robustness" in md and "| char | 0.3 |" in md and "metric_vs_noise.png" in md


def test_n_samples_report_mean_and_best_of_k(ckpt, tmp_path):
    first = _jsonl(tmp_path / "a.jsonl", [{"prompt": p, "reference": "x"} for p in PROMPTS])
    sample = ["--n", "2", "--temperature", "1.0", "--seed", "3", "--metrics", "exact_match", "rouge", "bleu"]
    assert _eval(ckpt, first, tmp_path / "a", *sample) == 0
    gens = [r["generations"] for r in _rows(tmp_path / "a")]
    assert all(len(g) == 2 for g in gens)
    # The second sample of each prompt becomes its reference: best-of-2 matches everything.
    data = _jsonl(tmp_path / "b.jsonl", [{"prompt": p, "reference": g[1]} for p, g in zip(PROMPTS, gens)])
    assert _eval(ckpt, data, tmp_path / "b", *sample) == 0
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    rows = _rows(tmp_path / "b")
    assert [r["generations"] for r in rows] == gens  # seeded: the same samples again
    assert report["exact_match_best_of_k"] == 1.0
    expected = sum(exact_match(g, [g2[1]]) for g2 in gens for g in g2) / (2 * len(gens))
    assert report["exact_match"] == pytest.approx(expected) and report["exact_match"] < 1.0
    for k in ROUGE:
        assert report[f"{k}_best_of_k"] >= report[k]
    # bleu_best_of_k: the corpus of each example's best sample (by sentence BLEU).
    best = [r["generations"][max(range(2), key=lambda j, r=r: r["scores"][j]["bleu"])] for r in rows]
    assert report["bleu_best_of_k"] == pytest.approx(sacrebleu.corpus_bleu(best, [[g[1] for g in gens]]).score)
    runs = [sacrebleu.corpus_bleu([g[j] for g in gens], [[g[1] for g in gens]]).score for j in range(2)]
    assert report["bleu"] == pytest.approx(sum(runs) / 2)
    assert "chrf" not in report and report["samples_per_prompt"] == 2


def test_chat_prompts_go_through_the_chat_template(ckpt, tmp_path):
    from haina.generate.chat import encode_chat
    from haina.generate.engine import Engine
    from haina.generate.sampling import SamplingParams
    from haina.generate.text import TextGenerator
    from haina.model.checkpoint import load_model

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]
    data = _jsonl(tmp_path / "chat.jsonl", [{"id": "m", "messages": msgs, "reference": "sat"},
                                            {"id": "p", "prompt": "to be", "reference": "or not"}])
    assert _eval(ckpt, data, tmp_path / "out", "--chat", "--metrics", "exact_match") == 0
    rows = _rows(tmp_path / "out")
    assert rows[0]["messages"] == msgs and rows[1]["prompt"] == "to be"
    model, tok = load_model(ckpt, device="cpu")
    gen = TextGenerator(Engine(model, eos_token_id=tok.eos_id), tok)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=(tok.token_to_id(IM_END),))
    want = gen.generate([encode_chat(tok, msgs), encode_chat(tok, [{"role": "user", "content": "to be"}])], params)
    assert [r["generations"][0] for r in rows] == [w[0].text for w in want]
    plain = gen.generate(["to be"], SamplingParams(max_new_tokens=8, temperature=0.0))[0][0].text
    assert plain != want[1][0].text  # the template made a difference


# ---------------------------------------------------------------------------------------------- bad input
def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_missing_references_fail_before_anything_is_written(ckpt, tmp_path, capsys):
    data = _jsonl(tmp_path / "refs.jsonl", [{"prompt": "a", "reference": "b"}, {"prompt": "c"},
                                            {"prompt": "d", "references": []}, {"prompt": "e", "reference": "f"}])
    assert _eval(ckpt, data, tmp_path / "out") == 2
    err = _one_line_error(capsys)
    assert "refs.jsonl:2:" in err and "2 record(s)" in err
    assert not (tmp_path / "out").exists()
    # --limit reads only the first records: the bad ones after them are not part of this evaluation.
    assert _eval(ckpt, data, tmp_path / "out", "--limit", "1", "--metrics", "exact_match") == 0
    assert [r["prompt"] for r in _rows(tmp_path / "out")] == ["a"]


def test_bad_json_unknown_metric_and_greedy_samples_are_one_line_errors(ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "reference": "b"}\n{"prompt": \n')
    assert _eval(ckpt, bad, tmp_path / "out") == 2
    assert "bad.jsonl:2: not valid JSON" in _one_line_error(capsys)
    good = _jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "reference": "b"}])
    assert _eval(ckpt, good, tmp_path / "out", "--metrics", "bleu,meteor") == 2
    assert "meteor" in _one_line_error(capsys)
    assert _eval(ckpt, good, tmp_path / "out", "--n", "3") == 2
    assert "--temperature" in _one_line_error(capsys)
    assert _eval(ckpt, good, tmp_path / "out", "--group-field", "lang") == 2
    assert "'lang'" in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()
