"""The web app of ``mambascope serve DIR`` (Starlette): a read-only neuron explorer over one output directory.

Routes (docs/serve.md)::

    GET  /                          the report's summary, sections and figures, neuron search, neuron pages
    GET  /static/{file}             the report's CSS and JavaScript (package files)
    GET  /figures/{name}.png        a figure of DIR/figures (no other file of DIR is reachable)
    GET  /api/summary               model, corpus, layers and their neuron counts, the live model's state
    GET  /api/neurons               every neuron's summary row: ?layer=&q=&sort=&order=asc|desc&offset=&limit=
    GET  /api/neuron/{layer}/{n}    one neuron page's payload (the static report's layout, one neuron filled in)
    GET  /api/detail/{layer}/{n}    every stored per-neuron detail (``NeuronStore.neuron``)
    GET  /api/by_token?token=&k=    the neurons that fire most on this token (``NeuronStore.by_token``)
    POST /api/trace                 {"text", "layer", "neuron", "position"}: a live trace (with a model)
    POST /api/steer                 {"prompt", "unit", "scale", "mode", "positions", "max_new_tokens"}: the prompt
                                    continued without and with the unit steered (with a model)
    GET  /attribute                 the attribution page: per-token relevance of one prediction
    POST /api/attribute             {"text", "target", "methods", "position", "ig_steps", "baseline"} (with a model)
    /features/...                   the same routes over the dictionary's features of ``census --dictionary``
                                    (``neuron`` = the feature index; its live trace encodes the traced hook)

Nothing is written: the app reads ``results.json``, ``figures/`` and the neuron store.  Every error is a
4xx/5xx with a one-line JSON (``/api``) or escaped HTML message; no traceback ever reaches a response.
Requests are served in a thread pool, several at once: the store's readers are safe for that.  Requests
from other sites are refused (``guard.RequestGuard``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mambascope.report import _access as acc
from mambascope.report.html import environment, report_context
from mambascope.results import to_jsonable
from mambascope.results.store import StoreError
from mambascope.serve.guard import RequestGuard
from mambascope.serve.live import (
    LiveBusyError,
    LiveInputError,
    LiveModel,
    LiveTooLongError,
    load_live,
    load_live_features,
)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
MAX_PAGE = 500  # rows per /api/neurons page
MAX_BY_TOKEN = 200
MAX_BODY = 256 * 1024  # bytes of a POST request's body
FEATURES_MOUNT = "/features"  # a dictionary's features (census --dictionary): the same routes under this prefix
_FIGURE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.png")
_SECURITY_HEADERS = {
    # the page loads only its own files; inline JSON data blocks are not scripts, figures may be data: URIs
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def open_output(directory: str | Path) -> tuple[Path, dict[str, Any], Any]:
    """(DIR resolved, its results, its NeuronStore) for a mambascope output directory.

    Raises FileNotFoundError / NotADirectoryError / ValueError with one line naming DIR and the fix."""
    from mambascope.results import open_results
    from mambascope.results.outputs import marker
    from mambascope.results.store import NeuronStore

    path = Path(directory)
    if not path.exists():
        raise FileNotFoundError(f"no such directory: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory: give the output directory of mambascope analyze")
    if marker(path) is None:
        raise ValueError(f"{path} is not a mambascope output (no .mambascope marker): give a directory written by "
                         "mambascope analyze")
    path = path.resolve()
    results, store = open_results(path)
    # an output written before the store existed: NeuronStore raises its one-line "no neuron store" error
    store = store if store is not None else NeuronStore(path)
    store.verify()  # a truncated store file: one line naming it now, not a failed request later
    return path, results, store


def _int(request: Request, name: str, default: int | None = None, low: int | None = None,
         high: int | None = None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HTTPException(400, f"{name}: {raw[:40]!r} is not an integer") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise HTTPException(400, f"{name}: {value} is outside {low}..{high}")
    return value


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(to_jsonable(data), status_code=status, headers=_SECURITY_HEADERS)


def _integer(body: dict[str, Any], name: str, required: bool = True) -> int | None:
    """``body[name]`` as a JSON integer (not a bool, not a string); 400 naming the field otherwise."""
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise HTTPException(400, f"{name}: give an integer")
    return value


def _live_answer(compute: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``compute(...)`` of the live model with its refusals as HTTP errors: 413 too long, 400 any other bad
    input, 503 the model busy too long with other requests."""
    try:
        return compute(*args, **kwargs)
    except LiveTooLongError as exc:
        raise HTTPException(413, str(exc)) from None
    except LiveInputError as exc:
        raise HTTPException(400, str(exc)) from None
    except LiveBusyError as exc:
        raise HTTPException(503, str(exc)) from None


