"""`python -m tests.support.paused_start MOMENT loom-args...`: the real `loom` CLI, stopped for good at one moment of
its start (it prints `paused at MOMENT` and sleeps), so a test can kill it exactly there:
- `tokenizer`: the GGUF's tokenizer written to its temporary folder, not yet renamed into the cache (the calibration
  beside it held before its first group);
- `calibration`: the first kernel group being measured (once the tokenizer read beside it is in the cache)."""
from __future__ import annotations

import sys
import threading
import time


def pause(moment: str) -> None:
    print(f"paused at {moment}", flush=True)
    time.sleep(3600)


def install(moment: str) -> None:
    from server.model.weights import calibrate, gguf

    if moment == "tokenizer":
        publish = gguf.publish_directory
        gguf.publish_directory = lambda tmp, target: (pause(moment), publish(tmp, target))
        # the tokenizer is read beside the weights: hold the calibration too, so that the kill finds it unfinished
        calibrate.measure_group = lambda *args, **kwargs: time.sleep(3600)
    elif moment == "calibration":  # once the tokenizer read beside it is in the cache: a moment of calibration only
        published = threading.Event()
        publish = gguf.publish_directory
        gguf.publish_directory = lambda tmp, target: (publish(tmp, target), published.set())[0]
        calibrate.measure_group = lambda *args, **kwargs: (published.wait(600), pause(moment))
    else:
        raise SystemExit(f"unknown moment {moment!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    from server.cli import main

    main(sys.argv[2:])
