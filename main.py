"""The seed's entry point: ``python main.py`` reads config.yaml (flags override any key) and
answers a few built-in prompts, or ``--prompt``, with timing."""

import sys

from vllm_lite.entrypoints.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
