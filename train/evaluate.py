"""COCO evaluation of a detector over one split (used by teacher and student training)."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from detectors.data import CocoDetection
from detectors.evaluation import CocoEvaluator, view_boxes_to_original
from detectors.views import collate


@torch.no_grad()
def evaluate_detector(model: torch.nn.Module, dataset: CocoDetection, batch_size: int = 8,
                      num_workers: int = 0, device: str | torch.device = "cpu",
                      progress: bool = True) -> dict[str, float]:
    """Runs ``model`` over every image of ``dataset`` (its first view) and returns COCO AP in percent."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate)
    evaluator = CocoEvaluator(dataset)
    for batch in tqdm(loader, desc="eval", disable=not progress, leave=False):
        batch = batch.to(device)
        detections = model.postprocess(model(batch.images, batch.image_sizes))
        for det, view, image_id in zip(detections, batch.views, batch.image_ids):
            orig_size = dataset.image_size(image_id)
            det = {k: v.cpu() for k, v in det.items()}
            det["boxes"] = view_boxes_to_original(det["boxes"], view, orig_size)
            evaluator.process([image_id], [det])
    model.train(was_training)
    return evaluator.evaluate()
