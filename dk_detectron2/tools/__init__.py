"""Analysis tools for (DK) Detectron2 models. Each module has a command line:

* :mod:`~dk_detectron2.tools.erf`: effective receptive fields, figures and numbers
  (``python -m dk_detectron2.tools.erf``; the measurement itself is
  :mod:`~dk_detectron2.tools.erf_measure`);
* :mod:`~dk_detectron2.tools.kernel_samples`: a DK layer's scope and its sampled taps
  (``python -m dk_detectron2.tools.kernel_samples``);
* :mod:`~dk_detectron2.tools.flops`: fvcore FLOP/activation handles of the DK operators, and
  :mod:`~dk_detectron2.tools.analyze_model`: flop / activation / parameter / structure reports
  (``python -m dk_detectron2.tools.analyze_model``);
* :mod:`~dk_detectron2.tools.demo`: predictions drawn on images (``python demo.py``).

Nothing is imported here, so ``import dk_detectron2`` stays light; import the module you need.
"""
