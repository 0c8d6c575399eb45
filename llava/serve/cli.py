"""Chat about an image in the terminal with a LLaVA / p-MoD LLaVA checkpoint (LLaVA's `serve.cli`).

    python -m llava.serve.cli --model-path CKPT --image-file photo.png

Each user line is one turn; the reply streams as it is generated. An empty line or end of input quits, so
a scripted conversation can be piped in on standard input.
"""

from __future__ import annotations

import argparse

from transformers import TextStreamer

from llava.conversation import get_conv_template
from llava.eval.run_llava import generate_reply, place_images, sampling_kwargs
from llava.serve.common import add_model_arguments, default_conv_mode, load_for_inference, load_image, run_cli


def chat(model, tokenizer, image_processor, image, conv_mode: str, generate_kwargs: dict,
         read=input, debug: bool = False) -> list[str]:
    """Run turns until `read` returns an empty line or raises EOFError; returns the replies."""
    conversation = get_conv_template(conv_mode)
    user, assistant = conversation.roles
    replies = []
    while True:
        try:
            message = read(f"{user}: ")
        except EOFError:
            message = ""
        if not message.strip():
            print("exit...")
            return replies
        if not replies:
            message = place_images(message, 1, model.config)
        conversation.append_message(user, message)
        conversation.append_message(assistant, None)
        prompt = conversation.get_prompt()
        print(f"{assistant}: ", end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        reply = generate_reply(model, tokenizer, image_processor, prompt, [image], generate_kwargs, streamer)
        conversation.messages[-1] = (assistant, reply)
        replies.append(reply)
        if debug:
            print(f"\n{{'prompt': {prompt!r}, 'outputs': {reply!r}}}\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--image-file", "--image_file", dest="image_file", required=True,
                        help="an image path, URL or base64 string")
    parser.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    parser.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=512)
    parser.add_argument("--debug", action="store_true", help="print each prompt and reply")
    args = parser.parse_args(argv)
    if args.conv_mode is not None:
        get_conv_template(args.conv_mode)  # an unknown template fails before the model loads
    image = load_image(args.image_file)
    tokenizer, model, image_processor = load_for_inference(args)
    conv_mode = args.conv_mode or default_conv_mode(model, args.model_path)
    generate_kwargs = sampling_kwargs(args.temperature, None, 1, args.max_new_tokens)
    chat(model, tokenizer, image_processor, image, conv_mode, generate_kwargs, debug=args.debug)


if __name__ == "__main__":
    run_cli(main)
