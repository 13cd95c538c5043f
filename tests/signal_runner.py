"""Run the mambascope CLI and send this very process a real signal at a chosen point (test_signals.py).

    python tests/signal_runner.py SIGNAL POINT -- ARGV...

POINT: ``load`` (while the model loads), ``save:N`` (right after the N-th results.json is written: a stage
boundary), ``swap`` (inside the final swap, between moving the old output aside and moving the new one in).
"""

import os
import signal
import sys

import mambascope.models as models
import mambascope.results as results
from mambascope.cli import main


def fire() -> None:
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))


def after(function, when):
    def wrapped(*args, **kwargs):
        value = function(*args, **kwargs)
        if when(*args):
            fire()
        return value
    return wrapped


point = sys.argv[2]
if point == "load":
    models.load_model = after(models.load_model, lambda *a: True)
elif point.startswith("save:"):
    saves = []
    results.save_json = after(results.save_json, lambda path, value: saves.append(path.name)
                              or saves.count("results.json") == int(point[5:]))
elif point == "swap":
    os.rename = after(os.rename, lambda src, dst: ".old-" in str(dst))
else:
    raise SystemExit(f"unknown point {point}")
sys.exit(main(sys.argv[4:]))
