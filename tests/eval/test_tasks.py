"""Task files: the YAML / JSONL schema and its one-line errors, prompt assembly with seeded few-shot examples,
and BIG-bench task.json read as BIG-bench's `json_task.default_format_fn` formats it (expected strings written
out here by hand from that function's definition)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmforge.common import LmforgeError
from lmforge.eval.tasks import GENERATE, MULTIPLE_CHOICE, load_task, load_tasks

CAPITALS = """\
name: capitals
description: "Answer the question.\\n\\n"
prompt: "Q: What is the capital of {country}?\\nA:"
choices: options
answer: label
metrics: [acc, acc_norm]
fewshot: 0
items:
  - {country: France, options: [Paris, Lyon, Nice], label: 0}
  - {country: Italy, options: [Milan, Rome, Turin], label: Rome}
  - {country: Spain, options: [Madrid, Seville, Bilbao], label: [0]}
  - {country: Peru, options: [Cusco, Lima, Arequipa], label: 1}
"""


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- YAML / JSONL ------------------------------------------------------------------------------------------------

def test_yaml_multiple_choice(tmp_path):
    task = load_task(write(tmp_path, "capitals.yaml", CAPITALS))
    assert (task.name, task.kind, len(task.items)) == ("capitals", MULTIPLE_CHOICE, 4)
    assert [i.gold for i in task.items] == [(0,), (1,), (0,), (1,)]  # index, choice text, list of indices
    item = task.items[1]
    assert task.context(item) == "Answer the question.\n\nQ: What is the capital of Italy?\nA:"
    assert task.continuations(item) == [" Milan", " Rome", " Turin"]  # lm-eval's target_delimiter " "
    assert task.chance() == pytest.approx(1 / 3)


def test_jinja_template_and_data_file(tmp_path):
    rows = [{"q": "2+2", "ans": "4"}, {"q": "3+3", "ans": ["6", "six"]}]
    write(tmp_path, "sums.jsonl", "\n".join(json.dumps(r) for r in rows))
    spec = ("name: sums\nprompt: '{{ q }} = '\ntarget: ans\nstop: [\"\\n\"]\nmetrics: [exact_match, f1]\n"
            "data: sums.jsonl\n")
    task = load_task(write(tmp_path, "sums.yaml", spec))
    assert task.kind == GENERATE and task.stop == ["\n"] and task.metrics == ["exact_match", "f1"]
    assert [i.prompt for i in task.items] == ["2+2 = ", "3+3 = "]
    assert task.items[1].targets == ("6", "six")
    # a directory: the YAML's data file is its items, not a second task
    assert [t.name for t in load_tasks([tmp_path])] == ["sums"]


def test_jsonl_with_and_without_header(tmp_path):
    items = [{"prompt": "Is ice cold?", "choices": ["yes", "no"], "answer": 0},
             {"prompt": "Is fire cold?", "choices": ["yes", "no"], "answer": 1}]
    plain = load_task(write(tmp_path, "plain.jsonl", "\n".join(json.dumps(r) for r in items) + "\n\n"))
    assert (plain.name, plain.kind, plain.metrics) == ("plain", MULTIPLE_CHOICE, ["acc", "acc_norm"])
    assert plain.context(plain.items[1]) == "Is fire cold?"
    header = {"task": {"name": "yesno", "prompt": "Question: {prompt}\nAnswer:", "target_delimiter": " ",
                       "metrics": ["acc"]}}
    task = load_task(write(tmp_path, "h.jsonl", "\n".join(json.dumps(r) for r in [header, *items])))
    assert task.name == "yesno" and task.context(task.items[0]) == "Question: Is ice cold?\nAnswer:"


def test_fewshot_is_seeded_excludes_the_item_and_ignores_limit(tmp_path):
    task = load_task(write(tmp_path, "capitals.yaml", CAPITALS))
    ctx = task.context(task.items[0], fewshot=2, seed=7)
    assert ctx == task.context(task.items[0], fewshot=2, seed=7)  # deterministic
    assert ctx.startswith("Answer the question.\n\n") and ctx.endswith("Q: What is the capital of France?\nA:")
    shots = ctx.removeprefix("Answer the question.\n\n").split("\n\n")
    assert len(shots) == 3 and "France" not in "".join(shots[:2])
    for shot in shots[:2]:  # prompt + target_delimiter + the gold choice
        country = shot.split("capital of ")[1].split("?")[0]
        gold = {"Italy": "Rome", "Spain": "Madrid", "Peru": "Lima"}[country]
        assert shot.endswith(f"?\nA: {gold}")
    seen = {task.context(task.items[0], fewshot=2, seed=s) for s in range(20)}
    assert len(seen) > 1  # the seed matters
    with pytest.raises(LmforgeError, match="4-shot needs at least 5 items"):
        task.context(task.items[0], fewshot=4)


# --- errors -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, match", [
    (CAPITALS + "shots: 3\n", "unknown task field 'shots'"),
    (CAPITALS.replace("fewshot: 0", "fewshot: two"), "task field 'fewshot' must be int, got str"),
    (CAPITALS.replace("fewshot: 0", "fewshot: -1"), "task field 'fewshot' must be >= 0"),
    (CAPITALS.replace("metrics: [acc, acc_norm]", "metrics: acc"), "task field 'metrics' must be list"),
    (CAPITALS.replace("metrics: [acc, acc_norm]", "metrics: [acc, bleu]"), "unknown multiple_choice metric 'bleu'"),
    (CAPITALS.replace("label: 1}", "label: 5}", 1), "item 4: field 'label': answer must be a choice index"),
    (CAPITALS.replace("label: Rome", "label: Naples"), "answer 'Naples' is not one of the choices"),
    (CAPITALS.replace("{country}", "{nation}"), "item 1: prompt template uses field 'nation'"),
    (CAPITALS + "target: label\n", "either 'choices' (multiple choice) or 'target'"),
    ("", "empty task file"),
    ("name: x\nitems: []\n", "the task has no items"),
    ("name: x\n", "either inline ('items') or as a JSONL file ('data')"),
    ("- a\n- b\n", "must be a mapping of task fields"),
    ("name: [x\n", "not valid YAML"),
])
def test_bad_yaml_is_one_line_error(tmp_path, text, match):
    with pytest.raises(LmforgeError, match=match.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")) as e:
        load_task(write(tmp_path, "t.yaml", text))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, match", [
    ("", "the task has no items"),
    ('{"task": {"name": "x", "bogus": 1}}\n{"prompt": "a", "target": "b"}', "unknown task field 'bogus'"),
    ('{"prompt": "a", "target": "b"}\nnot json', "h.jsonl:2: not valid JSON"),
    ('[1, 2]', "each line must be a JSON object"),
    ('{"prompt": "a", "choices": ["x"], "answer": 0}', "choices must be a list of at least 2 strings"),
    ('{"prompt": "a"}', "missing field 'target'"),
])
def test_bad_jsonl_is_one_line_error(tmp_path, text, match):
    with pytest.raises(LmforgeError, match=match) as e:
        load_task(write(tmp_path, "h.jsonl", text))
    assert "\n" not in str(e.value)


def test_duplicate_task_names_and_unknown_files(tmp_path):
    write(tmp_path, "a.yaml", CAPITALS)
    write(tmp_path, "b.yaml", CAPITALS)
    with pytest.raises(LmforgeError, match="two tasks are named 'capitals'"):
        load_tasks([tmp_path])
    with pytest.raises(LmforgeError, match="unknown task file type '.txt'"):
        load_task(write(tmp_path, "t.txt", "x"))
    with pytest.raises(LmforgeError, match="no task files"):
        load_tasks([tmp_path / "a.yaml", (tmp_path / "empty").mkdir() or tmp_path / "empty"])


# --- BIG-bench ----------------------------------------------------------------------------------------------------

BB_MC = {
    "name": "toy_bb", "description": "d", "keywords": [], "canary": "c", "preferred_score": "multiple_choice_grade",
    "metrics": ["multiple_choice_grade", "bleurt"],
    "task_prefix": "Solve.\n",
    "examples": [
        {"input": "1 + 1?", "target_scores": {"3": 0, "2": 1, "11": 0}},
        {"input": "2 + 2?", "target_scores": {"4": 1, "5": 0}},
        {"input": "1 + 1?", "target_scores": {"3": 0, "2": 1, "11": 0}},  # a duplicate: dropped, as BIG-bench does
        {"input": "3 + 3?", "target_scores": {"6": 1, "9": 0.5, "7": 0}},
    ],
}


def test_bigbench_multiple_choice_format(tmp_path):
    folder = tmp_path / "toy_bb"
    folder.mkdir()
    (folder / "task.json").write_text(json.dumps(BB_MC))
    task = load_task(folder)
    assert (task.name, task.kind, len(task.items)) == ("toy_bb", MULTIPLE_CHOICE, 3)
    assert task.metrics == ["acc", "acc_norm", "grade"] and task.skipped_metrics == ["bleurt"]
    first = task.items[0]
    # default_format_fn: choices sorted, permuted by a fresh RandomState(42), joined with "\n  choice: "
    order = list(np.random.RandomState(seed=42).permutation(sorted(["3", "2", "11"])))
    listing = "".join("\n  choice: " + c for c in order)
    assert task.context(first) == "Solve.\n" + "\nQ: 1 + 1?" + listing + "\nA: "
    assert first.choices == ("3", "2", "11") and first.gold == (1,) and first.scores == (0.0, 1.0, 0.0)
    assert task.continuations(first) == ["3", "2", "11"]  # no delimiter: the output prefix ends in a space
    # BIG-bench's low_score: the mean target score of a uniform pick
    assert task.chance() == pytest.approx(((1 / 3) + (1 / 2) + (1.5 / 3)) / 3)
    # few-shot: shots joined by the separator "\n", each the formatted input + its target, then the query
    ctx = task.context(task.items[2], fewshot=1, seed=0)
    assert ctx in {"Solve.\n" + shot.prompt + shot.targets[0] + "\n" + task.items[2].prompt for shot in task.items[:2]}
    assert task.items[0].targets == ("2",)


def test_bigbench_prefixes_and_generative(tmp_path):
    doc = {"name": "gen_bb", "description": "d", "keywords": [], "canary": "c", "preferred_score": "exact_str_match",
           "metrics": ["exact_str_match", "rouge"], "example_input_prefix": "In: ", "example_output_prefix": " Out:",
           "few_shot_example_separator": " | ", "stop_string": ".",
           "examples": [{"input": "a", "target": "A"}, {"input": "b", "target": ["B", "bee"]}]}
    task = load_task(write(tmp_path, "task.json", json.dumps(doc)))
    assert task.kind == GENERATE and task.metrics == ["exact_str_match", "rouge1", "rouge2", "rougeLsum"]
    assert task.context(task.items[1]) == "In: b Out:"
    assert task.context(task.items[1], fewshot=1) == "In: a Out:A | In: b Out:"
    assert task.stop == ["."] and task.keep_stop and task.output_regex is None
    doc.pop("stop_string")
    assert load_task(write(tmp_path, "task.json", json.dumps(doc))).output_regex == r"[^\.\?\!\;\n]+"
    mc = {**BB_MC, "append_choices_to_input": False, "choice_prefix": "X"}
    assert load_task(write(tmp_path, "task.json", json.dumps(mc))).items[0].prompt == "\nQ: 1 + 1?\nA: "


@pytest.mark.parametrize("doc, match", [
    ({"name": "x"}, "no 'examples'"),
    ({"examples": []}, "'examples' must be a non-empty list"),
    ({"examples": [{"input": "a"}]}, "example 1 needs 'input' and 'target' or 'target_scores'"),
    ({"metrics": ["multiple_choice_grade"], "examples": [{"input": "a", "target_scores": {"x": 0, "y": 0}}]},
     "no choice scores higher"),
])
def test_bigbench_errors(tmp_path, doc, match):
    with pytest.raises(LmforgeError, match=match):
        load_task(write(tmp_path, "task.json", json.dumps(doc)))
