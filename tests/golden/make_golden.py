"""Write the golden bitstreams and their decoded-pixel hashes.

Run once per shipped model (``python -m tests.golden.make_golden``); never
regenerate existing files: they guard that data written by earlier releases
keeps decoding to the same pixels."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from dicom_nncodec import codec

from .sources import SOURCES

HERE = Path(__file__).parent


def main():
    index_path = HERE / "golden.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    for name, (frames, fmt, options, model_id) in SOURCES.items():
        if name in index:
            continue
        files = []
        for i, data in enumerate(codec.encode_frames(frames(), fmt, model_id=model_id, **options)):
            path = HERE / f"{name}.{i}.nncf"
            if path.exists():
                raise SystemExit(f"{path} exists: golden files are never rewritten")
            path.write_bytes(data)
            decoded = codec.decode_frame(data, fmt)
            files.append({"file": path.name, "pixels_sha256": hashlib.sha256(np.ascontiguousarray(decoded).tobytes()).hexdigest()})
        index[name] = {"options": options, "model": model_id, "frames": files}
    index_path.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
