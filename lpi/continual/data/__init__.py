"""Data for continual retrieval: task-split manifests, readers, synthetic images, loaders.

The readers (`lpi.continual.data.coco`, `lpi.continual.data.fashion_mnist`) and the synthetic
generator (`lpi.continual.data.synthetic`) are CLIs as well as modules, so they are imported by
name rather than here (runpy warns about a module that its package has already imported).
"""

from lpi.continual.data.loader import (
    Batch,
    CaptionDataset,
    CaptionSampler,
    EvalSet,
    collate,
    eval_captions,
    eval_set,
    image_batches,
    load_pixels,
    make_loader,
)
from lpi.continual.data.manifest import (
    SPLITS,
    ManifestError,
    Record,
    group,
    read_manifest,
    select,
    tasks,
    write_manifest,
)

__all__ = [
    "SPLITS",
    "Batch",
    "CaptionDataset",
    "CaptionSampler",
    "EvalSet",
    "ManifestError",
    "Record",
    "collate",
    "eval_captions",
    "eval_set",
    "group",
    "image_batches",
    "load_pixels",
    "make_loader",
    "read_manifest",
    "select",
    "tasks",
    "write_manifest",
]
