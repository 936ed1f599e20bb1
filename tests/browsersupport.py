"""
Headless Chromium for the browser tests, driven by Selenium through Debian's
ChromeDriver (packages ``chromium`` and ``chromium-driver``; ``.ci/run``
installs them).

Without them a browser test is skipped, saying why, on a developer's
machine; with the environment variable ``CI`` set it fails instead, since a
CI run that silently tests no browser would prove nothing.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from tests.support import temp_dir

CHROMIUM = os.environ.get("HOOKAH_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("HOOKAH_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
# Flags this machine needs: no sandbox as root, and no background
# networking, which a closed network refuses many times a second.
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,1100",
)


def find(path: str, name: str) -> str:
    found = path if os.access(path, os.X_OK) else shutil.which(name)
    if not found:
        message = f"{name} is not installed (Debian packages chromium and chromium-driver); the browser tests need it"
        if os.environ.get("CI"):
            raise AssertionError(message + " (CI is set, so this is a failure, not a skip)")
        raise SkipTest(message)
    return found


def start_browser(testcase: TestCase) -> Any:
    """A headless Chromium with a fresh profile; its browser log is kept (``driver.get_log("browser")``)."""
    chromium = find(CHROMIUM, "chromium")
    chromedriver = find(CHROMEDRIVER, "chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = temp_dir(testcase, prefix="hookah-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(30)
    return driver
