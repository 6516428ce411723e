"""Manifests from COCO captions and from Karpathy's split files (COCO, Flickr30k).

The 12-task COCO protocol (spec/original-code-notes.md, 5a): one task per COCO supercategory,
arriving in the order appliance, sports, outdoor, electronic, accessory, indoor, kitchen,
furniture, vehicle, food, animal, person. The public code reads the task of each image from a
preprocessed file that is not published, so the rule here is ours: **an image belongs to the
supercategory of its largest-area instance annotation** (non-crowd annotations first; crowd
regions only when an image has nothing else; ties go to the lower annotation id). Images
without instance annotations (about 1% of COCO) have no task and are left out. The largest
object is what captions most often describe, and one image gets exactly one task, so task test
sets never share an image.

Captions are lower-cased, stripped of punctuation and cut to 30 words, as the notes say the
public code's captions are (the punctuation set is BLIP's `pre_caption`, an assumption).

    python -m lpi.continual.data.coco coco --root COCO --out coco.jsonl
    python -m lpi.continual.data.coco karpathy --json dataset_flickr30k.json \
        --images flickr30k-images --num-tasks 4 --out flickr.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lpi.continual.data.manifest import Record, group, tasks, write_manifest

log = logging.getLogger(__name__)

# COCO's supercategories in COCO order: the public code's category ids 1..12.
SUPERCATEGORIES = (
    "person",
    "vehicle",
    "outdoor",
    "animal",
    "accessory",
    "sports",
    "kitchen",
    "food",
    "furniture",
    "electronic",
    "appliance",
    "indoor",
)
TASK_ORDER_IDS = (11, 6, 3, 10, 5, 12, 7, 9, 2, 8, 4, 1)  # utils/data.py of the public code
COCO_TASKS = tuple(SUPERCATEGORIES[i - 1] for i in TASK_ORDER_IDS)
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
MAX_WORDS = 30
_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")


def clean_caption(text: str, max_words: int = MAX_WORDS) -> str:
    """Lower-case, drop punctuation, squeeze whitespace, keep the first `max_words` words."""
    text = _PUNCTUATION.sub(" ", text.lower())
    return " ".join(text.split()[:max_words])


def load_json(path: str | Path) -> dict:
    """A JSON object from disk; errors name the file."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as file:
            data = json.load(file)
    except OSError as error:
        raise ValueError(f"{path}: cannot read ({error.strerror})") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: malformed JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return data


def _field(data: Mapping, key: str, where: str) -> Any:
    if not isinstance(data, Mapping) or key not in data:
        raise ValueError(f"{where}: missing '{key}'")
    return data[key]


# --- COCO captions + instances -----------------------------------------------------------------


def image_tasks(instances: Mapping, where: str = "instances") -> dict[int, str]:
    """image id -> supercategory of its largest-area annotation (crowd regions last)."""
    supercategory = {}
    for index, category in enumerate(_field(instances, "categories", where)):
        name = _field(category, "supercategory", f"{where}: categories[{index}]")
        if name not in SUPERCATEGORIES:
            raise ValueError(f"{where}: categories[{index}] has unknown supercategory {name!r}")
        supercategory[_field(category, "id", f"{where}: categories[{index}]")] = name
    best: dict[int, tuple] = {}
    for index, ann in enumerate(_field(instances, "annotations", where)):
        here = f"{where}: annotations[{index}]"
        category = _field(ann, "category_id", here)
        if category not in supercategory:
            raise ValueError(f"{here}: category_id {category} is not in 'categories'")
        # Larger key wins: non-crowd first, then area, then the lower annotation id.
        key = (not ann.get("iscrowd", 0), float(_field(ann, "area", here)), -ann.get("id", index))
        image = _field(ann, "image_id", here)
        if image not in best or key > best[image][0]:
            best[image] = (key, supercategory[category])
    return {image: name for image, (_, name) in best.items()}


def coco_records(
    captions_json: str | Path,
    instances_json: str | Path,
    image_dir: str | Path,
    split: str,
    max_per_task: int | None = None,
    clean: bool = True,
) -> list[Record]:
    """COCO captions -> records in the protocol's task order, capped per task by image id."""
    captions = load_json(captions_json)
    task_of = image_tasks(load_json(instances_json), str(instances_json))
    files = {}
    for index, image in enumerate(_field(captions, "images", str(captions_json))):
        here = f"{captions_json}: images[{index}]"
        files[_field(image, "id", here)] = _field(image, "file_name", here)
    texts = _captions_by_image(captions, str(captions_json), clean)
    order = {name: rank for rank, name in enumerate(COCO_TASKS)}
    keep = sorted(
        (i for i in files if i in task_of and texts.get(i)), key=lambda i: (order[task_of[i]], i)
    )
    _log_dropped(captions_json, files, task_of, texts)
    records = [Record(Path(image_dir) / files[i], tuple(texts[i]), task_of[i], split) for i in keep]
    return _cap_per_task(records, max_per_task)


def _captions_by_image(captions: Mapping, where: str, clean: bool) -> dict[int, list[str]]:
    texts: dict[int, list[str]] = {}
    annotations = _field(captions, "annotations", where)

    def by_id(pair: tuple[int, Mapping]) -> int:
        index, ann = pair
        key: int = ann.get("id", index) if isinstance(ann, Mapping) else index
        return key

    for index, ann in sorted(enumerate(annotations), key=by_id):
        here = f"{where}: annotations[{index}]"
        text = _field(ann, "caption", here)
        if not isinstance(text, str):
            raise ValueError(f"{here}: 'caption' is not a string")
        text = clean_caption(text) if clean else text.strip()
        if text:
            texts.setdefault(_field(ann, "image_id", here), []).append(text)
    return texts


