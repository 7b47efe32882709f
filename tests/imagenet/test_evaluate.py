"""Evaluation (reference_trainers/imagenet/evaluate.py) with a tiny random feature extractor registered in
torch-fidelity (never the Inception download): FID equal to a direct float64 computation and to
torch-fidelity's calculate_metrics, FID 0 of identical sets, stats-only references, a hand-built Inception
Score, the alpha-sweep table and plot, and the missing-weights error."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

tf = pytest.importorskip("torch_fidelity")

from torch_fidelity.feature_extractor_base import FeatureExtractorBase  # noqa: E402
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY  # noqa: E402

from reference_trainers.digits.evaluate import frechet_distance, gaussian_frechet_distance  # noqa: E402
from reference_trainers.imagenet import evaluate as E  # noqa: E402

NAME = "driftloss-tiny-test"
SIZE = 16


class TinyExtractor(FeatureExtractorBase):
    """A random conv net: 'feat' [B, 6] (tanh conv, mean-pooled) for FID and precision/recall, and
    'logits_unbiased' [B, 3] = 100 x the channel means in [0, 1] (a pure-colour image is one 'class')."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.load_state_dict(torch.load(feature_extractor_weights_path, weights_only=True))

    @staticmethod
    def get_provided_features_list():
        return "feat", "logits_unbiased"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "feat", "kid": "feat", "prc": "feat", "isc": "logits_unbiased"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8)

    def forward(self, x):
        x = x.float() / 255
        out = {"feat": torch.tanh(self.conv(2 * x - 1)).mean((2, 3)), "logits_unbiased": 100 * x.mean((2, 3))}
        return tuple(out[k] for k in self.features_list)


if NAME not in FEATURE_EXTRACTORS_REGISTRY:
    tf.register_feature_extractor(NAME, TinyExtractor)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("extractor") / "tiny.pt"
    torch.save({f"conv.{k}": v for k, v in nn.Conv2d(3, 6, 3, stride=2).state_dict().items()}, path)
    return str(path)


def images(n, seed, bright=0.0):
    """uint8 [n, 16, 16, 3] smooth random colour patterns (``bright`` shifts the distribution)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, size=(n, 4, 4, 3)) + bright
    up = np.repeat(np.repeat(base, 4, axis=1), 4, axis=2) + 0.1 * rng.normal(size=(n, SIZE, SIZE, 3))
    return np.clip(up * 200, 0, 255).astype(np.uint8)


def save(path, arr, **extra):
    np.savez(path, arr_0=arr, **extra)
    return str(path)


def features(arr, weights, layer="feat"):
    """The test's own extraction: the same network, float64 features."""
    net = TinyExtractor(NAME, [layer], feature_extractor_weights_path=weights)
    with torch.no_grad():
        return net(torch.from_numpy(arr).permute(0, 3, 1, 2))[0].double().numpy()


def cfg(samples, reference, weights, **kw):
    return E.EvalConfig(samples=tuple(samples), reference=reference, inception=weights,
                        feature_extractor=NAME, device="cpu", progress=False, batch=32, **kw)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    gen, ref = images(60, 1), images(80, 2, bright=0.15)
    return {"gen": gen, "ref": ref, "gen_path": save(root / "gen.npz", gen),
            "ref_path": save(root / "ref.npz", ref)}


def test_fid_equals_direct_float64_and_torch_fidelity(data, weights):
    result = E.evaluate(cfg([data["gen_path"]], data["ref_path"], weights))
    row = result["rows"][0]
    direct = frechet_distance(features(data["gen"], weights), features(data["ref"], weights))
    assert row["fid"] == pytest.approx(direct, rel=1e-6) and direct > 1e-3
    assert row["num"] == 60 and result["reference"] == {"path": data["ref_path"], "fid_source": "images",
                                                        "num_images": 80}

    # the same numbers from torch-fidelity's own calculate_metrics on the same extractor
    class Images(torch.utils.data.Dataset):
        def __init__(self, arr):
            self.arr = torch.from_numpy(arr).permute(0, 3, 1, 2)

        def __len__(self):
            return len(self.arr)

        def __getitem__(self, i):
            return self.arr[i]

    ref = tf.calculate_metrics(input1=Images(data["gen"]), input2=Images(data["ref"]), fid=True, isc=True,
                               prc=True, feature_extractor=NAME, feature_extractor_weights_path=weights,
                               cuda=False, cache=False, verbose=False, save_cpu_ram=True, batch_size=32)
    assert row["fid"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-4)
    assert row["isc_mean"] == pytest.approx(ref["inception_score_mean"], rel=1e-9)
    assert (row["precision"], row["recall"]) == (ref["precision"], ref["recall"])


