"""A minimal W3C WebDriver client for chromedriver: enough to open pages, wait for them to render and take
screenshots, with no Python dependency beyond the standard library (Debian's chromium + chromium-driver)."""

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1600,1000",
]


def find_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or an AssertionError saying what to install."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromium-driver", driver)) if not path]
    assert not missing, (
        f"browser tests need {' and '.join(missing)}: apt-get install -y --no-install-recommends chromium chromium-driver "
        "(make test installs them: make system-packages)"
    )
    return chromium, driver


class Browser:
    """One headless Chromium session driven through chromedriver on a free 127.0.0.1 port."""

    def __init__(self, port: int, workdir: Path):
        chromium, driver = find_browser()
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=workdir)
        self.log = open(workdir / "chromedriver.log", "w")
        self.driver = subprocess.Popen([driver, f"--port={port}", "--allowed-ips=127.0.0.1"],
                                       stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if self._call("GET", "/status")["value"]["ready"]:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline and self.driver.poll() is None, "chromedriver did not start"
            time.sleep(0.2)
        options = {"binary": chromium, "args": [*CHROMIUM_FLAGS, f"--user-data-dir={self.profile}"]}
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        self.session = self._call("POST", "/session", caps)["value"]["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise AssertionError(f"webdriver {method} {path}: {error.read().decode()[:2000]}") from None

    def _session(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)["value"]

    def get(self, url: str) -> None:
        self._session("POST", "/url", {"url": url})

    def script(self, source: str, *args):
        """Runs `source` as a function body in the page; returns its JSON-able result."""
        return self._session("POST", "/execute/sync", {"script": source, "args": list(args)})

    def text(self) -> str:
        return self.script("return document.body ? document.body.innerText : '';")

    def wait_for(self, predicate, what: str, timeout: float = 60.0):
        """Polls `predicate(self)` until truthy; fails with the page's text when it never is."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; page text:\n{self.text()[:3000]}")
            time.sleep(0.5)

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self._session("GET", "/screenshot")))
        return path

    def close(self) -> None:
        try:
            self._call("DELETE", f"/session/{self.session}")
        finally:
            self.driver.terminate()
            try:
                self.driver.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.driver.kill()
                self.driver.wait()
            self.log.close()
            shutil.rmtree(self.profile, ignore_errors=True)
