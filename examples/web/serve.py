"""Serve the web client and an exported model folder on this machine only.

    python examples/web/serve.py --model models/onnx [--port 8000]
    then open http://127.0.0.1:8000/web/

examples/ is served at / (the page imports ../node/*.mjs, the modules the Node client uses) and the
model folder at /model/. The headers make the page cross-origin isolated, which onnxruntime-web needs
to run on several threads. Standard library only.
"""
from __future__ import annotations

import argparse
import functools
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

EXAMPLES = Path(__file__).resolve().parents[1]
MODEL_PREFIX = "/model"


class Handler(SimpleHTTPRequestHandler):
    """Static files from examples/, and from the model folder under /model/."""

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".js": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
                      ".onnx": "application/octet-stream"}

    def __init__(self, *args, model_dir: Path, **kwargs):
        self.model_dir = model_dir
        super().__init__(*args, directory=str(EXAMPLES), **kwargs)

    def translate_path(self, path: str) -> str:
        # The base class resolves against self.directory and drops ".." parts, so requests stay inside.
        route = urlsplit(path).path
        if route == MODEL_PREFIX or route.startswith(MODEL_PREFIX + "/"):
            self.directory = str(self.model_dir)
            path = path[len(MODEL_PREFIX):] or "/"
        return super().translate_path(path)

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/":
            self.send_response(302)
            self.send_header("Location", "/web/")
            self.end_headers()
            return
        super().do_GET()

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-store")  # a re-exported model is picked up on reload
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        if not getattr(self.server, "quiet", False):
            super().log_message(format, *args)


def make_server(model_dir: str | Path, port: int = 8000, host: str = "127.0.0.1",
                quiet: bool = False) -> ThreadingHTTPServer:
    """A server (not yet started) for the page and `model_dir`; port 0 picks a free port
    (then read server.server_address)."""
    server = ThreadingHTTPServer((host, port), functools.partial(Handler, model_dir=Path(model_dir).resolve()))
    server.quiet = quiet
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="folder written by python -m clipmodel.export")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    if not (Path(args.model) / "preprocess.json").is_file():
        raise SystemExit(f"serve.py: {args.model} is not an exported model folder (no preprocess.json)")
    if not (EXAMPLES / "web" / "node_modules" / "onnxruntime-web").is_dir():
        raise SystemExit("serve.py: run `npm ci` in examples/web first (onnxruntime-web is served from node_modules)")
    server = make_server(args.model, args.port)
    print(f"serving http://127.0.0.1:{server.server_address[1]}/web/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
