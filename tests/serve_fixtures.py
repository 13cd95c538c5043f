"""An output directory for the ``mambascope serve`` tests (tests/test_serve.py, tests/test_browser.py).

Written by the package's own writers (``OutputDir`` + ``save_results``: results.json, the neuron store, the
marker) from ``report_fixtures.mamba_results()`` with the figures of ``mamba_report()``, and a corpus token
replaced by markup (``EVIL``) so that escaping is tested on every page that shows it.  The random model
of those results is saved beside it as a local checkpoint (``model``), so that the live trace runs the
very model the output describes.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from report_fixtures import mamba_model, mamba_report, mamba_results

EVIL = "<script>alert(1)</script>"


@functools.cache
def served_output() -> tuple[Path, Path]:
    """(output directory, model checkpoint directory), built once per session (removed at exit)."""
    from mambascope.results import save_results
    from mambascope.results.outputs import OutputDir

    root = Path(tempfile.mkdtemp(prefix="mambascope-serve-test-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    results = mamba_results()
    layer = results["layers"]["0"]
    layer["token_detectors"][0]["token_strings"][0] = EVIL
    layer["top_contexts"]["tokens"][3][0][-1] = EVIL
    layer["logit_effects"]["promoted"][3][0] = EVIL
    with OutputDir(root / "out", kind="analyze") as out:
        save_results(out.staging, results)
        for figure in mamba_report()[0]:
            shutil.copy(figure, out.figures / Path(figure).name)
        out.commit()
    model, tokenizer = mamba_model()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "out", root / "model"
