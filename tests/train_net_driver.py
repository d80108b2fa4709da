"""``train_net.py`` with tiny dk_shapes datasets registered; the train_net/distributed tests run it.

Faults (``$DK_TEST_FAULT``, for the kill and no-hang tests; each prints a ``DK_TEST_FAULT`` line
to stderr when it happens):

- ``stall-iteration:N``: rank 0 sleeps at the start of iteration N (inside the training step);
- ``stall-save:NAME``: the save of ``NAME.pth`` sleeps after writing, before its rename;
- ``stall-metrics:N``: rank 0 writes the first half of ``metrics.json``'s record of iteration N
  (flushed to disk) and sleeps, as a process killed while appending it would leave the file;
- ``stall-evaluation[:N]``: rank 0 sleeps inside the evaluation, after inference (with ``:N``,
  only in the evaluation logged at iteration N: one of ``TEST.EVAL_PERIOD``'s, or ``MAX_ITER``
  for the final one);
- ``raise:RANK:N`` / ``kill:RANK:N``: rank RANK raises / SIGKILLs itself at iteration N, while
  the other ranks sleep in that iteration, outside any collective (inside one, gloo would notice
  the lost peer by itself: only the launcher's teardown ends a worker busy elsewhere);
- ``detectron2-resume``: not a fault but a broken variant: Detectron2's train loader, without
  the exact-resume state (what ``--resume`` does in plain Detectron2);
- ``no-allreduce``: a broken variant: models are not wrapped in DDP, so gradients are not
  averaged across processes.

Datasets (under ``$DK_TEST_DATASETS``): ``dk_shapes_tiny_train`` (8 images, 64 px),
``dk_shapes_tiny_val`` (4 images), ``dk_shapes_one`` (1 image, so that every process of a
multi-process run sees the same picture) and ``dk_shapes_two`` (2 images, one object each).
Registration is at module level so that the workers spawned by ``launch`` (which re-import this
file) have them too.

The writers (console, ``metrics.json``, TensorBoard) write after every iteration, not every 20
as in Detectron2, so that a comparison of ``metrics.json`` sees every iteration's values; with
``$DK_TEST_SHIPPED_WRITER_PERIOD`` set they keep Detectron2's period (20), as ``train_net.py``
ships them. With
``$DK_TEST_SAVE_INITIAL`` set, rank 0 saves the parameters that training starts from (after
loading and the DDP broadcast) into ``OUTPUT_DIR/initial_parameters.pth``.
"""
import json
import os
import signal
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import train_net  # noqa: E402
from dk_detectron2.data import ShapesSpec, register_shapes_dataset  # noqa: E402

ROOT = os.environ.get("DK_TEST_DATASETS")  # unset when a test only imports CONFIG/TINY_OPTS
TINY_DATASETS = {
    "dk_shapes_tiny_train": ("tiny_train", ShapesSpec(num_images=8, image_size=64, max_objects=2)),
    "dk_shapes_tiny_val": ("tiny_val", ShapesSpec(num_images=4, image_size=64, max_objects=2)),
    "dk_shapes_one": ("one", ShapesSpec(num_images=1, image_size=64, max_objects=2)),
    "dk_shapes_two": ("two", ShapesSpec(num_images=2, image_size=64, max_objects=1)),
}
if ROOT:
    for _name, (_split, _spec) in TINY_DATASETS.items():
        register_shapes_dataset(_name, ROOT, _split, _spec)


def _announce_and_stall(where):
    sys.stderr.write(f"DK_TEST_FAULT {where}\n")
    sys.stderr.flush()
    time.sleep(600)


