"""The protocol-free front door: classify, predict, metadata, readiness, management, metrics."""

from service.gateway.gateway import Gateway
from service.gateway.results import Prediction

__all__ = ["Gateway", "Prediction"]
