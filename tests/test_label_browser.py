"""The labelling page in a real headless Chromium, against the real server (`alignpipe label` in a subprocess).

Eight pairs with known chosen/rejected responses. The test reads which side shows the dataset's chosen
response and clicks (mouse) or presses a key accordingly, so the preference each label must store is
known; it undoes once, stops the server, restarts it, checks that the page continues at item 6, labels the
rest, and checks the saved judgments: every item, the preference in the ORIGINAL order, the recorded left
side, and no console errors.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from browser import chromium_driver, console_errors

from alignpipe.evaluation.labelling import read_labels

pytest.importorskip("starlette", reason="starlette is not installed")
pytest.importorskip("uvicorn", reason="uvicorn is not installed")

N = 8
TRICKY = "Is 1 < 2 & 3 > 2? <script>document.title='pwned'</script>"


def write_pairs(path: Path) -> Path:
    rows = []
    for i in range(N):
        prompt = TRICKY if i == 0 else f"question {i}?"
        row = {"prompt": prompt, "chosen": f"good answer {i}", "rejected": f"bad answer {i}"}
        if i == 2:  # a multi-turn (conversational) row: the page shows its turns
            row = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                              {"role": "user", "content": prompt}],
                   "chosen": [{"role": "assistant", "content": row["chosen"]}],
                   "rejected": [{"role": "assistant", "content": row["rejected"]}]}
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Server:
    """`alignpipe label PAIRS --port 0` in a subprocess; `url` is read from the line it prints."""

    def __init__(self, pairs: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "alignpipe.cli", "label", str(pairs), "--labeller", "tester", "--port", "0",
             "--seed", "7"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()  # keep the pipe from filling
        self.url = self._wait_for_url()
        self._wait_until_answering()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def _wait_for_url(self) -> str:
        while True:
            try:
                line = self.lines.get(timeout=120)
            except queue.Empty:
                pytest.fail(f"no URL from `alignpipe label`: {''.join(self.output)}")
            if m := re.search(r"http://127\.0\.0\.1:\d+/", line):
                return m.group(0)

    def _wait_until_answering(self) -> None:
        for _ in range(600):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        pytest.fail(f"the server at {self.url} never answered: {''.join(self.output)}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def test_label_pairs_in_a_real_browser(tmp_path: Path) -> None:
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pairs = write_pairs(tmp_path / "pairs.jsonl")
    labels_path = tmp_path / "pairs.jsonl.labels.tester.jsonl"
    expected: dict[int, tuple[str | None, str]] = {}  # item -> (stored preference, original response on the left)

    def _read_text(driver, element_id: str) -> str | None:  # noqa: ANN001
        """The element's text, or None (WebDriverWait tries again) when the page changed under the read."""
        try:
            return driver.find_element(By.ID, element_id).text
        except WebDriverException as exc:
            if isinstance(exc, StaleElementReferenceException) or "does not belong to the document" in str(exc):
                return None
            raise

    def text(driver, element_id: str) -> str:  # noqa: ANN001
        # the old page may go away between finding an element and reading it (after a submit): look again.
        # Chromium reports that race as a stale element or as a node that "does not belong to the document".
        return WebDriverWait(driver, 30, ignored_exceptions=[StaleElementReferenceException]).until(
            lambda d: _read_text(d, element_id))

    def wait_progress(driver, done: int) -> None:  # noqa: ANN001
        WebDriverWait(driver, 60).until(lambda d: text(d, "progress").startswith(f"{done} / {N} labelled"))

    def answer(driver, k: int, want: str, how: str) -> None:  # noqa: ANN001
        """On item k, give the verdict that stores `want` (first = chosen, second, tie, skip) by mouse or key."""
        assert text(driver, "item-title") == f"Item {k + 1} of {N}"
        a, b = text(driver, "text-a"), text(driver, "text-b")
        assert {a, b} == {f"good answer {k}", f"bad answer {k}"}
        left = "first" if a == f"good answer {k}" else "second"
        button = ("a" if left == want else "b") if want in ("first", "second") else want  # or tie / skip
        if how == "mouse":
            ActionChains(driver).move_to_element(driver.find_element(By.ID, f"btn-{button}")).click().perform()
        else:  # a / b (or 1 / 2 on odd items), t, s
            key = {"a": "1", "b": "2"}.get(button, button[0]) if k % 2 else button[0]
            ActionChains(driver).send_keys(key).perform()
        expected[k] = (None if want == "skip" else want, left)

    errors = []
    with chromium_driver() as driver:
        server = Server(pairs)
        driver.get(server.url)
        assert text(driver, "progress").startswith(f"0 / {N} labelled")
        assert text(driver, "prompt") == "USER\n" + TRICKY and driver.title.startswith("label 1")  # escaped
        plan = [("first", "mouse"), ("second", "key"), ("tie", "mouse"), ("second", "key"), ("first", "mouse")]
        for k, (want, how) in enumerate(plan):
            if k == 2:
                assert len(driver.find_elements(By.CSS_SELECTOR, "#prompt .turn")) == 3  # user, assistant, user
            answer(driver, k, want, how)
            wait_progress(driver, k + 1)
        ActionChains(driver).send_keys("u").perform()  # undo item 5 (index 4) ...
        wait_progress(driver, 4)
        assert len(read_labels(labels_path)) == 4
        answer(driver, 4, "second", "key")  # ... and label it the other way
        wait_progress(driver, 5)
        errors += console_errors(driver)
        server.stop()

        server = Server(pairs)  # a restarted server continues at item 6
        driver.get(server.url)
        assert text(driver, "item-title") == f"Item 6 of {N}" and text(driver, "prompt") == "USER\nquestion 5?"
        assert text(driver, "progress").startswith(f"5 / {N} labelled")
        for k, (want, how) in zip(range(5, N), [("first", "mouse"), ("skip", "key"), ("second", "mouse")],
                                  strict=True):
            answer(driver, k, want, how)
            wait_progress(driver, k + 1)
        assert text(driver, "done") == f"All {N} items done"
        assert "(1 skipped)" in text(driver, "progress")
        errors += console_errors(driver)
        server.stop()

    saved = read_labels(labels_path)
    assert len(saved) == N
    for k, j in enumerate(saved):
        want, left = expected[k]
        assert j.prompt_id == f"pairs:{k + 1}" and j.judge == "human:tester"
        assert j.candidate_ids == [f"pairs:{k + 1}/chosen", f"pairs:{k + 1}/rejected"]
        assert j.preference == want and json.loads(j.raw)["left"] == left
        assert (j.status, j.reason) == (("invalid", "skipped") if want is None else ("ok", ""))
    assert [j.preference for j in saved] == ["first", "second", "tie", "second", "second", "first", None, "second"]
    assert {left for _, left in expected.values()} == {"first", "second"}  # both display orders were undone
    assert errors == []
