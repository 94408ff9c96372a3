"""The documentation holds together: its links resolve, and its map of the tree is complete.

Two checks over README.md and docs/*.md:

* every relative link points at a file or directory that exists, and a ``#anchor`` at a heading
  the target file has (GitHub's anchors: lowercase, spaces to ``-``, punctuation other than
  ``-`` and ``_`` dropped, ``-1``, ``-2`` for repeats). External links are not checked.
* the "Where things are" section of docs/layout.md links every role, module, filter plugin file
  and playbook of the tree, and nothing else of those kinds: adding one without a line there,
  or removing one and leaving its line, fails.

The checks are plain functions, exercised on small trees below so that they are seen to fail.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
LAYOUT = REPO / "docs" / "layout.md"
LAYOUT_HEADING = "Where things are"
# The two commands, the farm, its figures and the attacks tried; the rest lives in docs/.
README_MAX_LINES = 260

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
INLINE_CODE = re.compile(r"(`+).+?\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
# What the layout section must name, as paths relative to the repository.
LAYOUT_KINDS = {
    "role": re.compile(r"^roles/[^/]+$"),
    "module": re.compile(r"^plugins/modules/[^/]+\.py$"),
    "filter plugin": re.compile(r"^plugins/filter/[^/]+\.py$"),
    "playbook": re.compile(r"^playbooks/[^/]+\.ya?ml$"),
}


def prose_lines(text: str) -> list[tuple[int, str]]:
    """The lines outside fenced code blocks, numbered from 1."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)[0] * len(match.group(1))
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            lines.append((number, line))
    return lines


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor the headings of a markdown file produce."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        anchor = github_anchor(match.group(2))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def links(text: str) -> list[tuple[int, str]]:
    """Link targets outside code: inline links, images and reference definitions."""
    found = []
    for number, line in prose_lines(text):
        bare = INLINE_CODE.sub("", line)
        found += [(number, target) for target in INLINE_LINK.findall(bare)]
        definition = REFERENCE_DEF.match(bare)
        if definition:
            found.append((number, definition.group(1)))
    return found


def broken_links(path: Path) -> list[str]:
    """The relative links of a markdown file that do not resolve, each with its line."""
    broken = []
    for number, target in links(path.read_text(encoding="utf-8")):
        if SCHEME.match(target):
            continue  # external (http, https, mailto): not checked
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{path.name}:{number}: {target}"
        if not resolved.exists():
            broken.append(f"{where} (no such file or directory)")
        elif anchor and resolved.suffix != ".md":
            broken.append(f"{where} (an anchor into a file that is not markdown)")
        elif anchor and unquote(anchor) not in anchors(resolved):
            broken.append(f"{where} (no heading makes #{anchor} in {resolved.name})")
    return broken


def section(text: str, heading: str) -> str:
    """The lines under ``heading``, up to the next heading of its level or above."""
    level, lines = None, []
    for _, line in prose_lines(text):
        match = HEADING.match(line)
        if level is None:
            if match and match.group(2).strip() == heading:
                level = len(match.group(1))
            continue
        if match and len(match.group(1)) <= level:
            break
        lines.append(line)
    if level is None:
        raise AssertionError(f"no heading {heading!r}")
    return "\n".join(lines)


def kind_of(relative: str) -> str | None:
    return next((kind for kind, pattern in LAYOUT_KINDS.items() if pattern.match(relative)), None)


def tree_parts(repo: Path) -> set[str]:
    """Every role, module, filter plugin file and playbook of a tree, relative to it."""
    parts = {f"roles/{p.name}" for p in (repo / "roles").glob("*") if p.is_dir()}
    parts |= {f"plugins/modules/{p.name}" for p in (repo / "plugins/modules").glob("*.py")}
    parts |= {f"plugins/filter/{p.name}" for p in (repo / "plugins/filter").glob("*.py")}
    parts |= {f"playbooks/{p.name}" for p in (repo / "playbooks").glob("*.y*ml")}
    return {part for part in parts if not Path(part).name.startswith(("_", "."))}


def listed_parts(doc: Path, heading: str, repo: Path) -> set[str]:
    """The roles, modules, filter files and playbooks the section links, relative to ``repo``."""
    listed = set()
    for _, target in links(section(doc.read_text(encoding="utf-8"), heading)):
        if SCHEME.match(target):
            continue
        resolved = (doc.parent / unquote(target.partition("#")[0])).resolve()
        try:
            relative = resolved.relative_to(repo.resolve()).as_posix()
        except ValueError:
            continue
        if kind_of(relative):
            listed.add(relative)
    return listed


