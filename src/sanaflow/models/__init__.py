"""sanaflow's networks: the SANA transformer, the DC-AE autoencoder and the text encoders."""

from .dc_ae import DCAE
from .sana_transformer import SanaTransformer

__all__ = ["DCAE", "SanaTransformer"]
