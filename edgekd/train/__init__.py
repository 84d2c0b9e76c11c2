"""The one training loop, shared by fine-tuning, distillation and quantization-aware distillation.

It knows nothing about teachers or quantizers: callers pass a ``loss_fn(model, batch, x)`` that
returns ``(loss, logits)``. What it owns: AdamW/SGD with linear warm-up + cosine decay,
checkpoint every epoch (``last.pt``) and on a new best validation top-1 (``best.pt``), resume
after an interruption, AMP on CUDA, DistributedDataParallel when launched by ``torchrun``
(NCCL on GPUs, gloo on CPU), and metrics JSON beside the checkpoint.

Modules: ``env`` (seeding, device, ranks), ``schedule`` (optimiser, schedule, length fitted to
the data, early stopping), ``evaluation`` (logits, accuracy), ``loop`` (``fit``, checkpoints,
resume, final metrics).
"""

from edgekd.train.env import DistEnv, device, init_distributed, seed_everything
from edgekd.train.evaluation import evaluate, predict_logits
from edgekd.train.loop import FitOptions, FitResult, LossFn, SaveFn, batch_input, cross_entropy_loss, final_metrics, fit
from edgekd.train.schedule import fit_to_data, make_optimizer, make_scheduler, score, stop_reason

__all__ = ["DistEnv", "FitOptions", "FitResult", "LossFn", "SaveFn", "batch_input", "cross_entropy_loss", "device", "evaluate", "final_metrics",
           "fit", "fit_to_data", "init_distributed", "make_optimizer", "make_scheduler", "predict_logits", "score", "seed_everything", "stop_reason"]
