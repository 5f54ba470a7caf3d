"""Where a trained llava checkpoint reads its answers from, and whether that token knows its x.

1. Token ablation on the val split (teacher-forced first answer token): the image tokens of the
   objects the question names only, or every token but theirs; the others are replaced by the
   tokens of a blank image.
2. A linear probe (least squares, 3/4 fit, 1/4 held out) of each train object's centre x from
   the one image token that holds its centre: what a head that attends there can read, since
   RoPE puts no position into the values.

    python experiments/llava/where_read.py logs/llava_shapes/<time>/stage2/checkpoints/last.ckpt
"""

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch
from PIL import Image

import vlm.families  # noqa: F401  (the classes a checkpoint may name)
from vlm.core.lit_module import VLMLitModule
from vlm.data.shapesworld.scene import BACKGROUND

QTYPES = ("color", "shape", "position")


def objects(root: Path) -> dict[str, list[dict]]:
    """image file -> its objects (bbox, colour, shape), from refs/instances.json."""
    inst = json.loads((root / "refs" / "instances.json").read_text())
    shape = {c["id"]: c["name"] for c in inst["categories"]}
    files = {i["id"]: f"images/{i['file_name']}" for i in inst["images"]}
    out = defaultdict(list)
    for a in inst["annotations"]:
        out[files[a["image_id"]]].append(
            {"bbox": a["bbox"], "color": a["color"], "shape": shape[a["category_id"]]}
        )
    return out


def named(qtype: str, question: str, objs: list[dict]) -> list[dict]:
    if qtype == "color":
        return [o for o in objs if f"the {o['shape']}?" in question]
    if qtype == "shape":
        return [o for o in objs if f"the {o['color']} object" in question]
    return [o for o in objs if f"{o['color']} {o['shape']}" in question]


@torch.no_grad()
def main(ckpt: str, root: str = "data/shapesworld/llava_shapes") -> None:
    module = VLMLitModule.from_checkpoint(ckpt)
    model, proc, root = module.model, module.processor, Path(root)
    side = int(model.num_image_tokens**0.5)
    size = Image.open(next((root / "images" / "val").glob("*.png"))).width
    cell = size / side

    def tokens(o: dict) -> set[int]:
        x, y, w, h = o["bbox"]
        return {
            r * side + c
            for r in range(side)
            for c in range(side)
            if x < cell * (c + 1) and x + w > cell * c and y < cell * (r + 1) and y + h > cell * r
        }

    def item(conv: list[dict], image: Image.Image) -> dict:
        return proc.encode({"conversations": conv, "image": image})

    encode, tf = model.encode_images, next(iter(proc.image_transforms.values()))
    blank = encode(tf(Image.new("RGB", (size, size), BACKGROUND))[None])[0]
    objs = objects(root)
    hit, tot = Counter(), Counter()
    for r in json.loads((root / "llava_val.json").read_text()):
        if r["qtype"] not in QTYPES:
            continue
        it = item(r["conversations"], Image.open(root / r["image"]).convert("RGB"))
        target = set().union(
            *map(tokens, named(r["qtype"], r["conversations"][0]["value"], objs[r["image"]]))
        )
        t = int((it["labels"] != -100).nonzero()[0])
        full = encode(it["pixel_values"][None])
        for mode, keep in (
            ("all tokens", set(range(side**2))),
            ("named only", target),
            ("all but named", set(range(side**2)) - target),
        ):
            drop = [k for k in range(side**2) if k not in keep]
            feats = full.clone()
            feats[0, drop] = blank[drop]
            model.encode_images = lambda _pv, f=feats: f
            logits = model(
                it["input_ids"][None], torch.ones_like(it["input_ids"][None]), it["pixel_values"][None]
            )
            model.encode_images = encode
            tot[r["qtype"], mode] += 1
            hit[r["qtype"], mode] += int(logits["logits"][0, t - 1].argmax() == it["labels"][t])
    for qt in QTYPES:
        if not (n := tot[qt, "all tokens"]):
            continue
        accs = ", ".join(
            f"{mode} {hit[qt, mode] / n:.2f}" for mode in ("all tokens", "named only", "all but named")
        )
        print(f"{qt} (n={n}): {accs}")

    feats, xs = [], []
    train = [(file, olist) for file, olist in objs.items() if "/train/" in file][:1200]
    for file, olist in train:
        f = encode(tf(Image.open(root / file).convert("RGB"))[None])[0]
        for o in olist:
            x, y, w, h = o["bbox"]
            cx, cy = x + w / 2, y + h / 2
            feats.append(f[int(cy // cell) * side + int(cx // cell)])
            xs.append(cx / size)
    X = torch.cat([torch.stack(feats), torch.ones(len(feats), 1)], 1)
    y, n = torch.tensor(xs)[:, None], len(xs) * 3 // 4
    pred = X[n:] @ torch.linalg.lstsq(X[:n], y[:n]).solution
    r2 = 1 - ((pred - y[n:]) ** 2).sum() / ((y[n:] - y[n:].mean()) ** 2).sum()
    half = ((pred > 0.5) == (y[n:] > 0.5)).float().mean()
    print(f"x from the centre token ({len(xs) - n} held-out objects): R² {r2:.2f}, half {half:.2f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
