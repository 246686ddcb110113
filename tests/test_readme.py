"""The README's Python examples run as written."""

import re
import subprocess
import sys
from pathlib import Path


README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})


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
