"""Q-Former captioner figures: the token metrics on hand-computed cases, which queries the patch
attention figure picks, input checks, and that every figure saves as a readable PNG."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.families.qformer_captioner.figures import (
    caption_grid,
    discriminative_power,
    parameter_table,
    query_patch_attention,
    save_figure,
    token_similarity,
    word_query_attention,
)


def image(size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def peaked_attention(entropy_order: list[int], n_patches: int = 16) -> np.ndarray:
    """(1 + Q, n_patches) rows; query k puts weight 10 ** -rank on all patches but one, so the
    query at rank 0 in ``entropy_order`` is the most peaked."""
    attn = np.ones((1 + len(entropy_order), n_patches))
    for rank, query in enumerate(entropy_order):
        attn[1 + query] = 10.0 ** -(len(entropy_order) - rank)
        attn[1 + query, query % n_patches] = 1.0
    return attn / attn.sum(1, keepdims=True)


def titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def test_discriminative_power_identical_tokens_is_zero():
    tokens = np.tile(np.array([0.3, -1.0, 2.0]), (5, 1))
    metrics = discriminative_power(tokens)
    assert metrics["discriminative_power"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["global_query_similarity"] == pytest.approx(1.0)


def test_discriminative_power_orthogonal_tokens_is_one():
    metrics = discriminative_power(3.0 * torch.eye(4, 6))
    assert metrics["discriminative_power"] == pytest.approx(1.0)
    assert metrics["global_query_similarity"] == pytest.approx(0.0, abs=1e-12)


def test_discriminative_power_hand_computed():
    # g=(1,0), q0=(0,1), q1=(5,5): cos(g,q0)=0, cos(g,q1)=cos(q0,q1)=1/sqrt2 (scale ignored).
    metrics = discriminative_power(torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], dtype=torch.bfloat16))
    assert metrics["discriminative_power"] == pytest.approx(1 - math.sqrt(2) / 3)
    assert metrics["global_query_similarity"] == pytest.approx(1 / (2 * math.sqrt(2)))
    assert math.isnan(metrics["image_specificity"])


def test_metrics_over_images():
    # Image a: orthogonal tokens; image b: both (1, 0). Token 0 equal across images, token 1 orthogonal.
    tokens = np.array([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [2.0, 0.0]]])
    metrics = discriminative_power(tokens)
    assert metrics["discriminative_power"] == pytest.approx(0.5)
    assert metrics["global_query_similarity"] == pytest.approx(0.5)
    assert metrics["image_specificity"] == pytest.approx(0.5)


def test_image_specificity_zero_for_same_tokens_and_matches_pairwise_mean():
    tokens = np.random.default_rng(1).normal(size=(3, 5, 8))
    assert discriminative_power(np.stack([tokens[0], tokens[0]]))["image_specificity"] == pytest.approx(0.0)
    unit = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    expected = 1 - np.mean([unit[i, t] @ unit[j, t] for t in range(5) for i, j in pairs])
    assert discriminative_power(tokens)["image_specificity"] == pytest.approx(expected)


def test_discriminative_power_needs_two_tokens():
    with pytest.raises(ValueError, match="T >= 2"):
        discriminative_power(np.ones((1, 4)))


def test_query_patch_attention_shows_lowest_entropy_queries_most_peaked_first():
    attn = peaked_attention([4, 1, 6, 0, 2, 5, 3])  # q4 most peaked, q3 least
    fig = query_patch_attention(Image.fromarray(image()), attn, (4, 4), max_queries=3, title="t")
    shown = titles(fig)
    assert shown[0] == "image"
    assert [t.split(" ")[0] for t in shown[1:]] == ["g", "q4", "q1", "q6"]
    assert shown[1] == "g (H=2.77)"  # uniform over 16 patches: log 16
    assert fig.get_suptitle() == "t"


def test_query_patch_attention_drops_cls_column():
    attn = peaked_attention([0, 1], n_patches=4)
    with_cls = np.concatenate([np.full((3, 1), 100.0), attn], axis=1)  # a CLS column that would dominate
    fig = query_patch_attention(image(), with_cls, (2, 2))
    assert titles(fig) == titles(query_patch_attention(image(), attn, (2, 2)))
    overlay = fig.axes[2].get_images()[1].get_array()  # q0 peaks on patch 0: top-left quadrant
    assert overlay.shape == (32, 32)
    assert overlay[:16, :16].mean() > 5 * overlay[16:, 16:].mean()
    with pytest.raises(ValueError, match="grid"):
        query_patch_attention(image(), np.ones((3, 6)), (2, 2))


def test_word_query_attention_labels_and_length_check():
    fig = word_query_attention(["a", "red", "ball"], torch.rand(3, 4))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["g", "q0", "q1", "q2"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "red", "ball"]
    with pytest.raises(ValueError, match="2 words but attn has 3 rows"):
        word_query_attention(["a", "red"], torch.rand(3, 4))
    with pytest.raises(ValueError, match="token labels"):
        word_query_attention(["a"], torch.rand(1, 4), token_labels=["g", "q0"])


def test_token_similarity_matrix_and_title():
    tokens = np.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    ax = token_similarity(tokens).axes[0]
    sim = ax.get_images()[0].get_array()
    assert sim[0, 1] == pytest.approx(0.0, abs=1e-12) and sim[1, 2] == pytest.approx(1 / math.sqrt(2))
    assert f"{1 - math.sqrt(2) / 3:.3f}" in ax.get_title()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["g", "q0", "q1"]


def test_caption_grid_texts():
    fig = caption_grid(
        [image(), Image.fromarray(image())], ["a red ball", "a blue cube"],
        references=[["ref one", "ref two"], "another ref"], ncols=4,
    )  # fmt: skip
    texts = [(t.get_text(), t.get_color()) for ax in fig.axes for t in ax.texts]
    assert texts == [
        ("a red ball", "black"),
        ("ref one", "grey"),
        ("a blue cube", "black"),
        ("another ref", "grey"),
    ]
    long = caption_grid([image()], ["word " * 20]).axes[0].texts[0].get_text()
    assert "\n" in long
    with pytest.raises(ValueError, match="2 images but 1 predictions"):
        caption_grid([image(), image()], ["x"])


def test_parameter_table_cells():
    rows = [
        {"component": "vision_tower", "total": 87849216, "trainable": 0},
        {"component": "qformer", "total": 1000, "trainable": 250},
        {"component": "all", "total": 87850216, "trainable": 250},
    ]
    cells = parameter_table(rows).axes[0].tables[0].get_celld()
    text = {k: c.get_text().get_text() for k, c in cells.items()}
    assert [text[0, c] for c in range(4)] == ["component", "total", "trainable", "trainable %"]
    assert [text[1, c] for c in range(4)] == ["vision_tower", "87,849,216", "0", "0.00%"]
    assert [text[2, c] for c in range(4)] == ["qformer", "1,000", "250", "25.00%"]
    assert cells[3, 1].get_text().get_fontweight() == "bold"
    assert cells[1, 1].get_text().get_fontweight() == "normal"


def test_save_figure_writes_png(tmp_path):
    figures = {
        "attn": query_patch_attention(image(), peaked_attention([0, 1]), (4, 4)),
        "words": word_query_attention(["a"], np.ones((1, 3))),
        "sim": token_similarity(np.eye(3)),
        "grid": caption_grid([image()], ["a caption"], [["a reference"]]),
        "params": parameter_table([{"component": "all", "total": 10, "trainable": 5}]),
    }
    for name, fig in figures.items():
        path = save_figure(fig, tmp_path / "deep" / "dir" / f"{name}.png")
        assert path.stat().st_size > 0
        with Image.open(path) as png:
            assert png.format == "PNG" and png.width > 0 and png.height > 0
