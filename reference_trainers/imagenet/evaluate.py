"""FID, Inception Score and precision/recall of generated sample sets (one per alpha) against a reference.

    python -m reference_trainers.imagenet.evaluate --samples samples/b2 \\
        --reference /data/VIRTUAL_imagenet256_labeled.npz \\
        --inception /models/weights-inception-2015-12-05-6726825d.pth --out results/b2
    python -m reference_trainers.imagenet.evaluate --samples a.npz --samples b.npz --reference ref.npz ...

Inputs (nothing is ever downloaded):
  --samples    any number of: an .npz with ``arr_0`` uint8 [N, H, W, 3] (the ADM evaluator's layout, what
               sample.py writes; optional ``alpha``), a folder holding samples.npz (sample.py's alpha-<a>/),
               a sample.py --out folder (every alpha-<a>/samples.npz in it), or a folder of image files.
               Each set's alpha comes from the npz's ``alpha``, else from an ``alpha-<a>`` folder/file name.
  --reference  a local .npz: images ``arr_0`` uint8 [M, H, W, 3] and/or precomputed Inception statistics
               ``mu`` [2048], ``sigma`` [2048, 2048] (an ADM reference batch holds both: statistics of the
               whole ImageNet training set, a 10k subset of images). FID uses the statistics when present
               (``--fid-from auto``, the ADM evaluator's convention), else those of the images' features;
               precision/recall need the images (without them they are reported as unavailable).
  --inception  a local file of torch-fidelity's InceptionV3 weights (``inception-v3-compat``, the TF FID graph
               ported to PyTorch; download it beforehand from the URL in the error message).

Outputs in --out: results.json (every number and setting), alpha_sweep.md (a table alpha | FID | IS |
precision | recall, best alpha named) and fid_vs_alpha.png (FID against alpha, the best alpha marked).

How torch-fidelity is used: its feature extractor registry and constructor (``create_feature_extractor`` with
``feature_extractor_weights_path`` = --inception, so a missing file never triggers its download), its
Inception Score (``isc_features_to_metric``: ``isc_splits`` splits of the ``logits_unbiased`` features,
shuffled with its fixed seed, which matters because sample.py writes classes in order) and its precision/
recall (``prc_features_to_metric``: k = ``prc_neighborhood`` nearest neighbours in the ``2048`` pool features,
memory-bounded variant). Not through ``calculate_metrics``: it cannot take precomputed reference statistics,
and one feature pass per set serves all three metrics here. The Fréchet distance is computed here, in
float64 with scipy's sqrtm (reference_trainers.digits.evaluate.gaussian_frechet_distance), from the mean and
unbiased covariance of the ``2048`` features (torch-fidelity's own FID uses an eigenvalue shortcut with a
float32 mean; the two agree to rounding). Any extractor registered with
``torch_fidelity.register_feature_extractor`` can replace Inception (``--feature-extractor``; the tests use a
tiny random one); its metric layers are its ``get_default_feature_layer_for_metric``.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import re
import sys
from dataclasses import dataclass

import numpy as np
import torch

from reference_trainers.common.config_cli import (
    ConfigError,
    check_fields,
    config_from_args,
    dataclass_parser,
    option,
)
from reference_trainers.digits.evaluate import gaussian_frechet_distance

INCEPTION = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FID_FROM = ("auto", "stats", "images")


@dataclass
class EvalConfig:
    samples: tuple[str, ...] = option((), "sample sets (the flag may be repeated): .npz files (arr_0 "
                                      "uint8 [N, H, W, 3]), alpha-<a>/ folders or --out folders of "
                                      "sample.py, folders of images")
    reference: str = option("", "local reference .npz: arr_0 images and/or mu, sigma statistics (e.g. ADM's "
                            "VIRTUAL_imagenet256_labeled.npz)")
    inception: str = option("", f"local weights file of the feature extractor ({INCEPTION_FILE} for "
                            f"{INCEPTION}); nothing is downloaded at run time")
    out: str = option("", "folder for results.json, alpha_sweep.md and fid_vs_alpha.png (empty: print only)")
    feature_extractor: str = option(INCEPTION, "a feature extractor registered in torch-fidelity")
    fid_from: str = option("auto", "reference side of FID: auto (its mu/sigma when present, else its "
                           "images), stats or images", choices=FID_FROM)
    prc: bool = option(True, "precision/recall (needs reference images)")
    isc_splits: int = option(10, "Inception Score splits (ADM: 10 splits of 5,000 for 50k samples)", ge=1)
    prc_neighborhood: int = option(3, "k of the k-nearest-neighbour manifolds of precision/recall", ge=1)
    batch: int = option(200, "images per feature extractor call", ge=1)
    device: str = option("auto", "cuda, cpu, or auto: cuda when available", choices=("auto", "cuda", "cpu"))
    progress: bool = option(True, "tqdm progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = dataclass_parser(EvalConfig, (__doc__ or "").split("\n\n")[0], skip=("samples",))
    samples = next(f for f in dataclasses.fields(EvalConfig) if f.name == "samples")
    parser.add_argument("--samples", nargs="+", action="extend", metavar="PATH",
                        help=samples.metadata["help"])
    return parser


def parse_config(argv: list[str] | None) -> EvalConfig:
    return config_from_args(EvalConfig, vars(build_parser().parse_args(argv)))


# --------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleSet:
    name: str
    path: str                      # an .npz file or a folder of images
    alpha: float | None


def _alpha_from_name(path: str) -> float | None:
    """alpha from an 'alpha-<a>' (or alpha_<a>, alpha=<a>, alpha<a>) component of ``path``, nearest last."""
    for part in reversed(os.path.normpath(os.path.abspath(path)).split(os.sep)):
        m = re.search(r"alpha[-_=]?(\d+(?:\.\d*)?)", part)
        if m:
            return float(m.group(1).rstrip("."))
    return None


def _npz_set(path: str, name: str | None = None) -> SampleSet:
    with np.load(path) as f:
        if "arr_0" not in f.files:
            raise ValueError(f"{path!r} has no 'arr_0' (samples uint8 [N, H, W, 3]); it holds {f.files}")
        alpha = float(f["alpha"]) if "alpha" in f.files else _alpha_from_name(path)
    if name is None:
        parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
        name = parent if os.path.basename(path) == "samples.npz" else os.path.basename(path)
    return SampleSet(name=name, path=path, alpha=alpha)


def _image_files(folder: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(folder, "*")) if p.lower().endswith(IMAGE_EXTENSIONS))


def find_sample_sets(paths) -> list[SampleSet]:
    """The sample sets named by ``paths`` (see --samples), sample.py folders expanded in alpha order."""
    sets = []
    for path in paths:
        if os.path.isfile(path):
            sets.append(_npz_set(path))
        elif os.path.isfile(os.path.join(path, "samples.npz")):
            sets.append(_npz_set(os.path.join(path, "samples.npz")))
        elif os.path.isdir(path) and glob.glob(os.path.join(path, "alpha-*", "samples.npz")):
            found = [_npz_set(p) for p in glob.glob(os.path.join(path, "alpha-*", "samples.npz"))]
            sets += sorted(found, key=lambda s: (s.alpha is None, s.alpha or 0.0, s.name))
        elif os.path.isdir(path) and _image_files(path):
            sets.append(SampleSet(os.path.basename(os.path.normpath(path)), path, _alpha_from_name(path)))
        else:
            raise FileNotFoundError(f"--samples {path!r}: not an .npz file, a folder with samples.npz, a "
                                    "sample.py output folder (alpha-*/samples.npz) or a folder of images")
    if not sets:
        raise ValueError("no sample sets: give --samples (an .npz, or the --out folder of sample.py)")
    return sets


def load_images(path: str) -> np.ndarray:
    """uint8 [N, H, W, 3] of an .npz (``arr_0``) or of a folder of image files (sorted by name)."""
    if os.path.isfile(path):
        with np.load(path) as f:
            images = f["arr_0"]
    else:
        from PIL import Image

        images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in _image_files(path)])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path!r}: images must be uint8 [N, H, W, 3], got {images.dtype} "
                         f"{list(images.shape)}")
    return images


# --------------------------------------------------------------------------------------------------------
# features and metrics
# --------------------------------------------------------------------------------------------------------

def missing_weights_message(name: str, path: str) -> str:
    where = (f"{INCEPTION_FILE}, torch-fidelity's release asset {_inception_url()}" if name == INCEPTION
             else f"the weights of the registered feature extractor {name!r}")
    return (f"--inception {path!r}: no such file. Feature extractor weights are never downloaded at run "
            f"time: download {where} beforehand (on a machine with internet access) and pass its local path")


def _inception_url() -> str:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    except ImportError:
        return f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
    return URL_INCEPTION_V3


def metric_layer(name: str, metric: str) -> str:
    """The feature layer torch-fidelity's extractor ``name`` uses for ``metric`` (fid, isc, prc)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"feature extractor {name!r} is not registered in torch-fidelity; known: "
                         f"{', '.join(FEATURE_EXTRACTORS_REGISTRY)} (register others with "
                         "torch_fidelity.register_feature_extractor)")
    return FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric(metric)


