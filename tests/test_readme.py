"""The Python examples of README.md and docs/legacy.md run as written; the calls README.md
names match flexpos' signatures."""

import inspect
import keyword
import re
import subprocess
import sys
from pathlib import Path

import flexpos


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


def test_readme_calls_name_real_arguments():
    """Each inline call of a flexpos function in README.md, such as ``causal_mask(len_q,
    len_k=len_q)``, names its parameters as the function does, in order."""
    calls = re.findall(r"`(?:flexpos\.)?(\w+)\(([^`()]*)\)`", (ROOT / "README.md").read_text())
    checked = [(name, args) for name, args in calls if inspect.isfunction(getattr(flexpos, name, None))]
    assert len(checked) >= 8
    for name, args in checked:
        params = list(inspect.signature(getattr(flexpos, name)).parameters.values())
        for i, arg in enumerate(a.strip() for a in args.split(",") if a.strip()):
            if arg.startswith("*"):
                assert params[i].kind is inspect.Parameter.VAR_POSITIONAL, (name, arg)
            elif "=" in arg:
                assert arg.split("=")[0] in {p.name for p in params}, (name, arg)
            elif arg.isidentifier() and not keyword.iskeyword(arg):  # a name, not a value
                assert params[i].name == arg, (name, arg, params[i].name)


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
