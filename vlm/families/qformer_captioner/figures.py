"""Analysis pictures for the Q-Former captioner, as pure functions over CPU tensors / arrays.

Every function builds a ``matplotlib.figure.Figure`` with its own Agg canvas and never goes
through pyplot, so figures can be drawn inside a training process (no display, no global figure
registry to leak into, no backend switch under other code's feet).

Token layout throughout: row 0 of the Q-Former outputs is the global context token (``g``),
rows 1.. are the learnable queries, labelled ``q0``, ``q1``, ...
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

_EPS = 1e-12


def _array(x: Any) -> np.ndarray:
    """float64 numpy view of a tensor (any dtype, bf16 included) or array-like."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float64)


def _rgb(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    return np.asarray(image)


def _figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def token_labels_for(num_tokens: int) -> list[str]:
    """``g, q0, q1, ...`` for ``num_tokens`` Q-Former outputs (global token first)."""
    return ["g"] + [f"q{i}" for i in range(num_tokens - 1)]


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm; an all-zero vector stays zero (cosine 0 with everything)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def _mean_offdiag_cosine(unit: np.ndarray, axis: int) -> np.ndarray:
    """Mean cosine over ordered pairs i != j along ``axis`` of unit vectors, without the n x n
    matrix: sum_{i!=j} <u_i, u_j> = |sum_i u_i|^2 - sum_i |u_i|^2, so it scales to many images."""
    n = unit.shape[axis]
    total = np.square(unit.sum(axis=axis)).sum(-1)
    self_terms = np.square(unit).sum(axis=(axis, -1))
    return (total - self_terms) / (n * (n - 1))


def cosine_matrix(tokens: Any) -> np.ndarray:
    """(T, T) cosine similarities between the rows of ``tokens`` (T, D)."""
    unit = _unit(_array(tokens))
    return unit @ unit.T


def discriminative_power(tokens: Any) -> dict[str, float]:
    """How far the Q-Former outputs are from collapsing onto one vector, from ``tokens``
    (N, T, D) for N images or (T, D) for one; row 0 of T is the global token, rows 1.. the queries.
    Cosine similarity is ``<a, b> / (|a| |b|)``; an all-zero token counts as cosine 0.

    - ``discriminative_power``: per image, 1 - the mean cosine similarity over the T(T-1) ordered
      pairs of distinct output tokens; then averaged over the N images. 0: every token carries
      the same direction (the queries collapsed onto the global token); 1: mutually orthogonal
      on average (anti-aligned tokens can push it up to 1 + 1/(T-1)).
    - ``global_query_similarity``: mean cosine similarity between the global token and each of
      the T-1 queries, averaged over images. Near 1: the queries only repeat the global token.
    - ``image_specificity``: per token position, 1 - the mean cosine similarity of that token
      over the N(N-1) ordered pairs of distinct images; then averaged over the T positions.
      0: a token outputs the same direction whatever the image. NaN when N < 2.
    """
    x = _array(tokens)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[1] < 2:
        raise ValueError(f"tokens must be (N, T, D) or (T, D) with T >= 2, got shape {tuple(x.shape)}")
    unit = _unit(x)
    n_images = unit.shape[0]
    within = _mean_offdiag_cosine(unit, axis=1)  # (N,)
    global_query = np.einsum("nd,ntd->nt", unit[:, 0], unit[:, 1:])
    across = _mean_offdiag_cosine(unit, axis=0) if n_images >= 2 else np.full(1, math.nan)  # (T,)
    return {
        "discriminative_power": float(1.0 - within.mean()),
        "global_query_similarity": float(global_query.mean()),
        "image_specificity": float(1.0 - across.mean()),
    }


def attention_entropy(attn: Any) -> np.ndarray:
    """Entropy (nats) of each row of ``attn`` after renormalising it to sum to 1: 0 when a row
    looks at one patch, ``log P`` when it looks at all P evenly."""
    p = np.clip(_array(attn), 0.0, None)
    p = p / np.maximum(p.sum(-1, keepdims=True), _EPS)
    return -(p * np.log(np.maximum(p, _EPS))).sum(-1)


def _upsample(grid_map: np.ndarray, width: int, height: int) -> np.ndarray:
    """(rows, cols) map -> (height, width) by bilinear resampling (float32 "F" image in PIL)."""
    resized = Image.fromarray(grid_map.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized)


def query_patch_attention(
    image: Any, attn: Any, grid: tuple[int, int], max_queries: int = 8, title: str | None = None
) -> Figure:
    """The image, then the global token's and the most peaked queries' attention over the image
    patches, upsampled (bilinear) to the image size and overlaid on it.

    ``attn`` is (T, P) with P = grid[0] * grid[1] patches in row-major order (grid = rows, cols);
    row 0 is the global token, rows 1.. the queries. With P + 1 columns the first column is taken
    to be the CLS / prefix token and dropped; entropies are computed on each row renormalised over
    the patches only.
    The ``max_queries`` queries with the lowest attention entropy are shown, most peaked first,
    each panel titled ``q<i> (H=<entropy in nats>)``. Each map is scaled to its own maximum so
    shapes are comparable; the entropy in the title carries how concentrated it is.
    """
    a = _array(attn)
    rows, cols = grid
    n_patches = rows * cols
    if a.ndim != 2 or a.shape[1] not in (n_patches, n_patches + 1):
        raise ValueError(
            f"attn must be (T, {n_patches}) or (T, {n_patches + 1}) for grid {tuple(grid)}, "
            f"got shape {tuple(a.shape)}"
        )
    a = a[:, -n_patches:]
    entropy = attention_entropy(a)
    queries = 1 + np.argsort(entropy[1:], kind="stable")[: max(max_queries, 0)]
    shown = [0, *queries.tolist()]
    labels = token_labels_for(a.shape[0])

    pixels = _rgb(image)
    height, width = pixels.shape[:2]
    n_panels = 1 + len(shown)
    ncols = min(n_panels, 5)
    nrows = math.ceil(n_panels / ncols)
    fig = _figure((2.6 * ncols, 2.6 * nrows * height / width + 0.5))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    axes[0].imshow(pixels)
    axes[0].set_title("image", fontsize=9)
    for ax, row in zip(axes[1:], shown, strict=False):
        heat = _upsample(a[row].reshape(rows, cols), width, height)
        ax.imshow(pixels)
        ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=max(float(heat.max()), _EPS))
        ax.set_title(f"{labels[row]} (H={entropy[row]:.2f})", fontsize=9)
    fig.suptitle(
        title or f"Q-Former attention over {n_patches} patches (uniform H = {math.log(n_patches):.2f})"
    )
    return fig


