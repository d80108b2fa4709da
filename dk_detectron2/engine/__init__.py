"""Training pieces: ``DKTrainer``, a backend-aware ``launch`` and CPU-capable DDP wrapping."""
from .ddp import create_ddp_model, device_aware_ddp
from .hooks import GeneratorWarmup
from .launch import backend_for_device, launch
from .trainer import DKTrainer
from .visualize import draw_instances, save_prediction_images

__all__ = [
    "DKTrainer",
    "GeneratorWarmup",
    "backend_for_device",
    "create_ddp_model",
    "device_aware_ddp",
    "draw_instances",
    "launch",
    "save_prediction_images",
]
