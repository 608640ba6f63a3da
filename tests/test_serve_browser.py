"""The service's web page and its API docs in a real headless browser (Debian's chromium +
chromedriver via Selenium), one server (with an API key) and one browser for the module:
the page asks for the key and lists the classes on load and as the key is typed; it
classifies, adds a class and classifies with it; with many 60-character labels it is no
wider than the window at 1280 and 390 px; /docs renders Swagger UI's operations with no
request to another host. Screenshots go to $ICLCLS_SCREENSHOTS (or a temporary folder)."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from test_serve import BASE, NEW, PER_CLASS, Server, banking, base_state  # noqa: F401  (fixtures)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
KEY = "page-test-key"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="Debian's chromium and chromium-driver are not installed (scripts/install.sh installs them as root)",
    ),
]


@pytest.fixture(scope="module")
def srv(base_state, tmp_path_factory):
    state = tmp_path_factory.mktemp("browser") / "state"
    shutil.copytree(base_state, state)
    server = Server(state, "--api-key-env", "ICLCLS_PAGE_KEY", env={"ICLCLS_PAGE_KEY": KEY})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the dev extra) is not installed")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the pages make
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    d = os.environ.get("ICLCLS_SCREENSHOTS")
    path = Path(d) if d else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _wait(browser, timeout: float = 60):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, ignored_exceptions=(StaleElementReferenceException,))


def _texts(browser, css: str) -> list[str]:  # read in one script call: the page may re-render meanwhile
    return browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.textContent)", css
    )


def _text(browser, element_id: str) -> str:
    return browser.execute_script("return document.getElementById(arguments[0]).textContent", element_id)


def _open_page(browser, srv, key: str | None = KEY) -> None:
    """The page, with ``key`` already in the tab's storage (as if typed earlier)."""
    browser.get(srv.url + "/")
    browser.execute_script(
        "arguments[0] === null ? sessionStorage.removeItem('iclcls-key') : sessionStorage.setItem('iclcls-key', arguments[0])",
        key,
    )
    browser.refresh()


def _listed(srv) -> dict[str, int]:
    r = httpx.get(srv.url + "/v1/classes", headers={"Authorization": f"Bearer {KEY}"})
    r.raise_for_status()
    return {c["label"]: c["examples"] for c in r.json()["classes"]}


def test_page_asks_for_the_key_and_lists_the_classes_on_load(browser, srv):
    from selenium.webdriver.common.by import By

    wait = _wait(browser)
    n = len(_listed(srv))
    _open_page(browser, srv, key=None)
    wait.until(lambda d: "401" in _text(d, "classes-status"))  # asked on load, with no key: a clear message
    assert "API key" in _text(browser, "classes-status") and _texts(browser, "#classes li") == []

    key = browser.find_element(By.ID, "api-key")
    key.send_keys("not-the-key")  # typing alone (no Enter, no blur) lists again
    wait.until(lambda d: "403" in _text(d, "classes-status"))
    assert "refused" in _text(browser, "classes-status")
    key.clear()
    key.send_keys(KEY)
    wait.until(lambda d: len(_texts(d, "#classes li")) == n)
    assert _text(browser, "class-count") == f"({n})" and _text(browser, "classes-status") == ""

    browser.refresh()  # the key stays for the tab: on load the list shows without any addition
    wait.until(lambda d: len(_texts(d, "#classes li")) == n)
    assert browser.find_element(By.ID, "classes").is_displayed()
    assert set(_texts(browser, "#classes li")) == {f"{c} ({k})" for c, k in _listed(srv).items()}


def test_page_classifies_adds_a_class_and_classifies_with_it(browser, srv, banking):
    from selenium.webdriver.common.by import By

    train, _ = banking
    wait = _wait(browser, 120)
    n = len(_listed(srv))
    _open_page(browser, srv)
    wait.until(lambda d: len(_texts(d, "#classes li")) == n)

    def classify(text: str) -> tuple[list[str], str]:
        box = browser.find_element(By.ID, "texts")
        box.clear()
        box.send_keys(text)
        browser.find_element(By.ID, "classify").click()
        wait.until(lambda d: _texts(d, ".prediction .text") == [text])
        return _texts(browser, ".prediction ol.labels .label"), _texts(browser, ".prediction summary")[0]

    labels, summary = classify("my new card has still not arrived")
    assert labels[0] == "card_arrival" and len(labels) == 5
    assert "no demonstrations" in summary  # the retriever ranked alone: the page says so
    assert "classified in" in _text(browser, "classify-status")

    new = NEW[0]
    browser.find_element(By.ID, "new-label").send_keys(new)
    browser.find_element(By.ID, "new-description").send_keys("closing the account")
    browser.find_element(By.ID, "new-examples").send_keys("\n".join(train[new][:10]))
    browser.find_element(By.ID, "add-class").click()
    wait.until(lambda d: "added 10 examples" in _text(d, "add-status"))
    assert f"{new} ({n + 1} classes)" in _text(browser, "add-status")
    wait.until(lambda d: len(_texts(d, "#classes li")) == n + 1)
    assert f"{new} (10)" in _texts(browser, "#classes li")

    labels, _ = classify("please close my account, I am leaving")
    assert labels[0] == new

    browser.find_element(By.ID, "texts").clear()
    browser.find_element(By.ID, "classify").click()
    wait.until(lambda d: "type a text first" in _text(d, "classify-status"))


