"""Benchmark: the image-recognition pipeline in one process and on the mesh (1 and 3 nodes).

::

    python benchmarks/pipeline.py            # the default size (20,000 training images)
    python benchmarks/pipeline.py --small    # seconds, to check that it runs

Three runs with the same seed and sizes: ``tasks.vision.run_sequential`` (plain sequential
code in this process), then the pipeline of ``examples/lan_demo.py`` on one local node and
on three local nodes (one of them without torch), each started fresh on 127.0.0.1 with the
cores of this machine split between them. Mesh times cover the pipeline from its first
submission to its last result, not the nodes' start-up. Accuracies, angle error and bytes
moved are those of the three-node run.

The last line printed is one JSON object: ``images``, ``single_process_s``,
``mesh_1_node_s``, ``mesh_3_nodes_s``, ``accuracy_svm``, ``accuracy_forest``,
``accuracy_cnn``, ``angle_mae_deg`` and ``bytes_moved_ratio``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType

from tasks.vision import PipelineSize, run_sequential

DEMO = Path(__file__).resolve().parents[1] / "examples" / "lan_demo.py"


def load_demo() -> ModuleType:
    """``examples/lan_demo.py`` as a module (examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("lan_demo", DEMO)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {DEMO}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    size = PipelineSize.small(seed=args.seed) if args.small else PipelineSize(seed=args.seed)
    demo = load_demo()

    t = time.perf_counter()
    single = run_sequential(size)
    single_s = time.perf_counter() - t
    print(f"single process: {single_s:.1f} s  {_figures(single)}", flush=True)

    with demo.local_mesh(1, without_torch=0) as client:
        one = demo.run_pipeline(client, size)
    print(f"mesh, 1 node:   {one.wall_s:.1f} s  {_figures(one.figures)}", flush=True)

    with demo.local_mesh(3, without_torch=1) as client:
        three = demo.run_pipeline(client, size)
    moved, produced = demo.traffic(three)
    print(f"mesh, 3 nodes:  {three.wall_s:.1f} s  {_figures(three.figures)}", flush=True)
    print(f"bytes moved {moved} of {produced} produced", flush=True)

    f = three.figures
    print(
        json.dumps(
            {
                "images": size.train_images,
                "single_process_s": round(single_s, 2),
                "mesh_1_node_s": round(one.wall_s, 2),
                "mesh_3_nodes_s": round(three.wall_s, 2),
                "accuracy_svm": round(f["accuracy_svm"], 4),
                "accuracy_forest": round(f["accuracy_forest"], 4),
                "accuracy_cnn": round(f["accuracy_cnn"], 4),
                "angle_mae_deg": round(f["angle_mae_deg"], 3),
                "bytes_moved_ratio": round(moved / max(produced, 1), 4),
            }
        )
    )


def _figures(f: dict[str, float]) -> str:
    return (
        f"svm {f['accuracy_svm']:.4f} forest {f['accuracy_forest']:.4f} "
        f"cnn {f['accuracy_cnn']:.4f} angle {f['angle_mae_deg']:.2f} deg"
    )


if __name__ == "__main__":
    main()
