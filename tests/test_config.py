"""Config: the original keys, the new ones, and messages that name the key, the value and what is allowed."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from easyserve import Config, ConfigError
from easyserve.errors import brief
from easyserve.loader import resolve


def test_defaults_serve_the_builtin_demo_offline():
    config = Config()
    expected = ("easyserve.builtin:Demo", "auto", "127.0.0.1", 9876)
    assert (config.handle, config.gpus, config.host, config.port) == expected


def test_every_key_from_yaml(tmp_path):
    path = tmp_path / "full.yaml"
    path.write_text(
        'GPUs: "0,1"\nProcessPerGPU: 2\nHandle: handles/mine.py:Mine\nHandleArgs: {model: m.onnx, threshold: 0.5}\n'
        "Host: 0.0.0.0\nPort: 8000\nHttpWorkers: 4\n"
        "MaxBatchSize: 16\nMaxWaitMs: 5\nMaxQueueSize: 100\nTimeoutS: 10\nQueueOrder: FIFO\nMaxBodyMB: 4\n"
        "FirstBatchTimeoutS: 120\nShutdownDelayS: 5\nStartsPerGPU: 1\n"
        "KeepAliveTimeoutS: 5\nHeaderTimeoutS: 3\nBodyTimeoutS: 20\nMaxBufferedMB: 64\n"
        "MaxWorkerMemoryMB: 2048\nMaxBatchesPerWorker: 10000\nPreprocessThreads: 4\nPipeline: false\n"
        "AllowedHosts: [api.example.com]\nCorsOrigins: https://app.example.com, https://admin.example.com\n"
        "ModelName: resnet18\nModelVersion: 2\nPassHeaders: X-Tenant, traceparent, x-tenant\nAccessLog: yes\n"
    )
    config = Config.from_yaml(path)
    assert config.to_dict() == {
        "GPUs": "0,1", "ProcessPerGPU": 2, "Handle": "handles/mine.py:Mine",
        "HandleArgs": {"model": "m.onnx", "threshold": 0.5}, "Host": "0.0.0.0", "Port": 8000,
        "HttpWorkers": 4,
        "MaxBatchSize": 16, "MaxWaitMs": 5.0, "MaxQueueSize": 100, "TimeoutS": 10.0, "ShutdownDelayS": 5.0,
        "QueueOrder": "fifo", "MaxBodyMB": 4.0,
        "StartTimeoutS": 300.0, "StartsPerGPU": 1, "FirstBatchTimeoutS": 120.0, "MaxWorkerMemoryMB": 2048.0,
        "MaxBatchesPerWorker": 10000,
        "PreprocessThreads": 4, "Pipeline": False, "ApiKey": None,
        "KeepAliveTimeoutS": 5.0, "HeaderTimeoutS": 3.0,
        "BodyTimeoutS": 20.0, "MaxBufferedMB": 64.0, "AllowedHosts": ["api.example.com"],
        "CorsOrigins": ["https://app.example.com", "https://admin.example.com"],
        "ModelName": "resnet18", "ModelVersion": "2", "PassHeaders": ["x-tenant", "traceparent"],
        "AccessLog": True,
    }
    assert config.base_dir == tmp_path


def test_overrides_win_over_the_file_and_none_is_skipped(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ProcessPerGPU: 2\nPort: 8000\n")
    config = Config.from_yaml(path, {"ProcessPerGPU": 3, "Port": None, "max_batch_size": 2})
    assert (config.process_per_gpu, config.port, config.max_batch_size) == (3, 8000, 2)
    assert config.replace(MaxWaitMs=0).max_wait_ms == 0


def test_one_setting_given_under_two_names_is_an_error():
    # Server(handle=A, Handle=B) served one of the two, without a word
    from easyserve import Server

    with pytest.raises(ConfigError, match="'handle' and 'Handle' name the same setting: give one"):
        Server(handle="handles_for_tests:Recorder", Handle="handles_for_tests:Tensors")
    with pytest.raises(ConfigError, match="'process_per_gpu' and 'ProcessPerGPU' name the same setting"):
        Config().replace(ProcessPerGPU=2, process_per_gpu=3)


@pytest.mark.parametrize("value,expected", [
    ("0,1", (0, 1)), (" 2 , 0 ", (2, 0)), (1, (1,)), ([0, 3], (0, 3)), ("cpu", ()), ("", ()), (None, ()),
    ("auto", "auto"), ("AUTO", "auto"), ("-1", ()), (-1, ()),  # -1 as CUDA_VISIBLE_DEVICES says none, unquoted too
])
def test_gpus_forms(value, expected):
    assert Config(gpus=value).gpus == expected


@pytest.mark.parametrize("key,suggestion", [
    ("ProcesPerGPU", "ProcessPerGPU"), ("GPU", "GPUs"), ("MaxBatchsize", "MaxBatchSize"),
    ("max_batch", "MaxBatchSize"), ("Hanlde", "Handle"), ("handle_arg", "HandleArgs"), ("timeout", "TimeoutS"),
])
def test_unknown_key_names_the_closest(key, suggestion):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'; did you mean '{suggestion}'"):
        Config.from_dict({key: 1})


def test_unknown_key_with_no_close_match_lists_the_known_keys():
    with pytest.raises(ConfigError, match="Known keys: GPUs, ProcessPerGPU, Handle"):
        Config.from_dict({"Zebra": 1})


@pytest.mark.parametrize("key,value,allowed", [
    ("ProcessPerGPU", 0, "an integer from 1 to 64"),
    ("ProcessPerGPU", "two", "an integer from 1 to 64"),
    ("ProcessPerGPU", 1.5, "an integer from 1 to 64"),
    ("ProcessPerGPU", True, "an integer from 1 to 64"),
    ("Port", 70000, "an integer from 0 to 65535"),
    ("MaxBatchSize", -1, "an integer from 1 to 4096"),
    ("MaxWaitMs", -5, "a number from 0 to 10000"),
    ("MaxWaitMs", "soon", "a number from 0 to 10000"),
    ("MaxWaitMs", True, "a number from 0 to 10000"),  # YAML's yes and on: no number, though Python's bool is one
    ("MaxQueueSize", 0, "an integer from 1 to 1000000"),
    ("TimeoutS", 0, "a number from 0.01 to 86400"),
    ("TimeoutS", float("nan"), "a number from 0.01 to 86400"),
    ("TimeoutS", 1e-300, "a number from 0.01 to 86400"),  # every request answered 504
    ("ShutdownDelayS", -1, "a number from 0 to 3600"),
    ("ShutdownDelayS", "5s", "a number from 0 to 3600"),
    ("HeaderTimeoutS", 5e-324, "a number from 0.01 to 86400"),  # every second connection closed unanswered
    ("MaxBatchSize", "\u00b2", "an integer from 1 to 4096"),  # a digit to str.isdigit, not to int()
    ("MaxBatchSize", "--5", "an integer from 1 to 4096"),
    ("QueueOrder", "lifo", "deadline or fifo"),
    ("QueueOrder", True, "deadline or fifo"),
    ("MaxBodyMB", -1, "a number from 0.001 to 4096"),
    ("MaxBodyMB", 1e-12, "a number from 0.001 to 4096"),  # every body refused
    ("MaxBufferedMB", 1e-9, "a number from 0.001 to 1048576"),
    ("MaxWorkerMemoryMB", 0.00001, "a number from 0.001 to 10000000"),  # README says sizes are at least 0.001 MB
    ("GPUs", "zero", '"auto", "cpu"'),
    ("GPUs", "0,a", '"auto", "cpu"'),
    ("GPUs", "0,\u00b2", '"auto", "cpu"'),
    ("GPUs", True, '"auto", "cpu"'),
    ("GPUs", {"a": 1}, '"auto", "cpu"'),
    ("Handle", "", "a handle class name"),
    ("Handle", 3, "a handle class name"),
    ("HandleArgs", [1, 2], "a mapping of keyword arguments"),
    ("Host", "my host", "an address to bind"),
    ("ModelName", "my model", "a name of letters, digits"),
    ("ModelName", "models/resnet18", "a name of letters, digits"),
    ("ModelName", "..", "a name of letters, digits"),
    ("ModelVersion", "", "a name of letters, digits"),
    ("ModelVersion", -1, "a name of letters, digits"),
    ("ModelVersion", 1.5, "a name of letters, digits"),
    ("PreprocessThreads", 0, "an integer from 1 to 256"),
    ("Pipeline", "maybe", "true, false or auto"),
    ("Pipeline", 1, "true, false or auto"),
    ("AccessLog", "auto", "true or false"),
    ("AccessLog", 1, "true or false"),
    ("PassHeaders", "*", 'name each one: "*" would hand the handle cookies and keys too'),
    ("PassHeaders", 5, "a list of header names"),
    ("PassHeaders", [f"x-{i}" for i in range(33)], "at most 32"),
])
def test_wrong_values_name_key_value_and_what_is_allowed(key, value, allowed):
    with pytest.raises(ConfigError) as info:
        Config.from_dict({key: value})
    message = str(info.value)
    assert message.startswith(f"{key}: got {brief(value)}; expected ")  # a long list: its first items
    assert allowed in message


@pytest.mark.parametrize("value,name", [(["X-Tenant", "bad name"], "bad name"), (["Ten\u00e4nt"], "ten\u00e4nt"),
                                        ("X-Tenant traceparent", "x-tenant traceparent"),
                                        (["x-tenant\u00a0"], "x-tenant\u00a0")])
def test_a_pass_headers_name_that_is_no_header_name_is_named(value, name):
    # it said "expected a list of header names ..., at most 32" of a list of one; a space for a comma,
    # and a non-breaking space (str.strip took it away), are named too
    with pytest.raises(ConfigError) as info:
        Config.from_dict({"PassHeaders": value})
    assert str(info.value) == (f"PassHeaders: {name!r} is not a header name (letters, digits and "
                               "!#$%&'*+-.^_`|~); separate names with commas")


def test_a_handle_instance_is_refused_naming_the_class_to_pass():
    from easyserve import Handle

    class Echo(Handle):
        def forward(self, batch):
            return batch

    expected = r"Handle: got an instance of .*Echo; pass the class itself \(.*Echo, not .*Echo\(\)\): each worker"
    with pytest.raises(ConfigError, match=expected):
        Config(handle=Echo())
    assert Config(handle=Echo).handle is Echo


def test_base_dir_in_a_config_file_is_refused(tmp_path):
    """It is the file's folder; given in the file, it reached the constructor twice (a TypeError)."""
    path = tmp_path / "serve.yaml"
    path.write_text("base_dir: /elsewhere\nPort: 0\n")
    with pytest.raises(ConfigError, match="serve.yaml: 'base_dir' is no setting of a config file"):
        Config.from_yaml(path)


