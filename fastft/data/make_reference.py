"""Build the forgetting reference set (fastft/data/reference_stdlib.jsonl) from Python's own docstrings.

The forgetting report (fastft/tasks/forgetting.py) measures a model on general English prose that is
not its training data: the docstrings of a fixed list of Python standard-library modules (written by
the CPython developers, PSF licence; see fastft/data/README.md). They are on every machine that runs
Python, which makes the set reproducible without a download.

For each module in ``MODULES`` (in order): the module docstring, then the docstrings of its public
classes, their public methods and its public functions (``inspect.getdoc``, dedented), each kept if
it has at least ``MIN_CHARS`` characters of prose once doctest examples (``>>>`` lines and their
output) are dropped. Duplicates are removed; the set stops at ``MAX_BYTES``. One JSON object per
line: ``{"text": ..., "source": "module.qualname"}``.

Run ``python -m fastft.data.make_reference`` to regenerate (deterministic for one Python version;
the committed file records the version in its first record's ``python`` field).
"""
import importlib
import inspect
import json
import os
import platform
import re

MODULES = [
    "argparse", "json", "pathlib", "textwrap", "string", "shutil", "subprocess", "logging", "dataclasses", "enum",
    "csv", "datetime", "decimal", "fractions", "heapq", "bisect", "random", "statistics", "email.message",
    "http.client", "urllib.parse", "tarfile", "zipfile", "configparser", "difflib", "pprint", "calendar",
    "unittest.case", "threading", "queue", "contextlib", "copy", "tempfile", "glob", "fnmatch", "shlex", "cmd",
    "timeit", "doctest", "ast", "tokenize", "weakref", "types", "numbers", "functools", "collections",
    "inspect", "typing", "pickle", "gettext", "locale", "optparse", "ipaddress", "uuid", "secrets", "base64",
    "sqlite3", "xml.dom.minidom", "html.parser", "wave", "smtplib", "imaplib", "ftplib", "mailbox", "socketserver",
    "asyncio.tasks", "asyncio.locks", "concurrent.futures._base", "multiprocessing.pool", "selectors", "sched",
    "trace", "pdb", "pstats", "zipimport", "codecs", "io", "os", "re",
]
MIN_CHARS = 200
MAX_BYTES = 250_000
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_stdlib.jsonl")


def _prose(doc: str) -> str:
    keep, in_example = [], False
    for line in doc.splitlines():
        s = line.strip()
        if s.startswith(">>>") or s.startswith("..."):
            in_example = True
            continue
        if in_example and s:  # doctest output runs until a blank line
            continue
        in_example = False
        keep.append(line.rstrip())
    text = "\n".join(keep).strip()
    return re.sub(r"\n{3,}", "\n\n", text)


def _docs(modname):
    mod = importlib.import_module(modname)
    yield modname, inspect.getdoc(mod)
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isclass(obj):
            yield f"{modname}.{name}", inspect.getdoc(obj)
            for mname, m in sorted(vars(obj).items()):
                # methods other libraries attach at import time (transformers adds Logger.info_once)
                # are not the standard library's
                if getattr(m, "__module__", mod.__name__) != mod.__name__:
                    continue
                if not mname.startswith("_") and (inspect.isfunction(m) or inspect.ismethoddescriptor(m)):
                    yield f"{modname}.{name}.{mname}", inspect.getdoc(m)
        elif inspect.isfunction(obj):
            yield f"{modname}.{name}", inspect.getdoc(obj)


def build():
    seen, rows, size = set(), [], 0
    for modname in MODULES:
        for source, doc in _docs(modname):
            if not doc:
                continue
            text = _prose(doc)
            if len(text) < MIN_CHARS or text in seen:
                continue
            seen.add(text)
            row = {"text": text, "source": source}
            if not rows:
                row["python"] = platform.python_version()
            line = json.dumps(row, ensure_ascii=False) + "\n"
            if size + len(line.encode()) > MAX_BYTES:
                return rows
            rows.append(line)
            size += len(line.encode())
    return rows


def main():
    rows = build()
    with open(OUT, "w", encoding="utf-8") as f:
        f.writelines(rows)
    print(f"{OUT}: {len(rows)} docstrings, {sum(len(r.encode()) for r in rows)} bytes")


if __name__ == "__main__":
    main()
