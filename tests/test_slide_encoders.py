"""Slide encoders over cached tile embeddings: published checkpoint layouts, forward passes, ``fs slide-encode``.

Layouts are written out by hand from each vendor's module definitions (CHIEF ``models/CHIEF.py``,
MIL-Lab ``abmil.py`` under ``ABMILModel.model``, MADELEINE ``Model.py``, TITAN's
``vision_transformer.py`` inside the full TITAN checkpoint), filled with random tensors and saved in
the vendor's file format, so a wrong module name or width fails the strict load. The end-to-end
tests run the command on a real store whose tile sets follow (or break) each encoder's contract.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

from featurestore.cli import search as search_cli
from featurestore.cli import slide_encode as slide_encode_cli
from featurestore.cli import train as train_cli
from featurestore.encoders.slide import build_slide_encoder, list_slide_encoders, slide_encoder_config
from featurestore.encoders.slide.titan import alibi_bias, grid
from featurestore.index import search, slide_set
from featurestore.schemas import EncoderSpec, ModelError, Slide, TilingSpec
from featurestore.store import SlideCommit, Store, tiles_table
from tests.conftest import make_slide

pytestmark = pytest.mark.usefixtures("one_torch_thread")
Shapes = dict[str, tuple[int, ...]]
runner = CliRunner()
app = typer.Typer()
slide_encode_cli.register(app)
search_cli.register(app)
train_cli.register(app)


def linear(name: str, out: int, inp: int) -> Shapes:
    return {f"{name}.weight": (out, inp), f"{name}.bias": (out,)}


def norm(name: str, width: int) -> Shapes:
    return {f"{name}.weight": (width,), f"{name}.bias": (width,)}


def gated(name: str, width: int, hidden: int, heads: int = 1) -> Shapes:
    return (linear(f"{name}.attention_a.0", hidden, width) | linear(f"{name}.attention_b.0", hidden, width)
            | linear(f"{name}.attention_c", heads, hidden))


def shapes_chief() -> Shapes:
    """``CHIEF(size_arg="small", dropout=True, n_classes=2)``: fc + gated attention at ``attention_net.3``."""
    return (linear("attention_net.0", 512, 768) | gated("attention_net.3", 512, 256) | linear("classifiers", 2, 512)
            | linear("instance_classifiers.0", 2, 512) | linear("instance_classifiers.1", 2, 512)
            | linear("att_head.fc1", 256, 512) | linear("att_head.fc2", 1, 256) | linear("text_to_vision.0", 512, 768)
            | {"organ_embedding": (19, 768)})


def shapes_feather() -> Shapes:
    """``ABMILModel`` saved by transformers: ``model.`` + ``ABMIL(in_dim=768, num_classes=108)``."""
    inner = linear("patch_embed.0", 512, 768) | gated("global_attn", 512, 384) | linear("classifier", 108, 512)
    return {f"model.{k}": v for k, v in inner.items()}


def shapes_madeleine() -> Shapes:
    """``MADELEINE(stain_encoding=False)`` saved from DistributedDataParallel (``module.`` prefix)."""
    out = (linear("wsi_embedders.pre_attn.0", 512, 512) | norm("wsi_embedders.pre_attn.1", 512)
           | linear("wsi_embedders.pre_attn.4", 512, 512) | norm("wsi_embedders.pre_attn.5", 512)
           | linear("wsi_embedders.pre_attn.8", 2048, 512) | norm("wsi_embedders.pre_attn.9", 2048)
           | linear("token_projector", 128, 2048) | linear("projector", 512, 2048))
    for i in range(4):
        out |= gated(f"wsi_embedders.attn.{i}", 512, 512)
    return {f"module.{k}": v for k, v in out.items()}


def pooler(name: str, queries: int) -> Shapes:
    return ({f"{name}.query": (queries, 768), f"{name}.attn.in_proj_weight": (3 * 768, 768),
             f"{name}.attn.in_proj_bias": (3 * 768,)} | linear(f"{name}.attn.out_proj", 768, 768)
            | norm(f"{name}.ln_q", 768) | norm(f"{name}.ln_k", 768))


def shapes_titan() -> Shapes:
    """The full TITAN checkpoint: the CoCa vision tower (6 blocks, parallel poolers) and a text tower."""
    tower = {"cls_token": (1, 1, 768), "proj": (768, 768)} | linear("patch_embed.0", 768, 768) | norm("norm", 768)
    for i in range(6):
        b = f"blocks.modules_list.{i}"
        tower |= (norm(f"{b}.norm1", 768) | linear(f"{b}.attn.qkv", 3 * 768, 768) | linear(f"{b}.attn.proj", 768, 768)
                  | norm(f"{b}.norm2", 768) | linear(f"{b}.mlp.fc1", 3072, 768) | linear(f"{b}.mlp.fc2", 768, 3072))
    tower |= pooler("attn_pool", 128) | pooler("attn_pool_contrastive", 1)
    text = {"text_encoder.token_embedding.weight": (64, 32), "text_encoder.positional_embedding": (16, 32)}
    return {f"vision_encoder.{k}": v for k, v in tower.items()} | text


def shapes_gigapath() -> Shapes:
    """``slide_encoder.pth``'s ``"model"``: ``gigapath_slide_enc12l768d`` (torchscale LongNet, sub-LN) plus a
    pretraining-only tensor of the MAE decoder, which the vendor's non-strict load ignores."""
    out = ({"cls_token": (1, 1, 768), "decoder_embed.weight": (512, 768)} | linear("patch_embed.proj", 768, 1536)
           | norm("encoder.layer_norm", 768) | norm("norm", 768))
    for i in range(12):
        layer = f"encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out |= linear(f"{layer}.self_attn.{proj}", 768, 768)
        out |= (norm(f"{layer}.self_attn.inner_attn_ln", 768) | norm(f"{layer}.self_attn_layer_norm", 768)
                | linear(f"{layer}.ffn.fc1", 3072, 768) | linear(f"{layer}.ffn.fc2", 768, 3072)
                | norm(f"{layer}.ffn.ffn_layernorm", 3072) | norm(f"{layer}.final_layer_norm", 768))
    return out


