"""The HTML report of real tiny runs, opened in a headless Chromium: every panel and plot present, nothing
loaded from the network, no console errors; a two-run comparison; a run with a missing round file; the CLI."""

import json
import re
import shutil
import subprocess
import sys

import pytest
from browser import chromium_driver, console_errors
from tiny import digit_prompts

from alignpipe.config import Recipe
from alignpipe.diagnostics.plots import PANELS
from alignpipe.diagnostics.report import build_report, write_report
from alignpipe.loop import run

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_recipe(tmp, model, name: str, beta: float) -> Recipe:
    """As tests/test_loop_tiny.py's recipe, smaller: 2 rounds of 4 prompts x 4 samples, DPO with `beta`."""
    prompts = digit_prompts(tmp / "prompts.jsonl", 16)
    return Recipe.model_validate({
        "name": name, "model": str(model), "rounds": 2, "output_dir": str(tmp / "runs"),
        "task": {"kind": "file", "path": str(prompts), "heldout_fraction": 0.25},
        "synthesis": {"prompts_per_round": 4, "samples_per_prompt": 4, "max_new_tokens": 6, "temperature": 1.0},
        "optimization": {"objectives": [{"name": "dpo", "beta": beta}], "batch_size": 4,
                         "adapter": {"r": 4, "alpha": 8}},
        "heldout": {"n": 4, "max_new_tokens": 6},
    })


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_path, one_thread):
    tmp = tmp_path_factory.mktemp("report")
    run(tiny_recipe(tmp, tiny_model_path, "beta-a", 0.1))
    run(tiny_recipe(tmp, tiny_model_path, "beta-b", 0.5))
    return tmp / "runs" / "beta-a", tmp / "runs" / "beta-b"


def open_page(path):
    """(page source, number of inline svgs, data-panel values, console errors) of the file in Chromium."""
    from selenium.webdriver.common.by import By

    with chromium_driver() as driver:
        driver.get(path.resolve().as_uri())
        svgs = len(driver.find_elements(By.CSS_SELECTOR, "figure.panel > svg"))
        panels = [el.get_attribute("data-panel") for el in driver.find_elements(By.CSS_SELECTOR, "[data-panel]")]
        texts = {p: el.text for el in driver.find_elements(By.CSS_SELECTOR, "[data-panel]")
                 for p in [el.get_attribute("data-panel")]}
        # every plot is laid out with a real size (a broken SVG renders as 0 x 0)
        sizes = driver.execute_script(
            "return Array.from(document.querySelectorAll('figure.panel > svg'))"
            ".map(s => [s.getBoundingClientRect().width, s.getBoundingClientRect().height]);")
        return driver.page_source, svgs, panels, texts, sizes, console_errors(driver)


def loads_nothing(page: str) -> None:
    """No attribute or CSS that fetches a URL: no src/href/url() to http(s), no <script src>, no <link>, no @import."""
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I), "remote src/href"
    assert not re.search(r"url\(\s*['\"]?\s*(https?:)?//", page, re.I), "remote url() in CSS"
    assert "<link" not in page.lower() and "@import" not in page and "<script" not in page.lower()
    assert not re.search(r"https?://", page), "an http(s) URL in the page"


def test_single_run_report_in_browser(runs, tmp_path):
    out = write_report([runs[0]], tmp_path / "report.html")
    page, svgs, panels, texts, sizes, errors = open_page(out)
    assert errors == []
    assert svgs == len(PANELS)
    assert all(f"signal-{pid}" in panels for pid, *_ in PANELS)
    assert all(w > 100 and h > 50 for w, h in sizes), sizes
    assert {"outcome", "rounds-0", "examples-0"} <= set(panels) and "config-diff" not in panels
    assert "missing-0" not in panels  # a finished run: nothing missing
    rounds_rows = texts["rounds-0"].splitlines()
    assert len(rounds_rows) == 1 + 2  # header + one row per round
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert f"{summary['after']['accuracy']:.4g}" in texts["outcome"]
    loads_nothing(out.read_text())
    # the JSON figures match the run
    data = build_report([runs[0]])
    assert [d["round"] for d in data["runs"][0]["rounds"]] == [0, 1]
    assert data["runs"][0]["rounds"][0]["candidates"]["count"] == 16
    # the loop records every figure these panels plot: each has a value for both rounds
    panels = {p["id"]: p for p in data["panels"]}
    for pid in ("sample_reward", "examples", "distinct_2", "truncation", "loss", "reward_accuracy", "kl",
                "stage_seconds", "stage_memory"):
        assert panels[pid]["note"] is None, panels[pid]["note"]
        assert all(v is not None for s in panels[pid]["series"] for v in s["y"]), pid


def test_comparison_shows_config_difference_first(runs, tmp_path):
    out = write_report(list(runs), tmp_path / "compare.html")
    page, svgs, panels, texts, sizes, errors = open_page(out)
    assert errors == []
    assert svgs == len(PANELS) and panels[0] == "config-diff"  # the differences come first
    keys = [line.split()[0] for line in texts["config-diff"].splitlines()[1:]]
    assert keys == ["name", "optimization.objectives.0.beta"]
    assert "0.1 0.5" in texts["config-diff"]
    assert {"rounds-0", "rounds-1", "examples-0", "examples-1"} <= set(panels)
    # overlaid: each plot's legend names both runs
    html = out.read_text()
    svgs = re.findall(r"<svg.*?</svg>", html, re.S)
    assert len(svgs) == len(PANELS)
    # every legend of a panel with figures names both runs (a panel no run recorded, e.g. selection, says so)
    recorded = [p["note"] is None for p in build_report(list(runs))["panels"]]
    assert sum(recorded) >= 10
    assert all(">beta-a" in svg and ">beta-b" in svg for svg, rec in zip(svgs, recorded, strict=True) if rec)
    loads_nothing(html)


def test_run_with_missing_metrics_renders_note(runs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(runs[0], broken, ignore=shutil.ignore_patterns("checkpoint", "final_model"))
    (broken / "round-01" / "metrics.json").unlink()
    out = write_report([broken], tmp_path / "broken.html")
    page, svgs, panels, texts, sizes, errors = open_page(out)
    assert errors == [] and svgs == len(PANELS)
    assert "round 1: no metrics.json" in texts["missing-0"]
    # round 1's loss is unknown, round 0's is still plotted and tabled
    data = build_report([broken])
    loss = next(p for p in data["panels"] if p["id"] == "loss")["series"][0]["y"]
    assert loss[0] is not None and loss[1] is None


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "alignpipe.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_cli_report(runs, tmp_path):
    (tmp_path / "notarun").mkdir()
    bad = run_cli("report", "notarun", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not a run directory: notarun" in lines[0], bad.stderr

    ok = run_cli("report", str(runs[0]), str(runs[1]), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert (runs[0].parent / "compare-beta-a-vs-beta-b.html").is_file()
    as_json = run_cli("report", str(runs[0]), "--json", cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["runs"][0]["name"] == "beta-a" and len(data["panels"]) == len(PANELS)
