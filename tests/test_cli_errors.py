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
    # the message quotes the value in brackets: printed as text, not read as console markup
    ("task:\n  kind: arithmetic\n  digits: [5, 2]\n", "a range is [low, high] with 0 <= low <= high, got [5, 2]"),
    ("optimization:\n  objectives: [{name: dpo, beta: -1}]\n", "objective 'dpo': beta must be >= 0, got -1"),
    ("output_dir: out.txt\n", "output_dir 'out.txt': cannot create out.txt/run"),
])
def test_bad_input_one_line_error(tmp_path, recipe, expected):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n{oops\n')
    (tmp_path / "out.txt").write_text("a file where the output folder would go")
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


def test_recipe_that_is_not_utf8(tmp_path):
    (tmp_path / "r.yaml").write_bytes("name: caf\u00e9\n".encode("latin-1"))
    result = run_cli("run", "r.yaml", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "r.yaml: not UTF-8 text (byte 0xe9 at offset 9); save the recipe as UTF-8" in result.stderr


@pytest.mark.parametrize("broken, expected", [
    ("config", "config.json is not valid JSON"),
    ("tokenizer", "no tokenizer files (expected one of tokenizer.json"),
    ("weights", "no weights (expected one of model.safetensors"),
])
def test_broken_model_directory(tmp_path, tiny_model_path, broken, expected):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_path, model)
    if broken == "config":
        (model / "config.json").write_text("{bad")
    elif broken == "tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (model / name).unlink()
    else:
        (model / "model.safetensors").unlink()
    (tmp_path / "r.yaml").write_text(f"model: {model}\n")
    result = run_cli("run", "r.yaml", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr + result.stdout
    err_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(err_lines) == 1 and f"model {model}: {expected}" in err_lines[0], result.stderr


def test_a_run_that_fails_at_load_leaves_the_run_directory_alone(tmp_path):
    """A rerun whose prompts file or model is bad keeps the finished run's config.yaml; a first run that
    fails at load creates no directory."""
    done = tmp_path / "runs" / "done"
    done.mkdir(parents=True)
    (done / "config.yaml").write_text("name: done  # what produced this run's model\n")
    for name, recipe in (("done", "task: {kind: file, path: missing.jsonl}\n"), ("done", "model: /no/such/model\n"),
                         ("fresh", "task: {kind: file, path: missing.jsonl}\n")):
        (tmp_path / "r.yaml").write_text(f"name: {name}\n{recipe}")
        result = run_cli("run", "r.yaml", cwd=tmp_path)
        assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (done / "config.yaml").read_text() == "name: done  # what produced this run's model\n"
    assert not (tmp_path / "runs" / "fresh").exists()
