"""The notebook view: the live dashboard and the Server's HTML card, with real servers (ipywidgets works
without a Jupyter frontend, so no kernel is needed here)."""

from __future__ import annotations

import html
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import Background, http, post_json, post_many, wait_busy, wait_queued, wait_until
from handles_for_tests import Recorder
from test_cli import TESTS

from easyserve import Server
from easyserve.dashboard import STATE_COLOURS, Dashboard

JSON = {"Content-Type": "application/json"}
FAST = 0.2  # refresh interval for the tests


def cells(value: str) -> list[list[str]]:
    """The rows of the HTML table a widget shows, as text (tags removed, entities decoded)."""
    rows = re.findall(r"<tr>(.*?)</tr>", value, re.S)
    return [[html.unescape(re.sub(r"<[^>]+>", "", cell)) for cell in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row)]
            for row in rows]


def numbers(dashboard) -> dict[str, str]:
    head, values = cells(dashboard.numbers.value)
    return dict(zip(head, values))


def counts(widget) -> dict[str, int]:
    """status -> answers, or batch size -> batches: the first and last column of each row."""
    return {row[0]: int(row[-1]) for row in cells(widget.value)[1:]}


def workers(dashboard) -> list[dict[str, str]]:
    head, *rows = cells(dashboard.workers.value)
    return [dict(zip(head, row)) for row in rows]


def dashboard_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dashboard"]


def test_the_dashboard_counts_known_traffic_as_it_arrives(serve):
    with serve("handles_robust:Sleeper", TimeoutS=2, MaxQueueSize=1) as server:
        dash = server.dashboard(interval=FAST)
        assert numbers(dash)["answered"] == "0" and "no answers yet" in dash.statuses.value
        assert [(w["worker"], w["state"], w["batches"]) for w in workers(dash)] == [("cpu/0", "idle", "0")]
        assert "running" in dash.header.value and server.url in dash.header.value
        url = server.url + "/predict"

        for i in range(3):
            assert post_json(url, {"mark": i})[0] == 200
        # the refresh thread shows them, without being asked
        wait_until(lambda: counts(dash.statuses) == {"200": 3}, 5, "the dashboard to show three answers")
        assert counts(dash.batch_sizes) == {"1": 3}
        assert numbers(dash)["p50"].endswith(" ms") and numbers(dash)["p99"].endswith(" ms")

        assert http("POST", url, data=b'{"x": ', headers=JSON)[0] == 400
        slow = Background(lambda: post_json(url, {"sleep": 1}))
        wait_busy(server)
        queued = Background(lambda: post_json(url, {"mark": "queued"}))
        wait_queued(server.url, 1)
        wait_until(lambda: numbers(dash)["queue"] == "1", 5, "the dashboard to show the queued request")
        assert post_json(url, {"mark": "refused"})[0] == 429
        assert slow.result()[0] == 200 and queued.result()[0] == 200
        assert post_json(url, {"sleep": 30})[0] == 504

        expected = {"200": 5, "400": 1, "429": 1, "504": 1}
        wait_until(lambda: counts(dash.statuses) == expected and workers(dash)[0]["restarts"] == "1"
                   and workers(dash)[0]["state"] == "idle", 20, "the dashboard to show every answer")
        shown = numbers(dash)
        assert (shown["answered"], shown["timeouts"], shown["restarts"], shown["queue"]) == ("8", "1", "1", "0")
        assert counts(dash.statuses) == {k: v for k, v in server.stats()["statuses"].items()}  # one source
        assert workers(dash)[0]["batches"] == "5"  # answered by the slot, across its restart
        p50, p99 = (float(shown[p].split()[0]) for p in ("p50", "p99"))
        assert 0 < p50 <= p99 and 1000 <= p99 < 1900  # the 2xx that slept a second, not the 504 at TimeoutS
        dash.close()


def test_the_dashboard_shows_the_cores_the_server_and_the_workers_use(serve):
    with serve("handles_for_tests:Spinner", HandleArgs={"spin_s": 0.02}) as server:
        first = server.dashboard(interval=60)  # one reading: the cores since the start, an idle one
        assert cores(first)[1] == 0 and 0 <= cores(first)[0] < 1
        first.close()
        dash = server.dashboard(interval=FAST)
        load = Background(lambda: post_many(server.url + "/predict", [{}] * 100, concurrency=2))
        # the one worker spins whenever it has a request, and it always has one waiting
        wait_until(lambda: cores(dash)[1] > 0.5, 10, "the dashboard to show the worker's core busy")
        assert all(s == 200 for s, _ in load.result())
        wait_until(lambda: cores(dash)[1] < 0.1, 5, "the dashboard to show the worker idle again")
        dash.close()