class Explorer:
    """The state behind the routes: DIR, its results and store, the rendered summary page, the live model."""

    unit = "neuron"  # what the store's units are (FeatureExplorer: "feature")

    def __init__(self, directory: Path, results: dict[str, Any], store: Any) -> None:
        self.dir, self.results, self.store = directory, results, store
        self.layers = [int(x) for x in store.layers]
        self.table = store.table()
        self.sizes = {str(int(layer)): int(n) for layer, n in self.table.groupby("layer").size().items()}
        self.live: LiveModel | None = None
        self.live_reason: str | None = None
        self.page = ""  # rendered by set_live, which create_app always calls
        self.attribute_page = ""
        # the units a steer request may name (body["unit"]["kind"]) -> (hook name, direction) of that unit:
        # another kind of unit (a dictionary feature) registers its own resolver here
        self.steer_units: dict[str, Callable[[dict[str, Any]], tuple[str, Any]]] = {"neuron": self.neuron_steering}

    def set_live(self, live: LiveModel | None, reason: str | None) -> None:
        """Use ``live`` for traces if it is the output's model (else say why not), and re-render the page."""
        if live is not None:
            reason = live.mismatch({int(layer): n for layer, n in self.sizes.items()})
            live = None if reason else live
        self.live, self.live_reason = live, reason
        self.page = self._render_page()
        self.attribute_page = environment().get_template("attribute.html").render(
            name=acc.model_name(self.results), live=self.live_state())

    # ---------------------------------------------------------------------------------------- pages
    def figures(self) -> list[Path]:
        """DIR/figures/*.png that are plain files inside DIR (a symlink out of DIR is left out)."""
        folder = self.dir / "figures"
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.glob("*.png") if self.inside(p) and _FIGURE_NAME.fullmatch(p.name))

    def inside(self, path: Path) -> bool:
        """Whether ``path`` is a file inside DIR once every symlink is resolved."""
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return False
        return real.is_file() and real.is_relative_to(self.dir)

    def _render_page(self) -> str:
        data = {"source": "server", "model": acc.model_name(self.results), "arch": acc.arch(self.results),
                "sizes": self.sizes, "unit": self.unit}
        context = report_context(self.results, self.figures(), {}, lambda p: f"figures/{p.name}",
                                 features_page=FEATURES_MOUNT.strip("/") + "/")
        return environment().get_template("serve.html").render(
            **context, served=True, neuron_data=data, layers=self.layers, sort_columns=self.sort_columns(),
            live=self.live_state())

    def live_state(self) -> dict[str, Any]:
        if self.live is not None:
            return self.live.describe()
        return {"available": False, "reason": self.live_reason or "no model"}

    def sort_columns(self) -> list[str]:
        return [c for c in self.table.columns if c not in ("layer", "neuron")]

    # ---------------------------------------------------------------------------------------- API
    def summary(self) -> dict[str, Any]:
        r = self.results
        return {"model": r.get("model"), "corpus": r.get("corpus"), "layers": self.sizes,
                "n_neurons": int(self.store.n_neurons), "columns": list(self.table.columns),
                "errors": acc.errors(r), "live": self.live_state()}

    def neurons(self, request: Request) -> dict[str, Any]:
        df = self.table
        layer = _int(request, "layer", None, 0)
        if layer is not None:
            if layer not in self.layers:
                raise HTTPException(404, f"layer: {layer} is not in this output (layers: "
                                         f"{', '.join(map(str, self.layers))})")
            df = df[df["layer"] == layer]
        q = request.query_params.get("q", "")
        if len(q) > 200:
            raise HTTPException(400, "q: at most 200 characters")
        if q:
            df = df[self._token_column().fillna("").astype(str).loc[df.index].str.contains(q, regex=False)]
        sort = request.query_params.get("sort") or "layer"
        if sort not in df.columns:
            raise HTTPException(400, f"sort: {sort[:60]!r} is not a column (columns: {', '.join(df.columns)})")
        order = request.query_params.get("order", "desc" if sort not in ("layer", "neuron") else "asc")
        if order not in ("asc", "desc"):
            raise HTTPException(400, f"order: {order[:20]!r} is neither asc nor desc")
        keys = [sort] + [k for k in ("layer", "neuron") if k != sort]
        df = df.sort_values(keys, ascending=[order == "asc", True, True][:len(keys)], na_position="last",
                            kind="stable")
        offset = _int(request, "offset", 0, 0)
        limit = _int(request, "limit", 50, 1, MAX_PAGE)
        page = df.iloc[offset:offset + limit]
        return {"total": len(df), "offset": offset, "limit": limit, "sort": sort, "order": order,
                "columns": list(df.columns), "rows": page.to_dict(orient="records")}

    def _token_column(self) -> Any:
        if "detector_tokens" not in self.table.columns:
            raise HTTPException(400, "q: this output's neuron table has no detector_tokens column")
        return self.table["detector_tokens"]

    def _check_neuron(self, layer: int, neuron: int) -> None:
        if layer not in self.layers:
            raise HTTPException(404, f"layer {layer} is not in this output (layers: "
                                     f"{', '.join(map(str, self.layers))})")
        n = self.sizes[str(layer)]
        if not 0 <= neuron < n:
            raise HTTPException(404, f"neuron {neuron} is out of range: layer {layer} has neurons 0..{n - 1}")

    def neuron_page(self, layer: int, neuron: int) -> dict[str, Any]:
        self._check_neuron(layer, neuron)
        data = self.store.layer_payload(layer, [neuron])  # one row group of the store read, not the layer
        return {"strings": data["strings"], "windows": data["windows"], "layer": data["layers"][str(layer)]}

    def detail(self, layer: int, neuron: int) -> dict[str, Any]:
        self._check_neuron(layer, neuron)
        return self.store.neuron(layer, neuron)

    def by_token(self, request: Request) -> dict[str, Any]:
        token = request.query_params.get("token")
        if not token:
            raise HTTPException(400, "token: give the token's text, e.g. ?token=%20the")
        if len(token) > 200:
            raise HTTPException(400, "token: at most 200 characters")
        k = _int(request, "k", 20, 1, MAX_BY_TOKEN)
        df = self.store.by_token(token, k=k)
        return {"token": token, "k": k, "columns": list(df.columns), "rows": df.to_dict(orient="records")}

    def live_model(self) -> LiveModel:
        if self.live is None:
            raise HTTPException(409, f"no live model: {self.live_reason}")
        return self.live

    def trace(self, body: dict[str, Any]) -> dict[str, Any]:
        live = self.live_model()
        try:
            text, layer, neuron = body["text"], body["layer"], body["neuron"]
        except KeyError as exc:
            raise HTTPException(400, f"missing field {exc.args[0]!r} (give text, layer, neuron, position)") from None
        position = body.get("position")
        for name, value in (("layer", layer), ("neuron", neuron), ("position", position)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise HTTPException(400, f"{name}: give an integer")
        if not isinstance(text, str):
            raise HTTPException(400, "text: give a string")
        self._check_layer(layer)
        return _live_answer(live.trace, text, layer, neuron, position)

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise HTTPException(400, f"layer: {layer} is not a layer of this output (layers: "
                                     f"{', '.join(map(str, self.layers))})")

    def neuron_steering(self, unit: dict[str, Any]) -> tuple[str, Any]:
        """(hook name, e_neuron) of ``{"kind": "neuron", "layer", "neuron"}``."""
        layer, neuron = _integer(unit, "layer"), _integer(unit, "neuron")
        self._check_layer(layer)
        return _live_answer(self.live_model().neuron_steering, layer, neuron)

    def steer(self, body: dict[str, Any]) -> dict[str, Any]:
        """The steer panel: ``{"prompt", "unit": {"kind", ...}, "scale", "mode", "positions",
        "max_new_tokens"}`` -> both continuations (``LiveModel.steer``), the unit echoed."""
        live = self.live_model()
        unit = body.get("unit")
        if not isinstance(unit, dict) or unit.get("kind") not in self.steer_units:
            raise HTTPException(400, f"unit: give an object whose kind is one of {', '.join(self.steer_units)}, "
                                     'e.g. {"kind": "neuron", "layer": 0, "neuron": 3}')
        hook, direction = self.steer_units[unit["kind"]](unit)
        answer = _live_answer(live.steer, body.get("prompt"), hook, direction, body.get("scale"),
                              body.get("mode", "add"), body.get("positions"), body.get("max_new_tokens", 20))
        return {"unit": unit, **answer}

    def attribute(self, body: dict[str, Any]) -> dict[str, Any]:
        """The attribution page: ``{"text", "target", "methods", "position", "ig_steps", "baseline"}`` (all
        but text optional) -> ``LiveModel.attribute``."""
        live = self.live_model()
        if not isinstance(body.get("text"), str):
            raise HTTPException(400, "text: give a string")
        options = {name: body[name] for name in ("target", "methods", "baseline") if body.get(name) is not None}
        for name in ("position", "ig_steps"):
            value = _integer(body, name, required=False)
            if value is not None:
                options[name] = value
        return _live_answer(live.attribute, body["text"], **options)


class FeatureExplorer(Explorer):
    """The explorer over a dictionary's features (``census --dictionary``: ``results["features"]`` and its store),
    mounted at ``FEATURES_MOUNT``: the same search, sort, pages and live trace, of features (``LiveFeatures``)."""

    unit = "feature"

    def __init__(self, directory: Path, results: dict[str, Any], store: Any) -> None:
        super().__init__(directory, results, store)
        self.steer_units = {"feature": self.feature_steering}  # {"kind": "feature", "layer", "feature"}

    def figures(self) -> list[Path]:
        return []  # DIR/figures are the neurons'

    def feature_steering(self, unit: dict[str, Any]) -> tuple[str, Any]:
        """(hook_out, W_dec[i]) of ``{"kind": "feature", "layer", "feature"}``."""
        layer, feature = _integer(unit, "layer"), _integer(unit, "feature")
        self._check_layer(layer)
        return _live_answer(self.live_model().feature_steering, layer, feature)


def feature_explorer(ex: Explorer) -> FeatureExplorer | None:
    """The FeatureExplorer of ``ex``'s output, or None when it has no feature census."""
    from mambascope.report.html import feature_results
    from mambascope.results.store import FEATURE_STORE_DIR, NeuronStore

    features = feature_results(ex.results)
    if features is None:
        return None
    store = NeuronStore(ex.dir, FEATURE_STORE_DIR)
    store.verify()
    return FeatureExplorer(ex.dir, features, store)


# --------------------------------------------------------------------------------------------- routes

def _routes(ex: Explorer) -> list[Any]:
    def index(request: Request) -> Response:
        return HTMLResponse(ex.page, headers=_SECURITY_HEADERS)

    def figure(request: Request) -> Response:
        name = request.path_params["name"]
        # only a bare file name of DIR/figures: no "/", "\", "..", absolute or encoded paths reach the disk
        if not _FIGURE_NAME.fullmatch(name) or ".." in name:
            raise HTTPException(404, "no such figure")
        path = ex.dir / "figures" / name
        if not ex.inside(path):
            raise HTTPException(404, "no such figure")
        return FileResponse(path, media_type="image/png", headers=_SECURITY_HEADERS)

    def layer_neuron(request: Request) -> tuple[int, int]:
        try:
            return int(request.path_params["layer"]), int(request.path_params["neuron"])
        except ValueError:
            raise HTTPException(400, "layer and neuron must be integers") from None

    def api_summary(request: Request) -> Response:
        return _json(ex.summary())

    def api_neurons(request: Request) -> Response:
        return _json(ex.neurons(request))

    def api_neuron(request: Request) -> Response:
        return _json(ex.neuron_page(*layer_neuron(request)))

    def api_detail(request: Request) -> Response:
        return _json(ex.detail(*layer_neuron(request)))

    def api_by_token(request: Request) -> Response:
        return _json(ex.by_token(request))

    def attribute_page(request: Request) -> Response:
        return HTMLResponse(ex.attribute_page, headers=_SECURITY_HEADERS)

    def live_post(compute: Callable[[dict[str, Any]], dict[str, Any]], fields: str) -> Callable[..., Any]:
        """A POST route whose JSON object body (``fields`` named in the error) goes to ``compute`` in a worker
        thread, so that the model's work does not block other requests."""
        async def route(request: Request) -> Response:
            raw = bytearray()
            async for chunk in request.stream():  # read no more than MAX_BODY, whatever Content-Length says
                raw += chunk
                if len(raw) > MAX_BODY:
                    raise HTTPException(413, f"request body over {MAX_BODY} bytes")
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise HTTPException(400, f"the body is not JSON: give {{{fields}}}") from None
            if not isinstance(body, dict):
                raise HTTPException(400, "the body must be a JSON object")
            from starlette.concurrency import run_in_threadpool

            return _json(await run_in_threadpool(compute, body))

        return route

    static = str(resources.files("mambascope.report").joinpath("static"))
    return [
        Route("/", index),
        Mount("/static", app=StaticFiles(directory=static), name="static"),
        Route("/figures/{name:path}", figure),
        Route("/api/summary", api_summary),
        Route("/api/neurons", api_neurons),
        Route("/api/neuron/{layer}/{neuron}", api_neuron),
        Route("/api/detail/{layer}/{neuron}", api_detail),
        Route("/api/by_token", api_by_token),
        Route("/api/trace", live_post(ex.trace, '"text", "layer", "neuron", "position"'), methods=["POST"]),
        Route("/api/steer", live_post(ex.steer, '"prompt", "unit", "scale", "mode", "positions", "max_new_tokens"'),
              methods=["POST"]),
        Route("/attribute", attribute_page),
        Route("/api/attribute", live_post(ex.attribute, '"text", "target", "methods", "ig_steps", "baseline"'),
              methods=["POST"]),
    ]


def _error_response(request: Request, status: int, message: str) -> Response:
    if request.url.path.startswith(("/api/", f"{FEATURES_MOUNT}/api/")):
        return _json({"error": message, "status": status}, status)
    page = environment().get_template("error.html").render(status=status, message=message)
    return HTMLResponse(page, status_code=status, headers=_SECURITY_HEADERS)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error_response(request, exc.status_code, str(exc.detail))


async def _store_error(request: Request, exc: Exception) -> Response:
    # a store file damaged or replaced since the server started: nothing this server can answer from it
    return _error_response(request, 503, str(exc))


async def _server_error(request: Request, exc: Exception) -> Response:
    # one line naming the failure; the traceback stays on the server's console (uvicorn logs it)
    return _error_response(request, 500, f"internal error ({type(exc).__name__})")


def create_app(directory: str | Path, *, model: str | None = None, live: bool = True, device: str = "cpu",
               allowed_hosts: Sequence[str] = LOCAL_HOSTS) -> Starlette:
    """The Starlette app serving ``directory`` (a mambascope output).

    model: the live model (default: the one named in results.json); ``live=False`` serves without one.
    allowed_hosts: Host names accepted besides the loopback addresses and localhost (DNS-rebinding guard,
    ``guard.RequestGuard``); ``("*",)`` accepts any.
    Raises FileNotFoundError / NotADirectoryError / ValueError for a DIR that is not a mambascope output.
    """
    ex = Explorer(*open_output(directory))
    name = model or (ex.results.get("model") or {}).get("name")
    if not live:
        ex.set_live(None, "started without a model (--no-model)")
    elif not name:
        ex.set_live(None, "results.json names no model: start with --model M")
    else:
        ex.set_live(*load_live(str(name), device))
    routes = _routes(ex)
    features = feature_explorer(ex)
    if features is not None:  # the dictionary's features: the same app under FEATURES_MOUNT
        path = (features.results.get("dictionary") or {}).get("path")
        features.set_live(*load_live_features(ex.live, ex.live_reason, str(path)))
        routes.append(Mount(FEATURES_MOUNT, routes=_routes(features)))
    app = Starlette(debug=False, routes=routes,
                    middleware=[Middleware(RequestGuard, error=_error_response, allowed_hosts=allowed_hosts)],
                    exception_handlers={HTTPException: _http_error, StoreError: _store_error,
                                        Exception: _server_error})
    app.state.explorer = ex
    return app
