"""`siglip train`: the configuration (config.py), one step (step.py), the loop (loop.py) and what it writes.

    config.py         TrainConfig: every flag, its YAML, its validation; saved inside each checkpoint
    processes.py      one process, or one rank of a torchrun job
    run_directory.py  --out: metrics, TensorBoard, checkpoints, resume
    step.py           the towers, the loss and micro-batches: one step's forward and backward
    feature_cache.py  SigLiT's cache of a locked image tower's embeddings
    guard.py          non-finite updates skipped and counted; a run that diverged stopped (exit status 3)
    captions.py       captions cut short by the text length, counted
    summary.py        held-out evaluation, the end-of-run table and plots
    loop.py           `train(config)`, which wires the above
"""

from siglip.train.config import TrainConfig, load_config, validate_config
from siglip.train.loop import add_arguments, run, train

__all__ = ["TrainConfig", "add_arguments", "load_config", "run", "train", "validate_config"]
