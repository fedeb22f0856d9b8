"""Pretext tasks, registered by name in :data:`TASKS`; each module is imported here so it registers."""

from capvis.tasks import captioning
from capvis.tasks import classification  # token_classification, multilabel_classification
from capvis.tasks import coca
from capvis.tasks import contrastive
from capvis.tasks import icmlm
from capvis.tasks import masked_lm
from capvis.tasks.base import TASKS, PretextTask, TaskOutput, build_task, count_parameters
from capvis.tasks.captioning import BicaptioningTask, CaptioningTask

__all__ = ["TASKS", "BicaptioningTask", "CaptioningTask", "PretextTask", "TaskOutput", "build_task",
           "captioning", "classification", "coca", "contrastive", "count_parameters", "icmlm", "masked_lm"]