def test_the_dashboard_shows_where_a_batchs_time_goes(serve, tmp_path):
    args = {"log": str(tmp_path / "timeline"), "preprocess_s": 0.02, "forward_s": 0.05}
    with serve("handles_for_tests:Timeline", HandleArgs=args) as server:
        dash = server.dashboard(interval=FAST)
        assert numbers(dash)["ms a batch: pre · fwd · post"] == "– · – · –"  # nothing has run yet
        assert post_json(server.url + "/predict", {"value": 1})[0] == 200
        wait_until(lambda: "–" not in numbers(dash)["ms a batch: pre · fwd · post"], 5, "the stages' times")
        pre, fwd, post = map(float, numbers(dash)["ms a batch: pre · fwd · post"].split(" · "))
        assert pre >= 20 and fwd >= 50 and post >= 20  # what each stage slept, at least
        dash.close()


def cores(dashboard) -> list[float]:
    return [float(x) for x in numbers(dashboard)["CPU cores: server · workers"].split(" · ")]


def test_the_log_box_shows_the_workers_latest_lines(serve):
    with serve("handles_ops:Noisy") as server:
        dash = server.dashboard(interval=FAST, log_lines=3)
        wait_until(lambda: "noisy setup on cpu/0" in dash.log.value, 5, "the setup line")
        for n in range(5):
            assert post_json(server.url + "/predict", {"n": f"<{n}>"})[0] == 200
        wait_until(lambda: "forward sees n=&lt;4&gt;" in dash.log.value, 5, "the last request's line, escaped")
        shown = re.search(r"<pre[^>]*>(.*)</pre>", dash.log.value, re.S).group(1).splitlines()
        assert len(shown) == 3 and "noisy setup" not in dash.log.value
        dash.close()


def test_refreshing_ends_when_the_server_stops_or_the_dashboard_closes(serve):
    with serve() as server:
        first, second, closed = (Dashboard(server, interval=FAST) for _ in range(3))
        assert len(dashboard_threads()) >= 3 and first.running and second.running
        closed.close()
        closed.thread.join(2)
        assert not closed.running
        assert post_json(server.url + "/predict", {"value": 1})[0] == 200
        wait_until(lambda: counts(first.statuses) == {"200": 1}, 5, "the answer on the dashboard")
        server.stop()
        stopped = time.monotonic()
        for dash in (first, second):
            dash.thread.join(2)
            assert not dash.running
        assert time.monotonic() - stopped < 1.5  # no refresh outlives its server by more than about a second
        assert not dashboard_threads()
        for dash in (first, second):  # the last view says so, and keeps the run's final numbers
            assert "stopped" in dash.header.value and "running" not in dash.header.value
            assert counts(dash.statuses) == {"200": 1}
            # its workers, stopped as they were told, were shown "dead", in red
            assert ">stopped<" in dash.workers.value and STATE_COLOURS["dead"] not in dash.workers.value
        frozen = first.header.value
        time.sleep(3 * FAST)
        assert first.header.value == frozen
        # a dashboard of a stopped server shows the last run's numbers once, and starts no thread
        late = server.dashboard(interval=FAST)
        assert not late.running and "stopped" in late.header.value and counts(late.statuses) == {"200": 1}


def test_a_dashboard_whose_server_started_again_before_its_last_look_shows_the_run_it_followed(serve):
    """`server.stop(); server.start()` in one cell: the dashboard's thread, woken by the stop, looked after the
    start, and showed the new run's empty numbers as "not started yet" while the server served."""
    with serve() as server:
        dash = Dashboard(server, interval=60)
        for value in range(3):
            assert post_json(server.url + "/predict", {"value": value})[0] == 200
        with dash._lock:  # its last look comes once the server has started again
            server.stop()
            server.start()
        dash.thread.join(5)
        assert not dash.running
        assert counts(dash.statuses) == {"200": 3} and "not started yet" not in dash.header.value
        assert "final numbers of the run it followed" in dash.header.value
        assert "the server was started again since: server.dashboard() shows the new run" in dash.header.value
        assert post_json(server.url + "/predict", {"value": 1})[0] == 200
        new = server.dashboard(interval=FAST)
        assert new.running and counts(new.statuses) == {"200": 1}
        new.close()


