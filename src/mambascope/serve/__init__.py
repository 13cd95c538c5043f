"""``mambascope serve DIR``: a local, read-only web app to browse the neurons of an output directory
(docs/serve.md).  :func:`create_app` builds the Starlette app (tests drive it with a test client);
:func:`serve` runs it with uvicorn."""

from __future__ import annotations

from mambascope.serve.app import LOCAL_HOSTS, create_app, open_output

__all__ = ["LOCAL_HOSTS", "create_app", "open_output"]
