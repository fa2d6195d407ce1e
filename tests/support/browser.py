"""Headless Chromium (Debian's `chromium` + `chromium-driver`) driven by selenium, for the playground's browser tests
and its screenshots. Viewport size, phone emulation and the colour scheme are set through the DevTools protocol, so
a screenshot is exactly the size asked for."""
from __future__ import annotations

import os
import shutil
import time

INSTALL = "sudo apt-get install -y chromium chromium-driver"


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    missing = [name for name in ("chromium", "chromedriver") if not shutil.which(name)]
    if missing:
        return f"{' and '.join(missing)} not found: install them with `{INSTALL}`"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[dev]'"
    return None


def start_chromium(width: int = 1280, height: int = 800):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", "--hide-scrollbars",
                "--force-color-profile=srgb", f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=shutil.which("chromedriver"), log_output=os.devnull)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_script_timeout(30)
    set_viewport(driver, width, height)
    return driver


def set_viewport(driver, width: int, height: int, mobile: bool = False, dark: bool | None = None) -> None:
    """Emulate a `width` x `height` CSS-pixel viewport (a phone's with `mobile`) and a colour scheme (None: light)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {
        "features": [{"name": "prefers-color-scheme", "value": "dark" if dark else "light"}]})


def wait_for(condition, timeout: float = 10.0, interval: float = 0.05, message: str = ""):
    """Poll `condition()` until it returns something truthy; returns it, or fails with `message`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s: {message}")
        time.sleep(interval)


def by_testid(driver, testid: str, many: bool = False):
    from selenium.webdriver.common.by import By

    css = f'[data-testid="{testid}"]'
    return driver.find_elements(By.CSS_SELECTOR, css) if many else driver.find_element(By.CSS_SELECTOR, css)


def console_errors(driver) -> list[str]:
    """The page's console errors since the last call (CSP violations and uncaught exceptions show up here)."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def open_playground(driver, url: str, model: str | None = "dummy:tiny") -> None:
    """Load the page afresh; with `model`, wait until its status strip shows that model (the server is ready)."""
    driver.get("about:blank")
    driver.get(url + "/")
    if model:
        wait_for(lambda: by_testid(driver, "status-model").text == model, timeout=30,
                 message=f"the status strip never showed {model!r}")


def fill(element, text: str) -> None:
    element.clear()
    element.send_keys(text)


def paste(element, text: str) -> None:
    """Put a long `text` in at once, as a paste does (typing 10,000 keys takes the browser half a minute)."""
    element.parent.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
                                  element, text)


def server_status(url: str, key: str | None = None) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(url + "/v1/status", headers=headers, timeout=5).json()
