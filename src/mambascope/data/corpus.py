"""Corpora: the built-in standard-library corpus, local text / JSONL files, and ``datasets`` names.

The built-in corpus (docs/design.md §7) is text that every Python install carries: the pydoc topics
(``pydoc_data.topics.topics``) and the docstrings of a fixed list of standard-library modules, their
public classes, functions and methods. Pure-Python modules are read from their source files with
``ast`` (nothing is imported or executed, and runtime patches by other libraries cannot leak in); the
few C modules (builtins, math, itertools, ...) are imported and read from their objects. Documents
shorter than ``MIN_DOC_CHARS`` are dropped and exact duplicates removed (first occurrence kept).
Nothing is copied into the repository; the text comes from the running interpreter, so the corpus
depends on the Python version, but for one Python it is always the same, in the same order.

Train / validation split: a document goes to ``validation`` when the first 8 bytes of the SHA-256 of
its UTF-8 text, read as a big-endian integer, modulo 100 are below 10 (about 10 %), otherwise to
``train``. The rule looks only at the text itself, so it is stable across runs, machines and corpus
order, and a document never lands in both splits. The same rule splits ``.txt`` and ``.jsonl`` files.
"""

from __future__ import annotations

import ast
import codecs
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "validation", "all")
VALIDATION_PERCENT = 10
# Docstrings shorter than this (after whitespace normalisation) are mostly one-liners such as
# "Return self+value." that repeat across hundreds of dunder methods and teach a model nothing.
MIN_DOC_CHARS = 64

# A fixed, deterministic list of standard-library modules whose import has no side effects (no
# browser, no GUI, no printed text, no terminal changes) and that are not deprecated (deprecated modules
# warn on import and disappear in later Pythons). Modules missing from a given Python are skipped.
BUILTIN_MODULES: tuple[str, ...] = (
    "abc", "argparse", "array", "ast", "asyncio", "asyncio.events", "asyncio.futures", "asyncio.locks",
    "asyncio.queues", "asyncio.streams", "asyncio.subprocess", "asyncio.tasks", "base64", "bdb",
    "binascii", "bisect", "builtins", "bz2", "calendar", "cmath", "cmd", "code", "codecs", "codeop",
    "collections", "collections.abc", "colorsys", "compileall", "concurrent.futures", "configparser",
    "contextlib", "contextvars", "copy", "copyreg", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "dis", "doctest", "email", "email.charset", "email.generator", "email.header",
    "email.headerregistry", "email.message", "email.parser", "email.policy", "email.utils", "enum",
    "errno", "faulthandler", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "gc", "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html",
    "html.parser", "http", "http.client", "http.cookiejar", "http.cookies", "http.server", "imaplib",
    "importlib", "importlib.abc", "importlib.machinery", "importlib.metadata", "importlib.resources",
    "importlib.util", "inspect", "io", "ipaddress", "itertools", "json", "json.decoder", "json.encoder",
    "keyword", "linecache", "locale", "logging", "logging.config", "logging.handlers", "lzma",
    "mailbox", "marshal", "math", "mimetypes", "mmap", "modulefinder", "multiprocessing",
    "multiprocessing.connection", "multiprocessing.pool", "multiprocessing.managers",
    "multiprocessing.shared_memory", "netrc", "numbers", "operator", "optparse", "os", "os.path",
    "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint",
    "profile", "pstats", "py_compile", "pyclbr", "pydoc", "queue", "quopri", "random", "re",
    "reprlib", "runpy", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal",
    "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat", "statistics", "string",
    "stringprep", "struct", "subprocess", "symtable", "sys", "sysconfig", "tabnanny", "tarfile",
    "tempfile", "textwrap", "threading", "time", "timeit", "token", "tokenize", "tomllib", "trace",
    "traceback", "tracemalloc", "types", "typing", "unicodedata", "unittest", "unittest.mock",
    "urllib.error", "urllib.parse", "urllib.request", "urllib.response", "urllib.robotparser", "uuid",
    "warnings", "wave", "weakref", "wsgiref.handlers", "wsgiref.simple_server", "wsgiref.util",
    "xml.dom", "xml.dom.minidom", "xml.etree.ElementTree", "xml.sax", "xml.sax.handler",
    "xml.sax.saxutils", "xmlrpc.client", "xmlrpc.server", "zipapp", "zipfile", "zipimport", "zlib",
    "zoneinfo",
)


@dataclass
class Corpus:
    """A list of documents with the name of its source and the split it was taken from."""

    name: str
    split: str
    texts: list[str] = field(repr=False)

    def __len__(self) -> int:
        return len(self.texts)


