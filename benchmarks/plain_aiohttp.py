"""The baseline: a bare aiohttp app that parses the JSON body and answers it. No workers, no batching."""

from __future__ import annotations

import argparse
import json

from aiohttp import web


async def predict(request: web.Request) -> web.Response:
    data = json.loads(await request.read())
    return web.Response(body=json.dumps(data).encode(), content_type="application/json")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9900)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_post("/predict", predict)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)
