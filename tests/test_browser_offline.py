"""The lab works offline and tells no third party who opened it: the browser asks only the lab's server.

Every page is opened from the nav while every request the page makes is recorded; a request to any
other host (a font host for the favicon, a CDN, telemetry) fails the test.
"""

from __future__ import annotations

from urllib.parse import urlparse

import pytest
from test_browser import PAGES, open_from_nav, wait_idle

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.heavy]  # its own server: CI's heavy stage

LOCAL_SCHEMES = {"data", "blob", "about", "chrome-extension"}


def test_no_page_asks_any_host_but_the_lab(page, base_url):
    lab_host = urlparse(base_url).netloc
    foreign: list[str] = []

    def record(request) -> None:
        url = urlparse(request.url)
        if url.scheme not in LOCAL_SCHEMES and url.netloc != lab_host:
            foreign.append(request.url)

    page.on("request", record)
    page.goto("/")
    wait_idle(page)
    for title in PAGES:
        open_from_nav(page, title)
    page.wait_for_timeout(500)  # late requests (favicon, fonts) of the last page
    assert not foreign, f"requests to other hosts: {sorted(set(foreign))[:10]}"
    icon = page.locator("link[rel~='icon']").first.get_attribute("href")
    assert icon and urlparse(icon).netloc in ("", lab_host), f"favicon from elsewhere: {icon}"