def in_validation(text: str) -> bool:
    """Whether ``text`` belongs to the validation split (stable SHA-256 rule, see the module docstring)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < VALIDATION_PERCENT


def split_texts(texts: list[str], split: str) -> list[str]:
    """Select ``split`` ("train", "validation" or "all") from ``texts``, keeping their order."""
    _check_split(split)
    if split == "all":
        return list(texts)
    want_validation = split == "validation"
    return [t for t in texts if in_validation(t) == want_validation]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")


def _normalise(doc: str) -> str:
    # cleandoc removes the indentation docstrings carry from the source; trailing spaces are noise.
    return "\n".join(line.rstrip() for line in inspect.cleandoc(doc).splitlines()).strip()


def _public(name: str) -> bool:
    return not name.startswith("_") or name == "__init__"


def _source_docstrings(source: str) -> list[str]:
    """Docstrings of a module's source: the module, its public classes and functions, their methods.

    Read with ``ast`` from the source file rather than from live objects: importing is not needed,
    and other libraries that patch stdlib objects at runtime (e.g. extra ``logging.Logger`` methods)
    cannot change the corpus. Source order; nested functions are not visited.
    """
    tree = ast.parse(source)
    docs: list[str] = []

    def visit(node: ast.AST) -> None:
        doc = ast.get_docstring(node, clean=False)  # type: ignore[arg-type]
        if doc:
            docs.append(doc)
        if isinstance(node, (ast.Module, ast.ClassDef)):
            for child in node.body:
                if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and _public(child.name):
                    visit(child)

    visit(tree)
    return docs


def _live_docstrings(module: object) -> list[str]:
    """Docstrings of a C-implemented module (no source): the module, its functions, classes, methods.

    Only objects whose ``__module__`` is this module are read, so names that a module re-exports, or
    that another library attached at runtime, are skipped. C types cannot be patched, so their
    members are stable. Sorted name order.
    """
    mod_name = module.__name__  # type: ignore[attr-defined]
    docs: list[str] = []
    if isinstance(module.__doc__, str):
        docs.append(module.__doc__)
    for name in sorted(vars(module)):
        obj = vars(module)[name]
        if not _public(name) or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) != mod_name:
            continue
        if isinstance(obj.__doc__, str):
            docs.append(obj.__doc__)
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                member = vars(obj)[attr]
                if _public(attr) and inspect.isroutine(member) and isinstance(member.__doc__, str):
                    docs.append(member.__doc__)
    return docs


def _module_source(mod_name: str) -> str | None:
    """The text of a stdlib module's .py source, found without importing it (None if it has none)."""
    try:
        spec = importlib.util.find_spec(mod_name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    origin = spec.origin
    if origin == "frozen":
        # Frozen stdlib modules (os, codecs, ... on 3.11+) still record their source file.
        origin = getattr(spec.loader_state, "filename", None)
    if not origin or not origin.endswith(".py") or not os.path.isfile(origin):
        return None
    return Path(origin).read_text(encoding="utf-8")


def builtin_texts() -> list[str]:
    """Every document of the built-in corpus (both splits), deduplicated, in a fixed order.

    Collected once per process (the sources cannot change while it runs); a fresh list is returned.
    """
    global _BUILTIN_CACHE
    if _BUILTIN_CACHE is None:
        _BUILTIN_CACHE = tuple(_collect_builtin())
    return list(_BUILTIN_CACHE)


_BUILTIN_CACHE: tuple[str, ...] | None = None


def _collect_builtin() -> list[str]:
    import pydoc_data.topics

    raw: list[str] = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    for mod_name in BUILTIN_MODULES:
        source = _module_source(mod_name)
        if source is not None:
            raw.extend(_source_docstrings(source))
            continue
        # C modules (builtins, math, itertools, ...): read the live objects.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(mod_name)
        except ImportError:
            # e.g. a module this Python lacks (tomllib before 3.11) or was built without.
            continue
        raw.extend(_live_docstrings(module))
    seen: set[str] = set()
    texts: list[str] = []
    for doc in raw:
        text = _normalise(doc)
        if len(text) < MIN_DOC_CHARS or text in seen:
            continue
        seen.add(text)
        texts.append(text)
    return texts


def _decode(path: Path) -> str:
    """The text of a corpus file: UTF-8 (a leading BOM is dropped). Anything else (an empty file, UTF-16,
    undecodable bytes, NUL bytes of a binary file) is one ValueError naming the file, the line and the
    encoding expected."""
    data = path.read_bytes()
    if not data:
        raise ValueError(f"corpus file {path} is empty")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ValueError(f"corpus file {path} is UTF-16 text (it starts with a UTF-16 byte-order mark); expected "
                         "UTF-8: convert it, e.g. iconv -f UTF-16 -t UTF-8")
    nul = data.find(b"\x00")  # text never holds NUL; binary files (and UTF-16/32 without a BOM) do
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise ValueError(f"corpus file {path}, line {line}: NUL byte, so this is a binary file; expected UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"corpus file {path}, line {line}: byte 0x{data[exc.start]:02x} is not UTF-8; expected "
                         "UTF-8 text: convert the file (e.g. iconv -f latin1 -t UTF-8) or pass a text file"
                         ) from None


def txt_documents(lines: Iterable[str]) -> Iterator[str]:
    """Documents of a text file's lines: separated by one or more blank (or whitespace-only) lines."""
    current: list[str] = []
    for line in lines:
        if line.strip():
            current.append(line.rstrip())
        elif current:
            yield "\n".join(current)
            current = []
    if current:
        yield "\n".join(current)


def jsonl_documents(lines: Iterable[str], path: Path) -> Iterator[str]:
    """The non-empty ``text`` of each JSONL line; a malformed line is a ValueError naming ``path`` and the line.

    Split the file on "\n" only: a JSON string may hold U+2028 and other characters that str.splitlines
    breaks at.
    """
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or "text" not in record:
            raise ValueError(f"{path}:{lineno}: each JSONL line must be an object with a 'text' field")
        if not isinstance(record["text"], str):
            raise ValueError(f"{path}:{lineno}: the 'text' field must be a string")
        if record["text"].strip():
            yield record["text"]


def _file_texts(path: Path, split: str) -> list[str]:
    """The documents of a .txt / .jsonl file in ``split``; a file without text, or without any document in
    the split, is one ValueError naming the file."""
    text = _decode(path)
    docs = list(txt_documents(text.splitlines()) if path.suffix.lower() == ".txt"
                else jsonl_documents(text.split("\n"), path))
    if not docs:
        what = "blank lines" if path.suffix.lower() == ".txt" else "lines whose 'text' is empty"
        raise ValueError(f"corpus file {path} has no text: no non-empty documents, only {what}")
    texts = split_texts(docs, split)
    if not texts:
        raise ValueError(f"corpus file {path} has {len(docs)} document(s), none in split {split!r} (the split "
                         f"takes about {VALIDATION_PERCENT}% of documents by a hash of their text); use split "
                         "'all' (--split all) to analyse the whole file")
    return texts


def _download_failure(spec: str, exc: BaseException) -> str:
    """One line for a failed ``load_dataset``: say the machine seems offline and what to do instead."""
    import datasets.config

    offline_env = bool(getattr(datasets.config, "HF_HUB_OFFLINE", False)) or any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if offline_env:
        why = "the machine seems offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)"
    else:
        why = f"the machine seems offline or the name is wrong ({type(exc).__name__}: {reason[:200]})"
    return f"could not download dataset {spec!r}: {why}; pass a local .txt or .jsonl file instead"


def _load_hf_dataset(spec: str, split: str) -> list[str]:
    """Texts of a ``datasets`` dataset ``name`` or ``name:config``; ``validation`` falls back to ``test``."""
    import datasets

    name, _, config = spec.partition(":")
    hf_split = {"all": None}.get(split, split)
    try:
        ds = datasets.load_dataset(name, config or None)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        raise ValueError(_download_failure(spec, exc)) from None
    if hf_split is None:
        parts = [ds[k] for k in sorted(ds)]
    else:
        key = hf_split if hf_split in ds else ("test" if hf_split == "validation" and "test" in ds else None)
        if key is None:
            raise ValueError(f"dataset {spec!r} has no split {split!r} (it has: {', '.join(sorted(ds))})")
        parts = [ds[key]]
    texts: list[str] = []
    for part in parts:
        if "text" not in part.column_names:
            raise ValueError(f"dataset {spec!r} has no 'text' column (columns: {', '.join(part.column_names)})")
        texts.extend(t for t in part["text"] if isinstance(t, str) and t.strip())
    return texts


def load_corpus(spec: str = "builtin", split: str = "train") -> Corpus:
    """Load a corpus by spec: ``"builtin"``, a ``.txt`` / ``.jsonl`` path, or a ``datasets`` name.

    ``split`` is ``"train"``, ``"validation"`` or ``"all"``. Built-in and file corpora are split by
    the stable hash rule of this module; a ``datasets`` corpus uses the dataset's own splits.
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for an empty corpus, a bad
    split, a file that is not UTF-8 text, a malformed JSONL line, or a dataset that cannot be
    downloaded; each names the file (and the line) at fault.
    """
    _check_split(split)
    if spec == "builtin":
        texts = split_texts(builtin_texts(), split)
        name = "builtin"
    else:
        path = Path(spec).expanduser()
        suffix = path.suffix.lower()
        if suffix in (".txt", ".jsonl"):
            if path.is_dir():
                raise IsADirectoryError(f"corpus {path} is a directory, not a .txt or .jsonl file")
            if not path.is_file():
                raise FileNotFoundError(f"corpus file not found: {path}")
            texts = _file_texts(path, split)
            name = str(path)
        elif path.exists():
            raise ValueError(f"unsupported corpus file {path}: use a .txt or .jsonl file")
        else:
            texts = _load_hf_dataset(spec, split)
            name = spec
    if not texts:
        raise ValueError(f"corpus {spec!r} has no non-empty documents in split {split!r}")
    return Corpus(name=name, split=split, texts=texts)
