"""A plain `dvc plots show` page renders offline, checked in headless Chromium.

The throw-away project gets the repo's `plots.html_template` setting and the template it
names (built by `make setup` with vega, vega-lite and vega-embed inlined; README: Plots
offline), runs the tiny pipeline and a plain `dvc plots show`, and the page is opened from its
file:// URL with host name resolution switched off. Every vega plot that dvc.yaml defines
must draw, every image must load, no request may leave file:// and the console must stay
free of errors. The screenshot is kept in tests/artifacts/plots.png.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`): no
debugging port, no extra Python package. Without a `chromium` executable the test skips,
or fails under CI=true (`make test` installs it with apt-get when run as root).
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, dvc, make_project, tiny_params

ARTIFACT = ROOT / "tests" / "artifacts" / "plots.png"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".gif", ".svg"}  # dvc-render's ImageRenderer
RENDER_TIMEOUT_S = 30.0

# The page's state, given the ids of its vega plot divs: whether vega drew in each, and each
# image. vega-embed replaces a div's content, so the divs are found from the page's source.
# Vega's output is the `.marks` element: a canvas counts as drawn when a pixel is not
# transparent (its background is), an svg when it holds shapes or text.
PAGE_STATE_JS = """
((ids) => {
  const drawn = (div) => {
    const marks = div && div.querySelector(".marks");
    if (!marks) return false;
    if (marks.tagName.toLowerCase() === "svg") {
      return marks.querySelector("path, rect, line, text") !== null;
    }
    if (!marks.width || !marks.height) return false;
    const pixels = marks.getContext("2d").getImageData(0, 0, marks.width, marks.height).data;
    for (let i = 3; i < pixels.length; i += 4) if (pixels[i] !== 0) return true;
    return false;
  };
  return {
    plots: ids.map((id) => ({id, drawn: drawn(document.getElementById(id))})),
    images: [...document.images].map((img) => ({
      src: img.getAttribute("src"), complete: img.complete, width: img.naturalWidth})),
  };
})
"""
VEGA_EMBED_CALL = re.compile(r"vegaEmbed\('#([^']+)'")


def chromium_or_skip() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    message = (
        "no chromium executable: apt-get install chromium (`make test` does it when run as root)"
    )
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true: {message}")
    pytest.skip(message)


def use_repo_html_template(project: Path) -> None:
    """Give ``project`` the repo's plots.html_template setting, verbatim, and its template.

    DVC resolves a relative setting from .dvc/, so the built template is copied to the same
    place relative to the project's .dvc/.
    """
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    assert config.has_option("plots", "html_template"), ".dvc/config: no plots.html_template"
    setting = config["plots"]["html_template"]
    template = (ROOT / ".dvc" / setting).resolve()
    assert template.is_file(), f"{template}: missing; run `make setup` (npm ci + build.py)"
    copy = (project / ".dvc" / setting).resolve()
    if copy != template:  # an absolute setting names the same file for both
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(template, copy)
    dvc("config", "plots.html_template", setting, cwd=project)


def expected_plots(dvc_yaml: Path) -> tuple[int, int]:
    """(vega plots, image plots) that dvc.yaml defines, top-level and stage-level."""
    spec = yaml.safe_load(dvc_yaml.read_text())
    entries = list(spec.get("plots", []))
    for stage in spec["stages"].values():
        entries += stage.get("plots", [])
    names = [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]
    images = sum(Path(name).suffix.lower() in IMAGE_EXTENSIONS for name in names)
    return len(names) - images, images


def _fd_above_9(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class Chromium:
    """Headless Chromium over the DevTools protocol on --remote-debugging-pipe.

    Chromium reads commands from its fd 3 and writes replies and events to its fd 4, one JSON
    message per NUL-terminated chunk. Events that arrive while waiting are kept in `events`.
    """

    def __init__(self, executable: str, profile: Path):
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()
        # the child's ends above fd 9, so moving them onto fds 3 and 4 cannot clobber either
        commands_read, replies_write = (_fd_above_9(fd) for fd in (commands_read, replies_write))
        profile.mkdir(parents=True, exist_ok=True)
        self.log = profile / "chromium.log"
        flags = [
            "--headless",
            "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-extensions",
            "--disable-sync",
            # every host name fails to resolve: the page must not need the network
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--window-size=1280,900",
            "--hide-scrollbars",
        ]
        # bash moves them onto fds 3 and 4 (dash's redirections stop at fd 9)
        remap = (
            f'exec "$@" 3<&{commands_read} 4>&{replies_write} {commands_read}<&- {replies_write}>&-'
        )
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                ["bash", "-c", remap, "bash", executable, *flags],
                pass_fds=(commands_read, replies_write),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        os.close(commands_read)
        os.close(replies_write)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from chromium in time")
            if select.select([self._replies], [], [], left)[0]:
                chunk = os.read(self._replies, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited; its log:\n{self.log.read_text()[-3000:]}")
                self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def send(
        self,
        method: str,
        params: dict | None = None,
        *,
        session: str | None = None,
        timeout: float = 30.0,
    ) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._commands, data) :]
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") != self._next_id:
                self.events.append(reply)
            elif "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            else:
                return reply["result"]

    def wait_for_event(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method:
                    return event
            seen = len(self.events)
            self.events.append(self._receive(deadline))

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(RuntimeError, TimeoutError, OSError):
                self.send("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._commands)
        os.close(self._replies)


def console_errors(events: list[dict]) -> list[str]:
    """Uncaught exceptions, console.error/assert calls and browser log errors (failed loads)."""
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            errors.append(details.get("exception", {}).get("description") or details["text"])
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            errors.append(
                " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
            )
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            errors.append(f"{params['entry']['text']} {params['entry'].get('url', '')}")
    return errors


def render_page(
    executable: str, page: Path, plot_ids: list[str], profile: Path, screenshot: Path
) -> tuple[dict, list[dict]]:
    """Open ``page`` in headless Chromium, wait until its plots drew; (page state, events)."""
    browser = Chromium(executable, profile)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Page.navigate", {"url": page.as_uri()}, session=session)
        browser.wait_for_event("Page.loadEventFired")
        deadline = time.monotonic() + RENDER_TIMEOUT_S
        while True:  # vegaEmbed renders asynchronously after the load event
            evaluated = browser.send(
                "Runtime.evaluate",
                {"expression": f"({PAGE_STATE_JS})({json.dumps(plot_ids)})", "returnByValue": True},
                session=session,
            )
            if "exceptionDetails" in evaluated:
                raise RuntimeError(f"page state: {evaluated['exceptionDetails']}")
            state = evaluated["result"]["value"]
            done = all(p["drawn"] for p in state["plots"]) and all(
                i["complete"] for i in state["images"]
            )
            if done or console_errors(browser.events) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        size = browser.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        shot = browser.send(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {
                    "x": 0,
                    "y": 0,
                    "width": size["width"],
                    "height": size["height"],
                    "scale": 1,
                },
            },
            session=session,
        )
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        return state, browser.events
    finally:
        browser.close()


def test_plain_plots_show_renders_offline(tiny_folder, tmp_path):
    executable = chromium_or_skip()  # before the pipeline runs, so a skip is immediate
    repo = make_project(
        tmp_path / "proj", tiny_params(tiny_folder, model="mlp", train={"epochs": 2})
    )
    use_repo_html_template(repo)
    dvc("repro", cwd=repo)
    dvc("plots", "show", cwd=repo)  # plain: the default output, dvc_plots/index.html
    page = repo / "dvc_plots" / "index.html"
    html = page.read_text()
    assert "<script src" not in html, f"{page}: loads a script from elsewhere"
    plot_ids = VEGA_EMBED_CALL.findall(html)
    vega_plots, image_plots = expected_plots(repo / "dvc.yaml")
    assert len(plot_ids) == vega_plots, plot_ids

    state, events = render_page(executable, page, plot_ids, tmp_path / "chromium", ARTIFACT)
    print(f"screenshot: {ARTIFACT}")

    assert console_errors(events) == []
    requests = [
        e["params"]["request"]["url"]
        for e in events
        if e.get("method") == "Network.requestWillBeSent"
    ]
    assert [u for u in requests if not u.startswith(("file:", "data:", "about:"))] == []
    assert [p["id"] for p in state["plots"] if not p["drawn"]] == [], "vega plots not drawn"
    assert len(state["images"]) == image_plots, state["images"]
    assert [i["src"] for i in state["images"] if not i["width"]] == [], "images not loaded"
