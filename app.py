"""The Hugging Face Space's entry point: `python app.py` (README.md's front matter names it). It takes the
playground's options, on the command line (`python app.py --synthetic`) or, on a Space, where nobody types a
command, in the variable IPAG_ARGS (the Space's settings: e.g. `--captioner vit-gpt2 --auth ann:secret`); see
docs/space.md.

The page listens on 0.0.0.0 at $PORT (default 7860, the port a Space is reached on). The models load once, at
start: BLIP-base and CLIP ViT-B/32, which the front matter's `preload_from_hub` puts on the Space's disk when it
is built. Loading them takes a while on 2 vCPUs (and, where they are not on disk yet, downloading them takes
minutes), so the page opens at once on the small models trained here on generated scenes (`--synthetic`,
shipped in models/), saying that the real ones are on their way; once they are loaded, the page restarts on
them (a reload shows them). Either way the examples are then captioned and explained in the background, and
the log says when that warm-up is done. If the real models cannot be loaded, the synthetic page stays, saying
why.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import playground
from ipag import ModelUnavailableError
from ipag.cli import captioner_name, load_explainer

LOADING = ("**Warming up:** the real models ({models}) are loading (the first start downloads them, ~1.6 GB). "
           "Until then this page runs the small models trained on generated scenes; reload it in a minute or two.")
FAILED = "**The real models could not be loaded** ({error}). This page runs the small models trained on generated scenes."


def space_arguments(argv: list[str]) -> argparse.Namespace:
    """The playground's options for a Space: every address, the port Spaces route to, then IPAG_ARGS, then
    what was given (later options win)."""
    return playground.parse_args(["--host", "0.0.0.0", "--port", os.environ.get("PORT", "7860"),
                                  *shlex.split(os.environ.get("IPAG_ARGS", "")), *argv])


def main(argv: list[str] | None = None) -> None:
    args = space_arguments(sys.argv[1:] if argv is None else argv)
    if args.synthetic or args.tiny:  # offline models: they load in seconds
        playground.serve(args, load_explainer(args))
        return
    offline = argparse.Namespace(**vars(args) | {"synthetic": True, "captioner": None})
    models = f"{captioner_name(args)}, CLIP {args.clip}"
    interim = playground.serve(offline, load_explainer(offline), LOADING.format(models=models), block=False)
    try:
        explainer = load_explainer(args)
    except ModelUnavailableError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        interim.close()
        playground.serve(offline, load_explainer(offline), FAILED.format(error=err))
        return
    interim.close()
    playground.serve(args, explainer)


if __name__ == "__main__":
    main()
