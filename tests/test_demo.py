"""``vlm-demo`` as a user runs it: the console script serving the shared trained run's checkpoint
(``trained_run`` in conftest), driven by headless Chromium. The browser is Debian's
(``make setup-browser``): Playwright's own download needs a network."""

import os
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image
from runs import BIN, cli, shapesworld_root

CHROMIUM = Path("/usr/bin/chromium")
QUESTION = "How many shapes are there?"
# Before the click: record the reply box's text at every change of its block, and when its
# status tracker, shown once the event starts, hides again (the stream has ended).
WATCH = """() => {
  const block = document.querySelector('#reply');
  Object.assign(window, {seen: [], started: false, done: false});
  new MutationObserver(() => {
    const busy = !block.querySelector('[data-testid=status-tracker]').classList.contains('hide');
    window.started ||= busy;
    window.done = window.started && !busy;
    window.seen.push(block.querySelector('textarea').value);
  }).observe(block, {subtree: true, attributes: true, childList: true, characterData: true});
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(ckpt: Path, cwd: Path, timeout: float = 90) -> Iterator[str]:
    """``vlm-demo`` on a free local port until the block ends; its URL once it answers HTTP."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    log = cwd / "demo.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [str(BIN / "vlm-demo"), f"ckpt={ckpt}", f"port={port}"],
            cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert server.poll() is None, f"vlm-demo exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"vlm-demo did not answer in {timeout} s: {log.read_text()}"
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_the_page_streams_the_reply_vlm_predict_prints(trained_run, shapesworld, tmp_path):
    """Upload a ShapesWorld test image, ask, wait for the stream to end: the page shows what
    ``vlm-predict`` prints for the same image and question, having shown only its prefixes."""
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium not installed: make setup-browser")
    from playwright.sync_api import sync_playwright

    ckpt = trained_run[0] / "checkpoints" / "last.ckpt"
    image = shapesworld_root(shapesworld) / "images" / "test" / "test_000000.png"
    shot = tmp_path / "demo.png"
    predicted = cli("vlm-predict", [f"ckpt={ckpt}", f"image={image}", f"question={QUESTION}"], tmp_path, 120)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    (expected,) = re.findall(r"^A: (.*)$", predicted.stdout, flags=re.M)
    with serving(ckpt, tmp_path) as url:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM))
            page = browser.new_page(viewport={"width": 1100, "height": 560})
            page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(url) else r.abort())
            page.goto(url)
            page.locator("#image input[type=file]").set_input_files(image)
            page.locator("#question textarea").fill(QUESTION)
            page.evaluate(WATCH)
            page.locator("#ask").click()
            page.wait_for_function("window.done", timeout=30_000)
            shown, seen = page.locator("#reply textarea").input_value(), page.evaluate("window.seen")
            page.screenshot(path=shot)
            browser.close()
    assert shown == expected
    assert all(expected.startswith(text) for text in seen)
    assert shot.stat().st_size > 10_000 and Image.open(shot).size == (1100, 560)


@pytest.mark.slow  # load_for's one line is in make test through vlm-predict and vlm-chat
def test_a_missing_checkpoint_is_one_line_on_stderr(tmp_path):
    missing = tmp_path / "none.ckpt"
    proc = cli("vlm-demo", [f"ckpt={missing}"], tmp_path, timeout=120)
    assert proc.returncode != 0
    said = f"ConfigError: vlm-demo: checkpoint {missing} does not exist: give ckpt=<path.ckpt>"
    assert proc.stderr.strip().splitlines() == [f"{said} (make train writes one)"]