def test_preprocess_threads_and_pipeline_default_to_auto_and_pipeline_takes_words():
    assert Config().preprocess_threads is None  # each worker then uses its share of the cores
    assert Config().pipeline is None  # on for GPU workers, off for CPU ones
    assert Config(preprocess_threads="", pipeline="off").pipeline is False
    assert Config.from_dict({"Pipeline": "yes"}).pipeline is True
    assert Config.from_dict({"Pipeline": "auto"}).to_dict()["Pipeline"] == "auto"


def test_model_name_defaults_to_the_handle_and_version_to_1():
    assert (Config().model_name, Config().model_version) == (None, "1")
    assert Config(model_name="yolo-v3.coco_2", model_version=7).model_version == "7"


def test_a_gpu_listed_twice_is_an_error():
    with pytest.raises(ConfigError, match="GPU 0 is listed twice.*ProcessPerGPU"):
        Config(gpus="0,0")


@pytest.mark.parametrize("text,message", [
    ("[1, 2]", "must hold a mapping"),
    ("GPUs: [0\n", "not valid YAML"),
    # YAML reads a setting without a space after its colon as a string: the line is named, and the fix
    ("GPUs:cpu\n", r"must hold a mapping of keys \(GPUs, Handle, \.\.\.\), not str \(line 1, 'GPUs:cpu': a "
                   r"setting needs a space after its colon, 'GPUs: cpu'\)$"),
    ("Port: 9000\nGPUs:cpu\nProcessPerGPU: 2\n", r"not valid YAML: .* \(line 2, 'GPUs:cpu': a setting needs a "
                                                 r"space after its colon, 'GPUs: cpu'\)$"),
    # never the API key's value (an error goes to logs), nor a line inside a block of text
    ("ApiKey:s3cr3t-token\n", r"not str \(line 1, 'ApiKey:\*\*\*': a setting needs a space after its colon, "
                              r"'ApiKey: \*\*\*'\)$"),
    ("HandleArgs:\n  note: |\n    Port:9000 of the db\nGPUs: [0\n", r"not valid YAML: .*begun on line 4\)$"),
])
def test_bad_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        Config.from_yaml(path)