def _install_fault(fault):
    """Patches train_net's code path so that ``fault`` (see the module docstring) happens."""
    from detectron2.engine import train_loop
    from detectron2.evaluation import COCOEvaluator
    from detectron2.utils import comm

    kind, _, where = fault.partition(":")
    if kind == "no-allreduce":
        from detectron2.engine import defaults

        from dk_detectron2.engine import ddp

        ddp._d2_create_ddp_model = lambda model, **kwargs: model
        defaults.create_ddp_model = lambda model, **kwargs: model
    elif kind == "detectron2-resume":
        from detectron2.engine import DefaultTrainer

        train_net.Trainer.build_train_loader = DefaultTrainer.build_train_loader
    elif kind == "stall-save":
        fsync = os.fsync

        def stalling_fsync(fd):
            if f"{where}.pth.tmp." in os.readlink(f"/proc/self/fd/{fd}"):
                _announce_and_stall(f"stalled in the save of {where}.pth")
            return fsync(fd)

        os.fsync = stalling_fsync
    elif kind == "stall-metrics":
        from detectron2.utils.events import JSONWriter

        write = JSONWriter.write

        class TearingFile:
            """metrics.json's handle, writing half of the record of iteration ``where``."""

            def __init__(self, handle):
                self.handle = handle

            def write(self, text):
                if json.loads(text)["iteration"] == int(where):
                    self.handle.write(text[: len(text) // 2])
                    self.handle.flush()
                    os.fsync(self.handle.fileno())
                    _announce_and_stall(f"stalled in metrics.json's record of iteration {where}")
                return self.handle.write(text)

            def __getattr__(self, name):
                return getattr(self.handle, name)

        def tearing_write(self):
            handle, self._file_handle = self._file_handle, TearingFile(self._file_handle)
            try:
                return write(self)
            finally:
                self._file_handle = handle

        JSONWriter.write = tearing_write
    elif kind == "stall-evaluation":
        from detectron2.utils.events import get_event_storage

        evaluate = COCOEvaluator.evaluate

        def stalling_evaluate(self, *args, **kwargs):
            if comm.is_main_process() and (not where or get_event_storage().iter == int(where)):
                _announce_and_stall("stalled in the evaluation"
                                    + (f" of iteration {where}" if where else ""))
            return evaluate(self, *args, **kwargs)

        COCOEvaluator.evaluate = stalling_evaluate
    elif kind in ("stall-iteration", "raise", "kill"):
        if kind == "stall-iteration":
            rank, iteration = 0, int(where)
        else:
            rank, iteration = map(int, where.split(":"))
        run_step = train_loop.SimpleTrainer.run_step

        def faulty_run_step(self):
            if self.iter == iteration and comm.get_rank() != rank and kind != "stall-iteration":
                time.sleep(600)  # busy elsewhere than in a collective when rank `rank` fails
            if self.iter == iteration and comm.get_rank() == rank:
                if kind == "stall-iteration":
                    _announce_and_stall(f"stalled in iteration {iteration}")
                sys.stderr.write(f"DK_TEST_FAULT rank {rank} fails in iteration {iteration}\n")
                sys.stderr.flush()
                if kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected failure of rank {rank} in iteration {iteration}")
            return run_step(self)

        train_loop.SimpleTrainer.run_step = faulty_run_step
    else:
        raise ValueError(f"unknown DK_TEST_FAULT {fault!r}")


def _write_every_iteration():
    from detectron2.engine.hooks import PeriodicWriter

    build_hooks = train_net.Trainer.build_hooks

    def build_hooks_writing_every_iteration(self):
        hooks = build_hooks(self)
        for hook in hooks:
            if isinstance(hook, PeriodicWriter):
                hook._period = 1
        return hooks

    train_net.Trainer.build_hooks = build_hooks_writing_every_iteration


def _save_initial_parameters():
    import torch
    from detectron2.utils import comm

    train = train_net.Trainer.train

    def train_saving_initial_parameters(self):
        if comm.is_main_process():
            model = getattr(self.model, "module", self.model)
            torch.save({k: v.detach().clone() for k, v in model.named_parameters()},
                       os.path.join(self.cfg.OUTPUT_DIR, "initial_parameters.pth"))
        return train(self)

    train_net.Trainer.train = train_saving_initial_parameters


if not os.environ.get("DK_TEST_SHIPPED_WRITER_PERIOD"):
    _write_every_iteration()
if os.environ.get("DK_TEST_SAVE_INITIAL"):
    _save_initial_parameters()
if os.environ.get("DK_TEST_FAULT"):
    _install_fault(os.environ["DK_TEST_FAULT"])

# A DK Mask R-CNN small enough for a test: the embedded job's config with tiny widths.
CONFIG = os.path.join(REPO, "configs", "shapes", "mask_rcnn_dk_R18_FPN_shapes.yaml")
TINY_OPTS = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "8", "MODEL.RESNETS.RES2_OUT_CHANNELS", "8",
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "16",  # GN: 32 groups
    "MODEL.ROI_BOX_HEAD.CONV_DIM", "32", "MODEL.ROI_BOX_HEAD.NUM_CONV", "1",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "32", "MODEL.ROI_MASK_HEAD.NUM_CONV", "1",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "10",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
    "DATALOADER.NUM_WORKERS", "0",
]

if __name__ == "__main__":
    train_net.launch_from_args(train_net.argument_parser().parse_args())
