"""`python -m tests.support.paused_start MOMENT loom-args...`: the real `loom` CLI, stopped for good at one moment of
its start (it prints `paused at MOMENT` and sleeps), so a test can kill it exactly there:
- `tokenizer`: the GGUF's tokenizer written to its temporary folder, not yet renamed into the cache;
- `calibration`: the first kernel group being measured."""
from __future__ import annotations

import sys
import time


def pause(moment: str) -> None:
    print(f"paused at {moment}", flush=True)
    time.sleep(3600)


def install(moment: str) -> None:
    from server.model.weights import calibrate, gguf

    if moment == "tokenizer":
        publish = gguf.publish_directory
        gguf.publish_directory = lambda tmp, target: (pause(moment), publish(tmp, target))
    elif moment == "calibration":
        calibrate.measure_group = lambda *args, **kwargs: pause(moment)
    else:
        raise SystemExit(f"unknown moment {moment!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    from server.cli import main

    main(sys.argv[2:])
