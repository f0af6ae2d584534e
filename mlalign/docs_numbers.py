"""`make docs`: rewrite the numbers in README.md, docs/*.md and experiments/*/README.md from committed result files.

A documented number lives between two markers, on one line or as whole lines:

    took <!-- generated: experiments/x/cost.json compare_over_train .1f -->8.7<!-- /generated -->x one task=train

    <!-- generated: experiments/x/tables.py:readme_table -->
    | ... the table the function returns ... |
    <!-- /generated -->

A spec is either `PATH.json KEY[.KEY...] [FORMAT]` (the value at that key path, `format(value, FORMAT)`) or
`PATH.py:FUNCTION` / `PATH.py:FUNCTION(ARGS)` (a function of that file called with literal ARGS; it returns the text),
PATH relative to the repository root. `python -m mlalign.docs_numbers` rewrites every block from its files;
`--check` rewrites nothing and exits 1 listing each block whose text differs from what its files give
(tests/test_docs_numbers.py runs it over the repository). Adding a documented number: docs/architecture.md.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- generated: (?P<spec>[^\n]+?) -->(?P<body>(?:(?!<!-- generated:).)*?)<!-- /generated -->",
                   re.S)
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
FUNCTION_SPEC = re.compile(r"^(?P<path>\S+\.py):(?P<name>\w+)(?:\((?P<args>.*)\))?$", re.S)


@dataclass
class Block:
    """One marked block of a markdown file: what it says now and what its files give."""

    file: Path
    line: int
    spec: str
    documented: str
    generated: str | None  # None when the spec could not be evaluated (`error` says why)
    error: str | None = None
    start: int = 0  # offset of the opening marker in the file's text

    def differs(self) -> bool:
        return self.error is not None or self.documented != self.generated

    def describe(self, root: Path) -> str:
        where = f"{self.file.relative_to(root) if self.file.is_relative_to(root) else self.file}:{self.line}"
        if self.error is not None:
            return f"{where}: {self.spec}: {self.error}"
        said, given = self.documented.strip("\n").split("\n"), self.generated.strip("\n").split("\n")
        if len(said) == len(given) == 1:
            return f"{where}: {self.spec}: the document says {said[0]!r}, the files give {given[0]!r}"
        k = next((i for i, (a, b) in enumerate(zip(said, given)) if a != b), min(len(said), len(given)))
        return (f"{where}: {self.spec}: line {k + 1} of the block says {_line(said, k)!r}, the files give "
                f"{_line(given, k)!r}")


def _line(lines: list[str], k: int) -> str:
    return lines[k] if k < len(lines) else "(no line)"


def doc_files(root: Path) -> list[Path]:
    """The markdown files whose numbers must come from files (CONVENTIONS.md rule 15)."""
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md")),
                        *sorted((root / "experiments").glob("*/README.md"))] if p.exists()]


_MODULES: dict[Path, object] = {}


def _load_module(path: Path):
    if path not in _MODULES:
        name = "_docs_numbers_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[path] = module
    return _MODULES[path]


def _json_value(root: Path, spec: str) -> str:
    path, _, rest = spec.partition(" ")
    keys, _, fmt = rest.strip().partition(" ")
    if not keys:
        raise ValueError("a .json spec needs a key path: PATH.json KEY[.KEY...] [FORMAT]")
    value = json.loads((root / path).read_text())
    for key in keys.split("."):
        value = value[int(key)] if isinstance(value, list) else value[key]
    return format(value, fmt.strip())


def _function_value(root: Path, spec: str) -> str:
    match = FUNCTION_SPEC.match(spec)
    if not match:
        raise ValueError("not PATH.json KEY [FORMAT] nor PATH.py:FUNCTION[(ARGS)]")
    function: Callable = getattr(_load_module(root / match["path"]), match["name"])
    call = ast.parse(f"f({match['args'] or ''})", mode="eval").body
    args = [ast.literal_eval(a) for a in call.args]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    return str(function(*args, **kwargs))


def generate(root: Path, spec: str) -> str:
    """What the files say for one spec."""
    spec = spec.strip()
    if spec.split(" ", 1)[0].endswith(".json"):
        return _json_value(root, spec)
    return _function_value(root, spec)


def _render(documented: str, generated: str) -> str:
    """A block's new text in the shape it has: whole lines (the body starts with a newline) or inline."""
    if documented.startswith("\n"):
        return "\n" + generated.strip("\n") + "\n"
    if "\n" in generated:
        raise ValueError("an inline block (on one line with its markers) cannot hold several lines")
    return generated


