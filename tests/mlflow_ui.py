"""Drive the real MLflow web UI in headless Chromium, as a person would, to move a registered-model alias.

Selectors were read off MLflow 3.17's model version page: the "Aliases" row of its descriptions list holds an
"Add aliases"/"Edit aliases" button and one tag per alias (``title`` = the alias); the modal is an antd dialog with a
tags-mode select and a button whose ``data-component-id`` is ``mlflow.edit-aliases-modal.save-button``.
"""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn, TypeVar
from urllib.parse import quote

from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

T = TypeVar("T")

ALIASES_ROW = (
    "//div[@data-testid='descriptions-item']"
    "[.//div[@data-testid='descriptions-item-label'][normalize-space()='Aliases']]"
)
EDIT_BUTTON = "button[title='Edit aliases'], button[title='Add aliases']"
DIALOG = "//div[@role='dialog'][.//button[@data-component-id='mlflow.edit-aliases-modal.save-button']]"
SAVE_BUTTON = "button[data-component-id='mlflow.edit-aliases-modal.save-button']"
ERROR_ALERT = "[data-component-id='mlflow.edit-aliases-modal.error-alert']"


@contextlib.contextmanager
def chromium(username: str, password: str) -> Iterator[WebDriver]:
    """Headless Chromium (Debian's chromium + chromedriver) that sends HTTP basic-auth credentials on every request.

    The header is injected through the DevTools protocol because credentials in the URL are not applied to the
    UI's fetch() calls to /ajax-api/, which MLflow's basic-auth app would then refuse.
    """
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    # --no-sandbox: CI runs as root; --disable-dev-shm-usage: containers have a tiny /dev/shm.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)
    try:
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})
        yield driver
    finally:
        driver.quit()


def _alias_tag(alias: str) -> str:
    """CSS selector of the tag MLflow renders for `alias` (aliases are word characters and dashes, no quotes)."""
    return f"[data-component-type='tag'][title='{alias}']"


def add_alias_in_ui(
    driver: WebDriver,
    tracking_uri: str,
    model: str,
    version: int | str,
    alias: str,
    screenshot: Path,
    timeout_s: float = 60,
) -> float:
    """Open the version page, edit aliases, add `alias`, click Save aliases; wait until the page shows the alias on the
    version; save a screenshot of the page after saving; return time.time() at the moment Save was clicked.

    If the alias is on another version, MLflow's UI moves it (it warns in the modal, then saves). A refused save
    (no MANAGE permission: MLflow 3.17's modal then shows just "INTERNAL_ERROR"), a version that already has the
    alias, or a step that times out raises AssertionError, with a screenshot `<stem>-failed.png` next to `screenshot`.
    """
    wait = WebDriverWait(driver, timeout_s, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))

    def fail(message: str) -> NoReturn:
        """Keep a screenshot of the failing moment next to the requested one and say what failed."""
        failed = screenshot.with_name(f"{screenshot.stem}-failed{screenshot.suffix or '.png'}")
        failed.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(failed))
        raise AssertionError(
            f"MLflow UI, {model!r} version {version}, alias {alias!r}: {message}; screenshot: {failed}"
        )

    def step(name: str, condition: Callable[[WebDriver], T]) -> T:
        """Wait for `condition` (re-finding elements each poll, since React re-renders them)."""
        try:
            return wait.until(condition)
        except TimeoutException:
            fail(f"timed out after {timeout_s:g}s waiting for {name}")

    def visible(d: WebDriver, by: str, selector: str) -> list[WebElement]:
        return [e for e in d.find_elements(by, selector) if e.is_displayed()]

    def in_dialog(d: WebDriver, selector: str) -> list[WebElement]:
        return [e for dialog in visible(d, By.XPATH, DIALOG) for e in dialog.find_elements(By.CSS_SELECTOR, selector)]

    driver.get(f"{tracking_uri.rstrip('/')}/#/models/{quote(model, safe='')}/versions/{quote(str(version), safe='')}")
    buttons = step(
        "the version page's 'Aliases' row with its Add/Edit button",
        lambda d: visible(d.find_element(By.XPATH, ALIASES_ROW), By.CSS_SELECTOR, EDIT_BUTTON),
    )
    if driver.find_element(By.XPATH, ALIASES_ROW).find_elements(By.CSS_SELECTOR, _alias_tag(alias)):
        # Nothing to save (the button stays disabled), and Enter on a selected option would remove the alias.
        fail("the version already has this alias")
    buttons[0].click()
    box = step("the alias input of the 'Add/Edit alias' modal", lambda d: in_dialog(d, "input[role='combobox']"))[0]
    box.send_keys(alias)
    box.send_keys(Keys.ENTER)
    step(f"the modal to list {alias!r} among the draft aliases", lambda d: in_dialog(d, _alias_tag(alias)))
    save = step(
        "an enabled 'Save aliases' button",
        lambda d: [b for b in in_dialog(d, SAVE_BUTTON) if b.is_displayed() and b.is_enabled()],
    )[0]
    clicked_at = time.time()
    save.click()

    def outcome(d: WebDriver) -> str:
        """'refused: <alert>' when the modal shows an error, 'saved' when it closed and the page shows the alias."""
        if errors := [e.text for e in in_dialog(d, ERROR_ALERT) if e.is_displayed()]:
            return f"refused: {errors[0]}"
        row = d.find_element(By.XPATH, ALIASES_ROW)
        saved = not visible(d, By.XPATH, DIALOG) and row.find_elements(By.CSS_SELECTOR, _alias_tag(alias))
        return "saved" if saved else ""

    result = step(f"the modal to close and the version page to show {alias!r}", outcome)
    if result != "saved":
        fail(f"the UI did not save the alias, it {result}")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(screenshot))
    return clicked_at
