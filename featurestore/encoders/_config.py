"""The frozen description of one teacher: light to import, so the catalogue never pulls in torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from featurestore.schemas.errors import ModelError

Pooling = Literal["cls", "mean", "cls+mean", "pooler"]
Interpolation = Literal["bilinear", "bicubic"]
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class TeacherConfig:
    """Everything needed to rebuild one teacher and reproduce its vendor's preprocessing.

    Preprocessing is torchvision's ``Resize(resize_to)`` (shorter side, antialiased ``interpolation``),
    ``CenterCrop(input_size)``, ``ToTensor`` and ``Normalize(mean, std)``; ``resize_to`` defaults to
    ``input_size``. ``pooling`` turns the backbone's output into one vector: the class token, the mean
    of the patch tokens (registers excluded; spatial mean for CNNs), both concatenated, or the
    module's own pooled output (``pooler``).

    ``builder`` and ``checkpoint_filter`` are ``module:function`` strings imported only when the
    teacher is built. ``weights_filename`` is looked up in Hugging Face repo ``hub_id``, inside the
    installed package ``package``, or taken as a path when neither is set; with no
    ``weights_filename`` the weights are generated from ``seed``. ``dtype`` is the autocast dtype
    preferred on a GPU (CPUs always compute in float32). ``arch``/``arch_kwargs`` name a timm
    architecture for the generic ``timm:`` and ``local:`` builders.
    """

    name: str
    builder: str
    embed_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pooling: Pooling
    resize_to: int | None = None
    interpolation: Interpolation = "bilinear"
    dtype: str = "float32"
    hub_id: str | None = None
    weights_filename: str | None = None
    package: str | None = None
    checkpoint_filter: str | None = None
    license: str = ""
    version: str = "1"
    seed: int = 0
    arch: str | None = None
    arch_kwargs: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.resize_to is None:
            object.__setattr__(self, "resize_to", self.input_size)
        problem = self._problem()
        if problem:
            raise ModelError(f"teacher config {self.name!r}: {problem}")

    def _problem(self) -> str:
        if not self.name:
            return "name must not be empty"
        for ref in filter(None, (self.builder, self.checkpoint_filter)):
            if ref.count(":") != 1 or ref.startswith(":") or ref.endswith(":"):
                return f"{ref!r} must be a 'module:function' reference"
        if self.embed_dim <= 0 or self.input_size <= 0:
            return "embed_dim and input_size must be > 0"
        if self.resize_to < self.input_size:
            return f"resize_to {self.resize_to} is below the {self.input_size} px crop; raise resize_to"
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            return "mean and std need 3 channels and std must be > 0"
        if self.pooling not in ("cls", "mean", "cls+mean", "pooler"):
            return f"unknown pooling {self.pooling!r}; choose cls, mean, cls+mean or pooler"
        if self.interpolation not in ("bilinear", "bicubic"):
            return f"unknown interpolation {self.interpolation!r}; choose bilinear or bicubic"
        if self.dtype not in DTYPES:
            return f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}"
        if (self.hub_id or self.package) and not self.weights_filename:
            return "hub_id and package need weights_filename, the file to load from them"
        return ""
