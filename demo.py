#!/usr/bin/env python
"""Draw the predictions of a (DK) Detectron2 model on images, in Detectron2's demo style.

    python demo.py --config-file CONFIG --input IMAGES_OR_FOLDERS_OR_GLOBS --output DIR \\
        [--confidence-threshold 0.5] [--opts MODEL.WEIGHTS path/model_final.pth ...]

See ``dk_detectron2.tools.demo``.
"""

from dk_detectron2.tools.demo import main

if __name__ == "__main__":
    main()