def _screenshot(browser, path: Path) -> None:
    """The whole page (not only the viewport)."""
    w, h = browser.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
    )
    shot = browser.execute_cdp_cmd(
        "Page.captureScreenshot",
        {"format": "png", "captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}},
    )
    path.write_bytes(base64.b64decode(shot["data"]))


def test_page_fits_the_window_with_many_long_labels(browser, srv, shots):
    from selenium.webdriver.common.by import By

    # 40 classes whose labels are 60 characters with no space to break at
    long = [(f"class_{i:02d}_" + "wire_transfer_reversal_dispute_" * 2)[:60] for i in range(40)]
    assert all(len(lab) == 60 for lab in long)
    body = {"examples": [{"text": f"question number {i} about a disputed wire transfer reversal", "label": lab}
                         for i, lab in enumerate(long)]}
    r = httpx.post(srv.url + "/v1/classes", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert r.status_code == 200, r.text
    n = len(_listed(srv))
    wait = _wait(browser)
    unbroken = "x" * 150
    try:
        for width, height in ((1280, 900), (390, 844)):
            browser.execute_cdp_cmd(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            )
            _open_page(browser, srv)
            wait.until(lambda d: len(_texts(d, "#classes li")) == n)  # listed on load, no addition
            assert browser.execute_script("return window.innerWidth") == width

            def fits() -> tuple[int, int]:
                # clientWidth: the window less a vertical scrollbar, so even a sliver of overflow counts
                sw, cw, iw = browser.execute_script(
                    "const e = document.documentElement; return [e.scrollWidth, e.clientWidth, window.innerWidth]")
                assert cw <= iw
                return sw, cw

            sw, iw = fits()
            assert sw <= iw, f"{width} px: the page is {sw} px wide once the classes are listed"
            right = browser.execute_script(
                "return Math.max(...Array.from(document.querySelectorAll('#classes li'))"
                ".map(e => e.getBoundingClientRect().right))")
            assert right <= width

            # ranked long labels, a long unbroken text and the candidates line fit too
            box = browser.find_element(By.ID, "texts")
            box.clear()
            box.send_keys("question number 7 about a disputed wire transfer reversal\n" + unbroken)
            browser.find_element(By.ID, "classify").click()
            wait.until(lambda d: len(_texts(d, ".prediction")) == 2)
            assert _texts(browser, ".prediction ol.labels .label")[0] == long[7]
            sw, iw = fits()
            assert sw <= iw, f"{width} px: the page is {sw} px wide with the predictions shown"
            _screenshot(browser, shots / f"page-{width}.png")
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def _requested_urls(browser) -> list[str]:
    """URLs the browser requested since the last call (chromedriver's performance log)."""
    urls = []
    for entry in browser.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def _not_local(urls: list[str]) -> list[str]:
    return [u for u in urls if urlsplit(u).scheme not in ("data", "blob", "about", "")
            and urlsplit(u).hostname not in LOCAL_HOSTS]


def test_docs_render_offline(browser, srv, shots):
    from selenium.webdriver.common.by import By

    wait = _wait(browser)
    _requested_urls(browser)  # drop what earlier tests logged
    _open_page(browser, srv)
    browser.get(srv.url + "/docs")
    post = '.opblock-post .opblock-summary-path[data-path="/v1/classify"]'
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, post))  # Swagger UI read the OpenAPI 3.1 document
    paths = set(_texts(browser, ".opblock-summary-path"))
    assert {"/v1/classify", "/v1/classes"} <= {p.replace("\u200b", "") for p in paths}
    assert not _texts(browser, ".errors-wrapper"), _texts(browser, ".errors-wrapper")
    _screenshot(browser, shots / "docs-1280.png")

    # every asset the docs name, favicon included, is on this server and is served
    assets = browser.execute_script(
        "return Array.from(document.querySelectorAll('script[src], link[href], img[src]')).map(e => e.src || e.href)"
    )
    assert any(a.endswith("/static/docs/swagger-ui-bundle.js") for a in assets)
    icons = browser.execute_script("return Array.from(document.querySelectorAll('link[rel~=icon]')).map(e => e.href)")
    assert icons and not _not_local(icons)
    for icon in icons:
        assert httpx.get(icon).status_code == 200

    performed = browser.execute_script("return performance.getEntries().map(e => e.name)")
    logged = _requested_urls(browser)
    assert any(u.endswith("/openapi.json") for u in logged)  # the log does see the page's requests
    outside = _not_local(assets + performed + logged)
    assert not outside, f"requests to other hosts: {outside}"
