"""PyTorch handles the tests serve where torch is installed (tests/test_torch.py): workers import this
module by name. A small model of fixed weights, no download."""

from __future__ import annotations

import time

import torch

from easyserve import Handle


def small_model(seed: int = 0) -> torch.nn.Module:
    """Linear, BatchNorm and Dropout: what training mode makes depend on the batch."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5),
                               torch.nn.Linear(8, 3))


class Classifier(Handle):
    """The small model on ``{"x": [4 numbers]}``; HandleArgs ``train`` leaves it in training mode, as a
    model is after it is made or loaded, ``in_dict`` keeps it in a dict of models."""

    def setup(self, device):
        model = small_model()
        if not self.args.get("train"):
            model.eval()
        if self.args.get("in_dict"):
            self.models = {"main": model}
        else:
            self.model = model

    def preprocess(self, task):
        return torch.tensor(task["task_info"]["x"], dtype=torch.float32)

    def forward(self, batch):
        model = self.models["main"] if self.args.get("in_dict") else self.model
        with torch.no_grad():
            return model(batch)

    def postprocess(self, output, task):
        return {"scores": output}


class Outputs(Handle):
    """forward answers what HandleArgs ``kind`` names, of torch's less usual tensors: ``quantized`` (each
    request's x, quantised), ``nested`` (each request x repeated its own number of times, ragged),
    ``complex`` (x as the real parts)."""

    def preprocess(self, task):
        return torch.tensor(task["task_info"]["x"], dtype=torch.float32)

    def stack(self, inputs):
        return list(inputs)

    def forward(self, batch):
        kind = self.args["kind"]
        if kind == "quantized":
            return torch.quantize_per_tensor(torch.stack(batch), scale=0.5, zero_point=0, dtype=torch.quint8)
        if kind == "nested":
            return torch.nested.nested_tensor([x.repeat(int(x[0])) for x in batch])
        return torch.complex(torch.stack(batch), torch.ones(len(batch), len(batch[0])))

    def postprocess(self, output, task):
        return {"y": output}


COMPILE_S = [0.0]  # how long the backend below takes to compile


def _slow_backend(model, example_inputs):
    """A torch.compile backend that takes COMPILE_S to compile, then runs the model as it is."""
    time.sleep(COMPILE_S[0])
    return model.forward


class Compiled(Handle):
    """A model under torch.compile (the backend above), warmed up in setup with a batch of 2 items; a
    batch of another size is then compiled for 60 s, past any TimeoutS."""

    def setup(self, device):
        torch._dynamo.config.automatic_dynamic_shapes = False  # each new size compiled again, as at first
        self.model = torch.compile(torch.nn.Linear(4, 3).eval(), backend=_slow_backend)
        with torch.no_grad():
            self.model(torch.zeros(2, 4))
        COMPILE_S[0] = 60.0

    def preprocess(self, task):
        return torch.tensor(task["task_info"]["x"], dtype=torch.float32)

    def forward(self, batch):
        with torch.no_grad():
            return self.model(batch)

    def postprocess(self, output, task):
        return {"y": output}


class Unlisted(torch.nn.Module):
    """A module whose submodules cannot be listed (a wrapper of its own kind)."""

    def named_modules(self, *args, **kwargs):
        raise RuntimeError("not listed")


class KeepsMuch(Classifier):
    """The classifier (in training mode), beside a module that cannot be listed and a list of 10 million
    numbers whose model comes last."""

    def setup(self, device):
        super().setup(device)
        self.odd = Unlisted()
        self.table = [0] * 10_000_000 + [self.model]


class MovedWithCuda(Handle):
    """Moves its model with .cuda(), as a script written for one GPU does."""

    def setup(self, device):
        self.model = torch.nn.Linear(2, 1).cuda()

    def forward(self, batch):
        return batch


class SetsItsThreads(Handle):
    """Sets torch's thread count to HandleArgs["threads"] in setup, where given."""

    def setup(self, device):
        if "threads" in self.args:
            torch.set_num_threads(int(self.args["threads"]))

    def forward(self, batch):
        return [torch.get_num_threads()] * len(batch)
