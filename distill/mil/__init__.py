"""MIL heads behind one interface (``MILHead``), built by name from a ``HeadConfig``."""

from featurestore.distill.mil._clam import ClamSB
from featurestore.distill.mil._pooling import ABMIL, MaxPool, MeanPool
from featurestore.distill.mil._transmil import NystromAttention, TransMIL
from featurestore.distill.mil.base import HEAD_NAMES, HeadConfig, HeadOutput, MILHead, Readout, masked_softmax

HEADS: dict[str, type[MILHead]] = {"mean": MeanPool, "max": MaxPool, "abmil": ABMIL, "transmil": TransMIL,
                                   "clam-sb": ClamSB}


def build_head(cfg: HeadConfig, in_dim: int, readout: Readout, n_classes: int = 0) -> MILHead:
    """A head for ``in_dim``-wide tile embeddings; ``readout`` maps its slide embedding to the task outputs."""
    return HEADS[cfg.name](in_dim, readout, cfg, n_classes)


__all__ = ["ABMIL", "HEADS", "HEAD_NAMES", "ClamSB", "HeadConfig", "HeadOutput", "MILHead", "MaxPool", "MeanPool",
           "NystromAttention", "Readout", "TransMIL", "build_head", "masked_softmax"]