def create_extractor(name: str, weights: str, layers, device: torch.device):
    """torch-fidelity's feature extractor ``name`` providing ``layers``, its weights from the local file
    ``weights`` (a clear error, never a download, when it is missing), in eval mode on ``device``."""
    if not weights or not os.path.isfile(weights):
        raise FileNotFoundError(missing_weights_message(name, weights))
    metric_layer(name, "fid")  # a clear error for unknown names
    from torch_fidelity.utils import create_feature_extractor

    extractor = create_feature_extractor(name, sorted(set(layers)), cuda=False,
                                         feature_extractor_weights_path=weights, verbose=False)
    return extractor.to(device).eval()


@torch.no_grad()
def extract_features(extractor, images: np.ndarray, batch: int, device: torch.device, progress: bool = False,
                     desc: str = "features") -> dict[str, torch.Tensor]:
    """{layer: float32 [N, D] on the CPU} of uint8 images [N, H, W, 3], ``batch`` at a time."""
    from tqdm import tqdm

    chunks: dict[str, list[torch.Tensor]] = {}
    with tqdm(total=len(images), disable=not progress, desc=desc, unit="img", dynamic_ncols=True) as bar:
        for start in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch])).permute(0, 3, 1, 2)
            feats = extractor.convert_features_tuple_to_dict(extractor(x.contiguous().to(device)))
            for layer, f in feats.items():
                chunks.setdefault(layer, []).append(f.reshape(f.shape[0], -1).float().cpu())
            bar.update(x.shape[0])
    return {layer: torch.cat(v) for layer, v in chunks.items()}


