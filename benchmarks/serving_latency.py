"""Latency of `mlflow models serve -m models:/clip@champion` (the pyfunc of pipeline/serving.py) over HTTP.

Logs the exported folder (models/onnx when export has written it, otherwise a randomly initialised
model of the size params.yaml describes, exported to a temporary folder) as the `clip` pyfunc into a
temporary SQLite store, serves it with the mlflow CLI on 127.0.0.1, and times --requests sequential
requests per case over one keep-alive connection, after a few untimed ones:

- image_embed: one 256x256 PNG (a synthetic scene) to embed
- text_embed: one caption to embed
- zero_shot_10: the same image against 10 labels (default template)

Reports p50/p90/p99 latency in ms and requests/s per case, the same calls in process (`predict_frame`,
no HTTP) for the server's overhead, and the server's start-up time, in reports/benchmarks/serving.json.
Other processes on the cores skew every number: the load average is recorded before and after.

    python benchmarks/serving_latency.py [--requests 200] [--random]
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` is not an installed package
import pipeline  # noqa: E402,F401  (first: MLflow's and onnxruntime's telemetry off)
import mlflow  # noqa: E402
import onnxruntime as ort  # noqa: E402
from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.onnx_latency import random_model_folder  # noqa: E402
from clipmodel import runtime, synthetic  # noqa: E402
from clipmodel.export import export_onnx  # noqa: E402
from clipmodel.io import write_json  # noqa: E402
from pipeline import serving  # noqa: E402

OUT = Path("reports/benchmarks/serving.json")
LABELS = [*synthetic.SHAPES, "red circle", "blue square"]  # 10
TEXT = "a red circle on the left and a blue square"
STARTUP_S = 300


def scene_png(size: int = 256) -> bytes:
    scene, _ = synthetic.sample(0, 0, 3)
    buffer = io.BytesIO()
    Image.fromarray(synthetic.render(scene, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = 1000 * np.asarray(seconds)
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 2) for q in (50, 90, 99)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(store: str, port: int, log: Path) -> subprocess.Popen:
    """`mlflow models serve` of models:/clip@champion in its own session (so it and its uvicorn stop together)."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PATH": os.pathsep.join([str(bin_dir), os.environ["PATH"]])}
    with open(log, "wb") as out:
        return subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", "models:/clip@champion",
                                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_ping(port: int, proc: subprocess.Popen, log: Path) -> float:
    """Seconds until /ping answers. Raises: SystemExit when the server exits or does not answer in time."""
    start = time.perf_counter()
    while time.perf_counter() - start < STARTUP_S:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return time.perf_counter() - start
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"no answer on /ping within {STARTUP_S} s:\n{log.read_text()[-3000:]}")


def time_requests(port: int, body: dict, n: int, warmup: int = 5) -> dict[str, float]:
    """p50/p90/p99 of `n` sequential POSTs of `body` to /invocations on one connection, and requests/s."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    payload = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    times = []
    try:
        for i in range(warmup + n):
            start = time.perf_counter()
            conn.request("POST", "/invocations", payload, headers)
            response = conn.getresponse()
            answer = response.read()
            if response.status != 200:
                raise SystemExit(f"HTTP {response.status}: {answer[:500]!r}")
            if i >= warmup:
                times.append(time.perf_counter() - start)
    finally:
        conn.close()
    return {**percentiles(times), "requests_per_s": round(n / sum(times), 1), "requests": n}


def time_calls(fn: Callable[[], object], n: int, warmup: int = 5) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return percentiles(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="timed requests per case")
    ap.add_argument("--random", action="store_true", help="random weights at params.yaml sizes even if models/onnx exists")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    image = base64.b64encode(scene_png()).decode("ascii")
    cases = {
        "image_embed": ({"dataframe_split": {"columns": ["image"], "data": [[image]]}}, None),
        "text_embed": ({"dataframe_split": {"columns": ["text"], "data": [[TEXT]]}}, None),
        "zero_shot_10": ({"dataframe_split": {"columns": ["image"], "data": [[image]]}}, {"labels": LABELS, "k": 5}),
    }
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        tmp = Path(tmp)
        trained = (ROOT / "models/onnx/preprocess.json").is_file() and not args.random
        onnx_dir = ROOT / "models/onnx" if trained else export_onnx(random_model_folder(tmp / "models"), tmp / "onnx")
        store = f"sqlite:///{tmp / 'mlflow.db'}"
        mlflow.set_tracking_uri(store)
        experiment = mlflow.create_experiment("serving-bench", artifact_location=(tmp / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = serving.log_model(onnx_dir, "clip", "clip")
        mlflow.MlflowClient(store).set_registered_model_alias("clip", "champion", info.registered_model_version)

        rt = runtime.ClipRuntime.load(onnx_dir)
        frames = {name: pd.DataFrame(body["dataframe_split"]["data"], columns=body["dataframe_split"]["columns"])
                  for name, (body, _) in cases.items()}
        in_process = {name: time_calls(lambda f=frames[name], p=params: serving.predict_frame(rt, f, p), args.requests)
                      for name, (_, params) in cases.items()}

        port, log = free_port(), tmp / "serve.log"
        proc = serve(store, port, log)
        try:
            startup_s = wait_for_ping(port, proc, log)
            http_results = {name: time_requests(port, {**body, **({"params": params} if params else {})}, args.requests)
                            for name, (body, params) in cases.items()}
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    report = {
        "model": {"source": "models/onnx" if trained else "random weights, params.yaml sizes",
                  "image_size": rt.pre.image_size, "context_length": rt.pre.context_length,
                  "embed_dim": rt.pre.embed_dim},
        "server": "mlflow models serve -m models:/clip@champion --env-manager local (1 uvicorn worker)",
        "request": {"image": "one 256x256 PNG, base64", "text": TEXT, "labels": len(LABELS),
                    "timed_requests_per_case": args.requests, "sequential": True, "keep_alive": True},
        "startup_s": round(startup_s, 1),
        "http": http_results,
        "in_process_predict_frame": in_process,
        "machine": {"cpus": os.cpu_count(), "processor": cpu_name(), "onnxruntime_threads": runtime.default_threads(),
                    "mlflow": mlflow.__version__, "onnxruntime": ort.__version__, "python": platform.python_version(),
                    "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]}},
        "note": "2 shared CPU cores: other people's jobs ran at the same time, so tails (p99) are inflated; "
                "compare the in-process numbers, taken in the same run, for the server's own overhead.",
    }
    write_json(OUT, report)
    print(f"server up in {report['startup_s']} s")
    print(f"{'case':<14} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'req/s':>7} {'in-process p50':>15}")
    for name, r in http_results.items():
        print(f"{name:<14} {r['p50_ms']:>8} {r['p90_ms']:>8} {r['p99_ms']:>8} {r['requests_per_s']:>7} "
              f"{in_process[name]['p50_ms']:>15}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
