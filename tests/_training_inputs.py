"""Two tiny annotated images (one box, class and mask each) for one Mask R-CNN training step."""
import torch
from detectron2.structures import BitMasks, Boxes, Instances


def two_training_images(size: int = 64, seed: int = 0):
    """Detectron2 training inputs: [{"image": uint8 [3, size, size], "instances": ...}] x 2."""
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for box in ([8.0, 10.0, 40.0, 50.0], [20.0, 4.0, 60.0, 30.0]):
        instances = Instances((size, size))
        instances.gt_boxes = Boxes(torch.tensor([box]))
        instances.gt_classes = torch.tensor([3])
        mask = torch.zeros(1, size, size, dtype=torch.bool)
        x0, y0, x1, y1 = (int(v) for v in box)
        mask[0, y0:y1, x0:x1] = True
        instances.gt_masks = BitMasks(mask)
        image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator)
        inputs.append({"image": image, "height": size, "width": size, "instances": instances})
    return inputs
