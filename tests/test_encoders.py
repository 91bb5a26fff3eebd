"""Teacher encoders: checkpoint layouts of every built-in model, weights handling, real ImageNet weights.

The giant ViTs are built on the meta device against checkpoints generated from independently
written key/shape tables, so a wrong architecture argument fails a strict load without any
download or gigabytes of memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from featurestore.encoders import (
    Teacher,
    TeacherConfig,
    _teacher,
    build_teacher,
    list_teachers,
    preprocess,
    register_teacher,
    teacher_config,
    teacher_spec,
)
from featurestore.encoders._registry import load_entrypoint
from featurestore.encoders._weights import load_strict, locate, read_state_dict
from featurestore.schemas import EncoderSpec, ModelError

REPO = Path(__file__).resolve().parents[1]
BUILT_IN = ["uni", "uni2-h", "gigapath", "conch-v1", "conch-v1.5", "virchow2", "h-optimus-0", "h0-mini",
            "phikon-v2", "efficientnet-lite0"]


Shapes = dict[str, tuple[int, ...]]


def shapes_vit(prefix: str = "", *, width: int, depth: int, mlp: int, patch: int, grid: int,
               pos_prefix: int = 1, registers: int = 0, glu: bool = False, layerscale: bool = True) -> Shapes:
    """Keys and shapes of a timm-layout ViT checkpoint, written out by hand from the cards, not by timm."""
    out = {"cls_token": (1, 1, width), "pos_embed": (1, pos_prefix + grid * grid, width),
           "patch_embed.proj.weight": (width, 3, patch, patch), "patch_embed.proj.bias": (width,),
           "norm.weight": (width,), "norm.bias": (width,)}
    if registers:
        out["reg_token"] = (1, registers, width)
    for i in range(depth):
        block = {"norm1.weight": (width,), "norm1.bias": (width,), "attn.qkv.weight": (3 * width, width),
                 "attn.qkv.bias": (3 * width,), "attn.proj.weight": (width, width),
                 "attn.proj.bias": (width,), "norm2.weight": (width,), "norm2.bias": (width,),
                 "mlp.fc1.weight": (mlp, width), "mlp.fc1.bias": (mlp,),
                 "mlp.fc2.weight": (width, mlp // 2 if glu else mlp), "mlp.fc2.bias": (width,)}
        if layerscale:
            block |= {"ls1.gamma": (width,), "ls2.gamma": (width,)}
        out |= {f"blocks.{i}.{k}": v for k, v in block.items()}
    return {prefix + k: v for k, v in out.items()}


def shapes_hf_dinov2(*, width: int, depth: int, mlp: int, patch: int, positions: int) -> Shapes:
    """A transformers ``Dinov2Model`` state dict (Phikon-v2's ``model.safetensors`` layout)."""
    out = {"embeddings.cls_token": (1, 1, width), "embeddings.mask_token": (1, width),
           "embeddings.position_embeddings": (1, positions, width),
           "embeddings.patch_embeddings.projection.weight": (width, 3, patch, patch),
           "embeddings.patch_embeddings.projection.bias": (width,), "layernorm.weight": (width,),
           "layernorm.bias": (width,)}
    for i in range(depth):
        layer = {"attention.output.dense.weight": (width, width), "attention.output.dense.bias": (width,),
                 "norm1.weight": (width,), "norm1.bias": (width,), "norm2.weight": (width,),
                 "norm2.bias": (width,), "layer_scale1.lambda1": (width,), "layer_scale2.lambda1": (width,),
                 "mlp.fc1.weight": (mlp, width), "mlp.fc1.bias": (mlp,), "mlp.fc2.weight": (width, mlp),
                 "mlp.fc2.bias": (width,)}
        for name in ("query", "key", "value"):
            layer |= {f"attention.attention.{name}.weight": (width, width),
                      f"attention.attention.{name}.bias": (width,)}
        out |= {f"encoder.layer.{i}.{k}": v for k, v in layer.items()}
    return out


def shapes_conch_v1() -> Shapes:
    """CONCH's CoCa checkpoint: image tower under ``visual.`` (trunk, 2 poolers, projection), text towers."""
    out = shapes_vit("visual.trunk.", width=768, depth=12, mlp=3072, patch=16, grid=28, layerscale=False)
    for pool, queries, dim in (("contrast", 1, 512), ("caption", 256, 768)):
        p = f"visual.attn_pool_{pool}."
        out |= {p + "query": (queries, dim), p + "attn.q_proj_weight": (dim, dim),
                p + "attn.k_proj_weight": (dim, 768), p + "attn.v_proj_weight": (dim, 768),
                p + "attn.in_proj_bias": (3 * dim,), p + "attn.out_proj.weight": (dim, dim),
                p + "attn.out_proj.bias": (dim,), p + "ln_q.weight": (dim,), p + "ln_q.bias": (dim,),
                p + "ln_k.weight": (768,), p + "ln_k.bias": (768,),
                f"visual.ln_{pool}.weight": (dim,), f"visual.ln_{pool}.bias": (dim,)}
    return out | {"visual.proj_contrast": (512, 512), "text.token_embedding.weight": (32007, 768),
                  "text.text_projection": (768, 512), "text_decoder.ln_final.weight": (768,),
                  "logit_scale": ()}


def shapes_conch_v1_5() -> Shapes:
    """``pytorch_model_vision.bin``: iBOT ViT-L/16 trained at 224 px (197 positions) + TITAN's pooler."""
    out = shapes_vit("trunk.", width=1024, depth=24, mlp=4096, patch=16, grid=14)
    return out | {"attn_pool_contrast.query": (1, 768), "attn_pool_contrast.ln_k.weight": (1024,),
                  "attn_pool_contrast.ln_k.bias": (1024,), "attn_pool_contrast.ln_q.weight": (768,),
                  "attn_pool_contrast.ln_q.bias": (768,), "attn_pool_contrast.to_q.weight": (768, 768),
                  "attn_pool_contrast.to_kv.weight": (1536, 1024),
                  "attn_pool_contrast.to_out.weight": (768, 768), "ln_contrast.weight": (768,),
                  "ln_contrast.bias": (768,)}


CHECKPOINTS = {
    "uni": lambda: shapes_vit(width=1024, depth=24, mlp=4096, patch=16, grid=14),
    "uni2-h": lambda: shapes_vit(width=1536, depth=24, mlp=8192, patch=14, grid=16, pos_prefix=0, registers=8,
                                 glu=True),
    "gigapath": lambda: shapes_vit(width=1536, depth=40, mlp=8192, patch=16, grid=14, glu=True),
    "virchow2": lambda: shapes_vit(width=1280, depth=32, mlp=6832, patch=14, grid=16, pos_prefix=5,
                                   registers=4, glu=True),
    "h-optimus-0": lambda: shapes_vit(width=1536, depth=40, mlp=8192, patch=14, grid=16, pos_prefix=0,
                                      registers=4, glu=True),
    "h0-mini": lambda: shapes_vit(width=768, depth=12, mlp=4096, patch=14, grid=16, pos_prefix=0, registers=4,
                                  glu=True),
    "phikon-v2": lambda: shapes_hf_dinov2(width=1024, depth=24, mlp=4096, patch=16, positions=197),
    "conch-v1": shapes_conch_v1,
    "conch-v1.5": shapes_conch_v1_5,
}


def fake_spec(config: TeacherConfig) -> EncoderSpec:
    return EncoderSpec(name=config.name, version=config.version, weights_sha256="0" * 64,
                       embed_dim=config.embed_dim, input_size=config.input_size, mean=config.mean,
                       std=config.std, pooling=config.pooling)


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_architecture_loads_its_checkpoint_layout_strictly(name):
    config = teacher_config(name)
    with torch.device("meta"):
        backbone = load_entrypoint(config.builder)(config)
    state = {k: torch.empty(shape, device="meta") for k, shape in CHECKPOINTS[name]().items()}
    if config.checkpoint_filter:
        state = load_entrypoint(config.checkpoint_filter)(state, backbone)
    load_strict(name, backbone, state, "generated")
    teacher = Teacher(config, backbone, fake_spec(config))
    out = teacher.embed_preprocessed(torch.empty(2, 3, config.input_size, config.input_size, device="meta"))
    assert out.shape == (2, config.embed_dim)


def test_phikon_key_mapping_reproduces_the_transformers_forward():
    """A tiny Dinov2 in HF's layout, run by a direct transcription of transformers' Dinov2Model."""
    from timm.models import VisionTransformer

    from featurestore.encoders.phikon import from_hf_dinov2

    width, depth, heads, patch = 32, 2, 4, 8
    gen = torch.Generator().manual_seed(0)
    hf = {k: torch.randn(s, generator=gen) * 0.2 for k, s in
          shapes_hf_dinov2(width=width, depth=depth, mlp=4 * width, patch=patch, positions=17).items()}
    x = torch.randn(2, 3, 32, 32, generator=gen)

    def ln(h, key):
        return F.layer_norm(h, (width,), hf[key + ".weight"], hf[key + ".bias"], eps=1e-6)

    def lin(h, key):
        return F.linear(h, hf[key + ".weight"], hf[key + ".bias"])

    h = F.conv2d(x, hf["embeddings.patch_embeddings.projection.weight"],
                 hf["embeddings.patch_embeddings.projection.bias"], stride=patch).flatten(2).transpose(1, 2)
    h = torch.cat([hf["embeddings.cls_token"].expand(2, -1, -1), h], 1) + hf["embeddings.position_embeddings"]
    for i in range(depth):
        p = f"encoder.layer.{i}."
        y = ln(h, p + "norm1")
        q, k, v = (lin(y, f"{p}attention.attention.{n}").unflatten(-1, (heads, -1)).transpose(1, 2)
                   for n in ("query", "key", "value"))
        attn = ((q @ k.transpose(-1, -2) / (width // heads) ** 0.5).softmax(-1) @ v).transpose(1, 2)
        h = h + hf[p + "layer_scale1.lambda1"] * lin(attn.flatten(2), p + "attention.output.dense")
        y = F.gelu(lin(ln(h, p + "norm2"), p + "mlp.fc1"))
        h = h + hf[p + "layer_scale2.lambda1"] * lin(y, p + "mlp.fc2")
    expected = ln(h, "layernorm")[:, 0]

    model = VisionTransformer(img_size=32, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
                              init_values=1.0, num_classes=0).eval()
    load_strict("phikon-v2", model, from_hf_dinov2(hf, model), "generated")
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x)[:, 0], expected, atol=1e-5, rtol=1e-4)


def test_conch_v1_5_pooler_matches_titans_formulation():
    """TITAN computes the pooler with einsum over ``(h d)``-split heads; ours uses SDPA."""
    from featurestore.encoders.conch import PerceiverPooler

    pool = PerceiverPooler(16, 24, n_head=4, n_queries=1).eval()
    x = torch.randn(3, 10, 24)
    q = pool.to_q(pool.ln_q(pool.query)).expand(3, -1, -1)
    k, v = pool.to_kv(pool.ln_k(x)).chunk(2, dim=-1)
    q, k, v = (t.reshape(3, t.shape[1], 4, 4).permute(0, 2, 1, 3) for t in (q, k, v))
    sim = torch.einsum("bhid,bhjd->bhij", q * 4 ** -0.5, k)
    out = torch.einsum("bhij,bhjd->bhid", (sim - sim.amax(-1, keepdim=True)).softmax(-1), v)
    expected = pool.to_out(out.permute(0, 2, 1, 3).reshape(3, 1, 16))
    with torch.no_grad():
        torch.testing.assert_close(pool(x), expected)


def slide_tiles(path: Path, size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """All whole tiles of the slide, and their mean HSV saturation (white background ≈ 0, H&E ≈ 0.4)."""
    import openslide

    slide = openslide.OpenSlide(str(path))
    w, h = slide.dimensions
    tiles = np.stack([np.asarray(slide.read_region((x, y), 0, (size, size)).convert("RGB"))
                      for y in range(0, h - size + 1, size) for x in range(0, w - size + 1, size)])
    hi, lo = tiles.max(-1).astype(np.float32), tiles.min(-1).astype(np.float32)
    return tiles, ((hi - lo) / np.maximum(hi, 1)).mean((1, 2))


@pytest.fixture(scope="module")
def lite0() -> Teacher:
    return build_teacher("efficientnet-lite0")


def test_efficientnet_lite0_separates_tissue_from_background(lite0, real_slide):
    tiles, saturation = slide_tiles(real_slide)
    order = np.argsort(saturation)
    tissue, background = tiles[order[-6:]], tiles[order[:6]]
    assert saturation[order[-6:]].min() > 0.3 and saturation[order[:6]].max() < 0.02
    emb = F.normalize(lite0(torch.from_numpy(np.concatenate([tissue, background]))), dim=-1)
    cos = emb @ emb.T
    off_diagonal = ~torch.eye(6, dtype=torch.bool)
    assert cos[:6, :6][off_diagonal].mean() > cos[:6, 6:].mean() + 0.15
    assert (cos[:6].fill_diagonal_(-1).argmax(1) < 6).all(), "a tissue tile's nearest neighbour is background"

    x = torch.from_numpy(tissue)
    ref = F.normalize(lite0(x), dim=-1)
    shifted = F.normalize(lite0(torch.roll(x, shifts=(4, 4), dims=(1, 2))), dim=-1)
    unnormalised = F.normalize(lite0.embed_preprocessed(x.permute(0, 3, 1, 2).float() / 255), dim=-1)
    assert (ref * unnormalised).sum(-1).mean() < (ref * shifted).sum(-1).mean() - 0.15


def test_efficientnet_lite0_real_imagenet_head_is_confident_and_stable():
    """The package's classifier, mapped by order onto timm's, recognises a cat and an espresso."""
    import timm

    skimage_data = pytest.importorskip("skimage.data")
    from featurestore.encoders.imagenet import from_efficientnet_pytorch

    config = teacher_config("efficientnet-lite0")
    model = timm.create_model("efficientnet_lite0").eval()
    state = read_state_dict(config.name, locate(config, None).path)
    load_strict(config.name, model, from_efficientnet_pytorch(state, model), "package")
    cat, espresso = list(range(281, 286)), [967]
    for image, classes in ((skimage_data.chelsea(), cat), (skimage_data.coffee(), espresso)):
        x = torch.from_numpy(np.ascontiguousarray(image))[None]
        for view in (x, x.flip(2), x[:, 20:-20, 30:-30]):
            with torch.no_grad():
                probs = model(preprocess(view, config)).softmax(-1)[0]
            assert probs.argmax().item() in classes and probs[classes].sum() > 0.7


def test_efficientnet_lite0_weights_come_from_the_package(lite0, tmp_path):
    package_file = locate(lite0.config, None).path
    assert lite0.spec.weights_sha256 == "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
    assert lite0.spec.source.endswith(package_file.name) and lite0.spec.embed_dim == 1280
    explicit = build_teacher("efficientnet-lite0", weights=package_file).spec
    assert explicit.weights_sha256 == lite0.spec.weights_sha256
    assert explicit.source == f"file:{package_file.name}"
    bad = {k: v[..., :1] if v.ndim == 4 else v for k, v in read_state_dict("x", package_file).items()}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ModelError, match=r"does not fit timm's conv_stem.weight .*--weights PATH"):
        build_teacher("efficientnet-lite0", weights=tmp_path / "bad.pth")


@pytest.mark.parametrize("name", BUILT_IN + ["test/tiny-cnn"])
def test_preprocessing_matches_the_vendor_torchvision_pipeline(name, real_slide):
    """Our on-device transform vs ``Resize``/``CenterCrop``/``ToTensor``/``Normalize`` on a PIL image."""
    import openslide
    from torchvision import transforms as T

    config = teacher_config(name)
    region = openslide.OpenSlide(str(real_slide)).read_region((900, 700), 0, (301, 263))
    tile = np.asarray(region.convert("RGB"))
    mode = T.InterpolationMode(config.interpolation)
    vendor = T.Compose([T.Resize(config.resize_to, interpolation=mode), T.CenterCrop(config.input_size),
                        T.ToTensor(), T.Normalize(config.mean, config.std)])(Image.fromarray(tile))
    ours = preprocess(torch.from_numpy(tile.copy())[None], config)
    assert ours.shape == (1, 3, config.input_size, config.input_size)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    grey_levels = (ours[0] - vendor).abs() * torch.tensor(config.std).view(3, 1, 1) * 255
    assert grey_levels.max() <= 2.01 and grey_levels.mean() < 0.3


def test_teacher_pools_class_token_and_patch_mean_without_registers():
    teacher = build_teacher("test/tiny-vit")
    pixels = torch.randint(0, 256, (3, 40, 36, 3), dtype=torch.uint8)
    tokens = teacher.backbone.forward_features(teacher.preprocess(pixels))
    assert teacher.backbone.num_prefix_tokens == 3
    expected = torch.cat([tokens[:, 0], tokens[:, 3:].mean(1)], dim=-1)
    torch.testing.assert_close(teacher(pixels), expected)
    assert teacher(pixels).dtype == torch.float32 and not teacher.training
    with pytest.raises(ModelError, match=r"expected uint8 RGB tiles shaped \(n, h, w, 3\)"):
        teacher(pixels.float())


def test_seeded_test_models_are_deterministic_and_hashed():
    a, b = build_teacher("test/tiny-cnn"), build_teacher("test/tiny-cnn")
    pixels = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    assert a.spec == b.spec and a.spec.source == "seed:0" and a.spec.dtype == "float32"
    torch.testing.assert_close(a(pixels), b(pixels), rtol=0, atol=0)


def test_weights_file_is_loaded_hashed_and_unwrapped(tmp_path):
    seeded = build_teacher("test/tiny-vit")
    pixels = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    state = seeded.backbone.state_dict()
    changed = {k: v * 1.5 for k, v in state.items()}
    save_file(changed, tmp_path / "w.safetensors")
    loaded = build_teacher("test/tiny-vit", weights=tmp_path / "w.safetensors")
    assert loaded.spec.weights_sha256 == hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()
    assert loaded.spec.source == "file:w.safetensors"
    assert loaded.spec.id != seeded.spec.id
    assert not torch.allclose(loaded(pixels), seeded(pixels))

    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "ddp.pt")
    wrapped = build_teacher("test/tiny-vit", weights=tmp_path / "ddp.pt")
    torch.testing.assert_close(wrapped(pixels), seeded(pixels), rtol=0, atol=0)


def test_bad_weights_fail_on_one_line(tmp_path):
    save_file(build_teacher("test/tiny-cnn").backbone.state_dict(), tmp_path / "cnn.safetensors")
    (tmp_path / "w.onnx").write_bytes(b"x")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    cases = {tmp_path / "cnn.safetensors": r"does not fit the test/tiny-vit architecture \(\d+ missing",
             tmp_path / "absent.pt": "does not exist", tmp_path / "w.onnx": "unknown suffix '.onnx'",
             tmp_path / "junk.pt": "cannot read weights"}
    for path, message in cases.items():
        with pytest.raises(ModelError, match=message) as err:
            build_teacher("test/tiny-vit", weights=path)
        assert "\n" not in str(err.value) and "--weights PATH" in str(err.value)


def test_hub_weights_come_from_the_cache_offline_or_fail_in_one_actionable_line(tmp_path):
    """HF_HUB_OFFLINE with a prepared cache: a cached repo builds, UNI fails before being constructed."""
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-cnn"
    (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    cached = repo / "snapshots" / ("a" * 40) / "model.safetensors"
    save_file(build_teacher("test/tiny-cnn").backbone.state_dict(), cached)
    code = textwrap.dedent("""
        import sys
        from featurestore.encoders import TeacherConfig, build_teacher, register_teacher
        from featurestore.schemas import ModelError
        try:
            build_teacher("uni")
        except ModelError as err:
            print(err)
        print("featurestore.encoders.uni" in sys.modules)
        register_teacher(TeacherConfig(name="acme", builder="featurestore.encoders.testing:tiny_cnn",
                                       embed_dim=96, input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                                       pooling="mean", hub_id="acme/tiny-cnn", weights_filename="model.safetensors"))
        spec = build_teacher("acme").spec
        print(spec.source, spec.weights_sha256)
    """)
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"} | {"HF_HUB_OFFLINE": "1",
                                                                      "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.splitlines()
    assert len(out) == 3 and out[1] == "False"
    for part in ("uni:", "MahmoodLab/UNI", "HF_HUB_OFFLINE", "HF_TOKEN", "--weights PATH"):
        assert part in out[0]
    assert out[2] == f"hf://acme/tiny-cnn/model.safetensors {hashlib.sha256(cached.read_bytes()).hexdigest()}"


def test_importing_the_package_imports_no_model_code():
    code = ("import sys\nimport featurestore.encoders as enc\n"
            "enc.list_teachers()\nenc.teacher_config('virchow2')\n"
            "print(sorted(m for m in sys.modules if m.startswith('featurestore.encoders')))\n"
            "print('torch' in sys.modules, 'timm' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         check=True).stdout.splitlines()
    assert out[0] == str(["featurestore.encoders", "featurestore.encoders._config",
                          "featurestore.encoders._registry", "featurestore.encoders.catalogue"])
    assert out[1] == "False False"


def test_catalogue_and_unknown_names():
    assert set(BUILT_IN + ["test/tiny-vit", "test/tiny-cnn"]) <= set(list_teachers())
    with pytest.raises(ModelError, match=r"unknown teacher 'unii'; choose one of .*\buni\b.*timm:") as err:
        teacher_config("unii")
    assert "\n" not in str(err.value)
    gigapath = teacher_config("gigapath")
    assert (gigapath.resize_to, gigapath.input_size, gigapath.interpolation) == (256, 224, "bicubic")
    assert teacher_config("h-optimus-0").mean == (0.707223, 0.578729, 0.703617)
    assert (teacher_config("conch-v1").input_size, teacher_config("virchow2").embed_dim) == (448, 2560)
    with pytest.raises(ModelError, match="resize_to 200 is below the 224 px crop"):
        TeacherConfig(name="x", builder="m:f", embed_dim=1, input_size=224, resize_to=200, mean=(0, 0, 0),
                      std=(1, 1, 1), pooling="cls")


def test_register_teacher_builds_like_a_built_in():
    config = TeacherConfig(name="test/registered-cnn", builder="featurestore.encoders.testing:tiny_cnn",
                           embed_dim=96, input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, pooling="mean",
                           seed=7)
    register_teacher(config)
    register_teacher(config)
    assert build_teacher("test/registered-cnn").spec.embed_dim == 96
    with pytest.raises(ModelError, match="already registered with a different config"):
        register_teacher(dataclasses.replace(config, seed=8))
    register_teacher(dataclasses.replace(config, name="test/wrong-dim", embed_dim=95))
    with pytest.raises(ModelError, match="pooling of this backbone gives 96-d"):
        build_teacher("test/wrong-dim")


def test_timm_architecture_by_name():
    teacher = build_teacher("timm:resnet18")
    assert teacher.spec.embed_dim == 512 and teacher.spec.pooling == "pooler"
    assert teacher(torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)).shape == (2, 512)
    with pytest.raises(ModelError, match="has no architecture 'resnet_nope'"):
        teacher_config("timm:resnet_nope")


def test_local_checkpoint_with_sidecar(tmp_path):
    import timm

    with torch.random.fork_rng():
        torch.manual_seed(1)
        trained = timm.create_model("test_vit", img_size=64, num_classes=10)
    torch.save(trained.state_dict(), tmp_path / "mine.pth")
    with pytest.raises(ModelError, match="no sidecar config .*mine.json"):
        teacher_config(f"local:{tmp_path / 'mine.pth'}")
    (tmp_path / "mine.json").write_text(json.dumps({
        "arch": "test_vit", "kwargs": {"img_size": 64}, "embed_dim": 64, "input_size": 64, "resize_to": 72,
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "pooling": "cls", "name": "my-vit"}))
    teacher = build_teacher(f"local:{tmp_path / 'mine.pth'}")
    assert teacher.spec.name == "my-vit" and teacher.spec.source == "file:mine.pth"
    pixels = torch.randint(0, 256, (2, 80, 80, 3), dtype=torch.uint8)
    with torch.no_grad():
        expected = trained.eval().forward_features(teacher.preprocess(pixels))[:, 0]
    torch.testing.assert_close(teacher(pixels), expected)
    (tmp_path / "mine.json").write_text(json.dumps({"arch": "test_vit", "embed_dims": 64}))
    with pytest.raises(ModelError, match=r"lacks \['embed_dim', 'input_size', 'mean', 'std'\]"):
        teacher_config(f"local:{tmp_path / 'mine.pth'}")


SPEC_KINDS = ["test/tiny-cnn", "test/tiny-vit", "efficientnet-lite0", "timm", "local", "student", "bfloat16"]
BF16_CNN = TeacherConfig(name="test/bf16-cnn", builder="featurestore.encoders.testing:tiny_cnn", embed_dim=96,
                         input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, pooling="mean", dtype="bfloat16")


def checkpoint_of(kind: str, folder: Path) -> tuple[str, Path | None]:
    """A teacher of ``kind`` whose weights are a file, and the ``weights=`` to pass for it."""
    import timm

    from featurestore.encoders.student import StudentEncoder

    resnet = timm.create_model("test_resnet", num_classes=0)
    if kind in ("test/tiny-cnn", "test/tiny-vit", "bfloat16"):
        name = register_teacher(BF16_CNN).name if kind == "bfloat16" else kind
        save_file(build_teacher(name).backbone.state_dict(), folder / "w.safetensors")
        return name, folder / "w.safetensors"
    if kind == "timm":
        save_file(resnet.state_dict(), folder / "w.safetensors")
        return "timm:test_resnet", folder / "w.safetensors"
    if kind == "local":
        torch.save(resnet.state_dict(), folder / "mine.pth")
        (folder / "mine.json").write_text(json.dumps({"arch": "test_resnet", "embed_dim": 96, "input_size": 32,
                                                      "mean": [0.5] * 3, "std": [0.5] * 3, "pooling": "mean"}))
        return f"local:{folder / 'mine.pth'}", None
    if kind == "student":
        save_file(StudentEncoder(resnet, projection=16).state_dict(), folder / "student.safetensors")
        (folder / "student.json").write_text(json.dumps({"arch": "test_resnet", "input_size": 32, "mean": [0.5] * 3,
                                                         "std": [0.5] * 3, "embed_dim": 16, "projection": 16}))
        return f"student:{folder}", None
    return kind, None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kind", SPEC_KINDS)
def test_teacher_spec_is_the_built_teachers_spec_without_building_it(kind, device, tmp_path, monkeypatch):
    name, weights = checkpoint_of(kind, tmp_path)
    with monkeypatch.context() as m:
        m.setattr(_teacher, "load_entrypoint", lambda ref: pytest.fail(f"{ref} imported: the network was built"))
        spec = teacher_spec(name, weights=weights, device=device)
        on_gpu = teacher_spec(name, weights=weights, device="cuda")
    assert spec == build_teacher(name, weights=weights, device=device).spec
    assert (spec.dtype, on_gpu.dtype) == ("float32" if device == "cpu" else on_gpu.dtype, teacher_config(name).dtype)


def test_teacher_spec_of_seeded_or_missing_weights():
    assert teacher_spec("test/tiny-cnn") is None and teacher_spec("timm:test_resnet") is None, \
        "seeded weights are known only by the hash of the generated tensors"
    with pytest.raises(ModelError, match="does not exist; pass --weights PATH"):
        teacher_spec("test/tiny-cnn", weights="/nonexistent/w.safetensors")


@pytest.mark.gpu
def test_float32_teacher_ignores_the_callers_autocast_on_gpu():
    cpu, gpu = build_teacher("test/tiny-vit"), build_teacher("test/tiny-vit", device="cuda")
    pixels = torch.randint(0, 256, (4, 48, 48, 3), dtype=torch.uint8)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu(pixels)
    assert out.dtype == torch.float32 and gpu.spec.dtype == "float32"
    torch.testing.assert_close(out.cpu(), cpu(pixels), atol=1e-4, rtol=1e-4)