def _matches(text: str) -> list[re.Match]:
    """The marked blocks of a markdown text; markers inside fenced code (examples of the syntax) are not blocks."""
    fences = [m.span() for m in FENCE.finditer(text)]
    return [m for m in BLOCK.finditer(text) if not any(a <= m.start() < b for a, b in fences)]


def blocks(root: Path, file: Path) -> list[Block]:
    """Every marked block of one markdown file, with what its spec generates now."""
    text = file.read_text()
    out = []
    for match in _matches(text):
        line = text.count("\n", 0, match.start()) + 1
        documented = match["body"]
        starts_line = not text[text.rfind("\n", 0, match.start()) + 1:match.start()].strip()
        try:
            # A line that starts with `<!--` ends the paragraph it is in (CommonMark HTML block), so an inline block
            # must follow some text on its line, and a block of whole lines must start its own.
            if documented.startswith("\n") != starts_line:
                raise ValueError("an inline block must not start a line (it would end its paragraph there), and a "
                                 "block of whole lines must start one")
            generated, error = _render(documented, generate(root, match["spec"])), None
        except Exception as e:  # noqa: BLE001  (a bad spec or a missing file is reported for its block, not raised)
            generated, error = None, f"cannot be generated: {type(e).__name__}: {e}"
        out.append(Block(file, line, match["spec"].strip(), documented, generated, error, match.start()))
    return out


def check(root: Path = REPO, files: list[Path] | None = None) -> list[str]:
    """One line per block whose text differs from what its files give (empty: the docs agree with the files)."""
    return [b.describe(root) for file in (files or doc_files(root)) for b in blocks(root, file) if b.differs()]


def write(root: Path = REPO, files: list[Path] | None = None) -> list[str]:
    """Rewrite every block from its files; returns the lines of blocks that could not be generated (left as they
    were) and the names of the files that changed."""
    problems, changed = [], []
    for file in files or doc_files(root):
        found = {b.start: b for b in blocks(root, file)}
        problems += [b.describe(root) for b in found.values() if b.error is not None]
        text = file.read_text()

        def replace(match: re.Match) -> str:
            block = found.get(match.start())  # None: a marker inside fenced code, an example
            if block is None or block.error is not None:
                return match[0]
            return f"<!-- generated: {match['spec']} -->{block.generated}<!-- /generated -->"

        new = BLOCK.sub(replace, text)
        if new != text:
            file.write_text(new)
            changed.append(str(file.relative_to(root) if file.is_relative_to(root) else file))
    return problems + [f"rewrote {name}" for name in changed]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlalign.docs_numbers", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 listing the blocks that differ")
    parser.add_argument("--root", type=Path, default=REPO, help="the repository root (default: %(default)s)")
    parser.add_argument("files", nargs="*", type=Path, help="markdown files (default: README.md, docs/*.md, "
                                                            "experiments/*/README.md)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    files = [f.resolve() for f in args.files] or None
    if args.check:
        problems = check(root, files)
        for line in problems:
            print(line)
        n = sum(len(blocks(root, f)) for f in (files or doc_files(root)))
        print(f"{len(problems)} of {n} generated blocks differ from their result files" if problems
              else f"all {n} generated blocks agree with their result files")
        return 1 if problems else 0
    report = write(root, files)
    for line in report:
        print(line)
    return 1 if any(not line.startswith("rewrote ") for line in report) else 0


if __name__ == "__main__":
    sys.exit(main())
