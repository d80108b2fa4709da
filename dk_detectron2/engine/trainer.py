"""``DKTrainer``: Detectron2's ``DefaultTrainer`` with COCO evaluation, CPU-capable DDP, a smaller
learning rate for the DK generators, a checkpointer that converts standard 3x3 kernels into DK
scopes on load (and saves atomically), exact resume, and prediction pictures.

Everything else (hooks, TensorBoard/JSON/ETA writers, LR schedule) is Detectron2's.
"""
import json
import logging
import os
import weakref

from detectron2.data import DatasetMapper, MetadataCatalog, get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import DKCheckpointer, atomic_write
from ..solver import build_dk_optimizer
from .ddp import device_aware_ddp, share_rank0_buffers
from .exact_resume import ExactResume, remove_torn_last_line, run_seed
from .hooks import GeneratorWarmup
from .resumable_loader import ResumableBatches, build_resumable_train_loader
from .visualize import save_prediction_images

__all__ = ["DKTrainer"]

logger = logging.getLogger(__name__)


class DKTrainer(DefaultTrainer):
    """``DefaultTrainer`` whose evaluation uses ``COCOEvaluator`` and, on the main process, writes
    ``eval_results.json`` and :attr:`num_visualized_images` prediction PNGs per test dataset into
    ``cfg.OUTPUT_DIR``. Multi-process training works for CPU models (gloo) as well as CUDA ones."""

    num_visualized_images = 4

    def __init__(self, cfg):
        with device_aware_ddp():
            super().__init__(cfg)

    def build_hooks(self):
        """Detectron2's hooks, after swapping ``DefaultTrainer``'s ``DetectionCheckpointer`` for a
        :class:`~dk_detectron2.checkpoint.DKCheckpointer`: ``MODEL.WEIGHTS`` may then name a
        rigid checkpoint (model zoo ``.pkl``, Detectron2 ``.pth``, torchvision) whose 3x3 kernels
        become DK scopes exactly, instead of being skipped as shape mismatches (saves are atomic).
        With ``MODEL.DK.GENERATOR_WARMUP_ITERS > 0`` a
        :class:`~dk_detectron2.engine.hooks.GeneratorWarmup` hook comes early; with the resumable
        train loader, :class:`~dk_detectron2.engine.exact_resume.ExactResume` comes first."""
        self.checkpointer = DKCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self),
            skip_mismatched=self.cfg.MODEL.ALLOW_PARTIAL_WEIGHTS,
        )
        hooks = super().build_hooks()
        warmup = int(self.cfg.MODEL.DK.GENERATOR_WARMUP_ITERS)
        if warmup < 0:
            raise ValueError(f"MODEL.DK.GENERATOR_WARMUP_ITERS must be >= 0, got {warmup}")
        if warmup:
            logger.info(f"DK generators held at lr 0 for the first {warmup} iterations")
            hooks.insert(0, GeneratorWarmup(warmup))
        batches = getattr(getattr(getattr(self, "_trainer", None), "data_loader", None),
                          "dataset", None)
        if isinstance(batches, ResumableBatches):
            hooks.insert(0, ExactResume(batches))  # seeds each step before any other hook runs
        return hooks

    def build_writers(self):
        """Detectron2's writers, after removing a half-written last record from
        ``OUTPUT_DIR/metrics.json`` (left by a process killed while appending it), so that the
        records of a resumed run are not glued to it."""
        remove_torn_last_line(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"))
        return super().build_writers()

    @classmethod
    def build_train_loader(cls, cfg):
        """With ``DATALOADER.SAMPLER_TRAIN`` "TrainingSampler" (the default): a loader whose batch
        ``i`` depends only on the run's seed, the rank and ``i``
        (:class:`~dk_detectron2.engine.resumable_loader.ResumableBatches`), so ``--resume`` picks
        the data stream up where the checkpoint left it. Other samplers: Detectron2's loader
        (a resumed run then reads another stream)."""
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            logger.warning(f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN!r}: the data "
                           "stream restarts on --resume (exact resume needs TrainingSampler)")
            return super().build_train_loader(cfg)
        dataset_dicts = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
            if cfg.MODEL.KEYPOINT_ON else 0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        return build_resumable_train_loader(
            dataset_dicts, DatasetMapper(cfg, is_train=True),
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH, seed=run_seed(cfg),
            rank=comm.get_rank(), world_size=comm.get_world_size(),
            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    def train(self):
        """Runs training; returns the results of the last evaluation (``{}`` if none ran)."""
        super().train()
        return getattr(self, "_last_eval_results", {})

    @classmethod
    def build_optimizer(cls, cfg, model):
        """SGD as Detectron2's, the DK generators at ``MODEL.DK.GENERATOR_LR_FACTOR`` x the lr."""
        return build_dk_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if evaluator_type != "coco":
            raise NotImplementedError(
                f"no evaluator for dataset {dataset_name!r} (evaluator_type {evaluator_type!r}); "
                "DKTrainer evaluates COCO-format instance datasets"
            )
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Detectron2's evaluation, with rank 0's BatchNorm statistics on every process (those of
        the checkpoint), so the metrics are those of ``--eval-only`` on the saved model."""
        share_rank0_buffers(model)
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process() and len(cfg.DATASETS.TEST):
            cls.write_results(cfg, model, results)
        return results

    @classmethod
    def write_results(cls, cfg, model, results):
        """Writes ``eval_results.json`` and the prediction PNGs into ``cfg.OUTPUT_DIR``."""
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        text = json.dumps(results, indent=2, sort_keys=True)
        atomic_write(os.path.join(cfg.OUTPUT_DIR, "eval_results.json"),
                     lambda f: f.write(text.encode()))
        if isinstance(model, DistributedDataParallel):
            model = model.module
        for dataset_name in cfg.DATASETS.TEST:
            paths = save_prediction_images(
                cfg, model, dataset_name, cfg.OUTPUT_DIR, cls.num_visualized_images
            )
            logger.info(f"Predictions on {dataset_name} drawn in {', '.join(paths)}")
