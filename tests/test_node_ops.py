"""Operating the node as a program: serve in the foreground, stop on SIGTERM, report status, log hygiene."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from scp import status
from scp.testing import send

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"node exited early: {proc.stdout.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("node did not start listening")


def test_serve_stores_then_stops_cleanly_on_sigterm(tmp_path):
    port = free_port()
    log_file = tmp_path / "node.log"
    cfg = tmp_path / "node.yaml"
    cfg.write_text(f"""
bind: 127.0.0.1
port: {port}
storage: {{path: {tmp_path / 'store'}, min_free_mb: 0}}
compression: {{device: cpu}}
logging: {{file: {log_file}}}
""")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from scp.node import serve; sys.exit(serve(sys.argv[1]))",
                             str(cfg)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, proc)
        ds = dcmread(get_testdata_file("CT_small.dcm"))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        assert send(port, [ds], calling_ae="MODALITY") == [0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = status.report(str(cfg))
    assert "1 instances" in text and "in progress" in text and "0 in progress" in text
    log = log_file.read_text()
    assert "association with MODALITY@127.0.0.1" in log and "released" in log
    assert "received SIGTERM" in log and "stopped" in log
    assert str(ds.PatientName) not in log and ds.PatientID not in log      # no patient data at INFO


def test_serve_reports_a_port_in_use(tmp_path, capsys):
    from scp.node import serve
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        cfg = tmp_path / "node.yaml"
        cfg.write_text(f"bind: 127.0.0.1\nport: {s.getsockname()[1]}\nstorage: {{path: {tmp_path / 'st'}}}\n"
                       "compression: {device: cpu, workers: 0}\n")
        assert serve(str(cfg)) == 1
    assert "cannot start" in capsys.readouterr().err
