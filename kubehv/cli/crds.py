"""``kubehv crds``: print or write the CRDs (and the API reference) generated from the models.

Why this module exists: the CRDs in crds/ and docs/reference.md are build artefacts of
kubehv.api; this command is how they are regenerated (``make crds``), and how a user gets
CRDs matching the installed kubehv without a clone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kubehv.api import crdgen, reference


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output-dir",
        type=Path,
        help="write one file per CRD (kubehv.io_<plural>.yaml) here instead of printing",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="print the Markdown API reference (docs/reference.md) instead of the CRDs",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="with --reference: write the reference to this file instead of printing it",
    )


def run(args: argparse.Namespace) -> int:
    if args.reference:
        text = reference.render()
        if args.output is not None:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(text)
            print(f"wrote {args.output}", file=sys.stderr)
        else:
            sys.stdout.write(text)
        return 0
    files = crdgen.render_all()
    if args.output_dir is not None:
        out: Path = args.output_dir
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (out / name).write_text(text)
            print(f"wrote {out / name}", file=sys.stderr)
        return 0
    sys.stdout.write("".join(files.values()))
    return 0
