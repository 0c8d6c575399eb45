"""Web demo: chat about an image with a LLaVA / p-MoD LLaVA checkpoint, and see which tokens p-MoD kept.

    python -m llava.serve.gradio_app --model-path CKPT [--port 7860]

One process (Gradio): upload an image, ask, and the answer streams in; later turns continue the conversation.
For a p-MoD checkpoint a panel shows, for the last answer, the image with the tokens each layer kept (slider
over layers) and what the prefill cost in TFLOPs and KV cache against the dense model on the same input.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import TextIteratorStreamer

from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import get_conv_template
from llava.demo.figures import image_token_grids, record_kept_image_tokens
from llava.eval.run_llava import image_inputs, place_images, sampling_kwargs
from llava.mm_utils import tokenizer_image_token
from llava.serve.common import add_model_arguments, default_conv_mode, load_for_inference, run_cli
from pmod.accounting import ModelShape, estimate
from pmod.visualize import overlay_kept_tokens


@dataclass
class KeptTokens:
    """What one prompt's prefill kept: an overlay per decoder layer, and the cost against dense."""

    overlays: list[Image.Image]
    kept: list[int]  # vision tokens kept per layer
    vision_tokens: int
    costs: str  # markdown


class DemoModel:
    """A loaded checkpoint with its template: prompts, streamed replies, kept-token panels."""

    def __init__(self, tokenizer, model, image_processor, conv_mode: str):
        self.tokenizer, self.model, self.image_processor = tokenizer, model, image_processor
        self.conv_mode = conv_mode
        self.schedule = getattr(model.get_model(), "schedule", None)

    @property
    def is_pmod(self) -> bool:
        return self.schedule is not None

    def prompt(self, turns: list[tuple[str, str | None]], with_image: bool) -> str:
        """The template's prompt for (user, assistant) turns; the image tag goes in front of the first question."""
        conversation = get_conv_template(self.conv_mode)
        for number, (user, assistant) in enumerate(turns):
            if number == 0 and with_image:
                user = place_images(user, 1, self.model.config)
            conversation.append_message(conversation.roles[0], user)
            conversation.append_message(conversation.roles[1], assistant)
        return conversation.get_prompt()

    def _inputs(self, prompt: str, image: Image.Image | None):
        ids = tokenizer_image_token(prompt, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
        images = image_inputs([image], self.image_processor, self.model) if image is not None else None
        return ids.to(self.model.device), images, [image.size] if image is not None else None

    def stream_reply(self, prompt: str, image: Image.Image | None, temperature: float,
                     max_new_tokens: int) -> Iterator[str]:
        """The reply so far, each time a token arrives (generation runs in a thread)."""
        input_ids, images, sizes = self._inputs(prompt, image)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        kwargs = dict(attention_mask=torch.ones_like(input_ids), images=images, image_sizes=sizes,
                      pad_token_id=pad, use_cache=True, streamer=streamer,
                      **sampling_kwargs(temperature, None, 1, int(max_new_tokens)))
        failure = []
        worker = threading.Thread(target=self._generate, args=(input_ids, kwargs, failure), daemon=True)
        worker.start()
        reply = ""
        for piece in streamer:
            reply += piece
            yield reply.strip()
        worker.join()
        if failure:
            raise failure[0]

    @torch.inference_mode()
    def _generate(self, input_ids, kwargs, failure: list) -> None:
        """generate() in the streaming thread; an error ends the stream and is raised by the reader."""
        try:
            self.model.generate(input_ids, **kwargs)
        except Exception as error:  # handed to the reading thread, which raises it
            failure.append(error)
            kwargs["streamer"].end()

    def kept_tokens(self, prompt: str, image: Image.Image) -> KeptTokens:
        """Recompute the prompt's routing (the prefill of the last answer) and draw every layer's kept tokens."""
        input_ids, images, sizes = self._inputs(prompt, image)
        kept = record_kept_image_tokens(self.model, input_ids, images, sizes)
        grids = image_token_grids(self.model, image.size)
        layers = sorted(kept)
        counts = self.model.last_token_counts
        n_vision, n_text = counts.n_target[0], counts.n_valid[0] - counts.n_target[0]
        report = estimate(ModelShape.from_config(self.model.config), self.schedule, n_text, n_vision)
        costs = (f"**Prefill of the last answer** ({n_text} text + {n_vision} image tokens): "
                 f"{report.total_flops / 1e12:.4g} TFLOPs vs {report.dense_total_flops / 1e12:.4g} dense "
                 f"({100 * report.flops_ratio:.0f}%); KV cache {report.kv_bytes / 2**10:.1f} KiB vs "
                 f"{report.dense_kv_bytes / 2**10:.1f} KiB ({100 * report.kv_ratio:.0f}%).")
        return KeptTokens([overlay_kept_tokens(image, grids, kept[layer]) for layer in layers],
                          [int(kept[layer].sum()) for layer in layers], n_vision, costs)


def message_text(content) -> str:
    """A chat message's text: a string, or Gradio's list of parts ({"type": "text", "text": ...}, files, ...)."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, (list, tuple)) else [content]
    return "".join(part.get("text", "") for part in parts if isinstance(part, dict) and part.get("type") == "text")


def turns_of(history: list[dict]) -> list[tuple[str, str | None]]:
    """Chatbot messages -> (user, assistant) turns."""
    turns = []
    for message in history:
        if message["role"] == "user":
            turns.append((message_text(message["content"]), None))
        elif turns:
            turns[-1] = (turns[-1][0], message_text(message["content"]))
    return turns


def build_app(demo: DemoModel):
    import gradio as gr

    def chat(message, image, history, temperature, max_new_tokens):
        if not str(message).strip():
            raise gr.Error("Type a question first.")
        history = list(history or []) + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        prompt = demo.prompt(turns_of(history), image is not None)
        for reply in demo.stream_reply(prompt, image, temperature, max_new_tokens):
            history[-1] = {"role": "assistant", "content": reply}
            yield history, "", gr.skip(), gr.skip(), gr.skip(), gr.skip()
        if not (demo.is_pmod and image is not None):
            yield history, "", gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        panel = demo.kept_tokens(prompt, image)
        last = len(panel.overlays) - 1
        yield (history, "", panel.costs, gr.update(maximum=last, value=last, visible=True),
               panel.overlays[last], panel.overlays)

    def show_layer(layer, overlays):
        return overlays[int(layer)] if overlays else None

    with gr.Blocks(title="p-MoD LLaVA") as app:
        gr.Markdown("## p-MoD LLaVA: chat about an image" + (" (p-MoD checkpoint)" if demo.is_pmod else ""))
        overlays = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="pil", label="Image", elem_id="image")
                temperature = gr.Slider(0.0, 1.5, value=0.2, step=0.05, label="Temperature (0 = greedy)")
                max_new_tokens = gr.Slider(1, 1024, value=128, step=1, label="Max new tokens")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=360)
                question = gr.Textbox(label="Question", placeholder="Ask about the image", elem_id="question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("Clear", elem_id="clear")
        with gr.Column(visible=demo.is_pmod):
            gr.Markdown("### Tokens kept by each layer for the last answer")
            costs = gr.Markdown(elem_id="costs")
            layer = gr.Slider(0, demo.model.config.num_hidden_layers - 1, value=0, step=1, label="Layer",
                              visible=False, elem_id="layer")
            kept = gr.Image(label="Kept image tokens (skipped ones darkened)", elem_id="kept", interactive=False)
        outputs = [chatbot, question, costs, layer, kept, overlays]
        inputs = [question, image, chatbot, temperature, max_new_tokens]
        send.click(chat, inputs, outputs, api_name="chat")
        question.submit(chat, inputs, outputs, api_name=False)
        layer.change(show_layer, [layer, overlays], kept, api_name=False)
        clear.click(lambda: ([], "", "", None, []), None, [chatbot, question, costs, kept, overlays], api_name=False)
    return app


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public link (needs internet)")
    args = parser.parse_args(argv)
    tokenizer, model, image_processor = load_for_inference(args)
    demo = DemoModel(tokenizer, model, image_processor, args.conv_mode or default_conv_mode(model, args.model_path))
    build_app(demo).queue().launch(server_name=args.host, server_port=args.port, share=args.share,
                                   show_error=True)


if __name__ == "__main__":
    run_cli(main)