def layout_mismatch(doc: Path, heading: str, repo: Path) -> tuple[set[str], set[str]]:
    """(in the tree but not listed, listed but not in the tree)."""
    tree, listed = tree_parts(repo), listed_parts(doc, heading, repo)
    return tree - listed, listed - tree


# --- The repository's documentation -----------------------------------------------------------


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(doc: Path):
    assert broken_links(doc) == []


def test_layout_section_names_exactly_the_tree():
    unlisted, stale = layout_mismatch(LAYOUT, LAYOUT_HEADING, REPO)
    assert not unlisted, (
        f"not listed in docs/layout.md ({LAYOUT_HEADING!r}); add a line linking each: {sorted(unlisted)}"
    )
    assert not stale, f"docs/layout.md links parts the tree no longer has: {sorted(stale)}"


def test_layout_section_sees_every_kind():
    # An empty glob (a renamed directory) would make the comparison above vacuous.
    kinds = {kind_of(part) for part in tree_parts(REPO)}
    assert kinds == set(LAYOUT_KINDS)


def test_readme_links_every_page_of_docs():
    linked = {
        (README.parent / target.partition("#")[0]).resolve()
        for _, target in links(README.read_text(encoding="utf-8"))
        if not SCHEME.match(target)
    }
    unlinked = [p.name for p in DOCS[1:] if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link docs/{unlinked}"


def test_readme_starts_with_the_two_commands_and_stays_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index("```sh")
    first_block = lines[start + 1 : lines.index("```", start + 1)]
    # The title, then the set-up commands before anything else.
    assert lines[0].startswith("# ")
    assert not any(line.strip() for line in lines[1:start])
    assert [line.split()[:2] for line in first_block] == [["make", "farm"], ["make", "test"]]
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move detail into docs/"


# --- The checks themselves fail when they should ----------------------------------------------


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Front door and job router", "front-door-and-job-router"),
        ("`node_base` in short", "node_base-in-short"),
        ("What the tests exercise, and what they cannot", "what-the-tests-exercise-and-what-they-cannot"),
        ("5. Rollout (not built yet)", "5-rollout-not-built-yet"),
        ("LACP bonding (`network_bond`)", "lacp-bonding-network_bond"),
        ("The stages of `make test`", "the-stages-of-make-test"),
        ("[Linked](other.md) heading", "linked-heading"),
    ],
)
def test_github_anchor(heading: str, anchor: str):
    assert github_anchor(heading) == anchor


def test_broken_links_are_found(tmp_path: Path):
    (tmp_path / "other.md").write_text("# Other\n\n## Twice\n\n## Twice\n", encoding="utf-8")
    (tmp_path / "dir").mkdir()
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Doc\n\n"
        "[ok](other.md#other) [ok](other.md#twice-1) [ok](dir/) [ok](#doc) [ok](https://x.invalid/y)\n"
        "`[in code](missing-in-code.md)`\n"
        "```sh\n# Not a heading\n[in a fence](missing-in-fence.md)\n```\n"
        "[gone](missing.md) [no anchor](other.md#not-a-heading) [fenced](#not-a-heading)\n"
        "[ref]: missing-ref.md\n",
        encoding="utf-8",
    )
    broken = broken_links(doc)
    assert [b.split(": ", 1)[1].split(" (")[0] for b in broken] == [
        "missing.md",
        "other.md#not-a-heading",
        "#not-a-heading",
        "missing-ref.md",
    ]


def test_layout_mismatch_catches_unlisted_and_stale_parts(tmp_path: Path):
    for directory in ("roles/listed", "roles/new_role", "plugins/modules", "plugins/filter", "playbooks"):
        (tmp_path / directory).mkdir(parents=True)
    for file in (
        "plugins/modules/mod.py",
        "plugins/filter/filt.py",
        "playbooks/site.yml",
        "playbooks/new.yml",
    ):
        (tmp_path / file).write_text("", encoding="utf-8")
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "layout.md"
    doc.write_text(
        "# Where things are\n\n"
        "[listed](../roles/listed/) [gone](../roles/gone/) [mod](../plugins/modules/mod.py)\n"
        "[filt](../plugins/filter/filt.py) [site](../playbooks/site.yml) [code](../roles/listed/tasks/)\n\n"
        "# Elsewhere\n\n[new](../playbooks/new.yml) [new role](../roles/new_role/)\n",
        encoding="utf-8",
    )
    unlisted, stale = layout_mismatch(doc, "Where things are", tmp_path)
    assert unlisted == {"roles/new_role", "playbooks/new.yml"}
    assert stale == {"roles/gone"}
    with pytest.raises(AssertionError, match="no heading"):
        layout_mismatch(doc, "Layout", tmp_path)
