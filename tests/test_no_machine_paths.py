"""Files the project writes for committing (checkpoints, docs, fixtures) hold no machine path (issue #12)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABSOLUTE = re.compile(r"""["'\s(](/(?:work|root|home|tmp|Users|mnt|opt|var)/[^"'\s)]*)""")


def committed_text_files():
    for folder in ("checkpoints", "docs", "tests/fixtures"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".json", ".md", ".txt", ".jsonl") and path.is_file():
                yield path


def test_committed_records_hold_no_machine_paths():
    files = list(committed_text_files())
    assert any(p.name == "config.json" for p in files)  # the scan sees the shipped checkpoints
    found = [(p.relative_to(ROOT).as_posix(), m.group(1)) for p in files for m in ABSOLUTE.finditer(p.read_text())]
    assert not found, f"machine paths in committed files: {found[:5]}"


def test_the_pattern_finds_a_machine_path():
    assert ABSOLUTE.search('"argv": ["/work/main/par_deploy/__main__.py"]')
    assert not ABSOLUTE.search('"made_from": "../runs/x/final"')
