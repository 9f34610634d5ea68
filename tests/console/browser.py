"""Debian's Chromium driven by Selenium through Debian's chromedriver (both from apt; nothing is downloaded:
the driver's path is given, so Selenium Manager never runs). The browser's network and console logs are kept
(``goog:loggingPrefs``) so a test can check every URL the page requested."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
]


def available() -> bool:
    return Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()


@contextmanager
def chromium(download_dir: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="dama-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(download_dir), "download.prompt_for_download": False}
    )
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        # Headless Chromium saves downloads only where it is told to.
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


class NetworkLog:
    """Every request the browser made (from the performance log, which each read drains): its URL and headers,
    and which ones the page's Content-Security-Policy blocked before they were sent."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.requests: dict[str, dict[str, Any]] = {}
        self.blocked: set[str] = set()
        self.console: list[dict[str, Any]] = []

    def collect(self) -> None:
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            params = message.get("params", {})
            if message.get("method") == "Network.requestWillBeSent":
                self.requests[params["requestId"]] = params["request"]
            elif message.get("method") == "Network.webSocketCreated":
                self.requests[params["requestId"]] = {"url": params["url"], "headers": {}}
            elif message.get("method") == "Network.loadingFailed" and params.get("blockedReason"):
                self.blocked.add(params["requestId"])
        self.console.extend(self.driver.get_log("browser"))

    @property
    def urls(self) -> list[str]:
        return [request["url"] for request in self.requests.values()]

    def sent_off_host(self, allowed: set[str]) -> list[str]:
        """URLs of requests that went out to a host not in ``allowed`` (blob: and data: URLs never leave the page;
        a request the CSP blocked was never sent)."""
        return [
            request["url"]
            for request_id, request in self.requests.items()
            if request_id not in self.blocked
            and urlsplit(request["url"]).scheme in ("http", "https", "ws", "wss")
            and urlsplit(request["url"]).hostname not in allowed
        ]
