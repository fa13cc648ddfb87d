"""Models: the zoo (builders by name), weights (resolve + verify) and the predictor (the actor)."""

from segbatch.models.predictor import Predictor
from segbatch.models.weights import ResolvedWeights, resolve_weights
from segbatch.models.zoo import build_model

__all__ = ["Predictor", "ResolvedWeights", "build_model", "resolve_weights"]