def test_identical_sets(data, weights, tmp_path):
    copy = save(tmp_path / "copy.npz", data["ref"])
    row = E.evaluate(cfg([copy], data["ref_path"], weights))["rows"][0]
    assert abs(row["fid"]) < 1e-6
    assert row["precision"] == 1.0 and row["recall"] == 1.0


def test_stats_only_and_mixed_reference(data, weights, tmp_path):
    f_ref = features(data["ref"], weights)
    mu, sigma = f_ref.mean(0), np.cov(f_ref, rowvar=False)
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=mu, sigma=sigma)
    result = E.evaluate(cfg([data["gen_path"]], str(stats), weights))
    row = result["rows"][0]
    mu_g, sig_g = E.gaussian_stats(features(data["gen"], weights))
    assert row["fid"] == pytest.approx(gaussian_frechet_distance(mu_g, sig_g, mu, sigma), rel=1e-6)
    assert row["precision"] is None and row["recall"] is None
    assert "reference images" in result["note"] and result["reference"]["fid_source"] == "stats"
    assert "n/a" in E.sweep_table(result)

    # images and statistics: FID from the statistics (ADM's convention) unless --fid-from images
    mixed = save(tmp_path / "mixed.npz", data["ref"], mu=mu + 0.5, sigma=sigma)
    auto = E.evaluate(cfg([data["gen_path"]], mixed, weights))["rows"][0]
    assert auto["fid"] == pytest.approx(gaussian_frechet_distance(mu_g, sig_g, mu + 0.5, sigma), rel=1e-6)
    assert auto["precision"] is not None
    from_images = E.evaluate(cfg([data["gen_path"]], mixed, weights, fid_from="images"))["rows"][0]
    assert from_images["fid"] == pytest.approx(row["fid"], rel=1e-6)
    with pytest.raises(ValueError, match="no arr_0"):
        E.evaluate(cfg([data["gen_path"]], str(stats), weights, fid_from="images"))
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, mu=np.zeros(5), sigma=np.eye(5))
    with pytest.raises(ValueError, match="5 dimensions"):
        E.evaluate(cfg([data["gen_path"]], str(wrong), weights))


def test_inception_score_hand_built(data, weights, tmp_path):
    """Pure-colour images: one-hot predictions over 3 classes, uniform marginal -> IS = 3; one colour -> 1."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 8, size=(30, SIZE, SIZE, 3), dtype=np.uint8)
    for i in range(30):
        colours[i, ..., i % 3] = 255
    three = save(tmp_path / "three.npz", colours)
    one = save(tmp_path / "one.npz", colours[::3])
    rows = E.evaluate(cfg([three, one], data["ref_path"], weights, isc_splits=1))["rows"]
    assert rows[0]["isc_mean"] == pytest.approx(3.0, rel=1e-6)
    assert rows[1]["isc_mean"] == pytest.approx(1.0, rel=1e-6)


def test_alpha_sweep_outputs(data, weights, tmp_path):
    """sample.py's layout (<out>/alpha-<a>/samples.npz); alpha 1.5 is drawn like the reference -> best."""
    runs = tmp_path / "samples"
    for alpha, bright in ((2.0, 0.4), (1.0, 0.0), (1.5, 0.15)):
        os.makedirs(runs / f"alpha-{alpha}")
        save(runs / f"alpha-{alpha}" / "samples.npz", images(60, int(alpha * 10), bright),
             labels=np.zeros(60, np.int64), alpha=np.float64(alpha))
    extra = save(tmp_path / "alpha-3.0.npz", images(60, 9, 0.6))           # alpha from the file name
    out = tmp_path / "results"
    result = E.main(["--samples", str(runs), "--samples", extra, "--reference", data["ref_path"],
                     "--inception", weights, "--feature-extractor", NAME, "--device", "cpu", "--no-progress",
                     "--out", str(out)])
    assert [r["alpha"] for r in result["rows"]] == [1.0, 1.5, 2.0, 3.0]
    assert result["best"]["alpha"] == 1.5
    table = (out / "alpha_sweep.md").read_text()
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert lines[0] == "| α | FID | IS | precision | recall |"
    assert [ln.split("|")[1].strip() for ln in lines[1:]] == ["1", "1.5", "2", "3"]
    assert "Best α (lowest FID): **1.5**" in table
    assert os.path.getsize(out / "fid_vs_alpha.png") > 1000
    saved = json.load(open(out / "results.json"))
    assert [r["fid"] for r in saved["rows"]] == [r["fid"] for r in result["rows"]]


def test_missing_weights_file(data, tmp_path):
    for path in (str(tmp_path / "nope.pth"), ""):
        with pytest.raises(FileNotFoundError, match="never downloaded") as err:
            E.evaluate(E.EvalConfig(samples=(data["gen_path"],), reference=data["ref_path"], inception=path,
                                    device="cpu", progress=False))
        assert "weights-inception-2015-12-05-6726825d.pth" in str(err.value)
        assert "local path" in str(err.value)
