"""One word's explanation per captioner family against this machine's FLOP floor (companion of `ipag.bench`).

    .venv/bin/python scripts/bench_vlm.py            # every tiny vision-language family, and tiny BLIP for scale
    .venv/bin/python scripts/bench_vlm.py --kinds llava,qwen2_vl --runs 5 --json vlm.json

Each family's tiny random model (`ipag.captioners.tiny_vlms`) is written and loaded back by path, as a download is,
captions the benchmark photo, and its first word is explained the way a click does (`target_gradients`: the forward
and backward pass every default map reads). Reported per family: the median time of that pass, its FLOPs
(`ipag.bench.explanation_flops`) and the floor they imply at this machine's attainable matrix-product rate. At this
size the floor is microseconds, so the ratio measures per-operation overhead, not arithmetic; tiny BLIP, the model
whose real size the main benchmark puts at 1.5–2× its floor, is the yardstick at the same size: a family far above
it spends its time in the adapter, not in the model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ipag import Explainer  # noqa: E402
from ipag.attribution import target_gradients  # noqa: E402
from ipag.bench import benchmark_image, explanation_flops, matmul_peak, timed  # noqa: E402
from ipag.captioners import load_captioner, tiny_captioner  # noqa: E402
from ipag.captioners.tiny_vlms import TINY_KINDS, save_tiny  # noqa: E402
from ipag.device import resolve_device  # noqa: E402
from ipag.target import Target  # noqa: E402

#: The yardstick: the captioner the main benchmark measures at real size, here tiny like the others.
REFERENCE = "blip-base"


def measure(explainer: Explainer, runs: int, device: torch.device) -> dict[str, Any]:
    """Time and FLOPs of the first caption word's explanation pass."""
    photo = benchmark_image((320, 240))
    caption = explainer.caption(photo)
    if not caption.words:
        raise RuntimeError("the random model wrote no word to explain")
    captioner = explainer.captioner
    pixel_values = captioner.preprocess(photo)
    token_ids = list(caption.token_ids)
    target = Target(caption.words[0].token_positions)

    def explain() -> None:
        list(target_gradients(captioner, pixel_values, token_ids, [target], -1, -1,
                              attentions=captioner.exposes_attentions))

    explain()  # warm-up
    seconds = statistics.median(timed(device, explain)[0] for _ in range(runs))
    flops = explanation_flops(explainer, pixel_values, token_ids, target)
    return {"seconds": seconds, "gflop": flops / 1e9, "tokens": len(token_ids)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default=",".join(TINY_KINDS), help="tiny families, comma-separated")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    peak = matmul_peak(device, torch.float32)
    results: dict[str, Any] = {}
    for kind in [REFERENCE, *args.kinds.split(",")]:
        with tempfile.TemporaryDirectory() as folder:
            captioner = (tiny_captioner(kind, 1, device) if kind == REFERENCE
                         else load_captioner(str(save_tiny(kind, folder, seed=1)), device))
        result = measure(Explainer(captioner, clip=None, precision="float32"), args.runs, device)
        result["floor_ratio"] = result["seconds"] / (result["gflop"] * 1e9 / peak)
        results[kind] = result
        print(f"{kind:16s} {result['seconds'] * 1e3:8.1f} ms  {result['gflop'] * 1e3:8.2f} MFLOP  "
              f"{result['floor_ratio']:9.0f}× floor  ({result['tokens']} tokens)", flush=True)
    reference = results[REFERENCE]["floor_ratio"]
    print(f"\nmatrix products: {peak / 1e9:.0f} GFLOP/s ({device}); ratios to tiny {REFERENCE}'s: "
          + ", ".join(f"{kind} {result['floor_ratio'] / reference:.2f}" for kind, result in results.items()
                      if kind != REFERENCE))
    if args.json:
        args.json.write_text(json.dumps({"matmul_gflops": peak / 1e9, "device": str(device), "families": results},
                                        indent=2))
    return results


if __name__ == "__main__":
    main()
