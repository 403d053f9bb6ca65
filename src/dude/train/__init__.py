"""Fine-tuning: typed configs and the training loop behind ``dude train`` and ``dude compare``.

    from dude.train import TrainConfig, train
    cfg = TrainConfig()                       # or options.build(TrainConfig, yaml_dict)
    cfg.adapter.method = "dude"
    result = train(cfg)                       # writes cfg.run.output_dir
"""

from .config import DataConfig, EvalConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from .loop import TrainingDiverged, TrainResult, train

__all__ = ["DataConfig", "EvalConfig", "ModelConfig", "OptimConfig", "RunConfig", "TrainConfig",
           "TrainResult", "TrainingDiverged", "train"]
