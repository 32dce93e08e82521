#!/usr/bin/env python3
"""Build a demo corpus of real English text from the installed Python standard library.

Every module's docstrings (module, classes, functions) become one JSONL document
``{"text": ...}``. No network, deterministic for a given Python installation.

    python tools/make_demo_corpus.py --output demo.jsonl --max-mb 4
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import sysconfig
import warnings

from megatron_lite.cli import EXIT_USAGE, run_main
from megatron_lite.errors import OutputPathError
from megatron_lite.io_utils import atomic_open


def module_docstrings(path: str, min_chars: int) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                docs.append(doc.strip())
    return docs


def iter_stdlib_files(root: str):
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "ensurepip", "turtledemo"}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--max-mb", type=float, default=4.0, help="stop after this many MB of text")
    p.add_argument("--min-chars", type=int, default=80, help="skip docstrings shorter than this")
    args = p.parse_args(argv)
    return run_main(lambda: write_corpus(args), usage_status=EXIT_USAGE)  # exit 2 on a bad --output, as before


def write_corpus(args) -> int:
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise OutputPathError(f"output directory {out_dir} does not exist")
    root = sysconfig.get_paths()["stdlib"]
    budget = int(args.max_mb * 1e6)
    n_docs = n_bytes = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old modules' invalid escape sequences
        with atomic_open(args.output, "w", encoding="utf-8") as f:
            for path in iter_stdlib_files(root):
                docs = module_docstrings(path, args.min_chars)
                if not docs:
                    continue
                text = "\n\n".join(docs)
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                n_docs += 1
                n_bytes += len(text.encode("utf-8"))
                if n_bytes >= budget:
                    break
    print(f"wrote {args.output}: {n_docs} documents, {n_bytes / 1e6:.2f} MB of docstrings from {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
