"""Deep tissue segmenters: published checkpoint layouts, the vendor's preprocessing and output rule, tiling
of the thumbnail, the mask on the real slide, and the one-line failure when weights are absent offline.

Weights are random with the published keys and shapes; nothing here claims accuracy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from typer.testing import CliRunner

from featurestore.cli.main import app
from featurestore.schemas import TilingSpec
from featurestore.schemas.errors import InvalidRecordError, ModelError
from featurestore.slides import open_slide, tile_grid, tissue_mask
from featurestore.slides.segmenters import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SEGMENTERS,
    jpeg_roundtrip,
    load_segmenter,
    preprocess,
    segment,
    tissue_from_logits,
)

Shapes = dict[str, tuple[int, ...]]


def _bn(prefix: str, n: int) -> Shapes:
    return {f"{prefix}.weight": (n,), f"{prefix}.bias": (n,), f"{prefix}.running_mean": (n,),
            f"{prefix}.running_var": (n,), f"{prefix}.num_batches_tracked": ()}


def shapes_hest_lightning() -> Shapes:
    """``deeplabv3_seg_v4.ckpt``'s ``state_dict``: a Lightning module holding ``model`` = torchvision's
    DeepLabV3-ResNet50 with a 2-class head and the auxiliary FCN head, written out from the architecture."""
    out: Shapes = {"backbone.conv1.weight": (64, 3, 7, 7), **_bn("backbone.bn1", 64)}
    inplanes = 64
    for layer, (blocks, width) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)], start=1):
        for b in range(blocks):
            p = f"backbone.layer{layer}.{b}"
            out |= {f"{p}.conv1.weight": (width, inplanes, 1, 1), **_bn(f"{p}.bn1", width),
                    f"{p}.conv2.weight": (width, width, 3, 3), **_bn(f"{p}.bn2", width),
                    f"{p}.conv3.weight": (4 * width, width, 1, 1), **_bn(f"{p}.bn3", 4 * width)}
            if b == 0:
                out |= {f"{p}.downsample.0.weight": (4 * width, inplanes, 1, 1), **_bn(f"{p}.downsample.1", 4 * width)}
            inplanes = 4 * width
    aspp = "classifier.0"
    out |= {f"{aspp}.convs.0.0.weight": (256, 2048, 1, 1), **_bn(f"{aspp}.convs.0.1", 256)}
    for i in (1, 2, 3):
        out |= {f"{aspp}.convs.{i}.0.weight": (256, 2048, 3, 3), **_bn(f"{aspp}.convs.{i}.1", 256)}
    out |= {f"{aspp}.convs.4.1.weight": (256, 2048, 1, 1), **_bn(f"{aspp}.convs.4.2", 256),
            f"{aspp}.project.0.weight": (256, 1280, 1, 1), **_bn(f"{aspp}.project.1", 256),
            "classifier.1.weight": (256, 256, 3, 3), **_bn("classifier.2", 256),
            "classifier.4.weight": (2, 256, 1, 1), "classifier.4.bias": (2,)}
    # TRIDENT drops these; their class count is irrelevant to the load.
    out |= {"aux_classifier.0.weight": (256, 1024, 3, 3), **_bn("aux_classifier.1", 256),
            "aux_classifier.4.weight": (2, 256, 1, 1), "aux_classifier.4.bias": (2,)}
    return {f"model.{k}": v for k, v in out.items()}


GRANDQC_KEYS, GRANDQC_VALUES = 492, 6_614_533
"""``Tissue_Detection_MPP10.pth``: a plain state dict of smp's UnetPlusPlus(timm-efficientnet-b0, classes=2)."""
GRANDQC_SPOT: Shapes = {"encoder.conv_stem.weight": (32, 3, 3, 3),
                        "encoder.blocks.6.0.conv_pwl.weight": (320, 1152, 1, 1),
                        "decoder.blocks.x_0_4.conv2.0.weight": (16, 16, 3, 3),
                        "segmentation_head.0.weight": (2, 16, 3, 3), "segmentation_head.0.bias": (2,)}


def random_state(shapes: Shapes) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            out[key] = torch.ones(shape)
        else:
            out[key] = 0.02 * torch.randn(shape, generator=gen)
    return out


@pytest.fixture(scope="module")
def hest_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("hest") / SEGMENTERS["hest"].filename
    torch.save({"state_dict": random_state(shapes_hest_lightning()), "epoch": 3, "global_step": 10}, path)
    return path


@pytest.fixture(scope="module")
def grandqc_ckpt(tmp_path_factory):
    pytest.importorskip("segmentation_models_pytorch")
    state = SEGMENTERS["grandqc"].build().state_dict()
    assert len(state) == GRANDQC_KEYS and sum(v.numel() for v in state.values()) == GRANDQC_VALUES
    assert {k: tuple(state[k].shape) for k in GRANDQC_SPOT} == GRANDQC_SPOT
    path = tmp_path_factory.mktemp("grandqc") / SEGMENTERS["grandqc"].filename
    torch.save(random_state({k: tuple(v.shape) for k, v in state.items()}), path)
    return path


def test_hest_published_layout_loads_strictly(hest_ckpt):
    model = load_segmenter("hest", str(hest_ckpt))
    assert not model.training
    assert model.classifier[4].out_channels == 2 and model.aux_classifier is None


def test_grandqc_published_layout_loads_strictly(grandqc_ckpt):
    model = load_segmenter("grandqc", str(grandqc_ckpt.parent))  # a folder holding the published file name
    assert model.segmentation_head[0].out_channels == 2


def test_a_checkpoint_of_the_wrong_model_is_one_line(hest_ckpt, tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ModelError, match="does not fit the hest architecture"):
        load_segmenter("hest", str(wrong))


