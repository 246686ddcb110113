"""The Python examples of README.md and docs/legacy.md run as written."""

import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def run_examples(path: Path) -> None:
    """Run the unindented ```python blocks of ``path`` in order, in one namespace (indented ones
    are fragments inside lists)."""
    blocks = re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)
    assert blocks
    namespace = {"__name__": "example"}
    for block in blocks:
        exec(compile(block, str(path), "exec"), namespace)


def test_readme_examples_run():
    run_examples(ROOT / "README.md")


def test_legacy_doc_examples_run():
    run_examples(ROOT / "docs" / "legacy.md")


def test_import_compiles_nothing():
    code = (
        "import torch\n"
        "def refuse(*args, **kwargs):\n"
        "    raise AssertionError('torch.compile called at import')\n"
        "torch.compile = refuse\n"
        "import flexpos, flexpos.bench, legacy.positional\n"
        "print('imported')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stdout
