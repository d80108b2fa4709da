"""Training hooks of dk_detectron2."""
import logging

from detectron2.engine import HookBase

from ..layers.geometry import check_int
from ..solver import GENERATOR_GROUP_KEY

__all__ = ["GeneratorWarmup"]

logger = logging.getLogger(__name__)


class GeneratorWarmup(HookBase):
    """Holds the DK generators' learning rate at 0 for the first ``warmup_iters`` iterations
    (``MODEL.DK.GENERATOR_WARMUP_ITERS``): the kernels train as rigid ones first, then the
    rotations start to learn at the scheduled rate (``MODEL.DK.GENERATOR_LR_FACTOR`` x the lr).

    Acts on the optimizer parameter groups marked ``GENERATOR_GROUP_KEY`` (see
    :func:`dk_detectron2.solver.get_dk_optimizer_params`). Before every step of the warm-up it sets
    their lr to 0; Detectron2's ``LRScheduler`` hook computes every lr from its base value after
    each step, so the schedule resumes untouched at iteration ``warmup_iters`` (also after
    ``--resume``, which restores ``trainer.iter``).

    The optimizer state is left alone: SGD's momentum buffers of the generators keep averaging
    their gradients during the warm-up (decaying by the momentum, 0.9, per step: effectively the
    last ~20 iterations), so the first step after it is an ordinary mid-training step.
    """

    def __init__(self, warmup_iters: int):
        self.warmup_iters = check_int("warmup_iters", warmup_iters, minimum=0)

    def before_train(self):
        groups = [g for g in self.trainer.optimizer.param_groups if g.get(GENERATOR_GROUP_KEY)]
        if not groups:
            logger.warning(
                "GeneratorWarmup: no optimizer parameter group is marked as DK generators "
                "(a model without DK layers, or an optimizer not built by get_dk_optimizer_params); "
                "the warm-up does nothing"
            )

    def before_step(self):
        if self.trainer.iter >= self.warmup_iters:
            return
        for group in self.trainer.optimizer.param_groups:
            if group.get(GENERATOR_GROUP_KEY):
                group["lr"] = 0.0
