"""The harness against lm-evaluation-harness run in-process on the same run directory (a tiny random Llama saved
with save_run + a BPE tokenizer trained here): the same tokens at the context/continuation boundary, per-item
log-likelihoods within 1e-3 and identical picks on a 60-item task (some items longer than the model's context,
so lm-eval's left truncation is exercised too); batch-size invariance; greedy generation with stop strings."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch

from lmforge.checkpoint import save_run
from lmforge.common import LmforgeError
from lmforge.eval.harness import Encoder, Evaluator, loglikelihoods
from lmforge.eval.tasks import load_task
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Llama, LlamaConfig
from lmforge.tokenizer import train_bpe

pytestmark = pytest.mark.usefixtures("one_thread")

EOT = "<|endoftext|>"
CORPUS = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. Many hands make light work. "
          f"{EOT}Look before you leap. Actions speak louder than words. Where there is smoke there is fire.{EOT}"
          "Better late than never. The early bird catches the worm. Practice makes perfect.") * 3
WORDS = ("quick brown fox lazy dog stitch time nine hands light work leap words smoke fire late never bird worm "
         "perfect practice").split()


def tiny_model(vocab_size: int, seed: int = 0, **kw) -> Llama:
    """Random Llama with N(0, 1/fan_in) matrices (varied predictions, no near-ties); non-printable byte tokens
    get a zero output row so greedy text is readable (as in tests/test_textgen.py)."""
    cfg = LlamaConfig(**{"vocab_size": vocab_size, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                         "max_seq_len": 64, **kw})
    torch.manual_seed(seed)
    model = Llama(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) if "norm" in name else torch.randn_like(p) / p.shape[-1] ** 0.5)
        unreadable = [i for i in range(256) if not 32 <= i < 127]
        model.lm_head.weight.mul_(3)[unreadable] = 0
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    return train_bpe([CORPUS], vocab_size=300, special_tokens=[EOT])


@pytest.fixture(scope="module")
def run(tok, tmp_path_factory):
    model = tiny_model(tok.vocab_size, eos_token_id=tok.token_to_id(EOT))
    return str(save_run(model, model.cfg, tmp_path_factory.mktemp("run"), tokenizer=tok))


@pytest.fixture(scope="module")
def evaluator(run):
    return Evaluator.from_run(run, "cpu")


@pytest.fixture(scope="module")
def hflm(run):
    """lm-evaluation-harness's `hf` model on the same run directory (transformers loads what save_run writes)."""
    pytest.importorskip("accelerate")
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    return huggingface.HFLM(pretrained=run, device="cpu", batch_size=16, dtype="float32")


def peer_loglikelihoods(hflm, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    from lm_eval.api.instance import Instance

    return hflm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)


