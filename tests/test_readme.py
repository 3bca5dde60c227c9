"""The README's Python example runs as written (in a temporary folder): the public face it uses exists."""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_python_example_runs(tmp_path, monkeypatch, capsys):
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        code = re.search(r"## Python example\s+```python\n(.*?)```", f.read(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "my_model" / "model.safetensors").is_file()
    assert capsys.readouterr().out.strip()
