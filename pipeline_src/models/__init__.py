from .activations import ClippedReLU, MaxMin, make_activation
from .architectures import (ARCHITECTURES, INPUT_SHAPE, NUM_CLASSES, CertifiableNet, CleanPass, WeightLayer,
                            build_model)

__all__ = ["ARCHITECTURES", "INPUT_SHAPE", "NUM_CLASSES", "CertifiableNet", "CleanPass", "ClippedReLU", "MaxMin",
           "WeightLayer", "build_model", "make_activation"]
