"""The README's Python API example runs as printed (on the tiny models it names)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_python_api_example_runs_as_printed(monkeypatch, capsys):
    monkeypatch.chdir(README.parent)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(block for block in blocks if "Explainer.tiny()" in block)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    why = namespace["why"]
    assert why.in_caption and why.maps["gradcam"].method == "LayerCAM"
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == namespace["caption"].text and len(printed) == 4


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    assert "make play" in text and "make test" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci
