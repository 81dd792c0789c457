#!/usr/bin/env python3
"""Checks that every relative link in the repository's Markdown (README.md, docs/, each crate's
README.md, packaging/) resolves: the file or folder exists, and a `#fragment` names a heading of
the target (GitHub's anchors). Web links (http:, https:, mailto:) are not fetched. Prints each
broken link as `file:line: link: reason` and exits 1 when there is one. Called by scripts/test.sh."""
import pathlib
import re
import sys

root = pathlib.Path(__file__).resolve().parents[2]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def markdown_files():
    skip = {"target", "node_modules", ".git"}
    for path in sorted(root.rglob("*.md")):
        if not skip.intersection(path.relative_to(root).parts):
            yield path


def lines_outside_code(path):
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            # Inline code spans are not links.
            yield number, re.sub(r"`[^`]*`", "", line)


def slug(heading):
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    found, seen = set(), {}
    for _, line in lines_outside_code(path):
        match = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        for name in re.findall(r'<a\s+(?:name|id)="([^"]+)"', line):
            found.add(name)
    return found


def main():
    broken = []
    checked = 0
    for path in markdown_files():
        for number, line in lines_outside_code(path):
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                    continue
                checked += 1
                file_part, _, fragment = target.partition("#")
                dest = (path.parent / file_part).resolve() if file_part else path
                where = f"{path.relative_to(root)}:{number}: {target}"
                if not dest.exists():
                    broken.append(f"{where}: no such file")
                elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
                    broken.append(f"{where}: no heading #{fragment} in {dest.relative_to(root)}")
    for line in broken:
        print(line, file=sys.stderr)
    print(f"links: {checked} relative links checked, {len(broken)} broken", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
