"""Built-in slide encoders: one config per model, its docstring citing where the contract comes from.

Only configs live here (no torch); each ``builder`` names the vendor module that constructs the
network. The tile contracts follow TRIDENT's ``slide_to_patch_encoder_name`` (github.com/mahmoodlab/
TRIDENT, ``slide_encoder_models/load.py``) for the tile encoder, and each model's paper or code for
the tile size and magnification it was pretrained on.
"""

from __future__ import annotations

from collections.abc import Callable

from featurestore.encoders.slide._config import SlideEncoderConfig, TileContract
from featurestore.schemas.errors import ModelError

NC_ND = "CC-BY-NC-ND-4.0"
_CONFIGS: dict[str, SlideEncoderConfig] = {}


def entrypoint(fn: Callable[[], SlideEncoderConfig]) -> Callable[[], SlideEncoderConfig]:
    """Register the config an entry-point function returns, under its name."""
    config = fn()
    _CONFIGS[config.name] = config
    return fn


def list_slide_encoders() -> list[str]:
    return sorted(_CONFIGS)


def slide_encoder_config(name: str) -> SlideEncoderConfig:
    found = _CONFIGS.get(name)
    if found is None:
        raise ModelError(f"unknown slide encoder {name!r}; choose one of {', '.join(list_slide_encoders())}")
    return found


@entrypoint
def mean() -> SlideEncoderConfig:
    """Mean of a slide's tile embeddings (TRIDENT's ``mean-<encoder>``): any tile set, its own width, no weights."""
    return SlideEncoderConfig(name="mean", builder="featurestore.encoders.slide.mean:mean_pool", embed_dim=None,
                              contract=None)


@entrypoint
def titan() -> SlideEncoderConfig:
    """TITAN (Ding et al., 2024): CONCH v1.5 features of 512 px tiles at 20× on their 2-D grid, 768-d.

    huggingface.co/MahmoodLab/TITAN ``encode_slide_from_patch_features(features, coords, patch_size_lv0)``
    with ``patch_size_lv0`` the tile's level-0 footprint (512 at 20×, 1024 at 40×); the checkpoint also
    holds the text tower, which is not loaded. TRIDENT runs it in float16.
    """
    return SlideEncoderConfig(
        name="titan", builder="featurestore.encoders.slide.titan:titan", embed_dim=768,
        contract=TileContract("conch-v1.5", 768, tile_size=512, mpp=0.5, coords=True),
        hub_id="MahmoodLab/TITAN", weights_filename="model.safetensors",
        checkpoint_filter="featurestore.encoders.slide.titan:vision_tower", license=NC_ND, dtype="float16")


@entrypoint
def chief() -> SlideEncoderConfig:
    """CHIEF (Wang et al., Nature 2024): gated attention MIL over CTransPath features of 256 px tiles at 10×.

    github.com/hms-dbmi/CHIEF ``models/CHIEF.py`` (``size_arg="small"``) and ``Get_CHIEF_WSI_level_feature.py``:
    the slide embedding is ``WSI_feature``, the attention-weighted sum of the tiles projected to 512-d
    (TRIDENT's table says 768; the network's output is 512). ``CHIEF_pretraining.pth`` is served from the
    authors' Google Drive, not a hub: pass ``--weights``.
    """
    return SlideEncoderConfig(
        name="chief", builder="featurestore.encoders.slide.chief:chief", embed_dim=512,
        contract=TileContract("ctranspath", 768, tile_size=256, mpp=1.0), weights_filename="CHIEF_pretraining.pth",
        license="GPL-3.0, non-commercial academic use")


@entrypoint
def feather() -> SlideEncoderConfig:
    """FEATHER (Shao et al., ICML 2025): MIL-Lab's gated ABMIL (``abmil.base``) pretrained on PC-108, 512-d.

    TRIDENT ``FeatherSlideEncoder``: ``forward_features`` of
    huggingface.co/MahmoodLab/abmil.base.conch_v15.pc108-24k over CONCH v1.5 tiles (TRIDENT's setting
    for them: 512 px at 20×), float32.
    """
    return SlideEncoderConfig(
        name="feather", builder="featurestore.encoders.slide.feather:feather", embed_dim=512,
        contract=TileContract("conch-v1.5", 768, tile_size=512, mpp=0.5),
        hub_id="MahmoodLab/abmil.base.conch_v15.pc108-24k", weights_filename="pytorch_model.bin", license=NC_ND,
        version="pc108-24k")


@entrypoint
def madeleine() -> SlideEncoderConfig:
    """MADELEINE (Jaume et al., ECCV 2024): 4-head gated ABMIL over CONCH v1 features of 256 px tiles at 10×.

    github.com/mahmoodlab/MADELEINE ``madeleine/models/Model.py`` ``encode_he`` with the released
    configuration (``n_heads 4``, ``patch_embedding_dim 512``, ``wsi_encoder_hidden_dim 512``, softmax
    attention, bfloat16); weights huggingface.co/MahmoodLab/madeleine ``model.pt``.
    """
    return SlideEncoderConfig(
        name="madeleine", builder="featurestore.encoders.slide.madeleine:madeleine", embed_dim=512,
        contract=TileContract("conch-v1", 512, tile_size=256, mpp=1.0), hub_id="MahmoodLab/madeleine",
        weights_filename="model.pt", license=NC_ND, dtype="bfloat16")


@entrypoint
def gigapath_slide() -> SlideEncoderConfig:
    """Prov-GigaPath's slide encoder (Xu et al., Nature 2024): LongNet over GigaPath tiles of 256 px at 20×, 768-d.

    TRIDENT ``GigaPathSlideEncoder``: ``create_model("hf_hub:prov-gigapath/prov-gigapath",
    "gigapath_slide_enc12l768d", 1536, global_pool=True)`` reading ``slide_encoder.pth`` (its ``"model"``
    entry), ``tile_size`` set to the tile's level-0 footprint, output ``all_layer_embed=True)[11]``; float16.
    """
    return SlideEncoderConfig(
        name="gigapath-slide", builder="featurestore.encoders.slide.gigapath:gigapath", embed_dim=768,
        contract=TileContract("gigapath", 1536, tile_size=256, mpp=0.5, coords=True),
        hub_id="prov-gigapath/prov-gigapath", weights_filename="slide_encoder.pth",
        checkpoint_filter="featurestore.encoders.slide.gigapath:encoder_keys", license="Apache-2.0", dtype="float16")


@entrypoint
def prism() -> SlideEncoderConfig:
    """PRISM (Shaikovski et al., 2024): a Perceiver over Virchow tile embeddings of 224 px at 20×, 1280-d.

    TRIDENT ``PRISMSlideEncoder``: ``slide_representations(features)["image_embedding"]`` of
    huggingface.co/paige-ai/Prism (``AutoModel``, BioGPT decoder dropped), Virchow class token ++ patch mean
    (2560-d) tiles, float16. The hub's weight file name is taken to be transformers' default
    ``model.safetensors``; pass ``--weights`` to a local copy otherwise.
    """
    return SlideEncoderConfig(
        name="prism", builder="featurestore.encoders.slide.prism:prism", embed_dim=1280,
        contract=TileContract("virchow", 2560, tile_size=224, mpp=0.5), hub_id="paige-ai/Prism",
        weights_filename="model.safetensors", checkpoint_filter="featurestore.encoders.slide.prism:image_resampler",
        license=NC_ND, dtype="float16")
