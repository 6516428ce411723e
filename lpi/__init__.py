"""lpi: a frozen CLIP backbone with low-rank deep task prompts (LPI, ACM MM 2024).

Torch only: this package imports nothing of the server, the store, the web stack, onnx or
triton (a CI contract keeps it so).
"""

from lpi.backbone import Backbone
from lpi.checkpoint import CheckpointError, fingerprint, load_backbone, save_backbone
from lpi.config import ClipConfig, PromptConfig, TextConfig, VisionConfig, load_preset
from lpi.fold import FoldedTask, FoldedTower, fold_task
from lpi.prefix import Prefix, SlotPrefix, TaskPrefix, batch_prefix, task_prefix
from lpi.preprocess import preprocess
from lpi.prompts import DensePrompts, PromptBank, TaskPrompts
from lpi.tokenizer import tokenize

__all__ = [
    "Backbone",
    "CheckpointError",
    "ClipConfig",
    "DensePrompts",
    "FoldedTask",
    "FoldedTower",
    "Prefix",
    "PromptBank",
    "PromptConfig",
    "SlotPrefix",
    "TaskPrefix",
    "TaskPrompts",
    "TextConfig",
    "VisionConfig",
    "batch_prefix",
    "fingerprint",
    "fold_task",
    "load_backbone",
    "load_preset",
    "preprocess",
    "save_backbone",
    "task_prefix",
    "tokenize",
]
