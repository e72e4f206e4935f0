"""Networks for distillation and evaluation: the ConvNet student and small-image baselines."""

from hpd_fast.models.alexnet import AlexNet
from hpd_fast.models.convnet import ConvNet, depth_for_resolution
from hpd_fast.models.factory import MODEL_NAMES, get_model
from hpd_fast.models.resnet import ResNet18
from hpd_fast.models.vgg import VGG11

__all__ = [
    "MODEL_NAMES",
    "AlexNet",
    "ConvNet",
    "ResNet18",
    "VGG11",
    "depth_for_resolution",
    "get_model",
]
