"""Text: documents that ship with Python and the installed packages, cleaned and deduplicated.

Sources: docstrings of standard-library modules (PSF-2.0), and the long descriptions (READMEs)
and license texts in installed packages' dist-info folders, each with the package's license as
its metadata declares it. code_samples: the standard library's own Python source (PSF-2.0), cut
into documents at line boundaries: ~30 MB that ship with every interpreter, for text-only runs
larger than the ~500 documents above allow (counts={"code": N} in build_demo; 0 by default).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata as md
import inspect
import re
import warnings

STDLIB_MODULES = ("json", "os", "collections", "itertools", "functools", "pathlib", "re", "string", "textwrap",
                  "tarfile", "zipfile", "csv", "random", "statistics", "heapq", "bisect", "dataclasses",
                  "argparse", "logging", "subprocess", "threading", "queue", "shutil", "tempfile", "typing",
                  "enum", "datetime", "calendar", "decimal", "fractions", "math", "hashlib", "base64", "wave",
                  "contextlib", "abc", "copy", "pprint", "difflib", "unittest", "inspect", "ast", "io", "struct")

MIN_CHARS, MAX_CHARS = 200, 4000


def clean(text: str) -> str:
    text = re.sub(r"\r\n?", "\n", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()[:MAX_CHARS]


def _doc(obj) -> str:
    with warnings.catch_warnings():  # typing.io / typing.re warn when their docstrings are read
        warnings.simplefilter("ignore", DeprecationWarning)
        return inspect.getdoc(obj) or ""


def _stdlib_docs():
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        yield f"python stdlib docstring: {name}", "PSF-2.0", _doc(mod)
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if getattr(obj, "__module__", None) != name:
                continue
            yield f"python stdlib docstring: {name}.{attr}", "PSF-2.0", _doc(obj)


def _package_docs():
    for dist in sorted(md.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        name = dist.metadata["Name"] or "unknown"
        license = dist.metadata.get("License-Expression") or dist.metadata.get("License") or "see package metadata"
        license = license.splitlines()[0][:100] if license else "see package metadata"
        body = dist.metadata.get_payload() if hasattr(dist.metadata, "get_payload") else None
        if body:
            yield f"package description (README): {name} {dist.version}", license, body
        for f in dist.files or []:
            in_dist_info = any(p.endswith(".dist-info") for p in f.parts[:-1])
            if in_dist_info and re.search(r"(LICEN[CS]E|COPYING|NOTICE)[^/]*$", f.name):
                try:
                    with open(f.locate(), encoding="utf-8", errors="replace") as fh:
                        body = fh.read()
                except OSError:
                    continue
                yield f"license text: {name} {dist.version} {f.name}", license, body


def text_samples(count: int):
    """Up to `count` cleaned, deduplicated documents, alternating stdlib and package sources."""
    seen: set[str] = set()
    n = 0
    sources = [_stdlib_docs(), _package_docs()]
    while sources and n < count:
        for gen in list(sources):
            try:
                source, license, text = next(gen)
            except StopIteration:
                sources.remove(gen)
                continue
            text = clean(text)
            digest = hashlib.sha1(re.sub(r"\W+", " ", text.lower()).encode()).hexdigest()
            if len(text) < MIN_CHARS or digest in seen:
                continue
            seen.add(digest)
            yield {"__key__": f"text_{n:06d}", "txt": text,
                   "json": {"modality": "text", "source": source, "license": license, "chars": len(text)}}
            n += 1
            if n >= count:
                return


def code_samples(count: int):
    """Up to `count` documents of standard-library Python source: every .py file under the
    interpreter's stdlib folder (tests, idle and tkinter demos left out), in sorted path order, cut
    at line boundaries into pieces of at most MAX_CHARS; deduplicated like text_samples."""
    import os
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "site-packages", "ensurepip",
            "pydoc_data", "__pycache__"}
    seen: set[str] = set()
    n = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for fname in sorted(filenames):
            if not fname.endswith(".py"):
                continue
            path = os.path.join(dirpath, fname)
            try:
                with open(path, encoding="utf-8") as fh:
                    lines = fh.read().replace("\r\n", "\n").split("\n")
            except (OSError, UnicodeDecodeError):
                continue
            rel = os.path.relpath(path, root)
            piece: list[str] = []
            size = 0
            for line in lines + [None]:
                if line is not None and size + len(line) + 1 <= MAX_CHARS:
                    piece.append(line)
                    size += len(line) + 1
                    continue
                text = "\n".join(piece).strip()
                piece, size = ([line[:MAX_CHARS]], len(line) + 1) if line is not None else ([], 0)
                digest = hashlib.sha1(text.encode()).hexdigest()
                if len(text) < MIN_CHARS or digest in seen:
                    continue
                seen.add(digest)
                yield {"__key__": f"code_{n:06d}", "txt": text,
                       "json": {"modality": "text", "source": f"python stdlib source: {rel}", "license": "PSF-2.0",
                                "chars": len(text)}}
                n += 1
                if n >= count:
                    return
