"""The runtime's command line: ``predict`` (the default), ``selfcheck`` and ``bench``.

Run from the bundle folder as ``python3 -m edgekd.runtime``; exit code 0 when all is well, 1 when
selfcheck disagrees with the host, 2 on an error (printed as one line).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from edgekd.errors import EdgekdError
from edgekd.runtime.checks import bench, selfcheck
from edgekd.runtime.classifier import BACKENDS, Classifier


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edgekd.runtime", description="Run an edgekd bundle (no torch needed).")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("predict", help="classify image files")
    pr.add_argument("bundle")
    pr.add_argument("images", nargs="+")
    pr.add_argument("--top-k", type=int, default=5)
    sc = sub.add_parser("selfcheck", help="verify checksums, load, compare with the host's reference outputs")
    sc.add_argument("bundle")
    be = sub.add_parser("bench", help="latency percentiles")
    be.add_argument("bundle")
    be.add_argument("--runs", type=int, default=200)
    be.add_argument("--warmup", type=int, default=20)
    be.add_argument("--batch", type=int, action="append", default=[])
    be.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op / OpenVINO inference threads (default: the target's, else the runtime's)")
    be.add_argument("--samples", action="store_true", help="include every run's time (samples_ms) in the JSON")
    for sp in (pr, sc, be):
        sp.add_argument("--backend", default="auto", choices=list(BACKENDS))
        sp.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in ("predict", "selfcheck", "bench", "-h", "--help"):
        args.insert(0, "predict")  # python -m edgekd.runtime BUNDLE img.png ...
    ns = _parser().parse_args(args)
    try:
        if ns.cmd == "predict":
            clf = Classifier(ns.bundle, ns.backend)
            preds = clf.classify_files(ns.images, ns.top_k)
            result: dict[str, Any] = {"backend": clf.backend, "predictions": [{"image": str(i), "top": [{"label": lab, "probability": round(pr, 6)} for lab, pr in p]} for i, p in zip(ns.images, preds)]}
            text = "\n".join(f"{i}: " + ", ".join(f"{lab} {pr:.3f}" for lab, pr in p) for i, p in zip(ns.images, preds))
        elif ns.cmd == "selfcheck":
            result = selfcheck(ns.bundle, ns.backend)
            ref = result["reference"]
            text = f"selfcheck {'ok' if result['ok'] else 'FAILED'}: {result['files']} files verified, backend {result['backend']}" + (
                f", reference top-1 agreement {ref['top1_agreement']:.3f} (max |diff| {ref['max_abs_diff']:.2e})" if ref["checked"] else "")
        else:
            result = bench(ns.bundle, ns.batch, ns.runs, ns.warmup, ns.backend, ns.samples, ns.threads)
            text = "\n".join(f"batch {r['batch']}: p50 {r['p50_ms']} ms, p90 {r['p90_ms']} ms, p99 {r['p99_ms']} ms ({r['images_per_s']} img/s)" for r in result["latency"])
    except EdgekdError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 2
    print(json.dumps(result) if ns.json else text)
    return 0 if result.get("ok", True) else 1
