"""A PyTorch user's handles, served: where torch is installed (CI installs its CPU build)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from conftest import caught, post_json, post_many, wait_until  # noqa: E402

from easyserve import Server, StartupError  # noqa: E402


def test_a_model_left_in_training_mode_is_warned_of_at_start(serve, caplog):
    """Left in training mode, BatchNorm normalised by each batch: one input got five answers, one per batch
    it was in, all 200, and nothing was said."""
    for args, where in (({"train": True}, "self.model"), ({"train": True, "in_dict": True}, "self.models['main']")):
        caplog.clear()
        with serve("handles_torch:Classifier", HandleArgs=args, ProcessPerGPU=2):
            pass
        said = [r.getMessage() for r in caught(caplog) if "training mode" in r.getMessage()]
        assert len(said) == 1 and said[0].endswith(  # once: the first worker's (of a device) alone
            f"Handle: {where} is in training mode: its BatchNorm1d '1' normalises by each batch, so a request's "
            f"answer depends on the requests batched with it; call {where}.eval() in setup()"), said
    caplog.clear()
    with serve("handles_torch:Classifier", MaxWaitMs=50) as server:  # in eval mode: nothing said, answers alike
        answers = post_many(server.url + "/predict", [{"x": [1, 2, 3, 4]}] * 8)
    assert not [r for r in caught(caplog) if "training mode" in r.getMessage()]
    assert {status for status, _ in answers} == {200}
    first = answers[0][1]["scores"]  # alike whatever the batch, to the last bits a batch's arithmetic moves
    assert all(body["scores"] == pytest.approx(first, abs=1e-5) for _, body in answers), answers


def test_looking_for_models_in_training_mode_never_fails_a_start_nor_walks_a_huge_list(serve, caplog):
    """A module that could not list its layers failed the start, blamed on the handle's setup; a list of
    10 million items took 3 s to look through."""
    with serve("handles_torch:KeepsMuch", HandleArgs={"train": True}) as server:
        assert [w["state"] for w in server.workers] == ["idle"]  # started, and ready
    said = [r.getMessage() for r in caught(caplog) if "training mode" in r.getMessage()]
    assert len(said) == 1 and "self.model is in training mode" in said[0], said  # not the list's last item


def test_quantized_and_nested_tensors_are_answered_and_complex_ones_say_what_to_send(serve):
    with serve("handles_torch:Outputs", HandleArgs={"kind": "quantized"}) as server:
        assert post_json(server.url + "/predict", {"x": [1, 2.5, 3]}) == (200, {"y": [1.0, 2.5, 3.0]})
    with serve("handles_torch:Outputs", HandleArgs={"kind": "nested"}, MaxWaitMs=100) as server:
        bodies = [{"x": [float(n), 7.0]} for n in (1, 2, 3)]
        answers = post_many(server.url + "/predict", bodies)  # a batch, each its own length
        assert answers == [(200, {"y": [float(n), 7.0] * n}) for n in (1, 2, 3)]
    with serve("handles_torch:Outputs", HandleArgs={"kind": "complex"}) as server:
        status, body = post_json(server.url + "/predict", {"x": [1, 2]})
    assert status == 500 and "complex numbers have no JSON form: answer their real and imaginary parts" in \
        body["error"] and "torch.view_as_real" in body["error"], body


def test_a_worker_stuck_compiling_a_new_batch_size_is_told_to_warm_up_the_sizes(serve, caplog):
    """Warmed up with one batch size, a torch.compile'd model compiled again for the next size on a request,
    and the worker was killed as stuck with no word of why."""
    with serve("handles_torch:Compiled", TimeoutS=1, MaxWaitMs=0) as server:
        assert post_json(server.url + "/predict", {"x": [1, 2, 3, 4]})[0] == 504  # a batch of 1: compiled anew
        said = wait_until(lambda: [r.getMessage() for r in caught(caplog) if "was stuck here" in r.getMessage()],
                          timeout=30)
    assert "compiling: torch.compile compiles again for each new input shape" in said[0], said[0]
    assert "self.forward(self.stack([item] * n)) for n = 1 and 2" in said[0]
    assert "torch/_dynamo/convert_frame.py" in said[0]


def test_a_model_moved_with_cuda_on_a_worker_without_a_gpu_is_told_to_use_the_workers_device():
    """The hint said to check what setup loads (a model path, the .onnx file served)."""
    with pytest.raises(StartupError) as failed:
        Server(handle="handles_torch:MovedWithCuda", GPUs="cpu", Port=0).start(timeout=60)
    assert str(failed.value).endswith("Hint: this worker has no GPU to use (a CPU worker: GPUs: cpu, or the GPUs "
                                      "listed are not on this machine, see the warning above); move the model with "
                                      ".to(device.torch_device), which is the worker's GPU or the CPU, not with "
                                      ".cuda() or 'cuda'."), str(failed.value)


def test_torch_threads_past_a_cpu_workers_share_are_said_once_and_reported(serve, caplog, monkeypatch):
    """A setup's torch.set_num_threads(8) on two cores, two workers: the log and /stats said each ran 1
    thread, its share, and nothing warned of 16 threads contending for 2 cores."""
    import os

    many = 4 * os.cpu_count()  # past any share of the cores
    caplog.set_level("INFO", logger="easyserve")
    with serve("handles_torch:SetsItsThreads", ProcessPerGPU=2) as server:  # its share: what easyserve set
        share = server.workers[0]["threads"]
        assert post_json(server.url + "/predict", {"n": 1}) == (200, share)
        assert [(w["threads"], w["torch_threads"]) for w in server.workers] == [(share, share)] * 2
    assert not [r for r in caught(caplog) if "torch runs" in r.getMessage()]
    with serve("handles_torch:SetsItsThreads", HandleArgs={"threads": many}, ProcessPerGPU=2) as server:
        assert post_json(server.url + "/predict", {"n": 1}) == (200, many)
        assert [(w["threads"], w["torch_threads"]) for w in server.workers] == [(share, many)] * 2
    said = [r.getMessage() for r in caught(caplog) if "torch runs" in r.getMessage()]
    warned = [m for m in said if m.startswith(f"torch runs {many} threads in each CPU worker, where a worker's share "
                                              f"of the cores is {share} (the handle's torch.set_num_threads)")]
    assert len(warned) == 1, said  # once a server, not once a worker
    assert [m for m in said if "ready: " in m and m.endswith(f"{share} CPU thread(s) (torch runs {many})")], said
    caplog.clear()
    monkeypatch.setenv("OMP_NUM_THREADS", str(many))  # the user's own, which easyserve leaves as it is
    with serve("handles_torch:SetsItsThreads", ProcessPerGPU=2) as server:
        threads = post_json(server.url + "/predict", {"n": 1})[1]  # torch takes no more than the cores
    said = [r.getMessage() for r in caught(caplog) if r.getMessage().startswith("torch runs")]
    assert said == [f"torch runs {threads} threads in each CPU worker, where a worker's share of the cores is {share} "
                    f"(OMP_NUM_THREADS={many} in the server's environment): the workers' threads contend for the "
                    "cores, each slower than in its share. Leave the thread count to easyserve (it sets "
                    "OMP_NUM_THREADS to the share), or call torch.set_num_threads(device.threads) in setup"], said
