"""
The status page in a real browser: headless Chromium, driven by Selenium,
signs in with the admin token, sees a topic and a failed delivery that this
test created, clicks Resend, and watches the delivery become delivered as
the target (now answering 200) receives it again.

Screenshots go to ``artifacts/status-page.png`` (after the resend) and
``artifacts/status-page-before.png``. Without Chromium and ChromeDriver
the test is skipped, saying why, or fails when ``CI`` is set
(``tests.browsersupport``).

Selenium's calls block, and the Hookah under test runs on this process's
reactor, so every browser step runs in a thread (``deferToThread``) while
the reactor goes on serving the browser.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any
from urllib.parse import quote

from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from hookah.model import DELIVERED, FAILED
from tests.browsersupport import start_browser
from tests.support import ROOT, http_client, listen_sink, poll, start_hookah

ARTIFACTS = os.path.join(ROOT, "artifacts")
ADMIN = "browser-admin-token"
PUBLISHER = "browser-publisher-token"


class StatusPageInBrowser(TestCase):
    timeout = 120

    def test_resend_a_failed_delivery(self) -> Any:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            sink.respond = lambda r: (500, {}, b"target down")
            service, base = await start_hookah(self, admin_tokens=(ADMIN,), publisher_tokens=(PUBLISHER,))
            client = http_client(self)
            auth = {"Authorization": f"Bearer {PUBLISHER}"}
            response = await client.post(base + "/dispatch?_topic=orders", data=b'{"order":1}', headers=auth)
            self.assertEqual(response.code, 202)
            response = await client.post(
                base + "/dispatch?_retries=0&_url=" + quote(sink_url + "/orders-hook", safe=""),
                data=b'{"order":2}',
                headers=dict(auth, **{"Content-Type": "application/json"}),
            )
            self.assertEqual(response.code, 202)
            delivery_id = (await response.json())["id"]
            await poll("the delivery to fail", lambda: service.store.get_delivery(delivery_id).addCallback(lambda d: d.status == FAILED), 30.0)

            driver = await deferToThread(start_browser, self)
            self.addCleanup(deferToThread, driver.quit)
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support import expected_conditions as EC
            from selenium.webdriver.support.ui import WebDriverWait

            def sign_in() -> str:
                driver.get(base + "/")
                field = driver.find_element(By.ID, "token")
                field.send_keys(ADMIN)
                field.submit()
                WebDriverWait(driver, 20).until(EC.presence_of_element_located((By.ID, "failed")))
                return driver.page_source

            page = await deferToThread(sign_in)
            self.assertIn("Failed deliveries", page)
            # The token itself never reaches the address bar or the cookie.
            self.assertNotIn(ADMIN, driver.current_url)
            self.assertNotIn(ADMIN, str(driver.get_cookies()))

            def failed_row() -> Any:
                return driver.find_element(By.CSS_SELECTOR, f'#failed tr[data-delivery="{delivery_id}"]')

            def before() -> Any:
                row = failed_row()
                topics = driver.find_element(By.ID, "topics").text
                driver.save_screenshot(os.path.join(ARTIFACTS, "status-page-before.png"))
                return row.find_element(By.CSS_SELECTOR, "[data-status]").text, row.text, topics

            os.makedirs(ARTIFACTS, exist_ok=True)
            status, row_text, topics = await deferToThread(before)
            self.assertEqual(status, "failed")
            self.assertIn(sink_url + "/orders-hook", row_text)
            self.assertIn("HTTP 500", row_text)
            self.assertIn("orders", topics)

            sink.respond = lambda r: (200, {}, b"ok")

            def resend() -> str:
                failed_row().find_element(By.CSS_SELECTOR, "form.resend button").click()
                WebDriverWait(driver, 30).until(
                    lambda d: failed_row().find_element(By.CSS_SELECTOR, "[data-status]").text == "delivered"
                )
                WebDriverWait(driver, 10).until(EC.text_to_be_present_in_element((By.ID, "notice"), "delivered"))
                driver.save_screenshot(os.path.join(ARTIFACTS, "status-page.png"))
                return driver.find_element(By.ID, "notice").text

            def row_after() -> str:
                return str(failed_row().text)

            notice = await deferToThread(resend)
            row_text = await deferToThread(row_after)
            self.assertIn("HTTP 200", row_text)
            self.assertIn(f"Delivery {delivery_id} delivered", notice)

            received = await sink.wait_for(2)
            self.assertEqual([r.path for r in received], ["/orders-hook", "/orders-hook"])
            self.assertEqual(received[1].body, b'{"order":2}')
            delivery = await service.store.get_delivery(delivery_id)
            self.assertEqual(delivery.status, DELIVERED)
            self.assertEqual([a.status_code for a in delivery.attempts], [500, 200])

            logs = await deferToThread(driver.get_log, "browser")
            # The sign-in page itself is a 401, which Chromium logs; anything
            # else severe (a script error, a CSP violation) is a bug.
            severe = [
                entry for entry in logs
                if entry.get("level") == "SEVERE" and not (entry.get("source") == "network" and "status of 401" in entry.get("message", ""))
            ]
            self.assertEqual(severe, [], "the page logged errors (a CSP violation?)")
            self.assertTrue(os.path.getsize(os.path.join(ARTIFACTS, "status-page.png")) > 10000)

        return ensureDeferred(go())


class MissingBrowser(TestCase):
    """The browser test, run with no browser to be found: skipped on a laptop, failed in CI."""

    def run_without_browser(self, ci: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "CI"}
        if ci:
            env["CI"] = ci
        env["HOOKAH_TEST_CHROMIUM"] = os.path.join(ROOT, "no-such-dir", "chromium")
        env["HOOKAH_TEST_CHROMEDRIVER"] = os.path.join(ROOT, "no-such-dir", "chromedriver")
        env["PATH"] = os.path.dirname(sys.executable)  # no chromium on it
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
             "tests/test_browser.py::StatusPageInBrowser"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )

    def test_skipped_outside_ci(self) -> None:
        result = self.run_without_browser(ci="")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("1 skipped", result.stdout)
        self.assertIn("chromium is not installed", result.stdout)

    def test_failed_in_ci(self) -> None:
        result = self.run_without_browser(ci="true")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("1 failed", result.stdout)
        self.assertIn("chromium is not installed", result.stdout)
        self.assertIn("a failure, not a skip", result.stdout)