def test_tissue_class_follows_each_vendor():
    logits = torch.tensor([[2.0, -2.0], [-2.0, 2.0], [0.0, 0.0]]).T.reshape(1, 2, 1, 3)
    # HEST: softmax class 1 > 0.5; GrandQC: argmax class 0, a tie resolving to class 0 as torch.max does.
    assert tissue_from_logits(SEGMENTERS["hest"], logits).tolist() == [[[False, True, False]]]
    assert tissue_from_logits(SEGMENTERS["grandqc"], logits).tolist() == [[[True, False, True]]]


def test_native_resolution_and_tile_from_trident():
    hest, grandqc = SEGMENTERS["hest"], SEGMENTERS["grandqc"]
    assert (hest.mpp, hest.tile, hest.jpeg_quality, hest.hub_id) == (1.0, 512, None, "MahmoodLab/hest-tissue-seg")
    assert (grandqc.mpp, grandqc.tile, grandqc.jpeg_quality, grandqc.hub_id) == (10.0, 512, 80,
                                                                                 "MahmoodLab/hest-tissue-seg")


@pytest.fixture(scope="module")
def slide_tile(real_slide):
    with open_slide(real_slide) as reader:
        return reader.read_region((600, 600), 0, (512, 512))


def test_hest_preprocessing_matches_trident_on_the_real_slide(slide_tile):
    vendor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    expected = vendor(Image.fromarray(slide_tile))
    torch.testing.assert_close(preprocess(SEGMENTERS["hest"], slide_tile[None])[0], expected, atol=1e-6, rtol=0)


def test_grandqc_preprocessing_matches_trident_on_the_real_slide(slide_tile):
    cv2 = pytest.importorskip("cv2")
    # TRIDENT's JpegCompressionTransform(quality=80), then ToTensor and ImageNet Normalize.
    _, encoded = cv2.imencode(".jpg", np.array(Image.fromarray(slide_tile)), [int(cv2.IMWRITE_JPEG_QUALITY), 80])
    jpeg = Image.fromarray(cv2.imdecode(encoded, cv2.IMREAD_COLOR))
    expected = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(transforms.ToTensor()(jpeg))
    torch.testing.assert_close(preprocess(SEGMENTERS["grandqc"], slide_tile[None])[0], expected, atol=1e-6, rtol=0)


VENDOR_JPEG_SUM = 160_862_583
"""Sum of the uint8 pixels of that tile after TRIDENT's cv2 JPEG round trip (opencv-python-headless 5.0.0.93),
so the check runs where OpenCV is not installed."""


def test_grandqc_jpeg_round_trip_matches_opencv_without_opencv(slide_tile):
    assert int(jpeg_roundtrip(slide_tile, 80).astype(np.int64).sum()) == VENDOR_JPEG_SUM


class _RedIsTissue(torch.nn.Module):
    """Class 1 wins where the normalised red channel is positive: a model whose answer is known per pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": torch.cat([torch.zeros_like(x[:, :1]), x[:, :1]], dim=1)}


def test_thumbnail_is_tiled_padded_and_reassembled_in_place():
    rgb = np.random.default_rng(0).integers(0, 256, (600, 1100, 3), dtype=np.uint8)
    mask = segment(_RedIsTissue(), SEGMENTERS["hest"], rgb, batch_size=4)
    assert mask.shape == (600, 1100)
    np.testing.assert_array_equal(mask, rgb[..., 0] / 255.0 > IMAGENET_MEAN[0])


@pytest.mark.parametrize("name", ["hest", "grandqc"])
def test_deep_mask_on_the_real_slide_has_the_otsu_grid(name, real_slide, request):
    weights = request.getfixturevalue(f"{name}_ckpt")
    otsu = TilingSpec(target_mpp=1.0, tile_size=224)
    deep = TilingSpec(target_mpp=1.0, tile_size=224, tissue_method=name, min_tissue=0.0)
    # An assumed 0.1 µm/px shrinks the slide physically, so HEST's 1 µm/px thumbnail is one 512 px tile.
    with open_slide(real_slide) as reader:
        reference = tissue_mask(reader, otsu, mpp=0.1)
        mask = tissue_mask(reader, deep, mpp=0.1, weights=str(weights))
        grid = tile_grid(reader, deep, mask, mpp=0.1)
    assert type(mask) is type(reference)
    assert mask.mask.shape == reference.mask.shape and mask.mask.dtype == bool
    assert (mask.mpp, mask.downsample) == (reference.mpp, reference.downsample)
    assert len(grid) > 0


def test_tiling_spec_takes_the_new_names_and_keeps_old_ids():
    for name in ("otsu", "grandqc", "hest", "none"):
        assert TilingSpec(target_mpp=0.5, tile_size=224, tissue_method=name).tissue_method == name
    with pytest.raises(InvalidRecordError, match="grandqc"):
        TilingSpec(target_mpp=0.5, tile_size=224, tissue_method="deep")
    # Ids of tilings made before the deep segmenters existed.
    assert TilingSpec(target_mpp=0.5, tile_size=224).id == "ffc78af6ec5c1b85"
    assert TilingSpec(target_mpp=0.5, tile_size=224, tissue_method="none").id == "16ab2c8c3e9c7a6a"


def test_absent_weights_offline_is_one_line_and_writes_nothing(real_slide, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    store = tmp_path / "store"
    result = CliRunner().invoke(app, ["extract", str(real_slide), "--store", str(store), "--model",
                                      "efficientnet-lite0", "--tissue", "hest"])
    assert result.exit_code == 2, result.output
    line = " ".join(result.output.split())
    assert "MahmoodLab/hest-tissue-seg/deeplabv3_seg_v4.ckpt" in line and "--tissue-weights" in line
    assert not store.exists()
