"""Write one half of IU dev (DESIGN.md section 6) to a JSONL file, to ingest as a source.

    python benchmarks/iu_half.py --half development --output ../iu-dev-development.jsonl

Train a student on the development half (plus radlabels), then score it on the locked half with
`teachers_iu.py --student`. Write the file outside the repo: the IU reports are not redistributed with it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from teachers_iu import DEFAULT_DATA

from deberta_rad.data import json_lines
from deberta_rad.gold import iu_half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="IU X-ray dev.jsonl")
    parser.add_argument("--half", choices=("development", "locked"), default="development")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"{args.data} not found (expected ../shared/data beside the repo)")
    records = [record for _, record in json_lines(args.data) if iu_half(record["report_id"]) == args.half]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("".join(json.dumps(record) + "\n" for record in records))
    print(f"wrote the {len(records)} reports of the {args.half} half to {args.output}")


if __name__ == "__main__":
    main()
