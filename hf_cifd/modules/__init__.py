"""Plain ``nn.Module`` building blocks, usable without the trainer."""

from .bottleneck import EntropyBottleneck1d
from .ibm import IBMOutput, InformationBottleneck
from .projector import Projector
from .rdm import RateDistortionModule, RDMOutput

__all__ = [
    "EntropyBottleneck1d", "IBMOutput", "InformationBottleneck", "Projector", "RateDistortionModule", "RDMOutput",
]
