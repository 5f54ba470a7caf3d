"""vlm-curate: the dense_connector seed's 20kUmap / 10kRandom subsets from MiniLM embeddings,
UMAP and clustering, on a small LLaVA-format pool of four clearly different request templates
(imbalanced on purpose) and, through the console script, on the default ShapesWorld."""

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from runs import cli

from vlm.cli.common import CONFIG_DIR
from vlm.cli.curate import curate
from vlm.data.readers import DataFormatError
from vlm.families.dense_connector.curation import (
    CurationError,
    cluster_quotas,
    embed,
    prompt_text,
    read_pool,
    subset_sizes,
)
from vlm.runtime.errors import said_in_one_line

pytestmark = pytest.mark.usefixtures("single_thread")

# kind: (records, template, fillers). Disjoint vocabularies, so each kind is its own region of
# the embedding space; "ocr" is rare, "describe" half the pool.
KINDS = {
    "describe": (
        120,
        "Describe the {} {} {} in this photo in detail.",
        (
            ["busy", "quiet", "sunny", "rainy", "crowded", "empty"],
            ["city", "village", "seaside", "mountain"],
            ["street", "beach", "market", "harbour", "park", "station"],
        ),
    ),
    "count": (
        60,
        "How many {} {} {} can you count in the image?",
        (
            ["white", "black", "brown", "spotted", "young"],
            ["grazing", "sleeping", "running", "standing"],
            ["sheep", "cows", "ducks", "horses", "goats"],
        ),
    ),
    "poem": (
        40,
        "Write a {} {} poem about {}.",
        (
            ["sad", "joyful", "short", "rhyming"],
            ["four-line", "free-verse", "old-fashioned"],
            ["lost love", "first snow", "a lonely night", "childhood memories", "falling leaves"],
        ),
    ),
    "ocr": (
        20,
        "Read the {} {} written on the {}.",
        (
            ["small", "faded", "handwritten", "printed"],
            ["words", "letters", "numbers", "text"],
            ["menu board", "street sign", "receipt", "book cover", "label"],
        ),
    ),
}
TEXT_ONLY = 4  # poem requests without an image: kept without a filter, dropped with one
SUBSETS = ("20kUmap", "10kRandom")


def compose_curate(*overrides: str) -> DictConfig:
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("curate", overrides=list(overrides))


def scaled(size: int, pool: int) -> int:
    return round(size * pool / 50027)


