"""jaxtrain: a JAX/Flax training library with sharded training."""

from jaxtrain.config import ConfigError, base_config
from jaxtrain.state import TrainState
from jaxtrain.tasks import Task, get_task, register_task
from jaxtrain.trainer import CheckpointSaveError, NonFiniteError, Trainer, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "CheckpointSaveError", "ConfigError", "NonFiniteError", "Task", "TrainResult", "TrainState",
    "Trainer", "base_config", "get_task", "register_task", "train",
]