def test_a_dashboard_whose_server_failed_to_start_again_says_so_not_that_a_new_run_serves(serve, tmp_path):
    from easyserve.errors import StartupError

    with serve("handles_for_tests:StartsOnce", HandleArgs={"counter": str(tmp_path / "starts")}) as server:
        dash = Dashboard(server, interval=60)
        assert post_json(server.url + "/predict", {"value": 1})[0] == 200
        with dash._lock:
            server.stop()
            with pytest.raises(StartupError, match="CUDA out of memory"):
                server.start()
        dash.thread.join(5)
        assert counts(dash.statuses) == {"200": 1} and "final numbers of the run it followed" in dash.header.value
        assert "a start since failed: " in dash.header.value and "shows the new run" not in dash.header.value


def test_running_the_dashboards_cell_again_replaces_its_view(serve):
    # Each run of a `server.dashboard()` cell left one more thread refreshing a view no longer shown
    with serve() as server:
        first = server.dashboard(interval=FAST)
        second = server.dashboard(interval=FAST)
        first.thread.join(2)
        assert not first.running and second.running and len(dashboard_threads()) == 1
        assert post_json(server.url + "/predict", {"value": 1})[0] == 200
        wait_until(lambda: counts(second.statuses) == {"200": 1}, 5, "the answer on the dashboard")
        # where widgets do not run, its text says what it is, not the widgets' own repr
        bundle = second._repr_mimebundle_()
        text = (bundle[0] if isinstance(bundle, tuple) else bundle)["text/plain"]
        assert text.startswith("<Dashboard of <Server running") and "VBox" not in text, text


def test_a_dashboard_replaced_leaves_no_widget_and_no_thread_behind(serve):
    """Each `server.dashboard()` run again left 21 widgets registered for good (the layout and style each
    text widget and box makes for itself, which closing the widget does not close), and the replaced
    one's thread slept out its interval before it saw it was closed."""
    from ipywidgets.widgets import widget

    # every widget alive: ipywidgets 8.1 and later keep them in _instances, 8.0 in Widget._active_widgets
    _instances = widget._instances if hasattr(widget, "_instances") else widget.Widget._active_widgets
    with serve() as server:
        first = server.dashboard(interval=60)
        held = len(_instances)
        for _ in range(5):
            server.dashboard(interval=60)
        first.thread.join(5)
        assert not first.running and len(dashboard_threads()) == 1
        assert len(_instances) == held


class Hostile(Recorder):
    pass


Hostile.__qualname__ = '<img src=x onerror="alert(1)">'


def test_the_html_card_shows_the_state_and_escapes_every_value(serve):
    args = {"note": "<script>alert('args')</script>"}
    with serve(HandleArgs=args, ProcessPerGPU=2) as server:
        assert post_json(server.url + "/predict", {"value": 1})[0] == 200
        running = server._repr_html_()
        plain = repr(server)
    assert "running" in running
    assert "workers 2/2 ready" in running and "answered 1" in running and "restarts 0" in running
    assert "queue 0" in running and "cpu/0" in running and "cpu/1" in running
    assert "<script>" not in running and "&lt;script&gt;alert(&#x27;args&#x27;)&lt;/script&gt;" in running
    assert plain.startswith("<Server running http://127.0.0.1:") and "workers=2/2 ready" in plain

    stopped = Server(handle=Hostile, GPUs="cpu", Port=0, HandleArgs={"x": '"><b onmouseover=alert(2)>'})
    card = stopped._repr_html_()
    assert "stopped" in card and "running" not in card
    assert "<img" not in card and "<b onmouseover" not in card and 'onerror="' not in card
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in card
    assert repr(stopped) == f"<Server stopped handle={Hostile.__qualname__} port=0>"  # plain repr unchanged
    # once stopped, a server on Port: 0 says the port it had (its URL is what a reader looked for)
    stopped.start(timeout=60)
    had = stopped.port
    stopped.stop()
    assert repr(stopped) == f"<Server stopped handle={Hostile.__qualname__} port={had}>" and had > 0


