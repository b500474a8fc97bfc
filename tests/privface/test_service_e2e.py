"""The quick start, end to end: ``privface serve`` with no database configured (embedded
PostgreSQL via pgserver) as a subprocess on a free port, driven by the CLI commands, which
align and protect on the client side; then a stop with SIGTERM and a restart on the same
data directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from privface.cli import main

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_serving(address: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    channel = grpc.insecure_channel(address)
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"privface serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        pytest.fail(f"privface serve not SERVING after {timeout} s:\n{log.read_text()}")
    finally:
        channel.close()


class Serve:
    """``privface serve`` in a subprocess with a clean environment (no DATABASE_URL)."""

    def __init__(self, data_dir: Path, model, log: Path) -> None:
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items()
               if k != "DATABASE_URL" and not k.startswith("PRIVFACE_")}
        env["PRIVFACE_MODEL_PATH"] = model.path
        if model.settings_threshold:
            env["PRIVFACE_THRESHOLD"] = str(model.settings_threshold)
        self.log = log
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "privface.cli", "serve", "--listen", self.address,
                 "--data-dir", str(data_dir)],
                stdout=fh, stderr=subprocess.STDOUT, env=env,
            )
        _wait_serving(self.address, self.proc, log)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, out


def test_quickstart_embedded_postgres(tmp_path, service_model, att_dir, capsys, monkeypatch):
    monkeypatch.setenv("PRIVFACE_CACHE_DIR", str(tmp_path / "cache"))  # enroll-batch state
    data = tmp_path / "data"
    log = tmp_path / "serve.log"
    server = Serve(data, service_model, log)
    try:
        text = log.read_text()
        assert "NO AUTHENTICATION" in text
        key_file = data / "keyring.json"
        assert key_file.exists() and stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert str(key_file) in text
        common = ["--server", server.address, "--gallery", "doors"]
        img = lambda s, i: str(att_dir / f"s{s}" / f"{i}.pgm")  # noqa: E731

        assert _cli(capsys, "gallery", "create", "doors", "--server", server.address)[0] == 0
        code, out = _cli(capsys, "enroll", *common, "--subject", "s1", "--name", "Ann Example",
                         "--meta", "team=blue", img(1, 1), img(1, 2), img(1, 3), "--json")
        assert code == 0 and len(json.loads(out)["sample_ids"]) == 3
        assert _cli(capsys, "enroll", *common, "--subject", "s2", img(2, 1), img(2, 2))[0] == 0

        batch = tmp_path / "batch"
        for s in (3, 4):
            (batch / f"s{s}").mkdir(parents=True)
            for i in (1, 2, 3):
                shutil.copy(img(s, i), batch / f"s{s}" / f"{i}.pgm")
        (batch / "s4" / "broken.pgm").write_bytes(b"not an image")
        (batch / "s4" / "subject.json").write_text('{"display_name": "Dee", "metadata": '
                                                   '{"site": "north"}}')
        report = tmp_path / "report.json"
        code, out = _cli(capsys, "enroll-batch", *common, str(batch), "--report", str(report),
                         "--json")
        result = json.loads(out)
        assert code == 0 and result["enrolled"] == 2 and result["failed"] == 0
        assert [f["reason"] for f in result["image_failures"]] == ["unreadable"]
        assert json.loads(report.read_text())["enrolled"] == 2
        assert Path(result["state_file"]).is_relative_to(tmp_path / "cache")
        # Resumable: a second run skips what is done and sends nothing.
        code, out = _cli(capsys, "enroll-batch", *common, str(batch), "--json")
        assert code == 0 and json.loads(out)["skipped"] == 2
        # Idempotent: without the resume file, the server recognises every subject.
        Path(result["state_file"]).unlink()
        code, out = _cli(capsys, "enroll-batch", *common, str(batch), "--json")
        assert code == 0 and json.loads(out)["replayed"] == 2

        code, out = _cli(capsys, "identify", *common, img(1, 7), "--json")
        answer = json.loads(out)
        assert code == 0 and answer["decision"] in ("MATCH", "NO_MATCH")
        assert {c["subject_id"] for c in answer["candidates"]} == {"s1", "s2", "s3", "s4"}
        if service_model.shipped:
            # The right person first for most of s1's other images: each call draws fresh
            # random ranks and the quick-start key is new every run, so a single hard probe
            # loses to s2 now and then (1 CI run in ~11); 3 of 5 is stable and still fails
            # for a model that cannot tell these people apart.
            top = []
            for i in (6, 7, 8, 9, 10):
                code, out = _cli(capsys, "identify", *common, img(1, i), "--json")
                top.append(json.loads(out)["candidates"][0]["subject_id"])
            assert top.count("s1") >= 3, top
        code, out = _cli(capsys, "identify", *common, img(1, 7))
        assert code == 0 and ("MATCH" in out)

        code, out = _cli(capsys, "verify", *common, "--subject", "s1", img(1, 8),
                         "--threshold", "-1", "--json")
        assert code == 0 and json.loads(out)["decision"] == "MATCH"
        code, out = _cli(capsys, "verify", *common, "--subject", "s1", img(1, 8),
                         "--threshold", "1", "--json")
        assert code == 0 and json.loads(out)["decision"] == "NO_MATCH"

        code, out = _cli(capsys, "subjects", *common, "--json")
        subjects = {s["subject_id"]: s for s in json.loads(out)}
        assert sorted(subjects) == ["s1", "s2", "s3", "s4"]
        assert subjects["s1"]["display_name"] == "Ann Example"
        assert subjects["s4"]["metadata"] == {"site": "north"}

        code, out = _cli(capsys, "delete", *common, "s1")
        assert code == 0 and "s1" in out
        code, out = _cli(capsys, "identify", *common, img(1, 7), "--json")
        after_delete = json.loads(out)
        assert "s1" not in {c["subject_id"] for c in after_delete["candidates"]}
        code, out = _cli(capsys, "gallery", "list", "--server", server.address, "--json")
        assert [(g["name"], g["subject_count"]) for g in json.loads(out)] == [("doors", "3")]
        code, out = _cli(capsys, "identify", *common, "--gallery", "nowhere", img(1, 7))
        assert code == 1
    finally:
        assert server.stop() == 0
    assert "privface stopped" in log.read_text()

    # Restart on the same data directory: same key file, index rebuilt from PostgreSQL.
    server = Serve(data, service_model, log)
    try:
        code, out = _cli(capsys, "subjects", "--server", server.address, "--gallery", "doors",
                         "--json")
        assert sorted(s["subject_id"] for s in json.loads(out)) == ["s2", "s3", "s4"]
        code, out = _cli(capsys, "gallery", "stats", "doors", "--server", server.address,
                         "--json")
        assert json.loads(out)["indexed_samples"] == "8"
    finally:
        assert server.stop() == 0
