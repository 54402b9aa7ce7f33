"""Bad input fails cleanly: one line naming the problem, a non-zero exit, no traceback."""

import subprocess
import sys

import pytest


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "alignpipe.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


@pytest.mark.parametrize("recipe, expected", [
    ("task:\n  kind: file\n  path: missing.jsonl\n", "prompts file not found: missing.jsonl"),
    ("task:\n  kind: file\n  path: bad.jsonl\n", "bad.jsonl: line 2: not valid JSON"),
    ("synthesis:\n  temprature: 1\n", "synthesis.temprature: Extra inputs are not permitted"),
    ("model: /no/such/model\n", "model path does not exist: /no/such/model"),
])
def test_bad_input_one_line_error(tmp_path, recipe, expected):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n{oops\n')
    (tmp_path / "r.yaml").write_text(recipe)
    result = run_cli("run", "r.yaml", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    err_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(err_lines) == 1 and expected in err_lines[0], result.stderr


def test_missing_recipe_file(tmp_path):
    result = run_cli("run", "nope.yaml", cwd=tmp_path)
    assert result.returncode != 0 and "recipe file not found: nope.yaml" in result.stderr
    assert "Traceback" not in result.stderr
