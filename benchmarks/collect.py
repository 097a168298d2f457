"""Put the latest benchmark results into BENCHMARKS.md and their plots into docs/benchmarks/.

Each ``bench_*.py`` script writes ``benchmarks/out/<name>.md`` (command, machine, tables,
verdicts) and ``benchmarks/out/<name>.png``. This script copies each PNG to
``docs/benchmarks/<name>.png`` and replaces the text between the markers
``<!-- <name>:start -->`` and ``<!-- <name>:end -->`` in ``BENCHMARKS.md`` with the Markdown
result, so the hand-written analysis around the markers stays as it is. The block between
``<!-- summary:start -->`` and ``<!-- summary:end -->`` gets one row per target (rows of the
benchmarks without new results are kept).

Results of ``--quick`` runs are skipped unless ``--allow-quick`` is given.

Run: ``python benchmarks/collect.py [--allow-quick] [--skip NAME ...]`` (after running the
benchmarks; ``--skip`` leaves those sections as they are).
"""

from __future__ import annotations

import json
import re
import shutil
import sys

from _common import OUT, ROOT

DOCS = ROOT / "docs" / "benchmarks"
NAMES = ("bench_memory", "bench_connected_components", "bench_overhead", "bench_stitching",
         "bench_parallel", "bench_whole_image", "bench_engine", "bench_fidelity",
         "bench_fidelity_overlap", "bench_fidelity_overlap_3d", "bench_formats",
         "bench_tiles", "bench_peer", "bench_gpu")


def section(name: str) -> str | None:
    """The generated Markdown for one benchmark, without its level-2 title."""
    path = OUT / f"{name}.md"
    if not path.exists():
        return None
    lines = path.read_text().splitlines()
    body = "\n".join(line for line in lines if not line.startswith("## ")).strip()
    if (OUT / f"{name}.png").exists():  # not every benchmark draws a plot
        body += f"\n\n![{name}](docs/benchmarks/{name}.png)"
    return body


def summary(names: list[str], text: str) -> str:
    """One row per target: the MET/MISSED verdicts of the included results, and the rows
    already in ``text`` for the benchmarks not included this time (in ``NAMES`` order)."""
    kept: dict[str, list[str]] = {}
    block = re.search(r"<!-- summary:start -->\n(.*?)<!-- summary:end -->", text, re.S)
    for line in (block.group(1).splitlines() if block else []):
        found = re.match(r"\| \[(\w+)\]", line)
        if found and found.group(1) not in names:
            kept.setdefault(found.group(1), []).append(line)
    rows = ["| benchmark | | figure (target) | measured |", "|---|---|---|---|"]
    for name in [*NAMES, *(k for k in kept if k not in NAMES)]:
        if name not in names:
            rows += kept.get(name, [])
            continue
        data = json.loads((OUT / f"{name}.json").read_text())
        for line in data["verdicts"]:
            status, _, rest = line.partition(": ")
            if status not in ("MET", "MISSED"):
                continue
            mark = "met" if status == "MET" else "**missed**"
            rows.append(f"| [{name}](#{name}) | {mark} | {rest} | "
                        f"{data['machine']['date']} |")
    return "\n".join(rows)


def replace(text: str, name: str, body: str) -> str | None:
    pattern = re.compile(rf"(<!-- {name}:start -->\n)(?:.*?\n)?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        return None
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def main() -> int:
    target = ROOT / "BENCHMARKS.md"
    text = target.read_text()
    DOCS.mkdir(parents=True, exist_ok=True)
    included = []
    skip = set(sys.argv[sys.argv.index("--skip") + 1:]) if "--skip" in sys.argv else set()
    for name in NAMES:
        if name in skip:
            print(f"{name}: skipped")
            continue
        body = section(name)
        if body is None:
            print(f"{name}: no results in {OUT}; run benchmarks/{name}.py first")
            continue
        if "--quick`" in body and "--allow-quick" not in sys.argv:
            print(f"{name}: latest result is a --quick smoke test; not copied "
                  "(rerun without --quick, or pass --allow-quick)")
            continue
        updated = replace(text, name, body)
        if updated is None:
            print(f"{name}: markers missing in BENCHMARKS.md")
            continue
        text = updated
        included.append(name)
        if (OUT / f"{name}.png").exists():
            shutil.copy(OUT / f"{name}.png", DOCS / f"{name}.png")
        print(f"{name}: updated")
    text = replace(text, "summary", summary(included, text)) or text
    target.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
