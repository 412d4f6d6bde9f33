r"""Host memory one forward of a full batch costs (not a test): what `PIGGYBACK_MAX_BATCH_SIZE` means in MB.

`PIGGYBACK_MAX_BATCH_SIZE` bounds images, not bytes: a batch's activations grow with the image's
area and the backbone. Each configuration runs in a fresh process (a forward's freed activations
stay in the allocator, so one process per number), and the number is the peak RSS of a
`no_grad` forward minus the RSS before it, with the backbone already loaded and warmed at batch 1.

    .venv/bin/python scripts/bench_batch_memory.py --backbones mobilenet_v2 resnet18 resnet50 --sizes 32 224
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys

import torch


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _current_rss_mb() -> float:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) / 1024


def measure(backbone: str, size: int, batch: int) -> float:
    """In this process: MB the batch's forward adds to the peak RSS."""
    import torchvision

    torch.set_num_threads(2)
    model = torchvision.models.get_model(backbone, weights=None).eval()
    with torch.no_grad():
        model(torch.rand(1, 3, size, size))
        before = max(_current_rss_mb(), _peak_rss_mb())
        model(torch.rand(batch, 3, size, size))
    return _peak_rss_mb() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "resnet18", "resnet50"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 224])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: backbone,size,batch in a fresh process
    args = parser.parse_args()
    if args.one:
        backbone, size, batch = args.one.split(",")
        print(json.dumps(measure(backbone, int(size), int(batch))))
        return
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("| backbone | input px | " + " | ".join(f"batch {b} (MB)" for b in args.batches) + " |")
    print("|---|---|" + "---|" * len(args.batches))
    for backbone in args.backbones:
        for size in args.sizes:
            cells = []
            for batch in args.batches:
                one = f"{backbone},{size},{batch}"
                out = subprocess.run(
                    [sys.executable, __file__, "--one", one], capture_output=True, text=True, check=True
                )
                cells.append(f"{json.loads(out.stdout):.0f}")
            print(f"| {backbone} | {size} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
