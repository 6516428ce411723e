"""One task sequence from several generated datasets: e.g. the synthetic bench suite's six
tasks followed by Fashion-MNIST's groups.

Each part is a folder a generator wrote (`lpi.continual.data.synthetic`,
`lpi.continual.data.fashion_mnist`): manifest.jsonl and task_families.json. The combined folder
gets manifest.jsonl (the parts' records, tasks in part order, images left where they are),
pretrain.jsonl (the parts' pretraining records, where a part has them), task_families.json,
and task_similarity.json: the Jaccard of the families of every pair of tasks, across parts as
within them. Task names must be distinct across parts. A part named --optional that is
missing (Fashion-MNIST not installed) is skipped with a message instead of an error.

    python -m lpi.continual.data.synthetic --suite bench --out data/synthetic
    python -m lpi.continual.data.fashion_mnist --out data/fashion
    python -m lpi.continual.data.combine --out data/bench --parts data/synthetic \
        --optional data/fashion --tasks shapes-colours textures positions sizes-backgrounds \
        backgrounds-positions counts tops
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from lpi.continual.data.manifest import read_manifest, select, write_manifest
from lpi.continual.data.synthetic import write_task_similarity

log = logging.getLogger(__name__)
SOURCE = "combined: Jaccard of the attribute families each task's captions vary"


def combine(
    out: str | Path,
    parts: Sequence[str | Path],
    tasks: Sequence[str] | None = None,
    optional: Sequence[str | Path] = (),
) -> list[str]:
    """Write the combined folder; return its tasks in order. `tasks` keeps only those, in
    the parts' order (None: all). Raises ValueError for a repeated or unknown task name."""
    out = Path(out)
    folders = [Path(p) for p in parts]
    for folder in map(Path, optional):
        if (folder / "manifest.jsonl").is_file():
            folders.append(folder)
        else:
            log.warning("skipping %s: it holds no manifest.jsonl (not generated?)", folder)
    records: list = []
    pretrain: list = []
    families: dict[str, frozenset[str]] = {}
    for folder in folders:
        part_families = json.loads((folder / "task_families.json").read_text())
        repeated = sorted(set(part_families) & set(families))
        if repeated:
            raise ValueError(f"{folder}: task(s) {', '.join(repeated)} also in an earlier part")
        families.update({task: frozenset(f) for task, f in part_families.items()})
        records += read_manifest(folder / "manifest.jsonl")
        if (folder / "pretrain.jsonl").is_file():
            pretrain += read_manifest(folder / "pretrain.jsonl")
    wanted = list(families) if tasks is None else list(tasks)
    unknown = sorted(set(wanted) - set(families))
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; the parts hold {list(families)}")
    order = [task for task in families if task in wanted]
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out / "manifest.jsonl", [r for t in order for r in select(records, t)])
    if pretrain:
        write_manifest(out / "pretrain.jsonl", pretrain)
    write_task_similarity(out, {task: families[task] for task in order}, SOURCE)
    return order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lpi.continual.data.combine",
        description="Append generated datasets into one task sequence with its task similarity.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--parts", type=Path, nargs="+", required=True, help="dataset folders")
    parser.add_argument(
        "--optional", type=Path, nargs="*", default=[], help="folders skipped when absent"
    )
    parser.add_argument("--tasks", nargs="*", help="keep only these tasks (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        order = combine(args.out, args.parts, args.tasks, args.optional)
    except (ValueError, OSError) as error:
        log.error("%s", error)
        return 2
    print(f"wrote {args.out}/manifest.jsonl: {len(order)} tasks, {', '.join(order)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
