"""The README's backend matrix lists exactly the registered ops and their backends."""

import re
from pathlib import Path

from tokops import _registry

README = Path(__file__).resolve().parents[1] / "README.md"


def test_backend_matrix_matches_registry():
    rows = {}
    for line in README.read_text().splitlines():
        m = re.match(r"\| `([a-z0-9_]+)`( / `([a-z0-9_]+)`)? \|[^|]*\| ([^|]*) \| ([^|]*) \| ([^|]*) \|$", line)
        if m:
            have = [b for b, cell in zip(("torch", "triton", "cuda"), m.group(4, 5, 6)) if cell.strip().startswith("yes")]
            for name in (m.group(1), m.group(3)):
                if name:
                    rows[name] = have
    assert rows == _registry.implementations()


def test_readme_opens_with_the_two_commands():
    text = README.read_text()
    block = text[text.index("```bash"):text.index("```", text.index("```bash") + 3)]
    assert "bash scripts/tokops.sh demo" in block and "bash scripts/tokops.sh test" in block
    ci = (README.parent / ".ci" / "run").read_text()
    assert "scripts/tokops.sh test" in ci
