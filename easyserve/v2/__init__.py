"""The Open Inference Protocol (KServe v2, REST), served beside ``/predict`` and through the same queue.

- :mod:`easyserve.tensors`: datatypes, and numpy arrays to and from JSON and binary tensor data.
- :mod:`easyserve.v2.protocol`: inference requests read and checked, responses written; runs in the
  server (small requests) and in the workers (large requests, and every response).
- :mod:`easyserve.v2.routes`: the HTTP routes (health, metadata, inference).
"""

from __future__ import annotations
