"""The README stays short and its guides reachable (issue 22): README.md within 10 KB with exactly the two set-up
commands, and every relative link in README.md and docs/*.md leads to a file that exists (and, with #anchor, to a
heading in it, slugged as GitHub slugs headings)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))


def slugs(md: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens; a repeat gets -1, -2, ..."""
    out = set()
    for line in prose(md.read_text(encoding="utf-8")).splitlines():
        if m := re.match(r"#{1,6} +(.+?) *#*$", line):
            slug, n = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-"), 0
            while (slug if n == 0 else f"{slug}-{n}") in out:
                n += 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(md: Path) -> list[str]:
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose(md.read_text(encoding="utf-8")))


def broken(md: Path) -> list[str]:
    bad = []
    for target in links(md):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.is_file():
            bad.append(f"{md.name}: {target} (no such file)")
        elif anchor and (dest.suffix != ".md" or anchor not in slugs(dest)):
            bad.append(f"{md.name}: {target} (no such heading)")
    return bad


def test_the_readme_fits_in_10_kb():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= 10 * 1024, f"README.md is {size} bytes: move the detail to a docs/ page"


def test_the_readme_has_exactly_the_two_setup_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = readme.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```\w*\n(.*?)^```", quick, flags=re.S | re.M)
    assert len(blocks) == 1, "the quick start has one code block"
    lines = [line for line in blocks[0].splitlines() if line.strip()]
    assert len(lines) == 2, lines
    assert "train.py --demo" in lines[0] and "pytest" in lines[1], lines


def test_the_readme_links_every_guide():
    """The README's guides: every docs/ page is linked from it, the four the issue names among them."""
    readme = set(links(ROOT / "README.md"))
    pages = {f"docs/{p.name}" for p in PAGES[1:]}
    assert {"docs/evaluation.md", "docs/data.md", "docs/troubleshooting.md", "docs/scale-out.md"} <= pages
    assert pages <= readme, sorted(pages - readme)
    assert {"LOSSES.md", "BENCHMARKS.md"} <= readme


def test_every_relative_link_resolves():
    assert all(links(p) for p in PAGES[:1])  # the README has links to check
    assert [b for p in PAGES for b in broken(p)] == []


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "a.md").write_text("# A title: here\n\n## A title: here\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#a-title-here) [ok](a.md#a-title-here-1) [x](a.md#nope) [y](gone.md) `[z](gone.md)`\n"
                    "```\n[w](gone.md)\n```\n[web](https://example.com)\n")
    assert [b.split(": ", 1)[1] for b in broken(page)] == ["a.md#nope (no such heading)", "gone.md (no such file)"]
