"""``vlm-demo [ckpt=<path.ckpt>]``: a web page to show a checkpoint an image (uploaded, or one of
its own ShapesWorld test images) and ask about it. The reply appears as it is generated; a
captioner needs no question and shows where its Q-Former looks; a segmenter lights its mask
over the image. Without ``ckpt``: the
newest ``make train`` checkpoint. Served on ``host:port``, this machine only by default."""

from __future__ import annotations

import gradio as gr
import hydra
from omegaconf import DictConfig

from vlm.cli.common import CONFIG_DIR, PROJECT_ROOT
from vlm.cli.demo_replies import example_images, mask_over, opened, patch_attention, prompt_batch, streamed
from vlm.cli.load import latest_checkpoint, load_for, what_it_does
from vlm.core.lit_module import VLMLitModule
from vlm.runtime.errors import ConfigError, said_in_one_line

VIEWS = {  # by what the checkpoint does: the text box's label and first value, the output's label
    "answers": ("question", "How many shapes are there?", "reply"),
    "captions": ("", "", "caption"),  # a captioner reads no question
    "segments": ("what to segment", "Please segment the red circle.", "predicted mask"),
}
CSS = "#image img, #mask img {object-fit: contain; image-rendering: pixelated}"  # 64 px scenes, enlarged


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="demo")
def main(cfg: DictConfig) -> None:
    with said_in_one_line():
        ckpt = cfg.ckpt or latest_checkpoint(PROJECT_ROOT / "logs" / "llava_shapes")
        module = load_for("vlm-demo", ckpt, cfg.device, does=tuple(VIEWS))
        generation = {k: v for k, v in cfg.generation.items() if v is not None}
        app = page(module, generation, example_images(module.data_config, cfg.examples), str(ckpt))
        try:
            app.launch(server_name=cfg.host, server_port=cfg.port, show_error=True, css=CSS)
        except OSError as err:  # Gradio's own message names its launch() arguments, not ours
            raise ConfigError(
                f"vlm-demo: cannot serve on {cfg.host}:{cfg.port} (the port is taken, or the address is "
                "not this machine's): give port=<n> or host=<address>"
            ) from err


def page(module: VLMLitModule, generation: dict, examples: list, ckpt: str) -> gr.Blocks:
    """The page for what ``module`` does: its text box, its output and its one handler."""
    kind = what_it_does(module)
    label, first, shown_as = VIEWS[kind]

    def asked(path: str | None, text: str) -> tuple:
        if label and not text.strip():
            raise gr.Error(f"Write the {label} first.")
        return opened(path), text if label else ""

    def reply(path: str | None, question: str):
        yield from streamed(module, prompt_batch(module, *asked(path, question)), generation)

    def segment(path: str | None, request: str):
        return mask_over(module, *asked(path, request))

    def attention(path: str | None):
        return patch_attention(module, opened(path))

    with gr.Blocks(title="vlm-demo") as app:
        gr.Markdown(f"**{type(module.model).__name__}** `{ckpt}`: it {kind} images.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    type="filepath",
                    image_mode=None,
                    sources=["upload"],
                    label="image",
                    height=256,
                    elem_id="image",
                )
                question = gr.Textbox(first, label=label, visible=bool(label), elem_id="question")
                ask = gr.Button("Caption" if kind == "captions" else "Ask", variant="primary", elem_id="ask")
                if examples:
                    gr.Examples(
                        [[str(p)] for p in examples], inputs=image, label="its ShapesWorld test images"
                    )
            with gr.Column():
                if kind == "segments":
                    shown = gr.Image(type="pil", format="png", label=shown_as, height=256, elem_id="mask")
                else:
                    shown = gr.Textbox(label=shown_as, lines=4, elem_id="reply")
                if kind == "captions":
                    looks = gr.Plot(label="where the Q-Former's tokens look", elem_id="attention")
        handler = segment if kind == "segments" else reply
        event = gr.on([ask.click, question.submit], handler, [image, question], shown)
        if kind == "captions":
            event.then(attention, image, looks)
    return app


if __name__ == "__main__":
    main()
