"""``python -m dama_engine.data.check PATH``: read and validate a dataset, print one JSON object.

The service runs this in a child process for every upload: untrusted archives and images are unpacked and
decoded outside the API process (a decompression bomb or a crash costs a child, not the server), and the API
never imports the engine. Output::

    {"ok": true, "format": "trl", "row_count": 12, "image_count": 12, "data_file": "...", "report": {...}}
    {"ok": false, "error": "archive member '../x' escapes the dataset folder"}     (exit status 2)
"""

from __future__ import annotations

import argparse
import json
import sys

from dama_engine.data.formats import DataFormatError, load_and_validate
from dama_engine.data.validation import DataLimits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dama_engine.data.check", description=__doc__)
    parser.add_argument("path", help="a data file, a folder or an archive")
    parser.add_argument("--format", default="auto")
    parser.add_argument("--extract-dir", help="unpack an archive here (kept); default: a temporary folder")
    parser.add_argument("--max-rows", type=int, default=DataLimits().max_rows)
    args = parser.parse_args(argv)
    limits = DataLimits(max_rows=args.max_rows)
    try:
        rows, report = load_and_validate(args.path, format=args.format, limits=limits, extract_dir=args.extract_dir)
    except (DataFormatError, OSError) as error:
        print(json.dumps({"ok": False, "error": str(error)}))
        return 2
    print(
        json.dumps(
            {
                "ok": report.ok,
                "format": report.format,
                "row_count": report.total_rows,
                "valid_rows": len(rows),
                "image_count": sum(len(row.images) for row in rows),
                "report": report.to_dict(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
