"""jaxtrain: a JAX/Flax training library with sharded training."""

from jaxtrain.api import Trainer, build_task, train
from jaxtrain.checkpoint import CheckpointSaveError
from jaxtrain.config import ConfigError, base_config
from jaxtrain.evaluator import EvalContext, Evaluator, HeldoutEvaluator, LoopEvaluator
from jaxtrain.evaluators import eval_config, register_evaluator
from jaxtrain.hooks import Hook, Loop, NonFiniteError
from jaxtrain.models import ModelFamily, get_model, register_model
from jaxtrain.state import TrainState
from jaxtrain.task import Task
from jaxtrain.tasks import get_task, register_task
from jaxtrain.trainer import TrainResult

__version__ = "0.1.0"

__all__ = [
    "CheckpointSaveError", "ConfigError", "EvalContext", "Evaluator", "HeldoutEvaluator",
    "Hook", "Loop", "LoopEvaluator", "ModelFamily", "NonFiniteError", "Task", "TrainResult",
    "TrainState", "Trainer", "base_config", "build_task", "eval_config", "get_model",
    "get_task", "register_evaluator", "register_model", "register_task", "train",
]
