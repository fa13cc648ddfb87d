"""The zoo's architecture names, in a module without torch: the job spec checks names against them."""

from __future__ import annotations

__all__ = ["INSTANCE_ARCHS", "SEMANTIC_ARCHS"]

#: torchvision semantic segmentation builders (`torchvision.models.get_model` names).
SEMANTIC_ARCHS = (
    "fcn_resnet50",
    "fcn_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
)
#: torchvision instance segmentation builders.
INSTANCE_ARCHS = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2")
