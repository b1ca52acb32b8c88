"""1-Lipschitz architectures built only from lipnet layers, and a registry to rebuild them."""

from lipnet.models.convnet import ConvNet
from lipnet.models.init import orthogonal_init_
from lipnet.models.liresnet import LiResNet
from lipnet.models.registry import MODELS, build_model, model_spec, register_model
from lipnet.models.wrappers import unwrap

__all__ = ["MODELS", "ConvNet", "LiResNet", "build_model", "model_spec", "orthogonal_init_", "register_model", "unwrap"]
