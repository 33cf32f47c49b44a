"""docs/migration.md: every fenced ``python`` block runs (small CPU sizes), and the README links the page."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "migration.md"


def _blocks():
    text = PAGE.read_text()
    return [(text[:m.start()].rsplit("\n## ", 1)[-1].split("\n", 1)[0], m.group(1))
            for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


def test_page_has_every_original():
    titles = " ".join(t for t, _ in _blocks())
    for original in ("ToMe", "tomesd", "PiToMe", "KIVI", "H2O", "FlexAttention"):
        assert original in titles


@pytest.mark.parametrize("title,code", _blocks(), ids=[t.split(" ")[0] + str(i) for i, (t, _) in enumerate(_blocks())])
def test_migration_example_runs(title, code):
    pytest.importorskip("timm")
    exec(compile(code, f"docs/migration.md ({title})", "exec"), {"__name__": "__migration__"})


def test_readme_links_migration_page():
    assert "docs/migration.md" in (ROOT / "README.md").read_text()


def test_block_mask_from_flex_rejects_other_objects():
    import torch

    from tokops.attention import BlockMask

    with pytest.raises(TypeError, match="flex_mask"):
        BlockMask.from_flex(torch.ones(1, 1, 2, 2, dtype=torch.bool))
