"""The documentation runs as written.

* Every ```python block of README.md and docs/*.md is executed, each as its own test case (id
  ``FILE:LINE``, the line of its opening fence), in a fresh namespace with the repository root as the
  working directory, in this process (jax's compiled programs are shared between blocks, which keeps
  the whole module to well under a minute on 2 cores). A traceback names the page and its line. A
  block that needs the test extra (transformers, to write a Hugging Face directory) skips without it.
  Blocks that are not meant to run are fenced as something else (```bash, ```text).
* No block writes into the shipped models (the inputs every block may read).
* Every fence names its language, so an unlabelled code block cannot hide from the runner.
* README's quickstart is exactly two commands, and the second (the test suite) is the command CI
  runs, verbatim in ``.ci/run``.
* Relative links between the pages point at files and headings that exist, README links every docs
  page, and every ``python -m experiments.X`` / ``bash experiments/X.sh`` the pages name exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
SHIPPED = ROOT / "experiments" / "shipped"
#: Modules of the test extra that examples may use (e.g. transformers, to write a Hugging Face directory):
#: without them those examples skip, as the tests that use them do.
OPTIONAL = {"torch", "transformers", "safetensors"}

FENCE = re.compile(r"^(\s*)```(.*)$")


def fenced_blocks(path: Path) -> list[tuple[str, int, str]]:
    """``(language, line of the opening fence, code)`` of each fenced block of a Markdown file."""
    blocks, language, start, body = [], None, 0, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = FENCE.match(line)
        if language is None:
            if match:
                language, start, body = match[2].strip(), number, []
        elif match and not match[2].strip():
            blocks.append((language, start, "\n".join(body) + "\n"))
            language = None
        else:
            body.append(line)
    assert language is None, f"{path.name}:{start}: a code block is never closed"
    return blocks


def _snippets() -> list[pytest.param]:
    out = []
    for page in PAGES:
        for language, line, code in fenced_blocks(page):
            if language == "python":
                name = page.relative_to(ROOT).as_posix()
                out.append(pytest.param(page, line, code, id=f"{name}:{line}"))
    return out


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("page,line,code", _snippets())
def test_python_block_runs(page: Path, line: int, code: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    before = _listing(SHIPPED)
    # blank lines in front, so that a traceback's line numbers are the page's own
    compiled = compile("\n" * line + code, str(page), "exec")
    try:
        exec(compiled, {"__name__": "__docs__", "__file__": str(page)})
    except ModuleNotFoundError as e:
        if e.name not in OPTIONAL:
            raise
        pytest.skip(f"{e.name} is not installed (the test extra)")
    assert _listing(SHIPPED) == before, f"{page.name}:{line} changed files under {SHIPPED}"


def test_the_readme_example_is_found() -> None:
    """The runner sees the README's example (guards against a parser that silently finds nothing)."""
    assert any(language == "python" for language, _, _ in fenced_blocks(README))


def test_readme_links_every_docs_page() -> None:
    linked = set(LINK.findall(README.read_text(encoding="utf-8")))
    unlinked = [page.relative_to(ROOT).as_posix() for page in PAGES[1:]
                if page.relative_to(ROOT).as_posix() not in linked]
    assert not unlinked, f"README.md links none of {unlinked}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_fence_names_its_language(page: Path) -> None:
    unlabelled = [line for language, line, _ in fenced_blocks(page) if not language]
    assert not unlabelled, f"{page.name}: code blocks without a language at lines {unlabelled} (```python runs; " \
                           "use ```bash or ```text for blocks that must not)"
    indented = [n for n, text in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1)
                if FENCE.match(text) and FENCE.match(text)[1]]
    assert not indented, f"{page.name}: indented fences at lines {indented} (start fences at column 0)"


def quickstart_commands() -> list[str]:
    """The command lines (not comments) of the first code block under README's ``## Quickstart``."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```bash\n(.*?)^```$", section, re.S | re.M)
    assert block, "README's Quickstart section has no ```bash block"
    return [line for line in block[1].splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_quickstart_is_the_main_job_and_the_ci_test_command() -> None:
    commands = quickstart_commands()
    assert len(commands) == 2, f"the quickstart should hold two commands, got {commands}"
    main_job, tests = commands
    assert main_job.endswith(".venv/bin/python -m experiments.perplexity"), main_job
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert tests in ci, f"README's test command is not a line of .ci/run:\n{tests}"


LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (outside code blocks): lower case, punctuation
    dropped, spaces as hyphens."""
    out, inside = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = page.parent / path if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    assert not broken, f"{page.name}: links to missing files or headings {broken}"


COMMAND = re.compile(r"python -m (?:lminf_jax\.)?experiments\.([a-z_0-9]+)\b|bash (experiments/[\w.-]+\.sh)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_commands_exist(page: Path) -> None:
    missing = []
    for module, script in COMMAND.findall(page.read_text(encoding="utf-8")):
        path = ROOT / (script or f"experiments/{module}.py")
        if not path.is_file():
            missing.append(script or f"experiments.{module}")
    assert not missing, f"{page.name}: commands that do not exist: {missing}"
