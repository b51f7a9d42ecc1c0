"""Detector zoo: ResNet-FPN RetinaNet, GFL and FCOS (dense) and Faster R-CNN (two-stage).

    model = build_detector("gfl-small", num_classes=3)
    out = model(images, image_sizes, targets)      # DetectorOutput: features, logits, anchors, losses ...
    detections = model.postprocess(out)            # per image: boxes (xyxy view pixels), scores, labels

A family is one file (``gfl.py``, ``retinanet.py``, ``fcos.py``, ``frcnn.py``: its config, head and
model) registered in ``detectors.zoo.FAMILIES``; ``detector.py`` holds the ``BaseDetector`` both
kinds share, the dense ``Detector`` base, and ``config.py`` the keys every family's config shares.
Faster R-CNN returns a ``TwoStageOutput`` (``detectors.frcnn``), whose RoI head runs alone on given
boxes over given FPN maps (``roi_head_outputs``): the partial teacher of a cached two-stage teacher.
"""
from detectors.atss import ATSSResult, atss_assign
from detectors.backbone import ResNetFPN, build_resnet_fpn
from detectors.config import DetectorConfig
from detectors.convert import convert_torchvision_retinanet
from detectors.detector import BACKGROUND, IGNORE, Detector, DetectorOutput, flatten_levels, valid_level_sizes
from detectors.fcos import FCOS, FCOSConfig, FCOSHead
from detectors.frcnn import FasterRCNN, FasterRCNNConfig, RoIBoxHead, TwoStageOutput
from detectors.gfl import GFL, GFLConfig, GFLHead, integral
from detectors.retinanet import RetinaNet, RetinaNetConfig, RetinaNetHead
from detectors.zoo import (FAMILIES, build_detector, config_from_dict, get_config, list_models, load_checkpoint,
                           save_checkpoint)

__all__ = [
    "ATSSResult", "BACKGROUND", "Detector", "DetectorConfig", "DetectorOutput", "FAMILIES", "FCOS", "FCOSConfig",
    "FCOSHead", "FasterRCNN", "FasterRCNNConfig", "GFL", "GFLConfig", "RoIBoxHead", "TwoStageOutput",
    "GFLHead", "IGNORE", "ResNetFPN", "RetinaNet", "RetinaNetConfig", "RetinaNetHead", "atss_assign",
    "build_detector", "build_resnet_fpn", "config_from_dict", "convert_torchvision_retinanet", "flatten_levels",
    "get_config", "integral", "list_models", "load_checkpoint", "save_checkpoint", "valid_level_sizes",
]
