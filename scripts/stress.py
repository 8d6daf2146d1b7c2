"""Full-scale load and soak check of the playground (loopback only; the tests run a reduced version).

    .venv/bin/python scripts/stress.py --clients 20 --uploads 200

1. `--clients` gradio_client clients at once, each on its own image: every one must get the caption and
   maps of its own image (checked against a local computation), with zero errors.
2. `--uploads` sequential caption+explain requests on different images: the server's resident memory
   (sampled after each) must level off, because caches are bounded per image.
The app runs in this process, on tiny models, bound to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gradio_client import Client, handle_file
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import playground  # noqa: E402
from ipag import Explainer  # noqa: E402


def rss_mb() -> float:
    """Current resident memory of this process (the server), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_image(folder: Path, index: int) -> Path:
    rng = np.random.default_rng(index)
    width, height = 48 + (index * 7) % 200, 36 + (index * 5) % 150
    path = folder / f"image{index}.png"
    Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--uploads", type=int, default=200)
    args = parser.parse_args()

    local = Explainer.tiny(seed=0)
    demo = playground.build_app(Explainer.tiny(seed=0))
    demo.queue(default_concurrency_limit=2, max_size=256)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    folder = Path(tempfile.mkdtemp(prefix="ipag-stress-"))

    def client_run(index: int) -> tuple[bool, float]:
        path = make_image(folder, index)
        started = time.perf_counter()
        client = Client(url, verbose=False)
        caption = client.predict(handle_file(str(path)), 1, 8, api_name="/caption")
        result, _, gradcam, *_ = client.predict(handle_file(str(path)), caption["words"][0]["text"],
                                                api_name="/explain")
        expected = local.caption(Image.open(path), max_new_tokens=8).text
        own = caption["text"] == expected and Image.open(gradcam).size == Image.open(path).size
        return own, time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.clients) as pool:
        outcomes = list(pool.map(client_run, range(args.clients)))
    wall = time.perf_counter() - started
    wrong = sum(1 for own, _ in outcomes if not own)
    latencies = sorted(seconds for _, seconds in outcomes)
    print(f"{args.clients} concurrent clients: {wrong} wrong/failed, wall {wall:.1f} s, "
          f"median latency {latencies[len(latencies) // 2]:.1f} s, max {latencies[-1]:.1f} s")

    client = Client(url, verbose=False)
    samples = []
    for index in range(args.uploads):
        path = make_image(folder, 10_000 + index)
        caption = client.predict(handle_file(str(path)), 1, 6, api_name="/caption")
        client.predict(handle_file(str(path)), caption["words"][0]["text"], api_name="/explain")
        samples.append(rss_mb())
    quarter = max(1, args.uploads // 4)
    print(f"{args.uploads} sequential uploads: RSS after {quarter}: {samples[quarter - 1]:.0f} MB, "
          f"after {args.uploads}: {samples[-1]:.0f} MB, max {max(samples):.0f} MB")
    demo.close()
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