def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], unbiased covariance [D, D]) in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 samples, got {f.shape[0]}")
    return f.mean(0), np.cov(f, rowvar=False)


def inception_score(logits: torch.Tensor, splits: int) -> tuple[float, float]:
    """torch-fidelity's Inception Score (mean, std over ``splits`` splits, samples shuffled with its seed)."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    out = isc_features_to_metric(logits, splits=max(1, min(splits, logits.shape[0])), shuffle=True,
                                 rng_seed=2020)
    return out["inception_score_mean"], out["inception_score_std"]


def precision_recall(generated: torch.Tensor, reference: torch.Tensor, neighborhood: int,
                     device: torch.device) -> tuple[float, float]:
    """torch-fidelity's precision (generated within the reference manifold) and recall (reference within
    the generated manifold), k-NN balls with k = ``neighborhood``."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    if min(len(generated), len(reference)) <= neighborhood:
        raise ValueError(f"precision/recall with k={neighborhood} needs more than {neighborhood} samples "
                         "per set")
    out = prc_features_to_metric(generated.to(device), reference.to(device), prc_neighborhood=neighborhood,
                                 prc_batch_size=10000, save_cpu_ram=True, verbose=False)
    return out["precision"], out["recall"]


@dataclass
class Reference:
    path: str
    mu: np.ndarray                 # FID statistics of the reference side
    sigma: np.ndarray
    fid_source: str                # "stats" (the file's mu/sigma) or "images" (of its arr_0 features)
    prc_features: torch.Tensor | None  # features of the reference images (None: stats-only reference)
    num_images: int


