"""A local headless Chromium (through playwright) for screenshots, with the network blocked.

Never downloads a browser: it uses the ``chromium`` executable on the PATH.
"""

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tlprisms._core.errors import PrismError

__all__ = ["CHROMIUM_ARGS", "chromium_executable", "open_page", "wait_rendered", "screenshot"]

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

#: JavaScript: true once every CircuitsVis mount has rendered children and every canvas
#: has been given a size
RENDERED_JS = """() => {
  const mounts = [...document.querySelectorAll('.tlprisms-cv-mount')];
  if (!mounts.every(m => m.firstElementChild)) return false;
  return [...document.querySelectorAll('canvas')].every(c => c.width > 0 && c.height > 0);
}"""


def chromium_executable() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    raise PrismError(
        "save_png: no chromium executable on the PATH; install one (e.g. "
        "`apt-get install chromium`) or save HTML with Report.save instead."
    )


@contextmanager
def open_page(*, width: int = 1200, height: int = 900) -> Iterator[tuple[Any, dict]]:
    """A fresh page whose every request except ``file://`` pages is aborted and recorded.

    Yields ``(page, log)`` with ``log = {"requests": [...], "errors": [...],
    "console": [...]}`` (blocked URLs, page errors, console error messages).
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        raise PrismError(
            "save_png: needs the playwright Python package "
            "(`pip install playwright`; no `playwright install` needed when a "
            "chromium executable is on the PATH)."
        ) from e
    exe = chromium_executable()
    log: dict = {"requests": [], "errors": [], "console": []}
    with (
        tempfile.TemporaryDirectory(prefix="tlprisms-chromium-") as profile,
        sync_playwright() as pw,
    ):
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=exe,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height},
            service_workers="block",
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()

            def route(r: Any) -> None:
                url = r.request.url
                if url.startswith("file://") and r.request.resource_type == "document":
                    r.continue_()
                else:
                    log["requests"].append(url)
                    r.abort()

            context.route("**/*", route)
            page.on("pageerror", lambda e: log["errors"].append(str(e)))
            page.on(
                "console", lambda m: log["console"].append(m.text) if m.type == "error" else None
            )
            yield page, log
        finally:
            context.close()


def wait_rendered(page: Any, timeout_ms: int = 20000) -> None:
    page.wait_for_function(RENDERED_JS, timeout=timeout_ms)
    page.wait_for_timeout(300)  # chart.js draws on the next animation frames


def screenshot(html: str, path: Path, *, width: int = 1200) -> Path:
    """Render ``html`` (a whole page) from a temporary file and save a full-page PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tlprisms-page-") as tmp:
        page_file = Path(tmp) / "page.html"
        page_file.write_text(html, encoding="utf-8")
        with open_page(width=width) as (page, log):
            page.goto(page_file.as_uri())
            wait_rendered(page)
            if log["errors"]:
                raise PrismError(f"save_png: the page raised {log['errors'][:3]}")
            # grow the viewport to the whole page first: a full-page capture that has to
            # resize the viewport itself makes chart.js re-layout mid-capture (the zoomed
            # attention map collapses)
            height = page.evaluate("() => document.documentElement.scrollHeight")
            page.set_viewport_size({"width": width, "height": int(height)})
            wait_rendered(page)
            page.screenshot(path=str(path), full_page=True)
    return path
