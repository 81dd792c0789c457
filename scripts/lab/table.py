#!/usr/bin/env python3
"""Turns the lab's results.tsv into the printed table, summary.md and results.json.

usage: table.py RESULTS_DIR "HEADER LINE"
"""

import json
import sys
import textwrap

COLUMNS = [("case", 4), ("name", 14), ("expectation", 30), ("observed", 46), ("result", 10), ("original", 24)]


def main():
    results_dir, header = sys.argv[1], sys.argv[2]
    rows = []
    with open(f"{results_dir}/results.tsv") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) == 6:
                rows.append(dict(zip([c for c, _ in COLUMNS], fields)))

    text = [header, render(rows)]
    with open(f"{results_dir}/summary.txt", "w") as f:
        f.write("\n".join(text) + "\n")
    with open(f"{results_dir}/summary.md", "w") as f:
        f.write(f"{header}\n\n| case | name | expectation | observed | result | original |\n|---|---|---|---|---|---|\n")
        for r in rows:
            f.write("| " + " | ".join(r[c].replace("|", "\\|") for c, _ in COLUMNS) + " |\n")
    with open(f"{results_dir}/results.json", "w") as f:
        json.dump({"header": header, "cases": rows}, f, indent=2)
    print("\n".join(text))


def render(rows):
    """A plain-text table whose long cells wrap inside their column."""
    sep = "+" + "+".join("-" * (w + 2) for _, w in COLUMNS) + "+"
    out = [sep, row_lines({c: c for c, _ in COLUMNS}), sep]
    for r in rows:
        out.append(row_lines(r))
        out.append(sep)
    return "\n".join(out)


def row_lines(r):
    cells = [textwrap.wrap(r[c], w, break_long_words=True) or [""] for c, w in COLUMNS]
    height = max(len(c) for c in cells)
    lines = []
    for i in range(height):
        parts = [(cell[i] if i < len(cell) else "").ljust(w) for cell, (_, w) in zip(cells, COLUMNS)]
        lines.append("| " + " | ".join(parts) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
