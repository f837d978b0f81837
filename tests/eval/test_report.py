"""Reports: the percentile bootstrap (against a direct numpy computation), the four files of --out, compare's
paired deltas, and `lmforge eval run / compare` end to end, bad input included (one line, exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.eval.harness import Metric
from lmforge.eval.report import bootstrap_ci, compare, markdown, paired_delta_ci
from tests.eval.test_harness import mc_task_file

pytestmark = pytest.mark.usefixtures("one_thread")


# --- bootstrap -----------------------------------------------------------------------------------------------------

def test_bootstrap_is_the_percentile_interval_of_resampled_means():
    values = [float(v) for v in np.random.default_rng(0).random(50) > 0.4]
    low, high = bootstrap_ci(Metric("acc", values), 50, resamples=2000, seed=3)
    idx = np.random.default_rng(3).integers(0, 50, size=(2000, 50))
    means = np.asarray(values)[idx].mean(axis=1)
    assert (low, high) == (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))
    assert low < np.mean(values) < high
    assert bootstrap_ci(Metric("acc", values), 50, resamples=2000, seed=3) == (low, high)  # fixed seed
    assert bootstrap_ci(Metric("acc", [1.0] * 20), 20) == (1.0, 1.0)


def test_bootstrap_recomputes_corpus_metrics_on_each_resample():
    preds = np.arange(30) % 3 == 0
    seen = []

    def corpus(idx):
        seen.append(len(idx))
        return float(np.mean(preds[list(idx)]))

    low, high = bootstrap_ci(Metric("x", corpus=corpus, n=30), 30, resamples=200, seed=1)
    per_item = bootstrap_ci(Metric("x", [float(p) for p in preds]), 30, resamples=200, seed=1)
    assert (low, high) == pytest.approx(per_item) and seen == [30] * 200


def test_paired_delta_ci():
    a = [0.0, 1.0] * 20
    assert paired_delta_ci(a, a) == (0.0, 0.0)
    low, high = paired_delta_ci(a, [1.0] * 40)
    assert 0 < low <= 0.5 <= high


# --- the CLI and the report files -------------------------------------------------------------------------------------

@pytest.fixture
def lmforge(capsys):
    """Run `lmforge ...` in-process through its top-level error handling: (exit code, stdout, stderr)."""
    from lmforge import cli

    def call(*argv: str) -> tuple[int, str, str]:
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err
    return call


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from lmforge.checkpoint import save_run
    from lmforge.tokenizer import train_bpe
    from tests.eval.test_harness import CORPUS, EOT, tiny_model

    tok = train_bpe([CORPUS], vocab_size=300, special_tokens=[EOT])
    model = tiny_model(tok.vocab_size, eos_token_id=tok.token_to_id(EOT))
    return str(save_run(model, model.cfg, tmp_path_factory.mktemp("run"), tokenizer=tok))


def test_run_writes_the_report_and_compare_reads_two(lmforge, run, tmp_path):
    tasks = mc_task_file(tmp_path, n=30, seed=1)
    gen = tmp_path / "gen.jsonl"
    gen.write_text('{"task": {"name": "gen", "max_new_tokens": 4, "metrics": ["exact_match", "chrf"]}}\n'
                   '{"prompt": "The quick", "target": "brown"}\n{"prompt": "Look", "target": ["before", "b"]}\n')
    code, out, err = lmforge("eval", "run", "--model", run, "--tasks", tasks, "--tasks", str(gen),
                             "--out", str(tmp_path / "a"), "--bootstrap", "200", "--no-progress")
    assert code == 0, err
    assert "| words | 30 | 0 | acc |" in out and "wrote" in out
    doc = json.loads((tmp_path / "a" / "results.json").read_text())
    assert doc["bootstrap"] == {"method": "percentile", "resamples": 200, "confidence": 0.95, "seed": 1234}
    words = doc["tasks"]["words"]
    assert words["n_items"] == 30 and words["chance"] == pytest.approx(0.25) and set(words["metrics"]) == {
        "acc", "acc_norm", "ece"}
    for m in words["metrics"].values():
        assert m["ci_low"] <= m["value"] <= m["ci_high"]
    assert set(doc["tasks"]["gen"]["metrics"]) == {"exact_match", "chrf"}
    lines = (tmp_path / "a" / "items.jsonl").read_text().splitlines()
    assert len(lines) == 32 and json.loads(lines[0])["task"] == "words"
    assert json.loads(lines[-1])["references"] == ["before", "b"]
    assert (tmp_path / "a" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "a" / "report.md").read_text() == markdown(doc)

    code, _, err = lmforge("eval", "run", "--model", run, "--tasks", tasks, "--out", str(tmp_path / "b"),
                           "--fewshot", "2", "--seed", "5", "--batch-size", "7")
    assert code == 0, err
    code, out, err = lmforge("eval", "compare", str(tmp_path / "a"), str(tmp_path / "b"))
    assert code == 0, err
    text = compare(tmp_path / "a", tmp_path / "b")
    assert out.strip() == text.strip()
    a = json.loads((tmp_path / "a" / "results.json").read_text())["tasks"]["words"]["metrics"]["acc"]["value"]
    b = json.loads((tmp_path / "b" / "results.json").read_text())["tasks"]["words"]["metrics"]["acc"]["value"]
    row = next(line for line in text.splitlines() if line.startswith("words") and " acc " in line)
    assert f"{b - a:+.4f}" in row and row.count("–") == 3  # both CIs and the paired CI of the difference
    assert "gen" in text and "—" in text  # a task only A has


@pytest.mark.parametrize("task_text, match", [
    ("name: t\nprompt: '{q}'\ntarget: a\nitems: [{q: x, a: y}]\nbogus: 1\n", "unknown task field 'bogus'"),
    ("name: t\nprompt: '{q}'\ntarget: a\nfewshot: many\nitems: [{q: x, a: y}]\n", "task field 'fewshot' must be int"),
    ("", "empty task file"),
])
def test_bad_task_file_is_one_line_exit_2(lmforge, run, tmp_path, task_text, match):
    path = tmp_path / "t.yaml"
    path.write_text(task_text)
    code, out, err = lmforge("eval", "run", "--model", run, "--tasks", str(path), "--out", str(tmp_path / "o"))
    assert (code, out) == (2, "")
    assert err.startswith("lmforge eval: error: ") and len(err.splitlines()) == 1 and match in err, err
    assert not (tmp_path / "o").exists()


def test_bad_arguments_are_one_line_exit_2(lmforge, run, tmp_path):
    tasks = mc_task_file(tmp_path, n=4)
    for args, match in [(["--limit", "0"], "--limit must be at least 1"),
                        (["--fewshot", "9"], "9-shot needs at least 10 items"),
                        (["--model", str(tmp_path / "missing")], "missing")]:
        argv = ["eval", "run", "--model", run, "--tasks", tasks, "--out", str(tmp_path / "o"), *args]
        code, out, err = lmforge(*argv)
        assert code == 2 and len(err.splitlines()) == 1 and match in err, err
    code, _, err = lmforge("eval", "compare", str(tmp_path), str(tmp_path))
    assert code == 2 and "has no results.json" in err


BIGBENCH = Path.home() / ".cache" / "lmforge" / "bigbench" / "tasks" / "date_understanding" / "task.json"
SMOLLM2 = Path.home() / ".cache" / "lmforge" / "smollm2-135m-instruct"


@pytest.mark.slow
@pytest.mark.skipif(not (BIGBENCH.is_file() and (SMOLLM2 / "config.json").is_file()),
                    reason="needs the cached BIG-bench date_understanding task and the converted SmolLM2 run")
def test_smollm2_on_date_understanding_matches_lm_eval(tmp_path):
    """The real model on real BIG-bench items: the first 40 items scored by lm-eval's HFLM give the same picks."""
    pytest.importorskip("accelerate")
    from lm_eval.models.huggingface import HFLM

    from lmforge.eval.harness import Evaluator
    from lmforge.eval.tasks import load_task
    from tests.eval.test_harness import peer_loglikelihoods

    [res] = Evaluator.from_run(SMOLLM2, "cpu").evaluate([load_task(BIGBENCH)], limit=40)
    peer = peer_loglikelihoods(HFLM(pretrained=str(SMOLLM2), device="cpu", batch_size=32, dtype="float32"),
                               [(r["context"], c) for r in res.records for c in r["choices"]])
    ours = [ll for r in res.records for ll in r["loglikelihoods"]]
    np.testing.assert_allclose(ours, [ll for ll, _ in peer], atol=1e-3, rtol=0)
    assert res.metrics["acc"].value() > res.task.chance()
