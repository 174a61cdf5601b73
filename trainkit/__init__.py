"""trainkit: a reference distributed-training runtime with the Ray Train V2 API, plus a test harness.

Swap ``ray.train`` for ``trainkit`` in a Ray Train V2 program:

>>> import trainkit
>>> from trainkit.torch import TorchTrainer  # doctest: +SKIP
>>> TorchTrainer(train_func, scaling_config=trainkit.ScalingConfig(num_workers=2)).fit()  # doctest: +SKIP
"""

from trainkit import collective
from trainkit.callback import UserCallback
from trainkit.checkpoint import Checkpoint
from trainkit.config import (TRAIN_DATASET_KEY, BackendConfig, CheckpointConfig, CheckpointConsistencyMode,
                             CheckpointUploadMode, DataConfig, FailureConfig, HangConfig, LoggingConfig, RunConfig,
                             ScalingConfig, StragglerConfig, SyncConfig, ValidationConfig, ValidationFn,
                             ValidationTaskConfig)
from trainkit.errors import (CheckpointError, ConfigError, ControllerError, HangDetectedError, NCCLHangError,
                             PreemptionError, PreemptionInfo, RunOwnedError, ScenarioError, StorageError,
                             TrainingFailedError, TrainkitError, WorkerGroupError)
from trainkit.result import Result
from trainkit.session import (ReportedCheckpoint, ReportedCheckpointStatus, TrainContext,
                              get_all_reported_checkpoints, get_checkpoint, get_context, get_dataset_shard,
                              get_preemption_info, report)
from trainkit.trainer import DataParallelTrainer

__version__ = "0.1.0"

__all__ = [
    "Checkpoint", "CheckpointConfig", "FailureConfig", "HangConfig", "RunConfig", "ScalingConfig", "StragglerConfig",
    "DataConfig", "LoggingConfig", "SyncConfig", "BackendConfig", "CheckpointUploadMode", "CheckpointConsistencyMode",
    "ValidationConfig", "ValidationFn", "ValidationTaskConfig", "TRAIN_DATASET_KEY", "UserCallback",
    "Result",
    "DataParallelTrainer", "TrainContext", "ReportedCheckpoint", "ReportedCheckpointStatus", "PreemptionInfo",
    "report", "get_checkpoint", "get_all_reported_checkpoints", "get_context", "get_dataset_shard",
    "get_preemption_info", "collective",
    "TrainkitError", "ConfigError", "ScenarioError", "StorageError", "RunOwnedError", "CheckpointError", "TrainingFailedError",
    "WorkerGroupError", "ControllerError", "HangDetectedError", "NCCLHangError", "PreemptionError",
]
