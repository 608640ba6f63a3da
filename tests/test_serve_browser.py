"""The service's web page in a real headless browser (Debian's chromium + chromedriver via
Selenium): load the page, classify a text, add a class from example lines, classify a text
of the new class, and check what the page shows."""

from __future__ import annotations

import shutil

import pytest

from test_serve import BASE, NEW, PER_CLASS, Server, banking, base_state  # noqa: F401  (fixtures)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="Debian's chromium and chromium-driver are not installed (scripts/install.sh installs them as root)",
    ),
]


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the dev extra) is not installed")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_page_classifies_adds_a_class_and_classifies_with_it(browser, base_state, banking, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    train, _ = banking
    state = tmp_path / "state"
    shutil.copytree(base_state, state)
    srv = Server(state)
    try:
        wait = WebDriverWait(browser, 120, ignored_exceptions=(StaleElementReferenceException,))

        def texts(css: str) -> list[str]:  # read in one script call: the page may re-render meanwhile
            return browser.execute_script(
                "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.textContent)", css
            )

        def status(element_id: str) -> str:
            return browser.find_element(By.ID, element_id).text

        browser.get(srv.url + "/")
        wait.until(lambda d: len(texts("#classes li")) == len(BASE))
        assert status("class-count") == f"({len(BASE)})"

        def classify(text: str) -> tuple[list[str], str]:
            box = browser.find_element(By.ID, "texts")
            box.clear()
            box.send_keys(text)
            browser.find_element(By.ID, "classify").click()
            wait.until(lambda d: texts(".prediction .text") == [text])
            return texts(".prediction ol.labels .label"), texts(".prediction summary")[0]

        labels, summary = classify("my new card has still not arrived")
        assert labels[0] == "card_arrival" and len(labels) == 5
        assert "no demonstrations" in summary  # the retriever ranked alone: the page says so
        assert "classified in" in status("classify-status")

        new = NEW[0]
        browser.find_element(By.ID, "new-label").send_keys(new)
        browser.find_element(By.ID, "new-description").send_keys("closing the account")
        browser.find_element(By.ID, "new-examples").send_keys("\n".join(train[new][:10]))
        browser.find_element(By.ID, "add-class").click()
        wait.until(lambda d: "added 10 examples" in status("add-status"))
        assert f"{new} ({len(BASE) + 1} classes)" in status("add-status")
        wait.until(lambda d: len(texts("#classes li")) == len(BASE) + 1)
        assert f"{new} (10)" in texts("#classes li")

        labels, _ = classify("please close my account, I am leaving")
        assert labels[0] == new

        browser.find_element(By.ID, "texts").clear()
        browser.find_element(By.ID, "classify").click()
        wait.until(lambda d: "type a text first" in status("classify-status"))
    finally:
        srv.stop()
