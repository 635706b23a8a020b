"""Puts the tables of a `mp-executors bench` run into README.md's performance section.

    python benchmarks/update_readme.py [--bench bench-results/bench.md] [--readme README.md] [--check]

Replaces everything between the lines `<!-- bench:start -->` and `<!-- bench:end -->` with
the contents of bench.md (the markers stay, so the next run replaces it again). Fails, and
changes nothing, if the markers are missing, repeated or out of order. `--check` only says
whether the README is up to date (exit 1 if not), for CI or a pre-commit hook.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
REPO = Path(__file__).resolve().parents[1]


def replace_section(readme: str, tables: str) -> str:
    """README text with the bench section replaced by `tables`; ValueError on bad markers."""
    lines = readme.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == START]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(starts) != 1 or len(ends) != 1:
        raise ValueError(f"expected exactly one {START} line and one {END} line, "
                         f"found {len(starts)} and {len(ends)}")
    (s,), (e,) = starts, ends
    if e < s:
        raise ValueError(f"{END} comes before {START}")
    body = tables.strip("\n") + "\n"
    return "".join(lines[: s + 1]) + "\n" + body + "\n" + "".join(lines[e:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", default="bench-results/bench.md", help="bench.md written by mp-executors bench")
    parser.add_argument("--readme", default=str(REPO / "README.md"))
    parser.add_argument("--check", action="store_true", help="exit 1 if the README is not up to date; write nothing")
    args = parser.parse_args(argv)
    bench, readme = Path(args.bench), Path(args.readme)
    if not bench.is_file():
        print(f"update_readme: {bench} not found; run `mp-executors bench --out {bench.parent}` first", file=sys.stderr)
        return 2
    old = readme.read_text()
    try:
        new = replace_section(old, bench.read_text())
    except ValueError as e:
        print(f"update_readme: {readme}: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{readme}: {'up to date' if new == old else 'out of date'}")
        return 0 if new == old else 1
    if new != old:
        readme.write_text(new)
    print(f"{readme}: bench section {'updated' if new != old else 'already up to date'} from {bench}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
