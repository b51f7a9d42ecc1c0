"""Key shapes of mmdetection's ResNet-50 backbone, for the synthetic mmdetection state dicts of the
FCOS and Faster R-CNN conversion tests (written from mmdet's ``ResNet``/``Bottleneck`` source)."""


def add_resnet50(shapes: dict[str, tuple[int, ...]]) -> None:
    """Add ``backbone.*`` (stem, four stages of bottlenecks, BatchNorm with running statistics)."""
    def batch_norm(prefix: str, width: int) -> None:
        shapes.update({f"{prefix}.{name}": (width,) for name in ("weight", "bias", "running_mean", "running_var")})
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["backbone.conv1.weight"] = (64, 3, 7, 7)
    batch_norm("backbone.bn1", 64)
    inplanes = 64
    for stage, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for block in range(blocks):
            prefix = f"backbone.layer{stage}.{block}"
            shapes[f"{prefix}.conv1.weight"] = (planes, inplanes if block == 0 else planes * 4, 1, 1)
            shapes[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
            shapes[f"{prefix}.conv3.weight"] = (planes * 4, planes, 1, 1)
            for index, width in ((1, planes), (2, planes), (3, planes * 4)):
                batch_norm(f"{prefix}.bn{index}", width)
            if block == 0:
                shapes[f"{prefix}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                batch_norm(f"{prefix}.downsample.1", planes * 4)
        inplanes = planes * 4