def load(out: Path, name: str):
    return json.loads((out / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def pool_json(tmp_path_factory) -> Path:
    """The pool in shuffled order: COCO (2 of 3) and SAM images, text-only records, and one
    record with no conversation (which the data module would skip)."""
    rng = random.Random(0)
    kinds = [kind for kind, (n, _, _) in KINDS.items() for _ in range(n)]
    rng.shuffle(kinds)
    records = []
    for i, kind in enumerate(kinds):
        question = KINDS[kind][1].format(*(rng.choice(words) for words in KINDS[kind][2]))
        image = f"coco/train2017/{i:012d}.jpg" if i % 3 else f"sam/images/sa_{i}.jpg"
        turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": f"answer {i}"}]
        records.append({"id": f"r{i}", "image": image, "conversations": turns, "kind": kind})
    for i in range(TEXT_ONLY):
        turns = [
            {"from": "human", "value": "Write a short poem about the sea."},
            {"from": "gpt", "value": "..."},
        ]
        records.insert(10 * i, {"id": f"t{i}", "conversations": turns, "kind": "poem"})
    records.insert(5, {"id": "broken", "image": "coco/x.jpg"})
    path = tmp_path_factory.mktemp("pool") / "pool.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def pool(pool_json) -> list[dict]:
    return [r for r in json.loads(pool_json.read_text()) if "conversations" in r]


@pytest.fixture(scope="module")
def curated(pool_json, tmp_path_factory) -> Path:
    """The command's own function on the config's defaults, 6 k-means clusters."""
    out = tmp_path_factory.mktemp("curated")
    curate(compose_curate(f"source={pool_json}", f"out_dir={out}", "cluster.num_clusters=6"))
    return out


def test_minilm_loads_offline_and_embeds_unit_vectors_of_384_dims():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    texts = ["What colour is the car?", "Which color does the car have?", "Write a poem about rain."]
    vectors = embed([*texts, texts[0]])
    assert vectors.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3  # a paraphrase is near, a poem far
    np.testing.assert_array_equal(vectors[3], vectors[0])  # a repeated text, encoded once, in its row


def test_prompt_text_is_the_human_turns_without_the_image_placeholder():
    turns = ["<image>\n  What is this? ", "a dog", "And the colour?\n<image>", "brown"]
    record = {"conversations": [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(turns)]}
    assert prompt_text(record) == "What is this?\nAnd the colour?"


def test_image_filter_keeps_only_matching_records(pool_json, pool):
    coco, unusable = read_pool(pool_json, "coco/")
    assert unusable == 1
    assert [r["id"] for r in coco] == [r["id"] for r in pool if "coco/" in r.get("image", "")]
    assert len(coco) == 160 and all("coco/" in r["image"] for r in coco)
    everything, _ = read_pool(pool_json, None)
    assert everything == pool and sum("image" not in r for r in everything) == TEXT_ONLY
    with pytest.raises(CurationError, match=r"^image_filter='lvis/': .*pool\.json") as err:
        read_pool(pool_json, "lvis/")
    assert "\n" not in str(err.value)


def test_a_missing_or_malformed_source_is_named(tmp_path):
    with pytest.raises(CurationError, match=f"^source: {tmp_path}/nope.json does not exist$"):
        read_pool(tmp_path / "nope.json", None)
    (tmp_path / "dict.json").write_text('{"id": 1}')
    with pytest.raises(DataFormatError, match="dict.json: expected a JSON list"):
        read_pool(tmp_path / "dict.json", None)
    (tmp_path / "cut.json").write_text('[{"id": 1')
    with pytest.raises(DataFormatError, match="malformed JSON in .*cut.json"):
        read_pool(tmp_path / "cut.json", None)


def test_sizes_are_the_seeds_scaled_to_the_pool():
    cfg = compose_curate()
    subsets = {name: dict(spec) for name, spec in cfg.subsets.items()}
    assert subset_sizes(subsets, 2500, cfg.reference_pool) == {"20kUmap": 999, "10kRandom": 500}
    assert subset_sizes(subsets, 50027, None) == {"20kUmap": 20000, "10kRandom": 10000}
    with pytest.raises(CurationError, match=r"^subsets\.20kUmap: size 20000 is larger than the pool of 300"):
        subset_sizes(subsets, 300, None)
    with pytest.raises(CurationError, match=r"^subsets\.10kRandom\.strategy='umap'"):
        subset_sizes({"10kRandom": {"size": 10, "strategy": "umap"}}, 300, None)


def test_quotas_are_even_round_robin_and_reach_every_cluster():
    # 12 over 4: 3 each; clusters 0 and 3 give all they have (1, 2), the 3 left go round again.
    np.testing.assert_array_equal(cluster_quotas(np.array([1, 5, 10, 2]), 12), [1, 4, 5, 2])
    np.testing.assert_array_equal(cluster_quotas(np.array([3, 3, 3]), 7), [3, 2, 2])
    counts = np.random.default_rng(0).integers(1, 40, size=20)
    np.testing.assert_array_equal(cluster_quotas(counts, int(counts.sum())), counts)
    for size in range(20, int(counts.sum()) + 1, 37):
        quotas = cluster_quotas(counts, size)
        assert quotas.sum() == size and (quotas >= 1).all() and (quotas <= counts).all()
        assert quotas.max() - quotas[quotas < counts].min(initial=quotas.max()) <= 1  # even where not capped


def test_subsets_have_the_scaled_sizes_and_unchanged_records_in_order(curated, pool):
    assert len(pool) == 244
    position = {r["id"]: i for i, r in enumerate(pool)}
    for name, size in zip(SUBSETS, (20000, 10000), strict=True):
        records = load(curated, name)
        assert len(records) == scaled(size, len(pool))
        order = [position[r["id"]] for r in records]
        assert order == sorted(set(order))
        assert records == [pool[i] for i in order]


def test_the_cluster_subset_reaches_every_cluster_and_evens_out_the_templates(curated, pool):
    summary = json.loads((curated / "clusters.json").read_text())
    assert (summary["pool"], summary["dims"], summary["method"], summary["seed"]) == (
        len(pool),
        10,
        "kmeans",
        42,
    )
    assert summary["sizes"] == {"20kUmap": 98, "10kRandom": 49}
    clusters = summary["clusters"]
    assert len(clusters) == 6 and all(c["20kUmap"] >= 1 for c in clusters)
    assert sum(c["pool"] for c in clusters) == len(pool)
    assert {name: sum(c[name] for c in clusters) for name in SUBSETS} == summary["sizes"]

    def share(records, kind):
        return sum(r["kind"] == kind for r in records) / len(records)

    even = load(curated, "20kUmap")
    assert share(even, "ocr") > 1.5 * share(pool, "ocr")  # the rare template gains
    assert share(even, "describe") < share(pool, "describe")  # the common one gives way


def test_outputs_are_written_whole(curated):
    assert sorted(p.name for p in curated.iterdir()) == [
        "10kRandom.json",
        "20kUmap.json",
        "clusters.json",
        "umap.png",
    ]
    assert (curated / "umap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_seed_gives_the_same_subsets_and_another_seed_another_random_one(curated, pool_json, tmp_path):
    args = [f"source={pool_json}", "cluster.num_clusters=6"]
    curate(compose_curate(*args, f"out_dir={tmp_path}/again"))
    curate(compose_curate(*args, f"out_dir={tmp_path}/other", "seed=7"))
    for name in SUBSETS:
        assert (tmp_path / "again" / f"{name}.json").read_bytes() == (curated / f"{name}.json").read_bytes()
    assert load(tmp_path / "other", "10kRandom") != load(curated, "10kRandom")


def test_hdbscan_samples_every_cluster_and_its_noise(pool_json, pool, tmp_path):
    curate(compose_curate(f"source={pool_json}", f"out_dir={tmp_path}", "cluster.method=hdbscan"))
    summary = json.loads((tmp_path / "clusters.json").read_text())
    assert summary["method"] == "hdbscan" and len(summary["clusters"]) >= 4
    assert all(c["20kUmap"] >= 1 for c in summary["clusters"])  # the noise group (-1) too, if any
    assert len(load(tmp_path, "20kUmap")) == scaled(20000, len(pool))


def test_a_subset_larger_than_the_pool_is_one_line_naming_it(pool_json, tmp_path, capsys):
    cfg = compose_curate(f"source={pool_json}", f"out_dir={tmp_path}/out", "reference_pool=null")
    with pytest.raises(SystemExit) as exit_, said_in_one_line():
        curate(cfg)
    assert exit_.value.code == 1
    assert (
        capsys.readouterr().err
        == "ConfigError: subsets.20kUmap: size 20000 is larger than the pool of 244 records\n"
    )
    assert not (tmp_path / "out").exists()  # said before anything is embedded or written


@pytest.mark.slow  # the full default curation: make test-full
def test_vlm_curate_on_the_default_shapesworld(tmp_path):
    shapes = ["num_train=100", "num_val=10", "num_test=10"]
    args = [f"paths.data_dir={tmp_path}/data", f"paths.log_dir={tmp_path}/logs"]
    run = cli("vlm-curate", [*args, *(f"data.shapesworld.{kv}" for kv in shapes)], tmp_path, 300)
    assert run.returncode == 0, run.stderr[-3000:]
    root = tmp_path / "data" / "shapesworld" / "dense_shapes"
    pool = json.loads((root / "llava_train.json").read_text())
    out = root / "curated"
    summary = json.loads((out / "clusters.json").read_text())
    assert summary["pool"] == len(pool) == 200 and len(summary["clusters"]) == 20
    assert all(c["20kUmap"] >= 1 for c in summary["clusters"])
    for name, size in zip(SUBSETS, (20000, 10000), strict=True):
        assert len(load(out, name)) == summary["sizes"][name] == scaled(size, len(pool))
    assert f"pool: 200 records of {root / 'llava_train.json'}" in run.stdout + run.stderr
