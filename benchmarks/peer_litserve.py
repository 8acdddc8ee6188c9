"""The same no-op served by LitServe, for a side-by-side run (install litserve in its own venv)."""

from __future__ import annotations

import argparse

import litserve as ls


class Echo(ls.LitAPI):
    def setup(self, device):
        pass

    def decode_request(self, request):
        return request

    def predict(self, x):
        return x

    def encode_response(self, output):
        return output


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9901)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    server = ls.LitServer(Echo(), accelerator="cpu", workers_per_device=args.workers)
    # no access log: easyserve and the aiohttp baseline write none either
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False, access_log=False)
