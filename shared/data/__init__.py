"""Where users come from: real LaMP files, the Amazon-review tasks, and the synthetic generator.

Every source yields the same records (shared.records): a TaskDataset whose base users train the
shared base adapter and whose eval users are personalized and evaluated.
"""

from __future__ import annotations

from .amazon import build_amazon, default_data_root
from .lamp import lamp_task_name, load_lamp_dataset, read_lamp, write_lamp, write_predictions
from .sources import REAL_TASKS, SYNTHETIC_TASKS, load_dataset, topic_split
from .synthetic import make_synthetic, oracle_predict, oracle_scores

__all__ = [
    "REAL_TASKS",
    "SYNTHETIC_TASKS",
    "load_dataset",
    "topic_split",
    "build_amazon",
    "default_data_root",
    "lamp_task_name",
    "load_lamp_dataset",
    "make_synthetic",
    "oracle_predict",
    "oracle_scores",
    "read_lamp",
    "write_lamp",
    "write_predictions",
]
