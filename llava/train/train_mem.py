"""LLaVA's and p-MoD's training entry `llava/train/train_mem.py`: `llava.train.train` with flash attention.

Their scripts launch `deepspeed llava/train/train_mem.py ...`; this file keeps that working. The attention
back-end defaults to `auto` (flash-attention 2 where it is installed and CUDA is present, else SDPA) unless
`--attn_implementation` is given.
"""

import sys

from llava.train.train import train


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(arg.split("=", 1)[0] == "--attn_implementation" for arg in argv):
        argv = ["--attn_implementation", "auto", *argv]
    train(argv)


if __name__ == "__main__":
    main()
