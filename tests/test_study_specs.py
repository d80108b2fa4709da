"""Every committed study spec (``configs/studies/*.yaml``) still describes runs that can start:
each detection row's config file and overrides merge into the DK config (a renamed key fails
here, not an hour into a study), each classification row's trainer arguments parse and its model
builds with the row's keyword arguments. Nothing is trained."""
import glob
import os

import pytest
import timm
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone

from dk_detectron2 import add_dk_config
from dk_detectron2.classification.train import build_parser
from dk_detectron2.tools.study import load_spec, load_spec_settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = sorted(glob.glob(os.path.join(REPO, "configs", "studies", "*.yaml")))


def _rows(kind):
    rows = []
    for path in SPECS:
        if load_spec_settings(path)["kind"] != kind:
            continue
        rows += [pytest.param(path, row, id=f"{os.path.basename(path)}:{row.name}")
                 for row in load_spec(path)]
    return rows


def _substituted(opts, root="/study", seed=3):
    return [v.replace("{seed}", str(seed)).replace("{root}", root) for v in opts]


def test_the_studies_folder_holds_both_kinds():
    kinds = {load_spec_settings(p)["kind"] for p in SPECS}
    assert kinds == {"detection", "classification"}, kinds


@pytest.mark.parametrize("path,row", _rows("detection"))
def test_detection_rows_merge_into_the_dk_config(path, row):
    cfg = get_cfg()
    add_dk_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, row.config))
    cfg.merge_from_list(_substituted(row.opts))
    # A row's own baseline must be a row of the same spec.
    names = {r.name for r in load_spec(path)}
    assert row.baseline is None or row.baseline in names, (row.name, row.baseline)


@pytest.mark.parametrize("path,row", _rows("classification"))
def test_classification_rows_parse_and_build(path, row):
    settings = load_spec_settings(path)
    args = build_parser().parse_args(["--model", row.config, "--seed", "3", "--output", "/study",
                                      *map(str, settings["train_args"]), *_substituted(row.opts)])
    assert args.model in timm.list_models(), args.model
    model = timm.create_model(args.model, num_classes=6, **args.model_kwargs).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 6)


PIPELINES = [
    # (pipeline spec, classification spec it reads, that study's output folder,
    #  {pipeline row: classification row})
    ("shapes_pretrained.yaml", "cls_shapes.yaml", "study_cls",
     {"dw_pre": "rigid3", "dk_pre": "dk", "dk_rigidpre": "rigid3"}),
    ("shapes_pretrained_lr01.yaml", "cls_shapes_lr01.yaml", "study_cls_lr01",
     {"dw_pre01": "rigid3_sgd01", "dk_pre01": "dk_sgd01"}),
    ("shapes_pretrained_mbv2.yaml", "cls_shapes_mbv2_recipe.yaml", "study_cls_mbv2_recipe",
     {"mbv2_pre01": "mbv2_rigid3_sgd01", "mbv2_dk_pre01": "mbv2_dk_sgd01",
      "mbv2_r5_pre01": "mbv2_rigid5_sgd01", "mbv2_w075_pre01": "mbv2_rigid3_w075_sgd01",
      "mbv2_cc19_pre01": "mbv2_condconv19_sgd01", "mbv2_dk_frozen_pre01": "mbv2_dk_frozen_sgd01",
      "mbv2_msra_pre01": "mbv2_rigid3_msra_sgd01",
      "mbv2_pre01_2x": "mbv2_rigid3_sgd01",
      "mbv2_dk_pre01_2x": "mbv2_dk_sgd01"}),
]


@pytest.mark.parametrize("pipeline_spec,classification_spec,study_folder,sources", PIPELINES,
                         ids=[p[0] for p in PIPELINES])
def test_pipeline_spec_reads_the_classification_study_backbones(pipeline_spec, classification_spec,
                                                                 study_folder, sources):
    """A pretrain-then-detect study starts each detection seed from the same seed of the
    classification study's rigid / DK rows (paired), from configs that load timm checkpoints."""
    pipeline = {r.name: r for r in load_spec(os.path.join(REPO, "configs/studies", pipeline_spec))}
    classification = {r.name: r for r in load_spec(os.path.join(REPO, "configs/studies",
                                                                classification_spec))}
    assert set(pipeline) == set(sources)
    for name, source in sources.items():
        weights = dict(zip(pipeline[name].opts[::2], pipeline[name].opts[1::2]))["MODEL.WEIGHTS"]
        assert weights == f"{{root}}/../{study_folder}/{source}/seed_{{seed}}/last.pth.tar"
        assert source in classification
        cfg = get_cfg()
        add_dk_config(cfg)
        cfg.merge_from_file(os.path.join(REPO, pipeline[name].config))
        cfg.merge_from_list(list(pipeline[name].opts))
        assert cfg.INPUT.FORMAT == "RGB"
        build_backbone(cfg)  # the row's options make a valid backbone
