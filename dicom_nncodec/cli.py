"""The ``dicom-nncodec`` command: compress, decompress, info, verify, bench, train, serve, worker, status, fsck."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from functools import partial

from . import files as F


def _init_worker():
    import torch
    torch.set_num_threads(1)
    os.environ["DICOM_NNCODEC_THREADS"] = "1"        # one engine thread per worker process


def _run_jobs(fn, pairs, workers: int, quiet: bool):
    """Run ``fn`` over the file pairs, with a progress bar and one line per failure."""
    from tqdm import tqdm

    results = []
    bar = tqdm(total=len(pairs), unit="file", disable=quiet or len(pairs) < 2 or not sys.stderr.isatty())
    if workers > 1 and len(pairs) > 1:
        with ProcessPoolExecutor(workers, initializer=_init_worker) as pool:
            for r in pool.map(fn, *zip(*pairs)):
                results.append(r)
                bar.update()
                _report(r, quiet)
    else:
        for p in pairs:
            r = fn(*p)
            results.append(r)
            bar.update()
            _report(r, quiet)
    bar.close()
    failed = [r for r in results if r.status == "failed"]
    done = [r for r in results if r.status == "ok"]
    if not quiet and done and any(r.bytes_out for r in done):
        bi, bo = sum(r.bytes_in for r in done), sum(r.bytes_out for r in done)
        print(f"{len(done)} file(s): {bi} -> {bo} bytes (ratio {bi / max(1, bo):.2f}); "
              f"{len(results) - len(done) - len(failed)} copied or skipped; {len(failed)} failed")
    return 1 if failed else 0


def _report(r: F.Result, quiet: bool):
    if r.status == "failed":
        print(f"FAILED {r.path}: {r.message}", file=sys.stderr)
    elif not quiet and r.status != "ok" and r.message:
        print(f"{r.status} {r.path}: {r.message}", file=sys.stderr)


def _workers(n: int) -> int:
    return os.cpu_count() or 1 if n == 0 else max(1, n)


def cmd_compress(a) -> int:
    if a.max_error and a.ratio is not None:
        print("dicom-nncodec: --max-error and --ratio exclude each other", file=sys.stderr)
        return 2
    pairs = F.plan(a.paths, a.output)
    return _run_jobs(partial(F.compress_file, max_error=a.max_error, ratio=a.ratio, device=a.device), pairs, _workers(a.jobs), a.quiet)


def cmd_decompress(a) -> int:
    pairs = F.plan(a.paths, a.output)
    target = F.DECOMPRESS_TARGETS[a.transfer_syntax]
    return _run_jobs(partial(F.decompress_file, target=target, device=a.device), pairs, _workers(a.jobs), a.quiet)


def cmd_verify(a) -> int:
    pairs = [(src,) for src, _ in F.plan(a.paths, None)]
    fn = partial(F.verify_file, device=a.device)
    results = [fn(*p) for p in pairs]
    bad = 0
    for r in results:
        if r.status == "failed":
            bad += 1
            print(f"FAILED {r.path}: {r.message}")
        elif not a.quiet:
            print(f"{r.status.upper()} {r.path}: {r.message}")
    return 1 if bad else 0


def cmd_info(a) -> int:
    rc = 0
    for p in a.files:
        try:
            print(F.describe(__import__("pathlib").Path(p)))
        except Exception as exc:
            print(f"FAILED {p}: {exc}", file=sys.stderr)
            rc = 1
    return rc


def cmd_train(a) -> int:
    if a.lossy:
        from .train.lossy_loop import LossyTrainConfig as Config, train
        extra = {}
    else:
        from .train.loop import TrainConfig as Config, train
        extra = {"use_lstm": not a.no_lstm}
    tuned = {k: getattr(a, k) for k in ("model_id", "width", "iterations", "batch", "crop", "lr", "threads")
             if getattr(a, k) is not None}
    cfg = Config(roots=a.roots, out=a.out, hold_out=a.hold_out or [], seed=a.seed, max_png=a.max_png,
                 **tuned, **extra)
    path = train(cfg, resume=a.resume)
    print(f"weights: {path}")
    return 0


def cmd_bench(a, rest) -> int:
    from . import bench
    return bench.main(rest)


def cmd_serve(a) -> int:
    from scp.node import serve
    return serve(a.config)


def cmd_worker(a) -> int:
    from scp.worker import main as worker_main
    return worker_main(a.config, a.threads)


def cmd_status(a) -> int:
    from scp.config import ConfigError
    from scp.index import IndexUnavailable
    from scp.status import report
    try:
        text = report(a.config)
    except ConfigError as exc:
        print(f"dicom-nncodec: configuration error: {exc}", file=sys.stderr)
        return 2
    except IndexUnavailable as exc:
        print(f"dicom-nncodec: {exc}", file=sys.stderr)
        return 1
    print(text)
    return 0


def cmd_fsck(a) -> int:
    from scp.fsck import main as fsck_main
    return fsck_main(a.config, a.repair)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicom-nncodec", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, outputs=True):
        sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the network runs")
        sp.add_argument("-q", "--quiet", action="store_true", help="print failures only")
        if outputs:
            sp.add_argument("-j", "--jobs", type=int, default=1, help="parallel worker processes (0: one per core)")

    c = sub.add_parser("compress", help="compress DICOM files or folders (lossless by default)")
    c.add_argument("paths", nargs="+")
    c.add_argument("-o", "--output", required=True, help="output folder (mirrors the input tree), or file")
    c.add_argument("--max-error", type=int, default=0,
                   help="near-lossless: guaranteed maximum absolute error N (1..255), NNCodecLossy")
    c.add_argument("--ratio", type=float, default=None,
                   help="lossy RNN-Conv at compression ratio R (met within 10 %%), NNCodecLossy")
    common(c)
    d = sub.add_parser("decompress", help="decompress dicom-nncodec files to a standard transfer syntax")
    d.add_argument("paths", nargs="+")
    d.add_argument("-o", "--output", required=True)
    d.add_argument("--transfer-syntax", "-t", default="explicit", choices=sorted(F.DECOMPRESS_TARGETS),
                   help="target transfer syntax (default: Explicit VR Little Endian)")
    common(d)
    i = sub.add_parser("info", help="model, mode, sizes and ratio per frame")
    i.add_argument("files", nargs="+")
    v = sub.add_parser("verify", help="decode every frame and check its stored checksum")
    v.add_argument("paths", nargs="+")
    common(v, outputs=False)
    sub.add_parser("bench", help="size and speed beside JPEG-LS, JPEG 2000, HTJ2K, JPEG-XL (see bench --help)",
                   add_help=False)
    t = sub.add_parser("train", help="train a lossless model (or with --lossy the RNN-Conv lossy model) from "
                                     "folders of DICOM files and PNGs")
    t.add_argument("roots", nargs="+")
    t.add_argument("--out", required=True, help="run folder: log, checkpoint, exported weights")
    t.add_argument("--lossy", action="store_true", help="train the lossy RNN-Conv model (ratio=)")
    t.add_argument("--model-id", default=None, help="default nnc-lossless-1, or nnc-lossy-1 with --lossy")
    t.add_argument("--hold-out", action="append", help="skip paths containing this text (repeatable)")
    t.add_argument("--no-lstm", action="store_true", help="train the ablation without the ConvLSTM state")
    for name, kind in (("width", int), ("iterations", int), ("batch", int), ("crop", int), ("lr", float),
                       ("threads", int)):
        t.add_argument(f"--{name}", type=kind, default=None, help="default: the trainer's (lossless or lossy)")
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--max-png", type=int, default=None, help="use at most this many PNGs per folder")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    s = sub.add_parser("serve", help="run the DICOM node")
    s.add_argument("--config", help="YAML configuration (default: the embedded one)")
    w = sub.add_parser("worker", help="run compression only, for nodes that share its index and storage folder")
    w.add_argument("--config", help="the nodes' YAML configuration (index, storage, compression)")
    w.add_argument("--threads", type=int, default=None, help="compression threads (default: compression.workers)")
    st = sub.add_parser("status", help="stored instances, bytes, queue and failures of a node")
    st.add_argument("--config")
    fs = sub.add_parser("fsck", help="check a node's index against its files and every stored frame's checksum")
    fs.add_argument("--config")
    fs.add_argument("--repair", action="store_true",
                    help="re-index, re-queue or set aside what can be fixed safely (the node must be stopped)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(None, argv[1:])
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return {"compress": cmd_compress, "decompress": cmd_decompress, "verify": cmd_verify, "info": cmd_info,
                "train": cmd_train, "serve": cmd_serve, "worker": cmd_worker, "status": cmd_status, "fsck": cmd_fsck}[a.command](a)
    except (FileNotFoundError, ValueError) as exc:
        print(f"dicom-nncodec: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