def mc_task_file(folder, n: int = 60, seed: int = 0, long_every: int = 9) -> str:
    """A multiple-choice YAML task of n generated items; every `long_every`-th has a context longer than the
    tiny model's 64 positions. Choices of one to three words, so continuations have 1..6 tokens."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        length = 70 if i % long_every == 0 else rng.randint(2, 12)
        options = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(4)]
        items.append({"question": " ".join(rng.choice(WORDS) for _ in range(length)), "options": options,
                      "label": rng.randrange(4)})
    path = folder / "words.yaml"
    path.write_text("name: words\ndescription: \"Pick the next words.\\n\\n\"\nprompt: \"Q: {question}?\\nA:\"\n"
                    "choices: options\nanswer: label\nmetrics: [acc, acc_norm, ece]\n"
                    "items:\n" + "".join(f"  - {json.dumps(it)}\n" for it in items))
    return str(path)


# --- parity with lm-evaluation-harness ---------------------------------------------------------------------------

def test_multiple_choice_matches_lm_eval(evaluator, hflm, tmp_path):
    task = load_task(mc_task_file(tmp_path))
    [result] = evaluator.evaluate([task], batch_size=16)
    records = result.records
    assert len(records) == 60 and any(len(evaluator.encoder.encode(r["context"])) > 64 for r in records)
    pairs = [(r["context"], " " + c) for r in records for c in r["choices"]]
    peer = peer_loglikelihoods(hflm, pairs)
    ours = [(ll, g) for r in records for ll, g in zip(r["loglikelihoods"], r["is_greedy"])]
    np.testing.assert_allclose([ll for ll, _ in ours], [ll for ll, _ in peer], atol=1e-3, rtol=0)
    assert [g for _, g in ours] == [g for _, g in peer]
    # lm-eval's process_results for multiple_choice: argmax of lls, and of lls / len(choice) for acc_norm
    i = 0
    acc = acc_norm = 0.0
    for r in records:
        lls = np.array([ll for ll, _ in peer[i:i + len(r["choices"])]])
        i += len(r["choices"])
        assert r["pred"] == int(np.argmax(lls))
        assert r["pred_norm"] == int(np.argmax(lls / np.array([float(len(c)) for c in r["choices"]])))
        acc += float(np.argmax(lls) in r["gold"])
        acc_norm += float(r["pred_norm"] in r["gold"])
    assert result.metrics["acc"].value() == pytest.approx(acc / 60)
    assert result.metrics["acc_norm"].value() == pytest.approx(acc_norm / 60)
    assert 0 <= result.metrics["ece"].value() <= 1


@pytest.mark.parametrize("context, continuation", [
    ("Q: the quick brown fox?\nA:", " lazy dog"),
    ("The early bird  ", "catches the worm"),  # trailing spaces move to the continuation
    ("Look before you\n", "leap."),
    (f"Where there is smoke{EOT}", " there is fire"),  # special-token text is the special token, as in HF
    ("Many hands make light", "work"),  # no space: the boundary token merges across the join
    ("Practice makes perfect — déjà vu", " 世界"),
])
def test_token_boundary_matches_lm_eval(evaluator, hflm, context, continuation):
    ctx, cont = hflm._encode_pair(context, continuation)
    assert evaluator.encoder.pair(context, continuation) == (list(ctx), list(cont))


def test_empty_context_and_raw_requests_match_lm_eval(evaluator, hflm):
    pairs = [("", " quick brown"), ("", "The quick"), ("fox", " jumps"), ("A stitch in", " time saves nine")]
    # choices sharing leading tokens (scored once, with the context), down to a choice that is that prefix + 1
    pairs += [("The", c) for c in (" quick brown fox", " quick brown dog", " quick brown", " quick brown fox.")]
    reqs = [evaluator.encoder.pair(c, k) for c, k in pairs]
    assert len({tuple(k[:2]) for _, k in reqs[-4:]}) == 1
    ours = loglikelihoods(evaluator.model, reqs, batch_size=4)
    peer = peer_loglikelihoods(hflm, pairs)
    np.testing.assert_allclose([a for a, _ in ours], [b for b, _ in peer], atol=1e-3, rtol=0)
    assert [a for _, a in ours] == [b for _, b in peer]


# --- batching and the cache ----------------------------------------------------------------------------------------

def test_batch_size_does_not_change_scores(evaluator, tmp_path):
    task = load_task(mc_task_file(tmp_path, n=12, seed=3))
    reqs = [evaluator.encoder.pair(task.context(i), c) for i in task.items for c in task.continuations(i)]
    reqs += [(list(reqs[0][0]), reqs[0][1][:1]), ([5], [7])]  # single-token continuations: no second forward
    reqs += [evaluator.encoder.pair("The", c) for c in (" quick brown fox", " quick brown dog")]  # shared prefix
    one = loglikelihoods(evaluator.model, reqs, batch_size=1)
    many = loglikelihoods(evaluator.model, reqs, batch_size=64)
    np.testing.assert_allclose([a for a, _ in one], [b for b, _ in many], atol=1e-4, rtol=0)
    # and equal to the plain definition: one uncached forward of context + continuation
    model = evaluator.model
    for (ctx, cont), (ll, greedy) in zip(reqs, many):
        x = torch.tensor([(ctx + cont)[-65:][:-1]])
        with torch.no_grad():
            lp = model(x)[0, -len(cont):].log_softmax(-1)
        assert ll == pytest.approx(float(lp.gather(-1, torch.tensor(cont)[:, None]).sum()), abs=1e-4)
        assert greedy == (lp.argmax(-1).tolist() == cont)


def test_bad_requests(evaluator):
    with pytest.raises(LmforgeError, match="encodes to no tokens"):
        loglikelihoods(evaluator.model, [([1, 2], [])])
    with pytest.raises(LmforgeError, match="exceeds the model's context"):
        loglikelihoods(evaluator.model, [([1], [3] * 65)])
    with pytest.raises(LmforgeError, match="--limit must be at least 1"):
        evaluator.evaluate([], limit=0)


def test_encoder_prefix_rules(tok):
    enc = Encoder(tok, prefix=[7], prefix_token_id=tok.token_to_id(EOT))
    assert enc.encode("fox") == [7, *tok.encode("fox")]
    assert enc.encode(EOT + "fox") == tok.encode(EOT + "fox", allowed_special="all")  # lm-eval's has_bos_prefix
    assert enc.pair("", " fox") == ([tok.token_to_id(EOT)], tok.encode(" fox"))


# --- generation ------------------------------------------------------------------------------------------------------

def greedy_text(evaluator, prompt: str, n: int) -> str:
    ids = evaluator.encoder.encode(prompt)
    eos = evaluator.model.cfg.eos_token_id
    out = []
    for t in generate(evaluator.model, ids, SamplingParams(temperature=0.0, max_new_tokens=n)):
        if t == eos:
            break
        out.append(t)
    return evaluator.tok.decode(out)


def test_generation_stops_and_scores(evaluator, tmp_path):
    prompts = ["The quick brown", "Look before", "Many hands make", "A stitch"]
    full = [greedy_text(evaluator, p, 12) for p in prompts]
    stop = next(c for c in full[0][2:] if c.strip())  # a character the first output really contains
    items = [{"q": p, "a": [f[:3], "zzz"]} for p, f in zip(prompts, full)]
    spec = {"task": {"name": "gen", "prompt": "{q}", "target": "a", "stop": [stop], "max_new_tokens": 12,
                     "metrics": ["exact_match", "exact_str_match", "f1", "bleu", "chrf", "rougeL"]}}
    path = tmp_path / "gen.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [spec, *items]))
    [result] = evaluator.evaluate([load_task(path)], batch_size=3)
    outputs = [r["output"] for r in result.records]
    assert outputs == [f.split(stop)[0] for f in full]  # batched greedy == one prompt alone, cut before the stop
    assert set(result.metrics) == {"exact_match", "exact_str_match", "f1", "bleu", "chrf", "rougeL"}
    exact = [float(o in (f[:3], "zzz")) for o, f in zip(outputs, full)]
    assert result.metrics["exact_str_match"].values == exact
    assert 0 <= result.metrics["bleu"].value() <= 100 and 0 <= result.metrics["f1"].value() <= 1


def test_bigbench_generation_keeps_stop_string_and_applies_regex(evaluator, tmp_path):
    """BIG-bench's postprocess_output: the text up to and including stop_string; else the first match of
    output_regex (default: the first sentence), "" if none."""
    prompt = "The quick brown"
    full = greedy_text(evaluator, "\nQ: " + prompt + "\nA: ", 16)
    stop = next(c for c in full[2:] if c.strip())
    base = {"name": "bb", "description": "", "keywords": [], "canary": "", "metrics": ["exact_str_match"],
            "preferred_score": "exact_str_match", "max_new_tokens": 16,
            "examples": [{"input": prompt, "target": "x"}]}
    (tmp_path / "task.json").write_text(json.dumps({**base, "stop_string": stop}))
    [res] = evaluator.evaluate([load_task(tmp_path / "task.json")])
    assert res.records[0]["output"] == full[:full.index(stop) + len(stop)]
    (tmp_path / "task.json").write_text(json.dumps({**base, "output_regex": r"[a-z]+"}))
    [res] = evaluator.evaluate([load_task(tmp_path / "task.json")])
    assert res.records[0]["output"] == next(iter(re.findall(r"[a-z]+", full)), "")
