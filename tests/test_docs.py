"""The README's configuration table matches the settings the code reads."""

import pathlib
import re
import subprocess

from collector.settings import SETTINGS

PROJECT = pathlib.Path(__file__).resolve().parents[1]
README = PROJECT / "README.md"


def test_every_setting_is_in_the_readme_table_with_its_default():
    rows = {m.group(1): m.group(2) for m in
            re.finditer(r"^\| `([A-Z_]+)` \| ([^|]+) \|", README.read_text(), re.MULTILINE)}
    for setting in SETTINGS:
        assert setting.env in rows, f"{setting.env} is missing from README.md"
        expected = ("(required)" if setting.default is None
                    else "(empty)" if setting.default == "" else f"`{setting.default}`")
        assert rows[setting.env].strip() == expected, setting.env


def test_readme_names_no_setting_the_code_does_not_read():
    documented = set(re.findall(r"^\| `(COLLECTOR_[A-Z_]+)` \|", README.read_text(), re.MULTILINE))
    assert documented <= {s.env for s in SETTINGS}


# Names of notes that live outside the repository: whoever clones it cannot follow them.
OUTSIDE_NOTES = re.compile(r"\bpitfalls? \d+|\bissues? #?\d+\b|\bdesign\.md\b|\bpitfalls\.md\b",
                           re.IGNORECASE)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def repository_files() -> list[pathlib.Path]:
    """Return the files git tracks (and new ones not ignored), this test file aside."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=PROJECT, capture_output=True, text=True, check=True).stdout
    files = [PROJECT / name for name in listed.splitlines()]
    return [f for f in files if f.is_file() and f != pathlib.Path(__file__).resolve()]


def test_nothing_points_to_notes_outside_the_repository():
    found = []
    for path in repository_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE_NOTES.search(line):
                found.append(f"{path.relative_to(PROJECT)}:{number}: {line.strip()}")
    assert not found, "say it here, or in docs/:\n" + "\n".join(found)


def slug(heading: str) -> str:
    """Return the anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_relative_link_of_the_docs_resolves():
    pages = [README, *sorted((PROJECT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and resolved.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", resolved.read_text(), re.MULTILINE)
                if anchor not in {slug(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
