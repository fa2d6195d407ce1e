"""Screenshots of the playground, for the README and reviews: every tab at desktop (1280x800) and phone (390x844)
width, chat also in dark mode and with a JSON schema, against a real `loom serve --model default --embedding-model
default` (started here unless --url is given; without an embedding model the Embeddings tab is left out).

    python -m tools.screenshots [--url http://127.0.0.1:8000] [--out docs/screenshots]

The PNGs are palette-quantized (Pillow, when installed) so they stay small enough to commit."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.support.browser import by_testid, fill, open_playground, set_viewport, start_chromium, wait_for
from tests.support.servers import free_port, stop

ROOT = Path(__file__).resolve().parents[1]
DESKTOP, PHONE = (1280, 800), (390, 844)
CHAT_PROMPT = "Write a Python function that reverses a string, with a one-line explanation."
DOCUMENT = (
    "The Jacquard loom, shown in Lyon in 1804, wove patterns from a chain of punched cards: each card held one row "
    "of the design, and a hole let a hook lift its warp thread while a blank left it down. Before it, a draw boy "
    "sat on top of the loom and lifted the threads by hand, row after row, and complex silks took months. With the "
    "cards a single weaver could produce brocade and damask many times faster, and a pattern could be stored, "
    "copied and woven again without mistakes. Weavers in Lyon at first attacked the machines, fearing for their "
    "work, yet within a decade thousands were in use across France. Charles Babbage later borrowed the idea of "
    "punched cards for his Analytical Engine, and Herman Hollerith used them to tabulate the 1890 United States "
    "census, which is why the loom is often called an ancestor of the computer.")
CLASSIFY_TEXT = "The app crashes every time I press Pay, and support has not answered my emails for three days."
CLASSIFY_LABELS = ["bug report", "billing question", "praise", "feature request"]
SCHEMA_PROMPT = "Describe the weather in Lyon today."
SCHEMA = """{
  "type": "object",
  "properties": {
    "city": {"type": "string"},
    "temperature_c": {
      "type": "integer",
      "minimum": -30, "maximum": 45},
    "sky": {"enum": ["sunny", "cloudy",
                     "rainy", "snowy"]}
  },
  "required": ["city", "temperature_c", "sky"]
}"""
EMBED_TEXTS = ["The weaver threads the warp onto the loom.", "A loom interlaces warp and weft into cloth.",
               "Punched cards stored the pattern of each row.", "The stock market closed higher on Friday.",
               "Shares rallied as investors cheered the earnings."]
RERANK_QUERY = "How did looms store their patterns?"
RERANK_DOCUMENTS = ["Jacquard's loom read each row of the design from a punched card.",
                    "Silk worms spin their cocoons from a single thread.",
                    "Herman Hollerith's tabulator counted the 1890 census on punched cards.",
                    "A draw boy lifted the warp threads by hand, row after row.",
                    "The recipe needs two cups of flour and a pinch of salt."]


def shoot(driver, out: Path, name: str, size: tuple[int, int], dark: bool = False) -> Path:
    set_viewport(driver, *size, mobile=size == PHONE, dark=dark)
    driver.execute_script("document.getElementById('chat-settings').open = arguments[0]", size != PHONE)
    driver.execute_script("document.getElementById('messages').scrollTop = 1e9")
    time.sleep(0.4)  # let layout, transitions and the status poll settle
    path = out / f"{name}.png"
    driver.save_screenshot(str(path))
    try:
        from PIL import Image
        Image.open(path).convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    except ImportError:
        pass
    print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {path.stat().st_size // 1024} KiB")
    return path


def answer_done(driver):
    found = by_testid(driver, "assistant-message", many=True)
    return found and found[-1].find_element("css selector", '[data-testid="answer-stats"]').text


def capture(url: str, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    d = start_chromium(*DESKTOP)
    shots = []
    try:
        open_playground(d, url, model=None)
        wait_for(lambda: d.find_element("id", "status-dot").get_attribute("data-state") == "ready", timeout=60,
                 message="the status strip never said ready")
        fill(by_testid(d, "temperature"), "0.3")
        fill(by_testid(d, "seed"), "7")
        fill(by_testid(d, "max-tokens"), "160")
        fill(by_testid(d, "prompt-input"), CHAT_PROMPT)
        by_testid(d, "send-button").click()
        wait_for(lambda: answer_done(d), timeout=180, message="the chat answer never finished")
        time.sleep(2.5)  # one more status poll, so the strip shows the load that answer caused
        for size, width in ((DESKTOP, "desktop"), (PHONE, "phone")):
            shots.append(shoot(d, out, f"chat-{width}-light", size))
            shots.append(shoot(d, out, f"chat-{width}-dark", size, dark=True))

        set_viewport(d, *DESKTOP)
        by_testid(d, "tab-summarize").click()
        fill(by_testid(d, "summarize-input"), DOCUMENT)
        d.find_element("css selector", '#summarize-style option[value="bullets"]').click()
        fill(by_testid(d, "summarize-max-tokens"), "120")
        by_testid(d, "summarize-button").click()
        wait_for(lambda: "completion tokens" in by_testid(d, "summarize-meta").text, timeout=180,
                 message="the summary never finished")
        for size, width in ((DESKTOP, "desktop"), (PHONE, "phone")):
            shots.append(shoot(d, out, f"summarize-{width}-light", size))

        set_viewport(d, *DESKTOP)
        by_testid(d, "tab-classify").click()
        fill(by_testid(d, "classify-input"), CLASSIFY_TEXT)
        d.execute_script("for (const b of document.querySelectorAll('#classify-labels .remove')) b.click()")
        for label in CLASSIFY_LABELS:
            by_testid(d, "label-entry").send_keys(label, "\n")
        by_testid(d, "classify-button").click()
        wait_for(lambda: by_testid(d, "score-row", many=True), timeout=180, message="no classification")
        for size, width in ((DESKTOP, "desktop"), (PHONE, "phone")):
            shots.append(shoot(d, out, f"classify-{width}-light", size))
        shots.append(shoot(d, out, "classify-desktop-dark", DESKTOP, dark=True))

        set_viewport(d, *DESKTOP)
        by_testid(d, "tab-chat").click()
        by_testid(d, "clear-button").click()
        d.find_element("css selector", "#schema-details summary").click()
        fill(by_testid(d, "schema-input"), SCHEMA)
        fill(by_testid(d, "max-tokens"), "120")
        fill(by_testid(d, "prompt-input"), SCHEMA_PROMPT)
        by_testid(d, "send-button").click()
        wait_for(lambda: answer_done(d), timeout=180, message="the JSON answer never finished")
        d.execute_script("const box = document.getElementById('schema-input'); box.scrollTop = box.scrollLeft = 0")
        time.sleep(2.5)  # the status poll after the answer
        shots.append(shoot(d, out, "chat-schema-desktop-light", DESKTOP))

        if by_testid(d, "tab-embeddings").is_displayed():
            shots += capture_embeddings(d, out)
    finally:
        d.quit()
    return shots


def capture_embeddings(d, out: Path) -> list[Path]:
    shots = []
    set_viewport(d, *DESKTOP)
    by_testid(d, "tab-embeddings").click()
    fill(by_testid(d, "embed-input"), "\n".join(EMBED_TEXTS))
    by_testid(d, "embed-button").click()
    wait_for(lambda: by_testid(d, "similarity-matrix", many=True), timeout=60, message="no similarity matrix")
    for size, width in ((DESKTOP, "desktop"), (PHONE, "phone")):
        shots.append(shoot(d, out, f"embeddings-{width}-light", size))
    shots.append(shoot(d, out, "embeddings-desktop-dark", DESKTOP, dark=True))

    set_viewport(d, *DESKTOP)
    by_testid(d, "mode-rerank").click()
    fill(by_testid(d, "rerank-query"), RERANK_QUERY)
    fill(by_testid(d, "rerank-documents"), "\n".join(RERANK_DOCUMENTS))
    by_testid(d, "rerank-button").click()
    wait_for(lambda: by_testid(d, "rerank-row", many=True), timeout=60, message="no ranking")
    for size, width in ((DESKTOP, "desktop"), (PHONE, "phone")):
        shots.append(shoot(d, out, f"rerank-{width}-light", size))
    return shots


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running Loom server (default: start `loom serve --model default` here)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    args = p.parse_args()
    if args.url:
        capture(args.url.rstrip("/"), args.out)
        return
    port = free_port()
    log = Path(tempfile.mkdtemp()) / "loom-serve.log"
    with log.open("wb") as sink:  # this checkout's server (python -m), whatever `loom` on the PATH points at
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model", "default", "--port", str(port),
                                 "--embedding-model", "default", "--kv-cache-memory", "0.5"], cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is not None or ready(url), timeout=300, interval=0.5,
                 message="loom serve never became ready")
        if proc.poll() is not None:
            raise SystemExit(f"loom serve exited:\n{log.read_text()[-3000:]}")
        capture(url, args.out)
    finally:
        stop(proc)


def ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


if __name__ == "__main__":
    main()
