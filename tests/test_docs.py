"""The documentation against the code: the README's example runs as printed, the README stays a
five-minute read, its speed table is the one benchmarks/README.md measured, docs/api.md is what
scripts/api_docs.py makes of the code today, and every relative link and anchor resolves."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 120


def _section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section of a Markdown text."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.M | re.S)


def test_readme_is_a_five_minute_read():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move details into docs/"


def test_readme_example_runs_as_printed():
    """The README's complete example, run as a user would paste it: it must be complete (no
    elisions), train, and print the first and last loss."""
    (code,) = _code_blocks(_section(README.read_text(), "A complete example"), "python")
    assert "..." not in code, "the complete example must run as printed"
    out = io.StringIO()
    with torch.random.fork_rng(), contextlib.redirect_stdout(out):  # it seeds torch's generator
        exec(compile(code, "README.md (A complete example)", "exec"), {"__name__": "__main__"})
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out.getvalue())]
    assert len(losses) == 2, out.getvalue()
    assert losses[1] < losses[0] / 10, f"the example does not train: {out.getvalue()}"


def test_readme_speed_table_is_measured_in_benchmarks_readme():
    """Each row of the README's "How fast" table is the run that benchmarks/README.md reports for
    the same command: torch fused's and numba's medians, the speed-up and the % of the bound."""
    bench = (ROOT / "benchmarks" / "README.md").read_text()
    rows = re.findall(r"^\| [^|]+ \| ([\d.]+) ms \| ([\d.]+) ms \| ([\d.]+)x \| (\d+) % \| `([^`]+)` \|$",
                      _section(README.read_text(), "How fast"), flags=re.M)
    assert len(rows) == 2
    for torch_ms, numba_ms, speedup, bound, command in rows:
        assert f"`{command}`" in bench, command
        assert re.search(rf"^\| torch fused \| {re.escape(torch_ms)} \|", bench, flags=re.M), (command, torch_ms)
        assert re.search(rf"^\| fused_lr numba \| {re.escape(numba_ms)} \| {re.escape(speedup)} \(.*?\) \| "
                         rf"{bound}% \(", bench, flags=re.M), (command, numba_ms, speedup, bound)


def test_api_reference_is_current():
    spec = importlib.util.spec_from_file_location("api_docs", ROOT / "scripts" / "api_docs.py")
    api_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(api_docs)
    assert api_docs.render() == api_docs.OUT.read_text(), "docs/api.md is stale: run python scripts/api_docs.py"


def test_changelog_names_the_current_version():
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[?{re.escape(version)}\]?", changelog, flags=re.M), f"CHANGELOG.md lacks {version}"
    assert re.search(r"^## \[?Unreleased\]?", changelog, flags=re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    heading = re.sub(r"`", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```$", "", path.read_text(), flags=re.M | re.S)  # no headings in code
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        slug = _slug(heading)
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


DOCS = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    """Every relative link of the page names a file that exists and, with a #fragment into a
    Markdown page, a heading of that page."""
    text = re.sub(r"^```.*?^```$", "", page.read_text(), flags=re.M | re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        file, _, fragment = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists() or (fragment and dest.suffix == ".md" and fragment not in _anchors(dest)):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"
