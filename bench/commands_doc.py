"""Write docs/commands.md's option tables again from the option specs in pipeline/config.py.

Each ``<!-- options: COMMAND -->`` ... ``<!-- end options -->`` block is the table of COMMAND's options,
made from the same specs as its click options (``pipeline.cli.option_table``); the prose around the blocks
is left alone. tests/test_docs.py fails while the committed file differs from what this writes.

    python bench/commands_doc.py            # rewrite docs/commands.md
    python bench/commands_doc.py --check    # exit 1 if it is out of date
"""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.cli import with_option_tables

DOC = Path(__file__).resolve().parents[1] / "docs" / "commands.md"


def main(argv: list[str]) -> int:
    text = DOC.read_text(encoding="utf-8")
    fresh = with_option_tables(text)
    if "--check" in argv:
        print("docs/commands.md is up to date" if fresh == text else "docs/commands.md is out of date: "
              "run python bench/commands_doc.py")
        return int(fresh != text)
    DOC.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