def test_missing_file():
    # a notebook opened in notebooks/ reads "configs/x.yaml" from there: the current directory is named
    with pytest.raises(ConfigError, match=re.escape(f"cannot read config file 'nope.yaml' (a path from the current "
                                                    f"directory, {os.getcwd()}): No such file")):
        Config.from_yaml("nope.yaml")


def test_a_key_given_twice_or_a_file_that_is_not_text_is_a_config_error(tmp_path):
    """A key given twice: the last one silently won. A binary file: a UnicodeDecodeError traceback."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("Port: 9001\nGPUs: cpu\nPort: 9002\n")
    with pytest.raises(ConfigError, match="'Port' is given twice \\(also on line 1\\)"):
        Config.from_yaml(twice)
    twice.write_text("HandleArgs: {model: a.onnx, model: b.onnx}\n")
    with pytest.raises(ConfigError, match="'model' is given twice"):
        Config.from_yaml(twice)
    merged = tmp_path / "merged.yaml"  # YAML's merge key is no key given twice
    merged.write_text("HandleArgs: {<<: {model: a.onnx, top_k: 5}, top_k: 3}\n")
    assert Config.from_yaml(merged).handle_args == {"model": "a.onnx", "top_k": 3}
    binary = tmp_path / "model.onnx"
    binary.write_bytes(b"\x08\xff\xfe\x00\x80")
    with pytest.raises(ConfigError, match="model.onnx is not a text file"):
        Config.from_yaml(binary)


def test_empty_file_means_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert Config.from_yaml(path).handle == "easyserve.builtin:Demo"


@pytest.mark.parametrize("given", ["handles/lin.py:LinHandle", "handles_for_tests:Recorder", "LinHandle"])
def test_a_handle_given_as_the_config_says_to_give_it_with_handle(tmp_path, monkeypatch, given):
    # `easyserve run handles/lin.py:LinHandle` said only "cannot read config file"
    monkeypatch.chdir(tmp_path)
    said = (f"cannot read config file {given!r} (a path from the current directory, {tmp_path}): No such file or "
            f"directory; to serve a handle, give it with --handle: `easyserve run --handle {given}`")
    with pytest.raises(ConfigError, match=f"^{re.escape(said)}$"):
        Config.from_yaml(given)
    with pytest.raises(ConfigError, match=r"No such file or directory$"):
        Config.from_yaml("configs/missing.yaml")


def test_a_python_file_given_as_the_config_says_how_to_serve_its_handle(tmp_path, monkeypatch):
    # it was "is not valid YAML: line 4, column 17"
    monkeypatch.chdir(tmp_path)
    path = Path("handles/colours.py")
    path.parent.mkdir()
    path.write_text("from easyserve import Handle\n\nclass ColourNamer(Handle):\n    def forward(self, batch): ...\n")
    said = ("handles/colours.py is a Python file, not a config: serve a handle it defines with `easyserve run "
            "--handle handles/colours.py:ClassName`, or name it in a YAML config (Handle: "
            "handles/colours.py:ClassName, from the config's folder or the current directory)")
    with pytest.raises(ConfigError, match=f"^{re.escape(said)}$"):
        Config.from_yaml(path)
    # the line it gives works in a config written here (with the file's name alone, it was "not found")
    Path("serve.yaml").write_text("Handle: handles/colours.py:ColourNamer\n")
    config = Config.from_yaml("serve.yaml")
    found = resolve(config.handle, config.base_dir)
    assert (found.kind, found.name, Path(found.target)) == ("file", "ColourNamer", tmp_path / path)


def test_values_and_files_that_were_tracebacks_are_config_errors(tmp_path, monkeypatch):
    """Each of these ended in a traceback (OverflowError, ValueError, RecursionError, MemoryError)
    with exit 1, which --supervise restarted for ever."""
    with pytest.raises(ConfigError, match=r"^TimeoutS: got an integer of 400 digits; expected a number from"):
        Config.from_dict({"TimeoutS": int("4" * 400)})
    cases = {
        "digits.yaml": ("Port: " + "9" * 5000 + "\n", "holds a number of more than 4,300 digits"),
        "deep.yaml": ("HandleArgs: {x: " + "[" * 5000 + "]" * 5000 + "}\n", "is nested too deeply to read"),
        "large.yaml": ("# " + "x" * 2**20 + "\n", "is over 1 MB: is it the config?"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=message):
            Config.from_yaml(tmp_path / name)
    with pytest.raises(ConfigError, match="is over 1 MB"):
        Config.from_yaml("/dev/zero")  # read until memory ran out
    for key in (" ", "two words"):  # a key of one space locked every client out
        monkeypatch.setenv("EASYSERVE_API_KEY", key)
        with pytest.raises(ConfigError, match=r"^\$EASYSERVE_API_KEY: expected a key without spaces"):
            Config().required_key  # noqa: B018
    monkeypatch.setenv("EASYSERVE_API_KEY", "k3y")  # short, the owner's choice
    assert Config().required_key == "k3y"


def test_a_handle_found_by_name_passes_over_lock_files_and_folders_and_two_files_with_it_are_refused(tmp_path):
    """An editor's lock file (``.#good.py``, a link to nowhere) in handles/ stopped ``easyserve run``
    with a FileNotFoundError traceback; two files defining the class served the first in the alphabet."""
    from easyserve.loader import resolve

    handles = tmp_path / "handles"
    handles.mkdir()
    (handles / "good.py").write_text("class Good:\n    pass\n")
    (handles / ".#good.py").symlink_to("root@host.12345:1700000000")
    (handles / "odd.py").mkdir()
    ref = resolve("Good", tmp_path)
    assert (ref.kind, ref.target, ref.name) == ("file", str((handles / "good.py").resolve()), "Good")
    (handles / "good_v2.py").write_text("class Good:\n    pass\n")
    with pytest.raises(ConfigError, match=r"Handle: a class 'Good' is in .*good\.py and .*good_v2\.py; name the one "
                                          r"to serve: \".*good_v2\.py:Good\""):
        resolve("Good", tmp_path)


def test_a_handle_file_is_looked_for_where_a_handle_class_is(tmp_path, monkeypatch):
    """``Handle: handles/tiny.py:TinyHandle`` in configs/tiny.yaml was found only from the project's
    folder, where ``Handle: TinyHandle`` is found from anywhere: one folder up from the config too."""
    from easyserve.loader import resolve

    (tmp_path / "handles").mkdir()
    (tmp_path / "handles" / "tiny.py").write_text("class TinyHandle:\n    pass\n")
    (tmp_path / "configs").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ref = resolve("handles/tiny.py:TinyHandle", tmp_path / "configs")
    assert (ref.kind, ref.target) == ("file", str((tmp_path / "handles" / "tiny.py").resolve()))
    assert resolve("TinyHandle", tmp_path / "configs").target == ref.target  # as the class name alone is
    with pytest.raises(ConfigError, match=r"Handle: file 'handles/nope\.py' not found \(looked in .*configs, "
                                          r".*, .*elsewhere\)"):
        resolve("handles/nope.py:TinyHandle", tmp_path / "configs")


def test_a_module_name_import_takes_though_python_code_could_not_write_it_is_served(tmp_path, monkeypatch):
    # "my-handles:Echo" and "01_intro:Echo" (a notebook's file) import by name, and served; a check
    # meant for ":Echo" and ".mod:Echo" refused them
    from easyserve import Client, Server

    for name in ("my-handles", "01_intro"):
        (tmp_path / f"{name}.py").write_text("from easyserve import Handle\n\n\nclass Echo(Handle):\n"
                                             "    def forward(self, batch):\n        return batch\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("my-handles", "01_intro"):
        with Server(handle=f"{name}:Echo", GPUs="cpu", ProcessPerGPU=1, Port=0) as server:
            assert Client(server.url).predict({"a": 1}) == {"a": 1}


def test_a_misspelt_handle_name_is_told_the_class_it_was_near(tmp_path):
    """``Handle: TinyHandel`` was told to name it as "module:Class" instead, not that TinyHandle was there."""
    from easyserve.loader import resolve

    handles = tmp_path / "handles"
    handles.mkdir()
    (handles / "tiny.py").write_text("class TinyHandle:\n    pass\n")
    with pytest.raises(ConfigError) as caught:
        resolve("TinyHandel", tmp_path)
    assert f"did you mean 'TinyHandle' (in {handles / 'tiny.py'})? Or name it as" in str(caught.value)
    with pytest.raises(ConfigError, match="did you mean 'OnnxModel'[?] Or name it"):  # the built-in ones too
        resolve("OnnxModle", tmp_path)
    with pytest.raises(ConfigError) as far:  # nothing near: as before
        resolve("Zzzz", tmp_path)
    assert "did you mean" not in str(far.value)


def test_handle_args_with_two_letters_swapped_are_told_the_word_they_swap(tmp_path):
    """``modle`` was told "did you mean 'mode'?" beside a ``model`` it takes."""
    from easyserve.loader import HandleRef, build

    (tmp_path / "tiny.py").write_text("from easyserve import Handle\n\nclass Tiny(Handle):\n"
                                      "    def __init__(self, model='m.onnx', mode='fast'):\n        pass\n\n"
                                      "    def forward(self, batch):\n        return batch\n")
    ref = HandleRef("file", str(tmp_path / "tiny.py"), "Tiny")
    with pytest.raises(ConfigError, match=r"^HandleArgs: Tiny takes no 'modle' \(did you mean 'model'\?\)"):
        build(ref, {"modle": "x.onnx"})
    with pytest.raises(ConfigError, match=r"takes no 'mod' \(did you mean 'mode'\?\)"):  # others as before
        build(ref, {"mod": "slow"})


def test_a_yaml_mistake_is_one_line_with_the_file_and_where(tmp_path):
    """It was six lines, each naming "<unicode string>" for the file."""
    config = tmp_path / "bad.yaml"
    config.write_text("Port: 9000\nHandle: [unclosed\nGPUs: cpu\n")
    with pytest.raises(ConfigError) as caught:
        Config.from_yaml(config)
    assert str(caught.value) == (f"{config} is not valid YAML: line 3, column 5: expected ',' or ']', but got ':' "
                                 "(while parsing a flow sequence, begun on line 2)")
    config.write_text("Port: 9000\nPort: 9001\n")
    with pytest.raises(ConfigError) as caught:
        Config.from_yaml(config)
    assert str(caught.value) == f"{config} is not valid YAML: line 2, column 1: 'Port' is given twice (also on line 1)"
    config.write_text("Port: 9000\x07\n")
    with pytest.raises(ConfigError) as caught:
        Config.from_yaml(config)
    assert str(caught.value) == (f"{config} is not valid YAML: character '\\x07' at offset 10: special characters "
                                 "are not allowed")


def test_one_setting_under_two_spellings_is_refused(tmp_path):
    """``Port: 19001`` then ``port: 19002`` got past the duplicate-key check: the server listened on 19002."""
    config = tmp_path / "c.yaml"
    config.write_text("Port: 19001\nport: 19002\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(config))}: 'port' and 'Port' name the same setting"):
        Config.from_yaml(config)
    with pytest.raises(ConfigError, match="'max_batch_size' and 'MaxBatchSize' name the same setting"):
        Config.from_dict({"MaxBatchSize": 4, "max_batch_size": 8})
    config.write_text("Port: 19001\n")
    assert Config.from_yaml(config, overrides={"port": 19003, "Host": None}).port == 19003  # an override wins


def test_a_first_batch_timeout_below_timeout_s_is_refused():
    """It could only give a first batch longer: one below TimeoutS was ignored, without a word."""
    with pytest.raises(ConfigError, match=r"FirstBatchTimeoutS \(5\) is below TimeoutS \(30\)"):
        Config(first_batch_timeout_s=5)
    assert Config(first_batch_timeout_s=30).first_batch_timeout_s == 30


def test_a_value_made_of_yaml_aliases_is_quoted_in_brief(tmp_path):
    """YAML aliases share one list among nine others, nine levels down: a 355-byte file's error quoted
    the whole expansion, gigabytes and half a minute of the machine's memory, then a MemoryError."""
    levels = ["  a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"  {name}: &{name} [{', '.join([f'*{before}'] * 9)}]" for before, name in zip("abcdefgh", "bcdefghi")]
    path = tmp_path / "aliases.yaml"
    path.write_text("GPUs: cpu\nHandleArgs:\n" + "\n".join(levels) + "\nPort: *i\n")
    with pytest.raises(ConfigError, match=r"^Port: got \[\[\[\[\.\.\.\], ") as raised:
        Config.from_yaml(path)
    assert len(str(raised.value)) < 4000 and str(raised.value).endswith("expected an integer from 0 to 65535")


def test_gpus_given_twice_in_a_tuple_a_host_with_a_control_character_and_a_handle_file_not_of_python(tmp_path):
    """A tuple of GPU ids passed as already checked, twice the same GPU with it (two workers of one
    name); a Host of "127.0.0.1\\0" bound 127.0.0.1 but was taken for a public address, which let any
    Host in; a handle file not ending in .py failed in each worker, exit 1, which --supervise restarts."""
    with pytest.raises(ConfigError, match="GPU 0 is listed twice"):
        Config(gpus=(0, 0))
    assert Config(gpus=(0, 1)).gpus == (0, 1)
    for host in ("127.0.0.1\0", "127.0.0.1\x7f", "local\x1bhost"):
        with pytest.raises(ConfigError, match=r"^Host: got '.*'; expected an address to bind"):
            Config(host=host)
    from easyserve.loader import resolve

    (tmp_path / "handles").mkdir()
    (tmp_path / "handles" / "echo.txt").write_text("from easyserve import Handle\nclass Echo(Handle):\n    pass\n")
    with pytest.raises(ConfigError, match=r"^Handle: 'handles/echo.txt' is not a Python module's file \(\.py, or "):
        resolve("handles/echo.txt:Echo", tmp_path)
    import py_compile  # a handle shipped compiled is one

    py_compile.compile(str(tmp_path / "handles" / "echo.txt"), cfile=str(tmp_path / "handles" / "echo.pyc"))
    assert resolve("handles/echo.pyc:Echo", tmp_path).kind == "file"


def test_configs_saved_by_other_editors_are_read_or_said_where_they_go_wrong(tmp_path):
    """A config saved as UTF-16 (Notepad's "Unicode") was "not a text file (UTF-8)", as was one with a
    Latin-1 byte in a comment, with no word of where; a non-breaking space pasted after a colon made
    the file one string, a YAML error on the next line, or a key with the spaces in it."""
    config = tmp_path / "c.yaml"
    config.write_bytes("# café\r\nGPUs: cpu\r\nProcessPerGPU: 2\r\n".encode("utf-16"))
    assert Config.from_yaml(config).process_per_gpu == 2
    config.write_bytes("GPUs: cpu\n# café\nProcessPerGPU: 2\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"c.yaml is not UTF-8 text: byte 0xe9 on line 2 .*save it as UTF-8"):
        Config.from_yaml(config)
    for text, line in (("GPUs:\u00a0cpu\n", 1), ("Port: 8000\nGPUs:\u00a0cpu\nProcessPerGPU: 2\n", 2),
                       ("GPUs: cpu\n\u00a0\u00a0ProcessPerGPU: 2\n", 2), ("GPUs\uff1a cpu\n", 1)):
        config.write_text(text)
        with pytest.raises(ConfigError, match=rf"\(line {line} holds a (non-breaking space|full-width colon) "):
            Config.from_yaml(config)


@pytest.mark.parametrize("key", ["short", "two words", "        "])
def test_an_api_key_too_short_or_with_spaces_is_refused_without_showing_it(key):
    with pytest.raises(ConfigError) as raised:
        Config.from_dict({"ApiKey": key})
    assert str(raised.value) == "ApiKey: expected a string of at least 8 characters without spaces (value hidden)"


def test_an_integer_in_quotes_and_handle_args_left_empty_are_taken():
    config = Config.from_dict({"ProcessPerGPU": "4", "MaxBatchSize": " 16 ", "HandleArgs": None})
    assert (config.process_per_gpu, config.max_batch_size, dict(config.handle_args)) == (4, 16, {})


@pytest.mark.parametrize("written, said", [
    ("ModelVersion: 010", 'ModelVersion: YAML read 010 as the octal number 8: put it in quotes, ModelVersion: "...", '
                          "for the name as written"),
    ("ModelName: 1.10", "ModelName: got 1.1; expected a name of letters, digits, '.', '_' and '-', such as resnet18 "
                        'or 1, as a string: in a YAML config, put it in quotes, ModelName: "...", for the name as '
                        "written (YAML reads 1.10 as the number 1.1)")])
def test_a_model_name_yaml_reads_as_another_number_is_told_to_be_quoted(tmp_path, written, said):
    """ModelVersion: 010 was served as version "8" without a word (YAML 1.1's octal), and ModelName: 1.10 was
    told that 1.1 is not "a name of letters, digits, '.', '_' and '-'"."""
    path = tmp_path / "named.yaml"
    path.write_text(f"{written}\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(said)}$"):
        Config.from_yaml(path)
    key, value = written.split(": ")
    path.write_text(f'{key}: "{value}"\n')
    config = Config.from_yaml(path)
    assert (config.model_version if key == "ModelVersion" else config.model_name) == value
    path.write_text("ModelVersion: 2\n")
    assert Config.from_yaml(path).model_version == "2"


def test_numbers_in_handle_args_are_read_as_json_and_yaml_1_2_read_them(tmp_path):
    """HandleArgs: {threshold: 1e-3} reached the handle as the string "1e-3" (YAML 1.1 wants a point in a
    float), where TimeoutS: 1e2 was 100.0; and an octal number is the number it is, as before."""
    path = tmp_path / "args.yaml"
    path.write_text("HandleArgs: {threshold: 1e-3, big: 2E+3, scale: 1.5e2, mode: 0755, ids: [007, 10], name: '1e-3',"
                    " labels: {00: background, 01: person}}\nTimeoutS: 1e2\n")
    config = Config.from_yaml(path)
    assert config.handle_args == {"threshold": 0.001, "big": 2000.0, "scale": 150.0, "mode": 493, "ids": [7, 10],
                                  "name": "1e-3", "labels": {0: "background", 1: "person"}}
    assert type(config.handle_args["mode"]) is int and type(config.handle_args["ids"][0]) is int
    assert [type(key) for key in config.handle_args["labels"]] == [int, int]  # a private int type, as keys too
    assert config.timeout_s == 100.0


def test_an_api_key_yaml_reads_as_a_number_is_told_to_be_quoted(tmp_path):
    """ApiKey: 12345678 is a number in YAML: "expected a string of at least 8 characters" told a user who had
    typed eight characters nothing."""
    path = tmp_path / "keyed.yaml"
    for written in ("12345678", "1234567890.5", "0x1234abcd"):
        path.write_text(f"GPUs: cpu\nApiKey: {written}\n")
        with pytest.raises(ConfigError) as raised:
            Config.from_yaml(path)
        assert str(raised.value) == ('ApiKey: YAML read it as a number, and a key is a string: put it in quotes, '
                                     'ApiKey: "..." (value hidden)'), written
        assert written not in str(raised.value)
    path.write_text('GPUs: cpu\nApiKey: "12345678"\n')
    assert Config.from_yaml(path).api_key == "12345678"
