"""Write tests/data/store-v2.tar.gz: a small store of format 2, made by the code that wrote format 2.

Run from a checkout of that code (git worktree add /tmp/v2 6603092), with this repository's tests on the path:

    cd /tmp/v2 && PYTHONPATH=/tmp/v2 python /path/to/tests/data/make_store_v2.py /path/to/tests/data

It holds a checkpoint and commits after it (a re-tiled slide whose old tiles must stay replaced, cached
pixels, labels, a failure), and ``expected.json``: what that code's SQL returned, for the migration test.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
import tempfile
from pathlib import Path

from featurestore.schemas import Failure, TilingSpec
from featurestore.store import Store
from tests.conftest import commit_random_slide, make_encoder

QUERIES = {
    "tiles": "SELECT slide_id, tile_index, x, y, tissue_fraction, tile_id FROM tiles ORDER BY ALL",
    "embeddings": "SELECT slide_id, tile_index, embedding FROM emb_test_enc ORDER BY ALL",
    "labels": "SELECT slide_id, label FROM labels ORDER BY ALL",
    "failures": "SELECT slide_path, stage FROM failures ORDER BY ALL",
    "tilings": "SELECT tiling_id FROM tilings ORDER BY ALL",
}


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store-v2"
        store = Store.create(root)
        tiling, enc = TilingSpec(0.5, 224), make_encoder(dim=8)
        for i in range(5):
            commit_random_slide(store, i, tiling, [enc], 4 + i, pixels=i == 0)
        csv = Path(tmp) / "labels.csv"
        csv.write_text("slide_id,label\n" + "".join(f"{i:032x},{i % 2}\n" for i in range(5)))
        store.import_labels(csv)
        store.checkpoint()
        commit_random_slide(store, 1, tiling, [enc], 3, seed=7)  # re-tiled after the checkpoint
        commit_random_slide(store, 5, tiling, [enc], 6)
        store.register(Failure("/data/broken.svs", "open", "SlideError", "cannot read", None))
        expected = {name: store.sql(q).to_pylist() for name, q in QUERIES.items()}
        (root / "expected.json").write_text(json.dumps({"queries": QUERIES, "rows": expected}, default=str))
        target = out / "store-v2.tar.gz"
        with tarfile.open(target, "w:gz") as tar:
            tar.add(root, arcname="store-v2")
    print(target, hashlib.sha256(target.read_bytes()).hexdigest())


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
