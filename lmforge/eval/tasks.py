"""Evaluation tasks: read a task file into items, and build each item's prompt (with few-shot examples).

Three formats, all read into the same `Task`:

- **YAML** (`.yaml` / `.yml`): the fields of `FIELDS` below, with the items inline (`items:`) or in a JSONL
  file beside it (`data: items.jsonl`, one JSON object per line). For example::

      name: capitals
      prompt: "Q: What is the capital of {country}?\\nA:"     # Python format string over item fields
      choices: options            # item field holding the choices (or a literal list shared by every item)
      answer: label               # item field with the gold: a choice index, a choice's text, or a list of indices
      metrics: [acc, acc_norm]
      fewshot: 2
      items:
        - {country: France, options: [Paris, Lyon], label: 0}

  A prompt containing `{{` or `{%` is a Jinja template instead (sandboxed, undefined names are errors).
  A generative task gives `target:` (the item field with the reference text, or a list of references)
  instead of `choices:`, and is scored by greedy generation up to `stop` strings.
- **JSONL** (`.jsonl`): an optional first line `{"task": {...the same fields...}}`, then one item per line.
  Without a header the defaults apply: the item's `prompt` is the prompt, and `choices` + `answer` make it
  multiple choice, else `target` is the reference.
- **BIG-bench** (`task.json`, or a directory holding one), read as BIG-bench's `bigbench/api/json_task.py`
  reads it: `examples` with `input` and `target_scores` (multiple choice) or `target` (generative);
  `task_prefix`, `example_input_prefix` (default "\\nQ: "), `example_output_prefix` ("\\nA: "),
  `choice_prefix` ("\\n  choice: "), `append_choices_to_input` (default true: the choices, sorted then
  permuted with numpy's RandomState(42), are listed after the input), `few_shot_example_separator` ("\\n"),
  `stop_string`, `output_regex`. Duplicate examples are dropped, as BIG-bench does.

A prompt is assembled as in lm-evaluation-harness: `description + shot_1 + delim + ... + shot_k + delim +
prompt(item)`, where a shot is `prompt(shot) + target_delimiter + answer(shot)` and the k shots are drawn
without replacement from the task's other items by a generator seeded with (fewshot_seed, item index), so an
item's prompt does not depend on `--limit` or on which other items run. Multiple-choice continuations are
`target_delimiter + choice`. (For BIG-bench the description is `task_prefix`, the delimiter the example
separator, and the target delimiter empty: its output prefix already ends in a space.)
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmforge.common import LmforgeError, read_text_file

MULTIPLE_CHOICE, GENERATE = "multiple_choice", "generate"
MC_METRICS = ("acc", "acc_norm", "grade", "ece")  # grade: BIG-bench's multiple_choice_grade (target score of the pick)
GEN_METRICS = ("exact_match", "f1", "exact_str_match", "case_insensitive_str_match", "bleu", "chrf", "chrf++",
               "rouge1", "rouge2", "rougeL", "rougeLsum")  # lmforge/eval/harness.py `generative_metric`
DEFAULT_METRICS = {MULTIPLE_CHOICE: ["acc", "acc_norm"], GENERATE: ["exact_match"]}

# field -> (accepted types, default, what it means); `name` defaults to the file's stem
FIELDS: dict[str, tuple[tuple[type, ...], Any, str]] = {
    "name": ((str,), None, "task name (default: the file name without extension)"),
    "description": ((str,), "", "text put before every prompt (before the few-shot examples)"),
    "prompt": ((str,), "{prompt}", "Python format string or Jinja template over the item's fields"),
    "choices": ((str, list), None, "item field holding the choices, or a list of choices shared by all items"),
    "answer": ((str,), "answer", "item field with the gold choice: index, choice text, or list of indices"),
    "target": ((str,), None, "item field with the reference text (or list of references): a generative task"),
    "metrics": ((list,), None, "metric names (default: acc, acc_norm; or exact_match when generative)"),
    "fewshot": ((int,), 0, "number of few-shot examples"),
    "fewshot_seed": ((int,), 1234, "seed of the few-shot draw"),
    "fewshot_delimiter": ((str,), "\n\n", "text between few-shot examples and before the item"),
    "target_delimiter": ((str,), " ", "text between a prompt and its answer / each choice"),
    "stop": ((list,), None, "stop strings for generation (default: [fewshot_delimiter])"),
    "max_new_tokens": ((int,), 32, "generation length limit"),
}
YAML_ONLY = {"items": (list,), "data": (str,)}


@dataclasses.dataclass(frozen=True)
class Item:
    """One evaluation example, its prompt already rendered (without description or few-shot examples).

    `choices` (multiple choice) are the answer texts without the target delimiter; `gold` the indices of the
    correct ones; `scores` BIG-bench's `target_scores` per choice (else None). `targets` are the references of
    a generative item, or the correct choices; a few-shot example shows `targets[0]` (a random one of several).
    """

    index: int
    prompt: str
    targets: tuple[str, ...]
    choices: tuple[str, ...] | None = None
    gold: tuple[int, ...] = ()
    scores: tuple[float, ...] | None = None
    fields: dict = dataclasses.field(default_factory=dict, compare=False)


@dataclasses.dataclass
class Task:
    """A named list of items and how to prompt and score them (see the module docstring)."""

    name: str
    kind: str  # MULTIPLE_CHOICE or GENERATE
    items: list[Item]
    metrics: list[str]
    description: str = ""
    fewshot: int = 0
    fewshot_seed: int = 1234
    fewshot_delimiter: str = "\n\n"
    target_delimiter: str = " "
    stop: list[str] = dataclasses.field(default_factory=list)
    max_new_tokens: int = 32
    output_regex: str | None = None  # BIG-bench: the output is the first match (default regex when no stop string)
    keep_stop: bool = False  # BIG-bench keeps the stop string in the output
    source: str = ""
    skipped_metrics: list[str] = dataclasses.field(default_factory=list)  # BIG-bench metrics lmforge lacks

    def chance(self) -> float | None:
        """Expected accuracy of a uniform random pick (BIG-bench's `low_score` for multiple_choice_grade)."""
        if self.kind != MULTIPLE_CHOICE or not self.items:
            return None
        per_item = [sum(i.scores) / len(i.scores) if i.scores is not None else len(i.gold) / len(i.choices)
                    for i in self.items]
        return sum(per_item) / len(per_item)

    def context(self, item: Item, fewshot: int | None = None, seed: int | None = None) -> str:
        """The full prompt of `item`: description, `fewshot` examples drawn from the other items, the item."""
        k = self.fewshot if fewshot is None else fewshot
        seed = self.fewshot_seed if seed is None else seed
        if k <= 0:
            return self.description + item.prompt
        if k > len(self.items) - 1:
            raise LmforgeError(f"task {self.name}: {k}-shot needs at least {k + 1} items, it has {len(self.items)}")
        rng = random.Random(f"{seed}/{item.index}")  # str seeds are hashed with sha512: stable across runs
        pool = [i for i in range(len(self.items)) if i != item.index]
        shots = [self.items[i] for i in rng.sample(pool, k)]
        text = self.fewshot_delimiter.join(s.prompt + self.target_delimiter + _pick(s.targets, rng) for s in shots)
        return self.description + text + self.fewshot_delimiter + item.prompt

    def continuations(self, item: Item) -> list[str]:
        """The strings whose log-likelihood is scored for a multiple-choice item."""
        return [self.target_delimiter + c for c in item.choices or ()]


def _pick(targets: Sequence[str], rng: random.Random) -> str:
    return targets[0] if len(targets) == 1 else rng.choice(list(targets))


# ---------------------------------------------------------------------- loading

def load_tasks(paths: Sequence[str | Path]) -> list[Task]:
    """Every task named by `paths` (task files, BIG-bench task.json files or directories of task files)."""
    tasks: list[Task] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = _task_files(p)
            if not files:
                raise LmforgeError(f"no task files (*.yaml, *.yml, *.jsonl, task.json) in {p}")
            tasks += [load_task(f) for f in files]
        else:
            tasks.append(load_task(p))
    seen: dict[str, str] = {}
    for t in tasks:
        if t.name in seen:
            raise LmforgeError(f"two tasks are named {t.name!r}: {seen[t.name]} and {t.source}")
        seen[t.name] = t.source
    return tasks


def _task_files(folder: Path) -> list[Path]:
    """Task files of a directory: task.json alone if present (a BIG-bench task), else the YAML and JSONL files
    (a JSONL that a YAML names as its `data` is that task's items, not a task) and `*/task.json`."""
    if (folder / "task.json").is_file():
        return [folder / "task.json"]
    yamls = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
    data = set()
    for y in yamls:
        doc = _read_yaml(y)
        if isinstance(doc, dict) and isinstance(doc.get("data"), str):
            data.add((y.parent / doc["data"]).resolve())
    jsonls = [j for j in sorted(folder.glob("*.jsonl")) if j.resolve() not in data]
    return sorted(yamls + jsonls + sorted(folder.glob("*/task.json")))


def load_task(path: str | Path) -> Task:
    """Read one task file (format chosen by its name and content; see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "task.json").is_file():
            raise LmforgeError(f"{path} is a directory without task.json; pass a task file")
        path = path / "task.json"
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return _load_yaml(path)
    if suffix == ".jsonl":
        return _load_jsonl(path)
    if suffix == ".json":
        return load_bigbench(path)
    raise LmforgeError(f"{path}: unknown task file type {path.suffix!r} (use .yaml, .yml, .jsonl or task.json)")


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(read_text_file(path))
    except yaml.YAMLError as e:
        raise LmforgeError(f"{path}: not valid YAML ({_one_line(str(e))})") from None


def _load_yaml(path: Path) -> Task:
    doc = _read_yaml(path)
    if doc is None:
        raise LmforgeError(f"{path}: empty task file")
    if not isinstance(doc, dict):
        raise LmforgeError(f"{path}: a task file must be a mapping of task fields, got {type(doc).__name__}")
    spec = _validate(doc, path, allowed={**{k: v[0] for k, v in FIELDS.items()}, **YAML_ONLY})
    if ("items" in spec) == ("data" in spec):
        raise LmforgeError(f"{path}: give the items either inline ('items') or as a JSONL file ('data'), "
                           f"exactly one of them")
    if "data" in spec:
        rows = _read_jsonl(path.parent / spec.pop("data"))
    else:
        rows = spec.pop("items")
        for n, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise LmforgeError(f"{path}: item {n} must be a mapping of fields, got {type(row).__name__}")
    return _build(spec, rows, path)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise LmforgeError(f"{path}:{n}: each line must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _load_jsonl(path: Path) -> Task:
    rows = _read_jsonl(path)
    spec: dict[str, Any] = {}
    if rows and set(rows[0]) == {"task"}:
        header = rows.pop(0)["task"]
        if not isinstance(header, dict):
            raise LmforgeError(f"{path}:1: the header's 'task' must be an object of task fields")
        spec = _validate(header, path, allowed={k: v[0] for k, v in FIELDS.items()})
    return _build(spec, rows, path)


def _validate(doc: dict, path: Path, allowed: dict[str, tuple[type, ...]]) -> dict:
    """Check every field's name and type; one line naming the first bad field."""
    for key, value in doc.items():
        if key not in allowed:
            raise LmforgeError(f"{path}: unknown task field {key!r} (known: {', '.join(sorted(allowed))})")
        types = allowed[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            want = " or ".join("list" if t is list else t.__name__ for t in types)
            raise LmforgeError(f"{path}: task field {key!r} must be {want}, got {type(value).__name__}")
    for key in ("metrics", "stop"):
        if key in doc and not all(isinstance(x, str) and x for x in doc[key]):
            raise LmforgeError(f"{path}: task field {key!r} must be a list of non-empty strings")
    if isinstance(doc.get("choices"), list) and not all(isinstance(x, str) for x in doc["choices"]):
        raise LmforgeError(f"{path}: task field 'choices' must be a field name or a list of strings")
    for key in ("fewshot", "max_new_tokens"):
        if key in doc and doc[key] < (1 if key == "max_new_tokens" else 0):
            raise LmforgeError(f"{path}: task field {key!r} must be >= {1 if key == 'max_new_tokens' else 0}")
    return dict(doc)


def _build(spec: dict, rows: list[dict], path: Path) -> Task:
    """A Task from validated fields and raw item rows."""
    if not rows:
        raise LmforgeError(f"{path}: the task has no items")
    opts = {k: spec.get(k, default) for k, (_, default, _) in FIELDS.items()}
    if opts["choices"] is not None and opts["target"] is not None:
        raise LmforgeError(f"{path}: a task has either 'choices' (multiple choice) or 'target' (generative), not both")
    if opts["choices"] is None and opts["target"] is None:  # infer from the first item
        if "choices" in rows[0]:
            opts["choices"] = "choices"
        else:
            opts["target"] = "target"
    kind = MULTIPLE_CHOICE if opts["choices"] is not None else GENERATE
    metrics = list(opts["metrics"] or DEFAULT_METRICS[kind])
    known = MC_METRICS if kind == MULTIPLE_CHOICE else GEN_METRICS
    if bad := [m for m in metrics if m not in known]:
        raise LmforgeError(f"{path}: unknown {kind} metric {bad[0]!r} (known: {', '.join(known)})")
    render = _template(opts["prompt"], path)
    items = [_item(n, row, opts, kind, render, path) for n, row in enumerate(rows)]
    return Task(name=opts["name"] or path.stem, kind=kind, items=items, metrics=metrics,
                description=opts["description"], fewshot=opts["fewshot"], fewshot_seed=opts["fewshot_seed"],
                fewshot_delimiter=opts["fewshot_delimiter"], target_delimiter=opts["target_delimiter"],
                stop=list(opts["stop"] if opts["stop"] is not None else [opts["fewshot_delimiter"]]),
                max_new_tokens=opts["max_new_tokens"], source=str(path))


def _item(n: int, row: dict, opts: dict, kind: str, render, path: Path) -> Item:
    where = f"{path}: item {n + 1}"
    prompt = render(row, where)
    if kind == GENERATE:
        refs = _field(row, opts["target"], where)
        refs = [refs] if isinstance(refs, str) else refs
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise LmforgeError(f"{where}: field {opts['target']!r} must be a string or a non-empty list of strings")
        return Item(n, prompt, tuple(refs), fields=row)
    choices = opts["choices"] if isinstance(opts["choices"], list) else _field(row, opts["choices"], where)
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise LmforgeError(f"{where}: choices must be a list of at least 2 strings")
    gold = _gold(_field(row, opts["answer"], where), choices, f"{where}: field {opts['answer']!r}")
    return Item(n, prompt, tuple(choices[g] for g in gold), tuple(choices), gold, fields=row)


def _field(row: dict, name: str, where: str) -> Any:
    if name not in row:
        raise LmforgeError(f"{where}: missing field {name!r}")
    return row[name]


def _gold(value: Any, choices: list[str], where: str) -> tuple[int, ...]:
    """Gold indices from an index, a choice's text, or a list of indices."""
    values = value if isinstance(value, list) else [value]
    out = []
    for v in values:
        if isinstance(v, str):
            if v not in choices:
                raise LmforgeError(f"{where}: answer {v!r} is not one of the choices")
            out.append(choices.index(v))
        elif isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(choices):
            out.append(v)
        else:
            raise LmforgeError(f"{where}: answer must be a choice index 0..{len(choices) - 1} or a choice's text, "
                               f"got {v!r}")
    if not out:
        raise LmforgeError(f"{where}: no answer given")
    return tuple(out)


def _template(source: str, path: Path):
    """render(row, where) -> str for a Jinja template (if it has `{{` or `{%`) or a Python format string."""
    if "{{" in source or "{%" in source:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        try:
            template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise LmforgeError(f"{path}: prompt template: {e.message} (line {e.lineno})") from None

        def render_jinja(row: dict, where: str) -> str:
            try:
                return template.render(**row)
            except jinja2.UndefinedError as e:
                raise LmforgeError(f"{where}: prompt template uses a field the item lacks ({e.message})") from None
        return render_jinja

    def render_format(row: dict, where: str) -> str:
        try:
            return source.format(**row)
        except KeyError as e:
            raise LmforgeError(f"{where}: prompt template uses field {e.args[0]!r}, which the item lacks") from None
        except (ValueError, IndexError, AttributeError) as e:
            raise LmforgeError(f"{path}: bad prompt template {source!r} ({e})") from None
    return render_format


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------- BIG-bench

BIGBENCH_MC = {"multiple_choice_grade": ["acc", "acc_norm", "grade"], "expected_calibration_error": ["ece"]}
BIGBENCH_GEN = {"exact_str_match": ["exact_str_match"], "case_insensitive_str_match": ["case_insensitive_str_match"],
                "bleu": ["bleu"], "rouge": ["rouge1", "rouge2", "rougeLsum"], "sequence_f1": ["f1"]}
BIGBENCH_DEFAULT_REGEX = r"[^\.\?\!\;\n]+"  # json_task._DEFAULT_REGEX: the first sentence


def load_bigbench(path: str | Path) -> Task:
    """A BIG-bench `task.json`, formatted exactly as `bigbench.api.json_task.default_format_fn` formats it.

    Multiple choice when the metrics include multiple_choice_grade (the examples' `target_scores` keys are the
    choices, in file order, and the first of the highest score is the answer); otherwise generative on `target`.
    Metrics without an lmforge implementation (bleurt, log_likelihood, ...) are left out.
    """
    path = Path(path)
    try:
        doc = json.loads(read_text_file(path))
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(doc, dict) or "examples" not in doc:
        kind = "a composite task (pass one of its subtask directories)" if isinstance(doc, dict) else "not a task"
        raise LmforgeError(f"{path}: no 'examples': {kind}")
    examples = _distinct(doc["examples"], path)
    bb_metrics = doc.get("metrics") or []
    mc = "multiple_choice_grade" in bb_metrics
    table = BIGBENCH_MC if mc else BIGBENCH_GEN
    metrics = [m for b in bb_metrics for m in table.get(b, [])] or DEFAULT_METRICS[MULTIPLE_CHOICE if mc else GENERATE]
    skipped = [b for b in bb_metrics if b not in table]
    fmt = {"input_prefix": doc.get("example_input_prefix", "\nQ: "),
           "output_prefix": doc.get("example_output_prefix", "\nA: "),
           "choice_prefix": doc.get("choice_prefix", "\n  choice: "),
           "append_choices": doc.get("append_choices_to_input", True)}
    items = [_bigbench_item(n, ex, fmt, mc, path) for n, ex in enumerate(examples)]
    stop = doc.get("stop_string")
    regex = doc.get("output_regex", None if stop else BIGBENCH_DEFAULT_REGEX)
    return Task(name=str(doc.get("name") or path.parent.name), kind=MULTIPLE_CHOICE if mc else GENERATE, items=items,
                metrics=metrics, description=str(doc.get("task_prefix", "")),
                fewshot_delimiter=doc.get("few_shot_example_separator", "\n"), target_delimiter="",
                stop=[stop] if stop else [], max_new_tokens=int(doc.get("max_new_tokens", 64)),
                output_regex=regex, keep_stop=True, source=str(path), skipped_metrics=skipped)


def _distinct(examples: Any, path: Path) -> list[dict]:
    """BIG-bench drops duplicate examples (same JSON), keeping the first."""
    if not isinstance(examples, list) or not examples:
        raise LmforgeError(f"{path}: 'examples' must be a non-empty list")
    seen, out = set(), []
    for n, ex in enumerate(examples, 1):
        if not isinstance(ex, dict) or "input" not in ex or not ("target" in ex or "target_scores" in ex):
            raise LmforgeError(f"{path}: example {n} needs 'input' and 'target' or 'target_scores'")
        key = json.dumps(ex)
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def _bigbench_item(n: int, ex: dict, fmt: dict, mc: bool, path: Path) -> Item:
    """json_task.default_format_fn: input_prefix + input [+ choice_prefix-joined choices] + output_prefix."""
    import numpy as np

    text = ex["input"]
    if not mc:
        refs = ex.get("target")
        refs = [refs] if isinstance(refs, str) else refs
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise LmforgeError(f"{path}: example {n + 1}: 'target' must be a string or a list of strings")
        return Item(n, fmt["input_prefix"] + text + fmt["output_prefix"], tuple(refs), fields=ex)
    scores = ex.get("target_scores")
    if not isinstance(scores, dict) or not scores:
        raise LmforgeError(f"{path}: example {n + 1}: multiple choice needs 'target_scores'")
    choices = list(scores)
    if fmt["append_choices"]:
        permuted = np.random.RandomState(seed=42).permutation(sorted(choices))  # a fresh RandomState(42) per example
        text = text + fmt["choice_prefix"] + fmt["choice_prefix"].join(permuted)
    values = [float(scores[c]) for c in choices]
    top = max(values)
    if (len(values) == 1 and top == 0) or (len(values) > 1 and top <= min(values)):
        raise LmforgeError(f"{path}: example {n + 1}: no choice scores higher than the others")
    target = ex.get("target")
    first = values.index(top)
    targets = tuple(target) if isinstance(target, list) else (target,) if isinstance(target, str) else (choices[first],)
    gold = tuple(i for i, v in enumerate(values) if v == top)
    return Item(n, fmt["input_prefix"] + text + fmt["output_prefix"], targets, tuple(choices), gold, tuple(values),
                fields=ex)


__all__ = ["GENERATE", "MULTIPLE_CHOICE", "Item", "Task", "load_bigbench", "load_task", "load_tasks"]
