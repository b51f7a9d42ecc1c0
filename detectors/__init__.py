"""Detector zoo: ResNet-FPN RetinaNet and GFL with one forward API (see ``detectors.outputs``).

    model = build_detector("gfl-small", num_classes=3)
    out = model(images, image_sizes, targets)      # DetectorOutput: features, logits, anchors, losses ...
    detections = model.postprocess(out)            # per image: boxes (xyxy view pixels), scores, labels
"""
from detectors.atss import ATSSResult, atss_assign
from detectors.backbone import ResNetFPN, build_resnet_fpn
from detectors.gfl import GFL, GFLHead, integral
from detectors.outputs import BACKGROUND, IGNORE, Detector, DetectorOutput, flatten_levels, valid_level_sizes
from detectors.retinanet import RetinaNet, RetinaNetHead
from detectors.zoo import (DetectorConfig, build_detector, convert_torchvision_retinanet, get_config, list_models,
                           load_checkpoint, save_checkpoint)

__all__ = [
    "ATSSResult", "BACKGROUND", "Detector", "DetectorConfig", "DetectorOutput", "GFL", "GFLHead", "IGNORE",
    "ResNetFPN", "RetinaNet", "RetinaNetHead", "atss_assign", "build_detector", "build_resnet_fpn",
    "convert_torchvision_retinanet", "flatten_levels", "get_config", "integral", "list_models",
    "load_checkpoint", "save_checkpoint", "valid_level_sizes",
]
