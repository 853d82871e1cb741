"""Bundled small models with known circuits, their task generators and their training.

>>> from tl_circuits.bundled import bundled_tasks, list_bundled_models
>>> [info.name for info in list_bundled_models()]
['induction-2l', 'induction-counting-2l', 'planted-conflict-2l']
>>> sorted(bundled_tasks("induction-counting-2l"))
['counting', 'induction']
"""

from tl_circuits.bundled.models import (
    DEFAULT_BUNDLED_MODEL,
    BundledModelInfo,
    bundled_model_info,
    bundled_tasks,
    head_detector_scores,
    list_bundled_models,
    load_bundled_model,
)
from tl_circuits.bundled.samples import distinct_batch, duplicate_groups, n_distinct_rows
from tl_circuits.bundled.tasks import (
    TaskBatch,
    counting_batch,
    in_context_accuracy,
    in_context_loss,
    induction_batch,
    random_batch,
    scored_loss,
    scored_loss_metric,
    skip_induction_batch,
    task_tokenizer,
)

__all__ = [
    "DEFAULT_BUNDLED_MODEL", "BundledModelInfo", "TaskBatch", "bundled_model_info", "bundled_tasks", "counting_batch",
    "distinct_batch", "duplicate_groups", "head_detector_scores", "in_context_accuracy", "in_context_loss",
    "induction_batch", "list_bundled_models", "load_bundled_model", "n_distinct_rows", "random_batch", "scored_loss",
    "scored_loss_metric", "skip_induction_batch", "task_tokenizer",
]
