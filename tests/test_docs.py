"""Every ```python block in README.md and docs/*.md runs, so the docs cannot drift from the code.

Blocks fenced as ```py are signatures and contracts (docs/internals.md), shown but not executed."""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def python_blocks():
    for path in DOCS:
        for i, code in enumerate(BLOCK.findall(path.read_text(encoding="utf-8"))):
            yield pytest.param(code, id=f"{path.name}-{i}")


@pytest.mark.parametrize("code", list(python_blocks()))
def test_doc_example_runs(code, tmp_path, tiktoken_cache):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "<doc>", "exec"), {"__name__": "__doc_example__"})
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="session")
def tiktoken_cache():
    """Docs may use public encodings; make sure the offline copies are fetched once."""
    from lmforge import assets

    return assets.tiktoken_file("o200k_base")


def test_readme_shows_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text


def test_readme_shell_example_runs(tmp_path, tiktoken_cache):
    """The README's tokenizer commands, run as written in a directory with a small corpus."""
    import subprocess
    import sys

    block = re.search(r"```bash\n(# train on files.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    (tmp_path / "my_corpus").mkdir()
    (tmp_path / "my_corpus" / "a.txt").write_text("Hello world. Hello tokenizers! " * 200 + "Hi! 世界 🤖\n")
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    for line in block.splitlines():
        cmd = line.split("  #")[0].strip()
        if not cmd or cmd.startswith("#"):
            continue
        out = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (cmd, out.stderr)
        if "decode" in cmd:
            assert out.stdout == "Hi!\n"
    assert (tmp_path / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