def load_reference(cfg: EvalConfig, extractor, device: torch.device, fid_layer: str,
                   prc_layer: str) -> Reference:
    """The reference's FID statistics and (when it holds images) its precision/recall features."""
    if not cfg.reference or not os.path.isfile(cfg.reference):
        raise FileNotFoundError(f"--reference {cfg.reference!r}: no such file (a local .npz with arr_0 "
                                "images and/or mu, sigma statistics, e.g. ADM's "
                                "VIRTUAL_imagenet256_labeled.npz)")
    with np.load(cfg.reference) as f:
        keys = set(f.files)
        has_stats, has_images = {"mu", "sigma"} <= keys, "arr_0" in keys
        if not (has_stats or has_images):
            raise ValueError(f"reference {cfg.reference!r} holds {sorted(keys)}: it needs arr_0 (uint8 "
                             "images [M, H, W, 3]) and/or mu, sigma (feature statistics)")
        use_stats = has_stats and cfg.fid_from in ("auto", "stats")
        if cfg.fid_from == "stats" and not has_stats:
            raise ValueError(f"--fid-from stats: reference {cfg.reference!r} has no mu/sigma")
        if cfg.fid_from == "images" and not has_images:
            raise ValueError(f"--fid-from images: reference {cfg.reference!r} has no arr_0 images")
        mu = sigma = None
        if use_stats:
            mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
        need_images = has_images and (not use_stats or cfg.prc)
        images = load_images(cfg.reference) if need_images else None
    feats = None
    if images is not None:
        feats = extract_features(extractor, images, cfg.batch, device, cfg.progress, desc="reference")
        if not use_stats:
            mu, sigma = gaussian_stats(feats[fid_layer])
    return Reference(path=cfg.reference, mu=mu, sigma=sigma, fid_source="stats" if use_stats else "images",
                     prc_features=feats[prc_layer] if feats is not None and cfg.prc else None,
                     num_images=0 if images is None else len(images))


def evaluate_set(sample_set: SampleSet, reference: Reference, extractor, cfg: EvalConfig,
                 device: torch.device, layers: dict[str, str]) -> dict:
    """{name, path, alpha, num, fid, isc_mean, isc_std, precision, recall} of one sample set."""
    images = load_images(sample_set.path)
    feats = extract_features(extractor, images, cfg.batch, device, cfg.progress, desc=sample_set.name)
    mu, sigma = gaussian_stats(feats[layers["fid"]])
    if mu.shape != reference.mu.shape:
        raise ValueError(f"the reference statistics have {reference.mu.shape[0]} dimensions but the "
                         f"feature extractor's FID layer {layers['fid']!r} gives {mu.shape[0]}: statistics "
                         "of another feature extractor?")
    row = {"name": sample_set.name, "path": sample_set.path, "alpha": sample_set.alpha, "num": len(images),
           "fid": gaussian_frechet_distance(mu, sigma, reference.mu, reference.sigma)}
    row["isc_mean"], row["isc_std"] = inception_score(feats[layers["isc"]], cfg.isc_splits)
    row["precision"] = row["recall"] = None
    if cfg.prc and reference.prc_features is not None:
        row["precision"], row["recall"] = precision_recall(feats[layers["prc"]], reference.prc_features,
                                                           cfg.prc_neighborhood, device)
    return row


