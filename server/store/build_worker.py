"""Build one Qdrant Edge shard's indexes in a process of its own.

qdrant-edge-py holds the GIL for the whole of `EdgeShard.optimize()` (measured: a thread
ticking every 5 ms did not run once during a 20k-point, 89 s build), so an in-process build
would stop every request of the server. `server.store.building` copies the shard, runs this on
the copy, and swaps the result in; the serving shard is never opened here.

    python -m server.store.build_worker COPY_DIR --field group:keyword
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("path", help="the copied shard's directory")
    parser.add_argument(
        "--field", action="append", default=[], help="FIELD:KIND payload index to create first"
    )
    parser.add_argument("--parent", type=int, help="exit when this process does (Linux)")
    return parser.parse_args(argv)


def die_with(parent: int | None) -> None:
    """A server killed mid-build takes its builder with it (PR_SET_PDEATHSIG): the copy it
    was writing is removed when the server opens the store again."""
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the call
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    die_with(args.parent)
    os.nice(10)  # the server's requests come first on the cores the build shares with them
    import qdrant_edge as qe

    from server.store.edge import FIELD_PARAMS

    start = time.perf_counter()
    shard = qe.EdgeShard.load(args.path)
    try:
        for spec in args.field:
            field, kind = spec.rsplit(":", 1)
            params = FIELD_PARAMS[kind]()
            shard.update(qe.UpdateOperation.create_field_index(field, params))
        shard.optimize()
        info = shard.info()
        shard.flush()
        done = {"points": info.points_count, "indexed": info.indexed_vectors_count}
    finally:
        shard.close()
    done["seconds"] = round(time.perf_counter() - start, 3)
    print(json.dumps(done), flush=True)  # the one line the parent reads
    return 0


if __name__ == "__main__":
    sys.exit(main())