def word_query_attention(
    words: Sequence[str], attn: Any, token_labels: Sequence[str] | None = None
) -> Figure:
    """Heatmap of each generated word's decoder cross-attention (heads averaged) over the T
    Q-Former outputs: ``attn`` (W, T), words on the y axis, tokens (``g, q0, ...``) on the x axis."""
    a = _array(attn)
    if a.ndim != 2:
        raise ValueError(f"attn must be (W, T), got shape {tuple(a.shape)}")
    if len(words) != a.shape[0]:
        raise ValueError(f"got {len(words)} words but attn has {a.shape[0]} rows (one per word expected)")
    labels = list(token_labels) if token_labels is not None else token_labels_for(a.shape[1])
    if len(labels) != a.shape[1]:
        raise ValueError(f"got {len(labels)} token labels but attn has {a.shape[1]} columns")
    fig = _figure((max(4.0, 0.35 * len(labels) + 2.0), max(2.5, 0.3 * len(words) + 1.2)))
    ax = fig.add_subplot()
    image = ax.imshow(a, cmap="viridis", aspect="auto", vmin=0.0)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(words)), list(words), fontsize=8)
    ax.set_xlabel("Q-Former output token")
    ax.set_ylabel("generated token")
    ax.set_title("decoder cross-attention (heads averaged)", fontsize=10)
    fig.colorbar(image, ax=ax, label="attention")
    return fig


def token_similarity(tokens: Any) -> Figure:
    """(T, T) cosine-similarity heatmap of one image's Q-Former outputs ``tokens`` (T, D), row 0
    the global token; the title gives that image's discriminative power. A collapsed Q-Former
    shows as an all-red matrix."""
    x = _array(tokens)
    sim = cosine_matrix(x)
    labels = token_labels_for(sim.shape[0])
    power = discriminative_power(x)["discriminative_power"]
    side = max(3.5, 0.3 * len(labels) + 1.5)
    fig = _figure((side + 1.0, side))
    ax = fig.add_subplot()
    image = ax.imshow(sim, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_title(f"token cosine similarity (discriminative power {power:.3f})", fontsize=10)
    fig.colorbar(image, ax=ax, label="cosine")
    return fig


def caption_grid(
    images: Sequence[Any],
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]] | None = None,
    ncols: int = 4,
) -> Figure:
    """Images in a grid, each with its generated caption under it and, when ``references`` are
    given (one string or list of strings per image), the first reference in grey below that."""
    if not images:
        raise ValueError("caption_grid needs at least one image")
    if len(predictions) != len(images):
        raise ValueError(f"got {len(images)} images but {len(predictions)} predictions")
    if references is not None and len(references) != len(images):
        raise ValueError(f"got {len(images)} images but {len(references)} references")
    ncols = max(1, min(ncols, len(images)))
    nrows = math.ceil(len(images) / ncols)
    fig = _figure((3.0 * ncols, 4.2 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for i, (ax, image, prediction) in enumerate(zip(axes, images, predictions, strict=False)):
        ax.imshow(_rgb(image))
        caption = ax.text(
            0.5, -0.03, textwrap.fill(prediction, 34), transform=ax.transAxes,
            ha="center", va="top", fontsize=9,
        )  # fmt: skip
        if references is not None:
            reference = references[i] if isinstance(references[i], str) else references[i][0]
            ax.annotate(
                textwrap.fill(reference, 34), xy=(0.5, 0.0), xycoords=caption, xytext=(0, -3),
                textcoords="offset points", ha="center", va="top", fontsize=8, color="grey",
            )  # fmt: skip
    return fig


def parameter_table(rows: Sequence[Mapping[str, Any]]) -> Figure:
    """A paper-style parameter breakdown: one row per ``{"component", "total", "trainable"}``
    mapping, columns component / total / trainable / trainable %, counts with thousands
    separators; a row whose component is ``all`` is set in bold as the total line."""
    header = ["component", "total", "trainable", "trainable %"]
    cells = [
        [
            str(row["component"]),
            f"{int(row['total']):,}",
            f"{int(row['trainable']):,}",
            f"{100.0 * row['trainable'] / row['total']:.2f}%" if row["total"] else "-",
        ]
        for row in rows
    ]
    fig = _figure((6.5, 0.32 * (len(cells) + 1) + 0.4))
    ax = fig.add_subplot()
    ax.set_axis_off()
    table = ax.table(cellText=cells, colLabels=header, loc="center", cellLoc="right", colLoc="right")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1.0, 1.3)
    for (r, c), cell in table.get_celld().items():
        if c == 0:
            cell.get_text().set_horizontalalignment("left")
        if r == 0 or cells[r - 1][0] == "all":
            cell.get_text().set_fontweight("bold")
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parent folders created). Nothing is closed: the figure
    is not registered with pyplot, so it is freed with its last reference."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path
