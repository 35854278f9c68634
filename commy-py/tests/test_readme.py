"""The Python quickstarts of the repository's README.md, run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import List

import pytest

from conftest import LONG, REPO


def quickstarts() -> List[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quickstart (Python)", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_has_python_quickstarts() -> None:
    blocks = quickstarts()
    assert len(blocks) == 2
    assert "commy.Mesh()" in blocks[0] and "commy.AsyncMesh()" in blocks[1]


@pytest.mark.parametrize("index", [0, 1], ids=["blocking", "asyncio"])
def test_a_readme_quickstart_runs(runtime_dir: str, index: int) -> None:
    code = quickstarts()[index]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=LONG * 2
    )
    assert out.returncode == 0, out.stderr