def _log_dropped(where: str | Path, files: Mapping, task_of: Mapping, texts: Mapping) -> None:
    no_task = sum(i not in task_of for i in files)
    no_caption = sum(i in task_of and not texts.get(i) for i in files)
    if no_task or no_caption:
        log.info(
            "%s: left out %d image(s) without instances and %d without captions",
            where,
            no_task,
            no_caption,
        )


def _cap_per_task(records: list[Record], limit: int | None) -> list[Record]:
    if limit is None:
        return records
    counts: dict[str, int] = {}
    kept = []
    for record in records:
        counts[record.task] = counts.get(record.task, 0) + 1
        if counts[record.task] <= limit:
            kept.append(record)
    return kept


# --- Karpathy splits ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HashTasks:
    """K tasks for a dataset without categories: a stable hash of the file name picks one."""

    count: int
    prefix: str = "part"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"{self.prefix}-{k}" for k in range(self.count))

    def __call__(self, entry: Mapping) -> str:
        digest = hashlib.sha256(str(entry["filename"]).encode()).digest()
        return self.names[int.from_bytes(digest[:8], "big") % self.count]


@dataclass(frozen=True)
class CocoTasks:
    """The 12-task protocol on Karpathy's COCO split, through each entry's `cocoid`."""

    by_image: Mapping[int, str]
    names: tuple[str, ...] = COCO_TASKS

    @classmethod
    def from_instances(cls, paths: Iterable[str | Path]) -> CocoTasks:
        by_image: dict[int, str] = {}
        for path in paths:
            by_image.update(image_tasks(load_json(path), str(path)))
        return cls(by_image)

    def __call__(self, entry: Mapping) -> str | None:
        cocoid = entry.get("cocoid")
        return self.by_image.get(cocoid) if isinstance(cocoid, int) else None


TaskAssigner = HashTasks | CocoTasks | Callable[[Mapping], str | None]


def karpathy_records(
    json_path: str | Path, image_root: str | Path, task: str | TaskAssigner, clean: bool = True
) -> list[Record]:
    """Karpathy's dataset_*.json -> records; restval joins train; a None task drops the image."""
    entries = _field(load_json(json_path), "images", str(json_path))
    records = []
    for index, entry in enumerate(entries):
        record = _karpathy_record(entry, f"{json_path}: images[{index}]", image_root, task, clean)
        if record is not None:
            records.append(record)
    if len(records) < len(entries):
        log.info("%s: %d image(s) had no task or caption", json_path, len(entries) - len(records))
    names = getattr(task, "names", None) or tasks(records)
    order = {name: rank for rank, name in enumerate(names)}
    return sorted(records, key=lambda record: order.get(record.task, len(order)))


def _karpathy_record(
    entry: Mapping, where: str, image_root: str | Path, task: str | TaskAssigner, clean: bool
) -> Record | None:
    split = _field(entry, "split", where)
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"{where}: unknown split {split!r}")
    texts = []
    for number, sentence in enumerate(_field(entry, "sentences", where)):
        raw = _field(sentence, "raw", f"{where}.sentences[{number}]")
        if not isinstance(raw, str):
            raise ValueError(f"{where}.sentences[{number}]: 'raw' is not a string")
        text = clean_caption(raw) if clean else raw.strip()
        if text:
            texts.append(text)
    name = task if isinstance(task, str) else task(entry)
    if name is None or not texts:
        return None
    image = Path(image_root) / entry.get("filepath", "") / _field(entry, "filename", where)
    return Record(image, tuple(texts), name, KARPATHY_SPLITS[split])


# --- CLI ---------------------------------------------------------------------------------------


def _coco_main(args: argparse.Namespace) -> list[Record]:
    root = Path(args.root)
    notes = root / "annotations"
    records = []
    for year_split, split, limit in (
        ("train2017", "train", args.max_train_per_task),
        ("val2017", "test", args.max_test_per_task),
    ):
        records += coco_records(
            notes / f"captions_{year_split}.json",
            notes / f"instances_{year_split}.json",
            root / year_split,
            split,
            limit,
        )
    return records


def _karpathy_main(args: argparse.Namespace) -> list[Record]:
    task: str | TaskAssigner
    if args.instances:
        task = CocoTasks.from_instances(args.instances)
    elif args.num_tasks:
        task = HashTasks(args.num_tasks, args.task)
    else:
        task = args.task
    return karpathy_records(args.json, args.images, task)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lpi.continual.data.coco", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    coco = commands.add_parser("coco", help="COCO 2017: train2017 -> train, val2017 -> test")
    coco.add_argument(
        "--root", required=True, help="folder with annotations/, train2017/, val2017/"
    )
    coco.add_argument("--max-train-per-task", type=int, default=None)
    coco.add_argument("--max-test-per-task", type=int, default=None)
    karpathy = commands.add_parser("karpathy", help="Karpathy's dataset_coco/flickr30k.json")
    karpathy.add_argument(
        "--json", required=True, help="dataset_coco.json or dataset_flickr30k.json"
    )
    karpathy.add_argument("--images", required=True, help="root the entries' file paths are under")
    karpathy.add_argument(
        "--task", default="flickr30k", help="task name (or prefix with --num-tasks)"
    )
    karpathy.add_argument("--num-tasks", type=int, default=0, help="split into K tasks by hash")
    karpathy.add_argument(
        "--instances", nargs="*", default=None, help="COCO instances JSONs: the 12-task protocol"
    )
    for command in (coco, karpathy):
        command.add_argument("--out", required=True, help="manifest to write (JSONL)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    records = _coco_main(args) if args.command == "coco" else _karpathy_main(args)
    write_manifest(args.out, records)
    for (name, split), members in group(records).items():
        print(f"{name} {split}: {len(members)} images")
    print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
