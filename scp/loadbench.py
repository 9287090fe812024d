"""Load benchmark: many associations storing and retrieving at once against a node run as a program.

    python -m scp.loadbench --senders 16 --retrievers 4 --minutes 2

Why a separate program and not a test: its figures depend on the machine; what
it must show anywhere is no failure and a node whose memory stays bounded.
It starts ``dicom-nncodec serve`` on a throw-away storage folder (background
compression on, as in production), then for the whole run each sender stores
generated images on its own associations (a new association every 50
instances) and each retriever picks an instance already acknowledged, finds it
(C-FIND) and fetches it (C-GET, alternately as stored and transcoded to
Explicit VR Little Endian) and compares the pixels with what was sent.  The
node's resident memory is sampled throughout.  Printed (and with --json
written): instances/s, MB/s, C-STORE / C-GET / C-FIND latencies (p50, p95,
p99), failures of every kind, RSS at the start, its peak and its course over
the run, the compression backlog.  Exit status 1 when anything failed or the
peak RSS exceeded --max-rss-mb.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Figures:
    store_latency: list = field(default_factory=list)
    get_latency: list = field(default_factory=list)
    find_latency: list = field(default_factory=list)
    stored_bytes: int = 0
    store_failures: int = 0
    retrieve_failures: int = 0
    mismatches: int = 0
    association_failures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _rss_mb(pid: int, key: str = "VmRSS") -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _pct(values: list, p: float) -> float:
    return float(np.percentile(values, p)) * 1000 if values else float("nan")


class Bench:
    def __init__(self, a):
        from pynetdicom.sop_class import SecondaryCaptureImageStorage
        self.a = a
        self.sop_class = SecondaryCaptureImageStorage
        rng = np.random.default_rng(1)
        y, x = np.mgrid[0:a.size, 0:a.size]
        self.pool = []                          # distinct images; each stored instance is one of them
        for i in range(16):
            base = (np.sin(x / (7 + i)) + np.cos(y / (11 + i))) * 1000 + 2048
            self.pool.append(np.clip(base + rng.normal(0, 20, base.shape), 0, 4095).astype("<u2"))
        self.acked: list[tuple[str, str, str, int]] = []      # (study, series, instance, pool index)
        self.acked_lock = threading.Lock()
        self.f = Figures()
        self.stop = threading.Event()

    # --- data -----------------------------------------------------------------------------------------

    def dataset(self, study: str, series: str, k: int):
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, generate_uid
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = self.sop_class
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName, ds.Modality = "LOADBENCH", "LOAD^BENCH", "OT"
        ds.InstanceNumber = k
        ds.Rows = ds.Columns = self.a.size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        idx = k % len(self.pool)
        ds.PixelData = self.pool[idx].tobytes()
        ds["PixelData"].VR = "OW"
        return ds, idx

    # --- workers --------------------------------------------------------------------------------------

    def _ae(self, title: str):
        from pynetdicom import AE
        ae = AE(ae_title=title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        return ae

    def sender(self, n: int) -> None:
        from pydicom.uid import ExplicitVRLittleEndian, generate_uid
        ae = self._ae(f"SENDER{n}")
        ae.add_requested_context(self.sop_class, [ExplicitVRLittleEndian])
        k = 0
        while not self.stop.is_set():
            assoc = ae.associate("127.0.0.1", self.a.port, ae_title="NNCODEC")
            if not assoc.is_established:
                with self.f.lock:
                    self.f.association_failures += 1
                time.sleep(0.2)
                continue
            assoc.dul._run_loop_delay = 0.005     # (the benchmark's own polling: less CPU taken from the node)
            study, series = generate_uid(), generate_uid()
            try:
                for _ in range(50):
                    if self.stop.is_set():
                        break
                    k += 1
                    ds, idx = self.dataset(study, series, k)
                    t = time.monotonic()
                    try:
                        status = assoc.send_c_store(ds).get("Status")
                    except Exception:
                        status = None
                    dt = time.monotonic() - t
                    with self.f.lock:
                        if status == 0:
                            self.f.store_latency.append(dt)
                            self.f.stored_bytes += len(ds.PixelData)
                        else:
                            self.f.store_failures += 1
                    if status == 0:
                        with self.acked_lock:
                            self.acked.append((study, series, ds.SOPInstanceUID, idx))
                    if not assoc.is_established:
                        break
            finally:
                if assoc.is_established:
                    assoc.release()

    def retriever(self, n: int) -> None:
        import dicom_nncodec
        from pydicom.dataset import Dataset
        from pydicom.uid import ExplicitVRLittleEndian
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind as FIND,
                                          StudyRootQueryRetrieveInformationModelGet as GET)
        rng = random.Random(n)
        received: list = []

        def on_store(event):
            ds = event.dataset
            ds.file_meta = event.file_meta
            received.append(dicom_nncodec.fix_transfer_syntax(ds))
            return 0x0000

        aes = []
        for syntaxes in ([dicom_nncodec.NNCodecLossless, ExplicitVRLittleEndian], [ExplicitVRLittleEndian]):
            ae = self._ae("RETRIEVER")        # as stored (passed through), or transcoded by the node
            ae.add_requested_context(FIND)
            ae.add_requested_context(GET)
            for ts in syntaxes:
                ae.add_requested_context(self.sop_class, [ts])
            aes.append(ae)
        while not self.stop.is_set():
            with self.acked_lock:
                pick = rng.choice(self.acked) if self.acked else None
            if pick is None:
                time.sleep(0.05)
                continue
            study, series, uid, idx = pick
            ae = rng.choice(aes)
            assoc = ae.associate("127.0.0.1", self.a.port, ae_title="NNCODEC",
                                 ext_neg=[build_role(self.sop_class, scp_role=True)],
                                 evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_ACCEPTED, dicom_nncodec.fix_association)])
            if not assoc.is_established:
                with self.f.lock:
                    self.f.association_failures += 1
                time.sleep(0.2)
                continue
            assoc.dul._run_loop_delay = 0.005
            try:
                ident = Dataset()
                ident.QueryRetrieveLevel = "IMAGE"
                ident.StudyInstanceUID, ident.SeriesInstanceUID, ident.SOPInstanceUID = study, series, uid
                t = time.monotonic()
                found = [s for s, _ in assoc.send_c_find(ident, FIND) if s is not None]
                ok = bool(found) and found[-1].Status == 0 and len(found) == 2
                with self.f.lock:
                    (self.f.find_latency.append(time.monotonic() - t) if ok else None)
                    self.f.retrieve_failures += not ok
                received.clear()
                t = time.monotonic()
                final = [s for s, _ in assoc.send_c_get(ident, GET) if s is not None]
                dt = time.monotonic() - t
                good = bool(final) and final[-1].Status == 0 and len(received) == 1
                same = good and np.array_equal(received[0].pixel_array, self.pool[idx])
                with self.f.lock:
                    if good:
                        self.f.get_latency.append(dt)
                    self.f.retrieve_failures += not good
                    self.f.mismatches += good and not same
            except Exception:
                with self.f.lock:
                    self.f.retrieve_failures += 1
            finally:
                if assoc.is_established:
                    assoc.release()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scp.loadbench", description=__doc__.split("\n\n")[0])
    p.add_argument("--senders", type=int, default=16)
    p.add_argument("--retrievers", type=int, default=4)
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--seconds", type=float, help="run length in seconds (instead of --minutes)")
    p.add_argument("--size", type=int, default=256, help="image rows and columns (16-bit): 256 -> 128 KiB")
    p.add_argument("--workers", type=int, default=1, help="the node's compression workers")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--storage", help="storage folder (default: a temporary one, removed afterwards)")
    p.add_argument("--max-rss-mb", type=float, default=2048, help="fail when the node's peak RSS exceeds this")
    p.add_argument("--index", default="sqlite",
                   help="the node's index: sqlite (default), postgresql (a throwaway local server) or a URL")
    p.add_argument("--json", help="also write the figures to this file")
    a = p.parse_args(argv)
    from .pgcluster import Unavailable, for_bench
    try:
        with for_bench(a.index) as (url, label):
            return run(a, url, label)
    except Unavailable as exc:
        print(f"loadbench: {exc}", file=sys.stderr)
        return 2


def run(a, index_url: str, index_label: str) -> int:
    """One load run against a node with the index ``index_url`` ("" : SQLite in the storage folder)."""
    seconds = a.seconds if a.seconds is not None else a.minutes * 60

    from .index import Index
    from .testing import NodeProcess, free_port
    folder = tempfile.mkdtemp(prefix="nncodec-loadbench-")
    storage = a.storage or os.path.join(folder, "storage")
    a.port = free_port()
    config = os.path.join(folder, "node.yaml")
    with open(config, "w") as f:
        f.write(f"bind: 127.0.0.1\nport: {a.port}\n"
                f"storage: {{path: {json.dumps(storage)}, min_free_mb: 0}}\n"
                f"compression: {{device: {a.device}, workers: {a.workers}, poll_seconds: 0.5}}\n"
                f"limits: {{max_associations: {a.senders + a.retrievers + 4}, shutdown_grace_seconds: 10}}\n"
                "peers: [{ae_title: RETRIEVER, host: 127.0.0.1, port: 1}]\n"
                f"logging: {{file: {json.dumps(os.path.join(folder, 'node.log'))}}}\n"
                f"index: {{url: {json.dumps(index_url)}}}\n")
    bench = Bench(a)
    node = NodeProcess(config, a.port).start()
    pid = node.proc.pid
    rss_start = _rss_mb(pid)
    course: list[tuple[float, float]] = []
    try:
        threads = [threading.Thread(target=bench.sender, args=(i,), daemon=True) for i in range(a.senders)]
        threads += [threading.Thread(target=bench.retriever, args=(i,), daemon=True) for i in range(a.retrievers)]
        started = time.monotonic()
        for t in threads:
            t.start()
        while time.monotonic() - started < seconds:
            time.sleep(0.5)
            course.append((time.monotonic() - started, _rss_mb(pid)))
        bench.stop.set()
        for t in threads:
            t.join(120)
        elapsed = time.monotonic() - started
        peak = max([_rss_mb(pid, "VmHWM")] + [r for _, r in course])
        rss_end = _rss_mb(pid)
        index = Index(index_url or "sqlite:///" + os.path.join(storage, "index.sqlite"))
        stats = index.stats()
        index.dispose()
    finally:
        node_status = node.stop(60)
        if node_status is None:
            node.kill()
        if not a.storage:
            shutil.rmtree(folder, ignore_errors=True)
    f = bench.f
    n = len(f.store_latency)
    failures = f.store_failures + f.retrieve_failures + f.mismatches + f.association_failures
    quarter = [course[min(len(course) - 1, int(len(course) * q))][1] for q in (0.25, 0.5, 0.75)] + [rss_end] \
        if course else []
    out = {
        "senders": a.senders, "retrievers": a.retrievers, "seconds": round(elapsed, 1), "image": f"{a.size}x{a.size}x16",
        "compression_workers": a.workers, "index": index_label, "instances": n, "instances_per_s": round(n / elapsed, 1),
        "mb_per_s": round(f.stored_bytes / 2**20 / elapsed, 2),
        "store_ms": {"p50": _pct(f.store_latency, 50), "p95": _pct(f.store_latency, 95), "p99": _pct(f.store_latency, 99)},
        "gets": len(f.get_latency), "get_ms": {"p50": _pct(f.get_latency, 50), "p95": _pct(f.get_latency, 95)},
        "finds": len(f.find_latency), "find_ms": {"p50": _pct(f.find_latency, 50), "p95": _pct(f.find_latency, 95)},
        "failures": failures, "store_failures": f.store_failures, "retrieve_failures": f.retrieve_failures,
        "mismatches": f.mismatches, "association_failures": f.association_failures,
        "rss_mb": {"start": round(rss_start), "peak": round(peak), "quarters": [round(r) for r in quarter]},
        "compressed": stats["by_state"].get("compressed", 0), "queue_at_end": sum(stats["queue"].values()),
        "node_exit": node_status,
    }
    ms = lambda d: ", ".join(f"{k} {v:.0f} ms" for k, v in d.items())   # noqa: E731
    print(f"load benchmark: {a.senders} senders, {a.retrievers} retrievers, {elapsed:.0f} s, "
          f"{a.size}x{a.size} 16-bit images ({a.size * a.size * 2 // 1024} KiB), {a.workers} compression workers, "
          f"index {index_label}")
    print(f"stored     {n} instances, {out['instances_per_s']} /s, {out['mb_per_s']} MB/s; C-STORE {ms(out['store_ms'])}")
    print(f"retrieved  {out['gets']} C-GET ({ms(out['get_ms'])}), {out['finds']} C-FIND ({ms(out['find_ms'])}), "
          "pixels compared with what was sent")
    print(f"failures   {failures} (stores {f.store_failures}, retrievals {f.retrieve_failures}, "
          f"pixel mismatches {f.mismatches}, associations {f.association_failures})")
    print(f"node RSS   start {rss_start:.0f} MB, peak {peak:.0f} MB, at 1/4, 1/2, 3/4 and the end: "
          + ", ".join(f"{r:.0f}" for r in quarter) + " MB")
    print(f"compressed {out['compressed']} during the run, {out['queue_at_end']} still queued at the end")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=2)
    ok = failures == 0 and peak <= a.max_rss_mb and node_status == 0
    if peak > a.max_rss_mb:
        print(f"peak RSS {peak:.0f} MB exceeds --max-rss-mb {a.max_rss_mb:.0f}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