def evaluate(cfg: EvalConfig) -> dict:
    """Every sample set of cfg.samples scored against cfg.reference; writes the outputs when cfg.out is
    set. Returns {"rows": [per set], "best": the row with the lowest FID, "reference": {...},
    "settings": {...}}."""
    if not cfg.samples:
        raise ConfigError("samples", "needs at least one sample set (an .npz, or sample.py's --out folder)")
    check_fields(cfg)
    sets = find_sample_sets(cfg.samples)
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    layers = {m: metric_layer(cfg.feature_extractor, m) for m in ("fid", "isc", "prc")}
    needed = [layers["fid"], layers["isc"]] + ([layers["prc"]] if cfg.prc else [])
    extractor = create_extractor(cfg.feature_extractor, cfg.inception, needed, device)
    reference = load_reference(cfg, extractor, device, layers["fid"], layers["prc"])
    rows = [evaluate_set(s, reference, extractor, cfg, device, layers) for s in sets]
    import torch_fidelity

    result = {
        "rows": rows,
        "best": min(rows, key=lambda r: r["fid"]),
        "reference": {"path": reference.path, "fid_source": reference.fid_source,
                      "num_images": reference.num_images},
        "settings": {**dataclasses.asdict(cfg), "layers": layers,
                     "torch_fidelity": getattr(torch_fidelity, "__version__", "unknown")},
    }
    if cfg.prc and reference.prc_features is None:
        result["note"] = ("precision/recall unavailable: the reference holds only statistics (mu, sigma); "
                          "they need reference images (arr_0)")
    if cfg.out:
        write_outputs(result, cfg.out)
    return result


# --------------------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------------------

def _fmt(value, digits: int) -> str:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return "n/a" if missing else f"{value:.{digits}f}"


def sweep_table(result: dict) -> str:
    """alpha_sweep.md: a markdown table alpha | FID | IS | precision | recall in alpha order."""
    rows = sorted(result["rows"], key=lambda r: (r["alpha"] is None, r["alpha"] or 0.0, r["name"]))
    ref = result["reference"]
    lines = [f"# FID vs alpha against `{ref['path']}`", "",
             f"FID reference: {ref['fid_source']}" + (f" ({ref['num_images']} reference images)"
                                                      if ref["num_images"] else ""), "",
             "| α | FID | IS | precision | recall |", "|---|---|---|---|---|"]
    for r in rows:
        alpha = f"{r['alpha']:g}" if r["alpha"] is not None else r["name"]
        cells = [alpha, _fmt(r["fid"], 3), _fmt(r["isc_mean"], 2), _fmt(r["precision"], 3),
                 _fmt(r["recall"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    best = result["best"]
    best_alpha = f"{best['alpha']:g}" if best["alpha"] is not None else best["name"]
    lines += ["", f"Best α (lowest FID): **{best_alpha}** (FID {best['fid']:.3f}).", ""]
    if "note" in result:
        lines += [result["note"] + ".", ""]
    lines += ["Samples:", ""] + [f"- {r['name']}: `{r['path']}` ({r['num']} images)" for r in rows] + [""]
    return "\n".join(lines)


def plot_fid_vs_alpha(rows: list[dict], path: str) -> bool:
    """FID against alpha (sets with a known alpha), the lowest FID marked; False when no set has an alpha."""
    pts = sorted((r["alpha"], r["fid"]) for r in rows if r["alpha"] is not None)
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas, fids = zip(*pts)
    best = int(np.argmin(fids))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(alphas, fids, "o-", color="C0", label="FID")
    ax.plot([alphas[best]], [fids[best]], "*", color="C3", markersize=14,
            label=f"best α = {alphas[best]:g} (FID {fids[best]:.2f})")
    ax.set_xlabel("guidance scale α")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("FID vs α (1-NFE)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(result: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, "alpha_sweep.md"), "w") as f:
        f.write(sweep_table(result))
    plot_fid_vs_alpha(result["rows"], os.path.join(out, "fid_vs_alpha.png"))


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv)
    for field, flag in (("samples", "--samples"), ("reference", "--reference"), ("inception", "--inception")):
        if not getattr(cfg, field):
            build_parser().error(f"{flag} is required")
    result = evaluate(cfg)
    print(sweep_table(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
