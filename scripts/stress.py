"""Full-scale load and soak check of the playground (loopback only; the tests run a reduced version).

    .venv/bin/python scripts/stress.py --clients 20 --uploads 200
    .venv/bin/python scripts/stress.py --clients 0 --uploads 200 --photos phone   # 12-megapixel JPEGs

1. `--clients` gradio_client clients at once, each on its own image: every one must get the caption and
   maps of its own image (checked against a local computation), with zero errors.
2. `--uploads` sequential uploads of different images through the page's API: /caption, which starts the
   background precompute of every caption word; when that is done, the server's resident memory is sampled.
   It must level off under the models (the RSS before the first request) plus the cache budget (`--cache-mb`),
   because the cache is bounded in bytes. `--photos phone` uploads 4000×3000 JPEGs with photo-like content (our
   loader downscales them to 2048×1536); `small`, random-noise images of 48–250 px.
The app runs in this process, on tiny models, bound to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from gradio_client import Client, handle_file
from PIL import Image, ImageChops, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import playground  # noqa: E402
from ipag import Explainer, Settings  # noqa: E402
from ipag.cache import DEFAULT_CACHE_MB  # noqa: E402

MB = 2**20


def rss_mb() -> float:
    """Current resident memory of this process (the server), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def small_image(folder: Path, index: int) -> Path:
    """A random-noise PNG of 48–250 px, different for every index."""
    rng = np.random.default_rng(index)
    width, height = 48 + (index * 7) % 200, 36 + (index * 5) % 150
    path = folder / f"image{index}.png"
    Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(path)
    return path


def phone_photo(folder: Path, index: int, size: tuple[int, int] = (4000, 3000)) -> Path:
    """A 12-megapixel JPEG (~2.6 MB) that compresses like a photo, different for every index: a smooth wash of
    colour, a few soft-edged objects and sensor grain. Noise would not do: it compresses like no photo, and a
    flat image is segmented like none."""
    rng = np.random.default_rng(index)
    width, height = size
    small = (width // 8, height // 8)  # drawn small and enlarged: under a second instead of several
    image = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize(small, Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.integers(0, small[0]), rng.integers(0, small[1])
        rx, ry = rng.integers(small[0] // 20, small[0] // 5), rng.integers(small[1] // 20, small[1] // 5)
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    image = image.filter(ImageFilter.GaussianBlur(1)).resize(size, Image.BICUBIC)
    grain = Image.effect_noise((width // 2, height // 2), 12).resize(size, Image.BILINEAR).convert("RGB")
    path = folder / f"photo{index}.jpg"
    ImageChops.add(image, grain, offset=-128).save(path, quality=90)
    return path


PHOTOS: dict[str, Callable[[Path, int], Path]] = {"small": small_image, "phone": phone_photo}


def serve(explainer: Explainer, *examples: Any, **launch: Any) -> tuple[gr.Blocks, str]:
    """The playground on `explainer` (and `build_app`'s `examples`), on a free loopback port, launched with
    `launch`'s options besides; returns the app (to close) and its URL."""
    demo = playground.build_app(explainer, *examples)
    playground.queue(demo, max_size=256)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _, url, _ = playground.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                                  quiet=True, **launch)
    return demo, url


@dataclass(frozen=True)
class Sample:
    """Memory after one upload had every caption word explained."""

    rss_mb: float  #: the process's resident memory
    cache_mb: float  #: what the explainer's cache holds (`ImageCache.used_bytes`)


def soak(url: str, explainer: Explainer, uploads: int, image: Callable[[int], Path],
         max_tokens: int = 20) -> list[Sample]:
    """`uploads` sequential uploads of `image(i)` through /caption (captions of up to `max_tokens` tokens; the
    tiny models always use them all), each sampled once the background precompute of every word is done."""
    client = Client(url, verbose=False)
    samples = []
    for index in range(uploads):
        client.predict(handle_file(str(image(index))), 1, max_tokens, True, api_name="/caption")  # + precompute
        explainer.wait_until_idle()
        samples.append(Sample(rss_mb(), explainer.cache.used_bytes() / MB))
        if (index + 1) % 10 == 0:
            print(f"  after {index + 1} uploads: RSS {samples[-1].rss_mb:.0f} MB, cache {samples[-1].cache_mb:.0f} MB",
                  flush=True)
    return samples


def clients(url: str, folder: Path, count: int) -> int:
    """`count` clients at once, each captioning and explaining its own image; prints latencies and returns how
    many got a wrong result or failed."""
    local = Explainer.tiny(seed=0)

    def client_run(index: int) -> tuple[bool, float]:
        path = small_image(folder, index)
        started = time.perf_counter()
        client = Client(url, verbose=False)
        caption = client.predict(handle_file(str(path)), 1, 8, api_name="/caption")
        result = client.predict(handle_file(str(path)), word=0, settings={"max_new_tokens": 8}, api_name="/explain")
        expected = local.caption(Image.open(path), Settings(max_new_tokens=8)).text
        own = (caption["text"] == result["explanation"]["caption"] == expected
               and Image.open(result["images"]["gradcam"]).size == Image.open(path).size)
        return own, time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=count) as pool:
        outcomes = list(pool.map(client_run, range(count)))
    wall = time.perf_counter() - started
    wrong = sum(1 for own, _ in outcomes if not own)
    latencies = sorted(seconds for _, seconds in outcomes)
    print(f"{count} concurrent clients: {wrong} wrong/failed, wall {wall:.1f} s, "
          f"median latency {latencies[len(latencies) // 2]:.1f} s, max {latencies[-1]:.1f} s")
    return wrong




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--uploads", type=int, default=200)
    parser.add_argument("--photos", choices=list(PHOTOS), default="small", help="what each upload is (see above)")
    parser.add_argument("--max-tokens", type=int, default=20, help="caption length asked for in the uploads")
    parser.add_argument("--cache-mb", type=float, default=DEFAULT_CACHE_MB, help="the server's cache budget")
    args = parser.parse_args()

    explainer = Explainer.tiny(seed=0, cache_mb=args.cache_mb)
    demo, url = serve(explainer)
    models_mb = rss_mb()  # the models, the libraries and the app, before any request
    folder = Path(tempfile.mkdtemp(prefix="ipag-stress-"))
    wrong = clients(url, folder, args.clients) if args.clients else 0

    started = time.perf_counter()
    samples = soak(url, explainer, args.uploads, partial(PHOTOS[args.photos], folder), args.max_tokens)
    minutes = (time.perf_counter() - started) / 60
    first = samples[min(10, len(samples)) - 1]
    ok = max(sample.rss_mb for sample in samples) <= models_mb + args.cache_mb
    print(f"{args.uploads} sequential uploads ({args.photos} photos, every word precomputed, {minutes:.1f} min): "
          f"RSS {models_mb:.0f} MB before the first request; after {min(10, len(samples))}: {first.rss_mb:.0f} MB; "
          f"after {len(samples)}: {samples[-1].rss_mb:.0f} MB; max {max(s.rss_mb for s in samples):.0f} MB. "
          f"Cache {first.cache_mb:.0f} → {samples[-1].cache_mb:.0f} MB (budget {args.cache_mb:.0f} MB); "
          f"RSS outside the cache {first.rss_mb - first.cache_mb:.0f} → {samples[-1].rss_mb - samples[-1].cache_mb:.0f} "
          f"MB. Stayed under models + budget: {'yes' if ok else 'NO'}.")
    demo.close()
    sys.exit(1 if wrong or not ok else 0)


if __name__ == "__main__":
    main()
