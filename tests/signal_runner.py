"""Run the mambascope CLI and send this very process a real signal at a chosen point (test_signals.py).

    python tests/signal_runner.py SIGNAL[+SIGNAL...] POINT -- ARGV...

SIGNAL: a name from ``signal``; several joined by ``+`` are sent one after the other at the same point.
POINT: ``load`` (while the model loads), ``save:N`` (right after the N-th results.json is written: a stage
boundary), ``swap`` (inside the final swap, between moving the old output aside and moving the new one in),
``batch:N`` (right after the census's N-th traced batch, before any checkpoint of it), ``ckpt-write:N``
(inside the N-th census checkpoint write: its temp file written, not yet renamed).
"""

import os
import signal
import sys

import mambascope.models as models
import mambascope.results as results
from mambascope.cli import main


def fire() -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 is signalled; torchrun stops the others
        for name in sys.argv[1].split("+"):
            os.kill(os.getpid(), getattr(signal, name))


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
elif point.startswith("batch:"):
    import mambascope.scale as scale

    batches = []
    scale.trace_stream = after(scale.trace_stream, lambda *a: batches.append(1) or len(batches) == int(point[6:]))
elif point.startswith("ckpt-write:"):
    writes, replace = [], os.replace

    def replace_or_die(src, dst):
        if ".checkpoint-" in str(dst):
            writes.append(dst)
            if len(writes) == int(point[11:]):
                fire()
        return replace(src, dst)

    os.replace = replace_or_die
else:
    raise SystemExit(f"unknown point {point}")
sys.exit(main(sys.argv[4:]))
