"""`python -m pipeline.inspect DIR`: print a shard folder's manifest and counts as JSON.

For a local folder the manifest is recomputed from the files (so it shows the
progress of a download that is still running, and writes nothing); for a URL
(`s3://...`, `file://...`) the stored `manifest.json` is read.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.manifest import build_manifest, read_manifest
from pipeline.remote import redact


def inspect_folder(folder: str) -> dict:
    if "://" not in folder and Path(folder).is_dir():
        return build_manifest(folder)
    return read_manifest(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="shard folder: local path or fsspec URL")
    args = parser.parse_args(argv)
    try:
        manifest = inspect_folder(args.folder)
    except (OSError, ValueError) as err:  # missing, unreachable (RemoteError) or not a manifest
        print(f"pipeline.inspect: {redact(str(err))}", file=sys.stderr)
        return 2
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