LAYOUTS = {"chief": (shapes_chief, "CHIEF_pretraining.pth"), "feather": (shapes_feather, "pytorch_model.bin"),
           "madeleine": (shapes_madeleine, "model.pt"), "titan": (shapes_titan, "model.safetensors")}


def write_checkpoint(name: str, folder: Path) -> Path:
    """Random tensors (float16, as the hub files are half-precision-sized) in ``name``'s layout and file format."""
    shapes, filename = LAYOUTS[name]
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=gen) * 0.05).half() for k, s in shapes().items()}
    path = folder / filename
    folder.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Each layout written once for the module (TITAN's is 50M parameters)."""
    root = tmp_path_factory.mktemp("slide-weights")
    return {name: write_checkpoint(name, root / name) for name in LAYOUTS}


def bag(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random tile embeddings on a 7-wide grid of 512 px tiles, level-0 corners (x, y)."""
    rng = np.random.default_rng(seed)
    x, y = np.divmod(np.arange(n), 7)
    return rng.standard_normal((n, dim)).astype(np.float32), np.stack([x * 512, y * 512], 1)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_published_layout_loads_strictly_and_encodes_deterministically(name, checkpoints, tmp_path):
    contract = slide_encoder_config(name).contract
    path = checkpoints[name]
    enc = build_slide_encoder(name, in_dim=contract.embed_dim, tile_size=contract.tile_size, weights=path.parent)
    features, coords = bag(23, contract.embed_dim, 0)
    out = enc(features, coords, 512)
    assert out.shape == (slide_encoder_config(name).embed_dim,) and out.dtype == np.float32
    assert np.isfinite(out).all() and np.abs(out).sum() > 0
    np.testing.assert_array_equal(out, enc(features, coords, 512))
    other = enc(*bag(23, contract.embed_dim, 1), 512)
    assert not np.allclose(out, other)
    assert enc.spec.weights_sha256 != "0" * 64 and enc.spec.source == f"file:{path.name}"
    if path.suffix != ".safetensors":
        state = torch.load(path, weights_only=True)
        state.pop(next(iter(state)))
        torch.save(state, tmp_path / path.name)
        with pytest.raises(ModelError, match="does not fit") as err:
            build_slide_encoder(name, in_dim=contract.embed_dim, tile_size=contract.tile_size,
                                weights=tmp_path / path.name)
        assert "\n" not in str(err.value) and "--weights PATH" in str(err.value)


def test_attention_encoders_ignore_tile_order_and_titan_reads_the_grid(checkpoints):
    """MIL pooling is permutation-invariant; TITAN's ALiBi makes it depend on where tiles lie."""
    chief = build_slide_encoder("chief", in_dim=768, tile_size=256, weights=checkpoints["chief"])
    features, coords = bag(15, 768, 2)
    perm = np.random.default_rng(0).permutation(15)
    np.testing.assert_allclose(chief(features, coords, 512), chief(features[perm], coords[perm], 512), atol=1e-5)
    titan = build_slide_encoder("titan", in_dim=768, tile_size=512, weights=checkpoints["titan"])
    np.testing.assert_allclose(titan(features, coords, 512), titan(features[perm], coords[perm], 512), atol=1e-5)
    assert not np.allclose(titan(features, coords, 512), titan(features, coords[::-1].copy(), 512), atol=1e-4)


def test_titan_grid_and_alibi_follow_the_vendor_convention():
    features = torch.arange(6, dtype=torch.float32).view(3, 2) + 1
    coords = torch.tensor([[1024, 0], [0, 512], [1024, 512]])
    cells, keep = grid(features, coords, 512)
    assert cells.shape == (3, 2, 2) and keep.tolist() == [[False, True], [False, False], [True, True]]
    assert cells[2, 0].tolist() == [1.0, 2.0] and cells[0, 1].tolist() == [3.0, 4.0]
    bias = alibi_bias(3, 2, keep, 12)
    assert bias.shape == (1, 12, 4, 4) and (bias[:, :, 0] == 0).all() and (bias[:, :, :, 0] == 0).all()
    # Tokens (0, 1), (2, 0), (2, 1) in row-major order; 12 heads: slopes 2^-1 ... 2^-8, then 2^-0.5, 2^-1.5 ...
    assert bias[0, 0, 1, 2].item() == pytest.approx(-(5 ** 0.5) / 2) and bias[0, 0, 2, 3].item() == -0.5
    assert bias[0, 8, 2, 3].item() == pytest.approx(-(2 ** -0.5)) and bias[0, 7, 2, 3].item() == -(2.0 ** -8)


def test_missing_weights_are_one_line_that_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as err:
        build_slide_encoder("titan", in_dim=768, tile_size=512)
    assert "\n" not in str(err.value) and "MahmoodLab/TITAN" in str(err.value) and "--weights" in str(err.value)
    with pytest.raises(ModelError, match="CHIEF_pretraining.pth does not exist") as err:
        build_slide_encoder("chief", in_dim=768, tile_size=256)
    assert "--weights" in str(err.value)
    with pytest.raises(ModelError, match="unknown slide encoder"):
        slide_encoder_config("prov-gigapath")
    assert set(list_slide_encoders()) == {"mean", "titan", "chief", "feather", "madeleine", "gigapath-slide", "prism"}


# --- fs slide-encode on a store ---------------------------------------------------------------------


def tile_encoder(name: str, dim: int) -> EncoderSpec:
    return EncoderSpec(name=name, version="1", weights_sha256="cd" * 32, embed_dim=dim, input_size=448,
                       mean=(0.5,) * 3, std=(0.5,) * 3, pooling="pooler")


def commit_grid_slide(store: Store, slide: Slide, tiling: TilingSpec, spec: EncoderSpec, n: int, seed: int) -> None:
    footprint = round(tiling.tile_size * tiling.target_mpp / slide.mpp_x)
    x, y = np.divmod(np.arange(n), 6)
    tiles = tiles_table(slide.slide_id, tiling.id, x * footprint, y * footprint, 0, footprint, np.ones(n))
    emb = np.random.default_rng(seed).standard_normal((n, spec.embed_dim)).astype(np.float32)
    store.commit_slide(SlideCommit(slide, tiling, tiles, {spec: emb}, dtype="float16"))


SLIDES = 8


@pytest.fixture
def store_path(tmp_path):
    """Eight slides with CONCH v1.5 bags of 512 px tiles at 0.5 µm/px (TITAN's and FEATHER's contract), and
    labels; the slides are 0.25 µm/px scans, so a tile's level-0 footprint is 1024 px."""
    store = Store.create(tmp_path / "s")
    tiling = TilingSpec(target_mpp=0.5, tile_size=512)
    for i in range(SLIDES):
        slide = Slide(**{**make_slide(i).to_dict(), "mpp_x": 0.25, "mpp_y": 0.25})
        commit_grid_slide(store, slide, tiling, tile_encoder("conch-v1.5", 768), 10 + 3 * i, seed=i)
    csv = tmp_path / "labels.csv"
    csv.write_text("filename,label\n" + "".join(f"slide_{i}.svs,{i % 2}\n" for i in range(SLIDES)))
    store.import_labels(csv)
    return store.root


def run(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def test_slide_encode_commits_a_searchable_slide_set_and_resumes(store_path, checkpoints):
    weights = checkpoints["titan"]
    done = run("slide-encode", "-s", store_path, "--tiles", "conch-v1.5", "--encoder", "titan",
               "--weights", weights, "--device", "cpu")
    assert done.exit_code == 0, done.output
    assert "titan over conch-v1.5: encoded 8 slides, 0 already done" in done.output.replace("\n", " ")
    store = Store.open(store_path)
    rows = store.sql("SELECT slide_id, encoder, n_tiles, len(embedding) AS dim FROM slide_features "
                     "ORDER BY slide_id").to_pylist()
    assert [(r["encoder"], r["n_tiles"], r["dim"]) for r in rows] == [("titan", 10 + 3 * i, 768) for i in range(SLIDES)]
    ss = slide_set(store, "titan:conch-v1.5")
    assert ss.slides == SLIDES and ss.embed_dim == 768 and ss.tiles_encoder == "conch-v1.5"
    specs = store.sql("SELECT input_size, pooling FROM encoders WHERE name = 'titan'").to_pylist()
    assert specs == [{"input_size": 512, "pooling": "pooler"}]
    again = run("slide-encode", "-s", store_path, "-t", "conch-v1.5", "-e", "titan", "--weights", weights,
                "--device", "cpu")
    assert "encoded 0 slides, 8 already done" in again.output.replace("\n", " ")
    hits = run("search", "-s", store_path, "-m", "titan", "--slide", make_slide(2).slide_id, "-f", "json")
    assert hits.exit_code == 0, hits.output
    found = json.loads(hits.output)
    assert found[0]["slide_id"] == make_slide(2).slide_id and found[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert len(found) == SLIDES and {"label", "n_tiles"} <= set(found[0])
    odd = search(store, "titan:conch-v1.5", slide_id=make_slide(1).slide_id, where="l.label = 1")
    assert set(odd.column("label").to_pylist()) == {1}


def test_mean_encoder_matches_the_bag_mean_and_trains_as_bags_of_one(store_path, tmp_path):
    from featurestore.distill.data import bags, collate_bags

    done = run("slide-encode", "-s", store_path, "-t", "conch-v1.5", "-e", "mean", "--device", "cpu")
    assert done.exit_code == 0, done.output
    store = Store.open(store_path)
    es = store.embedding_set("conch-v1.5")
    sid = make_slide(3).slide_id
    stored = store.sql("SELECT embedding FROM slide_features WHERE slide_id = ?", [sid]).column(0)[0].as_py()
    np.testing.assert_allclose(stored, store.read_bag(es, sid).astype(np.float32).mean(0), rtol=1e-5, atol=1e-6)
    data = bags(store, "mean:conch-v1.5", label="label")
    batch = collate_bags([data[i] for i in range(len(data))])
    assert batch.x.shape == (SLIDES, 1, 768) and batch.mask.all() and batch.y.tolist() == [0, 1] * (SLIDES // 2)
    np.testing.assert_allclose(batch.x[3, 0].numpy(), stored, rtol=1e-6)
    trained = run("train", "-s", store_path, "-m", "mean:conch-v1.5", "--label", "label", "--head", "abmil",
                  "--folds", 2, "--seeds", 1, "--epochs", 2, "--group", "none", "--device", "cpu", "--bootstrap", 10,
                  "--out", tmp_path / "run")
    assert trained.exit_code == 0, trained.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["embedding_set"]["slide_set"] == "mean:conch-v1.5" and config["cohort"]["slides"] == SLIDES
    assert config["embedding_set"]["tiling_id"] == es.tiling_id
    assert not list((tmp_path / "run").rglob("*heatmap*")), "a bag of one has no attention map to draw"
    predicted = run("predict", tmp_path / "run", "-s", store_path, "--device", "cpu")
    assert predicted.exit_code == 0, predicted.output
    rows = store.sql("SELECT model, set_id, count(DISTINCT slide_id) AS n FROM predictions GROUP BY ALL").to_pylist()
    assert rows == [{"model": "mean:conch-v1.5", "set_id": config["embedding_set"]["set_id"], "n": SLIDES}]


@pytest.mark.parametrize(("encoder", "wrong"), [("chief", "tile encoder conch-v1.5, not ctranspath"),
                                                 ("madeleine", "512 px tiles, not 256 px")])
def test_contract_mismatch_is_one_line_naming_the_extract_command_and_writes_nothing(store_path, encoder, wrong):
    before = Store.open(store_path).version
    refused = run("slide-encode", "-s", store_path, "-t", "conch-v1.5", "-e", encoder, "--device", "cpu")
    assert refused.exit_code == 2
    line = refused.output.replace("\n", " ")
    contract = slide_encoder_config(encoder).contract
    assert wrong in line and contract.extract_command() in line and "Traceback" not in refused.output
    assert Store.open(store_path).version == before


def test_absent_weights_write_nothing(store_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = Store.open(store_path).version
    refused = run("slide-encode", "-s", store_path, "-t", "conch-v1.5", "-e", "feather", "--device", "cpu")
    assert refused.exit_code == 2 and "MahmoodLab/abmil.base.conch_v15.pc108-24k" in refused.output
    assert Store.open(store_path).version == before


# --- Prov-GigaPath's LongNet -----------------------------------------------------------------------


def test_gigapath_layout_loads_strictly_on_the_meta_device():
    """86M parameters: checked for keys and shapes without allocating them."""
    from featurestore.encoders._registry import load_entrypoint
    from featurestore.encoders._weights import load_strict

    config = slide_encoder_config("gigapath-slide")
    with torch.device("meta"):
        network = load_entrypoint(config.builder)(config, 1536)
    state = {k: torch.empty(s, device="meta") for k, s in shapes_gigapath().items()}
    load_strict(config.name, network, load_entrypoint(config.checkpoint_filter)(state, network), "generated")
    state.pop("encoder.layers.3.ffn.ffn_layernorm.weight")
    with pytest.raises(ModelError, match="1 missing"):
        load_strict(config.name, network, load_entrypoint(config.checkpoint_filter)(state, network), "generated")


def dilated_reference(q, k, v, segments, ratios):
    """A direct loop over LongNet's branches, segments, head groups and heads: zero-padded segments and
    strides, softmax within each sparse set, branches merged by their log-sum-exp weights."""
    import math

    b, n, h, d = q.shape
    outs, lses = [], []
    for segment, ratio in zip(segments, ratios, strict=True):
        length = min(segment, n)
        total = -(-n // length) * length
        out = torch.zeros(b, h, total, d)
        lse = torch.full((b, h, total), -1e8)
        for start in range(0, total, length):
            span = length + (-length % ratio)
            padded = [torch.cat([x[:, start:start + length], x.new_zeros(b, span - min(length, n - start), h, d)], 1)
                      for x in (q, k, v)]
            group = h // ratio
            for g in range(ratio):
                idx = torch.arange(g, span, ratio)
                keep, heads = idx < length, slice(g * group, (g + 1) * group)
                qs, ks, vs = (x[0, idx, heads].transpose(0, 1) for x in padded)  # (group, tokens, d)
                scores = qs @ ks.transpose(1, 2) / math.sqrt(d)
                pos = start + idx[keep]
                out[0, heads, pos] = (scores.softmax(-1) @ vs)[:, keep]
                lse[0, heads, pos] = torch.logsumexp(scores, -1)[:, keep]
        outs.append(out[:, :, :n])
        lses.append(lse[:, :, :n])
    stacked = torch.stack(lses)
    weights = torch.exp(stacked - stacked.max(0).values)
    weights = weights / weights.sum(0)
    merged = sum(o * w[..., None] for o, w in zip(outs, weights, strict=True))
    return merged.transpose(1, 2).reshape(b, n, h * d)


@pytest.mark.parametrize("n", [37, 1030])
def test_gigapath_dilated_attention_matches_a_direct_loop(n):
    """37 tokens: one segment per branch; 1030: the 1024-token branch has a second, zero-padded segment."""
    from featurestore.encoders.slide import gigapath

    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, n, 16, 4, generator=gen) for _ in range(3))
    got = gigapath.dilated_attention(q, k, v)
    want = dilated_reference(q, k, v, gigapath.SEGMENTS, gigapath.RATIOS)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    dense = torch.softmax(q.transpose(1, 2) @ k.transpose(1, 2).transpose(-2, -1) / 2, -1) @ v.transpose(1, 2)
    assert not torch.allclose(got, dense.transpose(1, 2).reshape(1, n, 64), atol=1e-3), "dilated is not dense"


def test_gigapath_positions_are_maes_sincos_of_the_tile_cell():
    import numpy as np

    from featurestore.encoders.slide.gigapath import sincos_2d

    def vendor_1d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=float) / (dim / 2.0))
        out = np.einsum("m,d->md", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    flat = torch.tensor([0, 7, 3 * 1000 + 5, 999 * 1000 + 999])
    cols, rows = (flat % 1000).numpy().astype(np.float32), (flat // 1000).numpy().astype(np.float32)
    want = np.concatenate([vendor_1d(384, cols), vendor_1d(384, rows)], axis=1)
    np.testing.assert_allclose(sincos_2d(flat, 768).numpy(), want, atol=1e-6)
    origin = sincos_2d(torch.tensor([0]), 768)[0]
    assert origin[:192].eq(0).all() and origin[192:384].eq(1).all(), "column 0: sines 0, cosines 1"


def test_gigapath_encodes_a_bag_by_its_tiles_and_their_cells():
    from featurestore.encoders.slide.gigapath import gigapath

    with torch.device("meta"):
        network = gigapath(slide_encoder_config("gigapath-slide"), 1536).eval()
    network.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    for p in network.parameters():
        p.data.normal_(0, 0.02, generator=gen)
    features, coords = bag(20, 1536, 3)
    x, xy = torch.from_numpy(features), torch.from_numpy(coords)
    with torch.inference_mode():
        out = network.encode(x, xy, 512)
        assert out.shape == (1, 768) and torch.isfinite(out).all()
        torch.testing.assert_close(out, network.encode(x, xy, 512), rtol=0, atol=0)
        assert not torch.allclose(out, network.encode(x, xy * 2, 512), atol=1e-3), "cells matter"
        torch.testing.assert_close(out, network.encode(x, xy * 2, 1024)), "cells are coordinates // tile footprint"
        with pytest.raises(ModelError, match="outside the 1000 × 1000 grid"):
            network.encode(x, xy * 2000, 512)


# --- PRISM's Perceiver -----------------------------------------------------------------------------


def shapes_prism(aliases: bool) -> Shapes:
    """paige-ai/Prism's ``image_resampler``: layers 0-1 own a cross-attention (layers 2-7 reuse layer 1's),
    layer 0 owns the 6-block self-attention stack (layers 1-7 reuse it); with ``aliases`` every reuse is
    also saved under its own name. Plus decoder tensors that the slide path does not load."""
    def ff(name: str) -> Shapes:
        return norm(f"{name}.norm", 1280) | linear(f"{name}.net.0", 2560, 1280) | linear(f"{name}.net.2", 1280, 1280)

    def xattn(i: int) -> Shapes:
        x = f"perceiver.layers.{i}.xattn"
        return (norm(f"{x}.xattn.x_norm", 1280) | {f"{x}.xattn.to_q.weight": (1280, 1280),
                f"{x}.xattn.to_kv.weight": (2560, 2560), f"{x}.xattn.to_out.weight": (1280, 1280)} | ff(f"{x}.ff"))

    def tf(i: int) -> Shapes:
        out: Shapes = {}
        for j in range(6):
            b = f"perceiver.layers.{i}.tf.{j}"
            out |= (norm(f"{b}.mhsa.norm", 1280) | {f"{b}.mhsa.mha.in_proj_weight": (3840, 1280),
                    f"{b}.mhsa.mha.out_proj.weight": (1280, 1280)} | ff(f"{b}.ff"))
        return out

    out = norm("cls_norm", 1280) | norm("img_norm", 1280) | {"perceiver.latents": (513, 1280)}
    for i in range(8):
        if i <= 1 or aliases:
            out |= xattn(i)
        if i == 0 or aliases:
            out |= tf(i)
    return ({f"image_resampler.{k}": v for k, v in out.items()}
            | {"text_decoder.lm_head.weight": (42, 16), "img_to_latents.to_latents.weight": (5120, 1280)})


@pytest.mark.parametrize("aliases", [False, True])
def test_prism_layout_loads_strictly_with_or_without_shared_aliases(aliases):
    from featurestore.encoders._registry import load_entrypoint
    from featurestore.encoders._weights import load_strict

    config = slide_encoder_config("prism")
    with torch.device("meta"):
        network = load_entrypoint(config.builder)(config, 2560)
    state = {k: torch.empty(s, device="meta") for k, s in shapes_prism(aliases).items()}
    load_strict(config.name, network, load_entrypoint(config.checkpoint_filter)(state, network), "generated")
    assert network.perceiver.layers[5]["xattn"] is network.perceiver.layers[1]["xattn"]
    assert network.perceiver.layers[7]["tf"] is network.perceiver.layers[0]["tf"]


def test_prism_perceiver_reads_a_bag_as_a_set():
    """No positions: the first latent is the same whatever the tiles' order, and changes with their content."""
    from featurestore.encoders.slide.prism import PerceiverResampler, PerceiverShape

    torch.manual_seed(0)
    network = PerceiverResampler(PerceiverShape(latent_seq=4, latent_dim=16, context_dim=24, mhsa_heads=2,
                                                perceiver_depth=3, transformer_depth=2)).eval()
    features = torch.randn(30, 24)
    with torch.inference_mode():
        out = network.encode(features, torch.zeros(30, 2), 1)
        assert out.shape == (1, 16) and torch.isfinite(out).all()
        torch.testing.assert_close(out, network.encode(features.flip(0), torch.zeros(30, 2), 1))
        assert not torch.allclose(out, network.encode(features * 2, torch.zeros(30, 2), 1), atol=1e-4)
