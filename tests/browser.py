"""A headless Chromium driven by Selenium for the page tests (report, labelling).

Uses Debian's `chromium` and `chromedriver` (installed by `make test`); nothing is downloaded at test time.
Where either is missing, the test skips and says so.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


def _find(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


@contextmanager
def chromium_driver(width: int = 1280, height: int = 1000) -> Iterator:
    """A headless Chromium WebDriver with the browser console log enabled (`driver.get_log("browser")`)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
    browser = _find("chromium", "chromium-browser")
    driver_path = _find("chromedriver")
    if browser is None or driver_path is None:
        pytest.skip("no Chromium/chromedriver on this machine (`make browser` installs Debian's packages as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver) -> list[dict]:  # noqa: ANN001
    """Entries of the browser console at level SEVERE (JavaScript errors, failed loads)."""
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
