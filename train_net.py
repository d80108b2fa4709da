#!/usr/bin/env python
"""Train and evaluate Deformable-Kernel Mask R-CNNs with Detectron2.

Detectron2's ``tools/train_net.py`` workflow with ``import dk_detectron2`` (DK backbones, MODEL.DK
keys, the embedded ``dk_shapes`` datasets), COCO evaluation, and multi-process training on GPUs
(nccl) or on the CPU (gloo, ``MODEL.DEVICE cpu``). Examples::

    # the embedded job: DK Mask R-CNN on dk_shapes, on the CPU
    python train_net.py --config-file configs/shapes/mask_rcnn_dk_R18_FPN_shapes.yaml
    # evaluate a checkpoint
    python train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/x/model_final.pth
    # 8 GPUs; or 2 CPU processes with gloo
    python train_net.py --config-file CFG --num-gpus 8
    python train_net.py --config-file CFG --num-processes 2 MODEL.DEVICE cpu
    # two machines
    (machine0)$ python train_net.py --config-file CFG --num-gpus 8 --num-machines 2 \
                    --machine-rank 0 --dist-url tcp://HOST0:PORT
    (machine1)$ ... --machine-rank 1 --dist-url tcp://HOST0:PORT
"""
import logging
import os
from datetime import timedelta

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm

import dk_detectron2  # noqa: F401  (registers DK backbones and the dk_shapes datasets)
from dk_detectron2 import add_dk_config
from dk_detectron2.checkpoint import DKCheckpointer
from dk_detectron2.data import check_datasets_available
from dk_detectron2.engine import DKTrainer, backend_for_device, launch

Trainer = DKTrainer


def argument_parser():
    """Detectron2's ``default_argument_parser`` plus ``--num-processes``, ``--dist-backend`` and
    ``--dist-timeout``."""
    parser = default_argument_parser()
    parser.add_argument(
        "--num-processes", type=int, default=None,
        help="processes per machine; same as --num-gpus, clearer for CPU (gloo) runs",
    )
    parser.add_argument(
        "--dist-backend", choices=("auto", "gloo", "nccl"), default="auto",
        help="process-group backend; auto: nccl when MODEL.DEVICE is cuda, else gloo",
    )
    parser.add_argument(
        "--dist-timeout", type=float, default=DEFAULT_TIMEOUT.total_seconds(), metavar="SECONDS",
        help="how long a collective (all-reduce, barrier) waits for a process that stopped "
        "answering before the job fails (default %(default)g s, as Detectron2's); a worker that "
        "exits or is killed ends the job at once whatever this is. Keep it above the longest "
        "evaluation (the other processes wait for rank 0's COCOeval at a barrier)",
    )
    return parser


def build_config(args):
    """The config of ``args``: Detectron2 defaults + MODEL.DK, the file, then command-line overrides."""
    cfg = get_cfg()
    add_dk_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def setup(args):
    """Config, logging and output folder; checks that the datasets exist (or generates them)."""
    cfg = build_config(args)
    default_setup(cfg, args)
    if comm.is_main_process():  # generate embedded datasets once; others wait at the barrier
        check_datasets_available(tuple(cfg.DATASETS.TRAIN) + tuple(cfg.DATASETS.TEST))
    comm.synchronize()
    if not comm.is_main_process():
        check_datasets_available(tuple(cfg.DATASETS.TRAIN) + tuple(cfg.DATASETS.TEST))
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # Converts a rigid checkpoint's 3x3 kernels into DK scopes; a checkpoint of another
        # configuration (missing, extra or other-shaped tensors) is an error, not a half-loaded
        # model, unless MODEL.ALLOW_PARTIAL_WEIGHTS.
        partial = cfg.MODEL.ALLOW_PARTIAL_WEIGHTS
        DKCheckpointer(
            model, save_dir=cfg.OUTPUT_DIR, strict=not partial, skip_mismatched=partial
        ).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def launch_from_args(args):
    """Starts ``main`` in ``--num-processes``/``--num-gpus`` processes per machine."""
    num_processes = args.num_processes if args.num_processes is not None else args.num_gpus
    backend = args.dist_backend
    if backend == "auto":
        backend = backend_for_device(build_config(args).MODEL.DEVICE)
    logging.getLogger("dk_detectron2").info(f"Command Line Args: {args}")
    return launch(
        main,
        num_processes,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        backend=backend,
        timeout=timedelta(seconds=args.dist_timeout),
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    launch_from_args(argument_parser().parse_args())