def test_the_card_says_why_a_worker_is_down_and_once_stopped_what_the_last_run_did(serve, tmp_path):
    """A worker that could not start showed as "failed" with the reason only in stats(); a stopped
    server's card showed "stopped" alone, where the dashboard keeps the final numbers."""
    marker = tmp_path / "down"
    with serve("handles_robust:FlakySetup", HandleArgs={"marker": str(marker)}, ProcessPerGPU=2) as server:
        assert post_json(server.url + "/predict", {"value": 1})[0] == 200
        marker.touch()
        victim = server.workers[1]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: "transient setup failure" in server._repr_html_(), 20, "the card to say why")
        card = server._repr_html_()
        assert "cpu/1: " in card and "RuntimeError: transient setup failure" in card and "cpu/0:" not in card
        marker.unlink()
        wait_until(lambda: all(w["state"] == "idle" for w in server.workers), 20, "the worker back")
        assert "transient" not in server._repr_html_()
    card = server._repr_html_()
    assert "stopped" in card and re.search(r"last run: \d+ s · answered 1 \(1 × 200\) · restarts \d", card), card


def test_the_card_and_dashboard_of_a_server_that_could_not_start_say_why():
    """A server whose start failed showed "last run: 0 s · requests 0 · restarts 0", and its dashboard
    "final numbers of its last run", as if it had served; one never started said the latter too."""
    from easyserve import StartupError

    server = Server(handle="handles_for_tests:BrokenSetup", HandleArgs={"model": "gone.onnx"}, GPUs="cpu", Port=0)
    assert "not started yet" in Dashboard(server).html()
    with pytest.raises(StartupError):
        server.start(timeout=60)
    card = server._repr_html_()
    assert "last run" not in card, card
    said = ("worker cpu/0 could not start handle handles_for_tests:BrokenSetup: FileNotFoundError: model file "
            "&#x27;gone.onnx&#x27; not found")
    assert said in card, card
    view = Dashboard(server).html()
    assert said in view and "final numbers" not in view and "not started yet" not in view, view


@pytest.mark.timeout(30)
def test_the_card_of_handle_args_a_yaml_alias_bomb_expanded_is_drawn_at_once(tmp_path):
    """YAML aliases share one object, so ten levels of ten make 10^10 leaves from a few lines; the
    card's repr of them ran for half a minute, then out of memory, before it was cut short."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    (tmp_path / "bomb.yaml").write_text("Handle: handles_for_tests:Recorder\nGPUs: cpu\nHandleArgs:\n"
                                        + "".join(f"  {line}\n" for line in lines))
    card = Server.from_yaml(tmp_path / "bomb.yaml")._repr_html_()
    assert "args <code>{&#x27;a0&#x27;: [&#x27;x&#x27;" in card and "…" in card


def test_a_server_that_never_meets_a_notebook_never_imports_ipywidgets(tmp_path):
    script = textwrap.dedent("""
        import sys, urllib.request
        from easyserve import Server
        with Server(handle="handles_for_tests:Recorder", GPUs="cpu", Port=0) as server:
            urllib.request.urlopen(urllib.request.Request(server.url + "/predict", b'{"value": 1}',
                                                          {"Content-Type": "application/json"})).read()
            repr(server), server.stats(), server.logs()
        print(sorted(m for m in sys.modules if m.startswith(("ipywidgets", "easyserve.dashboard"))))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": f"{TESTS}:{TESTS.parent}", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_a_saved_notebook_shows_the_dashboard_as_it_was(serve):
    # Where widgets do not run (GitHub, nbconvert's HTML), a notebook shows the text/html beside the
    # widget view: the dashboard as it was when the cell ran.
    with serve("handles_for_tests:Recorder", ProcessPerGPU=2) as server:
        for i in range(3):
            post_json(server.url + "/predict", {"value": i})
        dashboard = server.dashboard()
        try:
            data = dashboard._repr_mimebundle_()
            data = data[0] if isinstance(data, tuple) else data
            assert "application/vnd.jupyter.widget-view+json" in data
            html = data["text/html"]
            assert "cpu/0" in html and "cpu/1" in html and "answers by status" in html
            assert html == dashboard.html()
        finally:
            dashboard.close()
