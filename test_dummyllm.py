"""Tests for dummyllm.py, standard library only: ``python3 -m unittest -v``.

They take the headings of dummyllm.py.  Most requests are answered without a
socket (AppTestCase: an application, a SocketlessHandler and a fake clock
that moves as answers wait), and each JSON answer is checked against the API
document's schema for it; real servers on port 0 (ServerTestCase) only where
the socket is the point: the wire, streams' timing, the SDKs, the browser;
subprocesses only where the process is.
"""

import ast
import asyncio
import atexit
import base64
import collections
import contextlib
import datetime
import enum
import functools
import gc
import http.client
import http.server
import importlib.util
import io
import itertools
import json
import logging
import operator
import os
import py_compile
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import statistics
import sys
import sysconfig
import tempfile
import threading
import time
import types
import typing
import unittest
import unittest.mock
import uuid
import warnings
import zlib

import dummyllm

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "dummyllm.py")
README = os.path.join(HERE, "README.md")
TERMINAL = ("ok", "fail", "timeout", "cancelled")
HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]


@functools.lru_cache(maxsize=None)
def compiled():
    """A directory that holds dummyllm compiled, dummyllm.pyc and no source,
    made at first use: the Pythons the tests start run or import it from
    there.  From the file, each compiled it anew (a file run by its path is
    never cached, nor anything under PYTHONDONTWRITEBYTECODE), 0.13 s of
    each start here.  The README's blocks run the file, as written."""
    directory = tempfile.mkdtemp(prefix="dummyllm-compiled-")
    atexit.register(shutil.rmtree, directory, True)
    py_compile.compile(SCRIPT, os.path.join(directory, "dummyllm.pyc"), doraise=True)
    return directory


def compiled_script():
    return os.path.join(compiled(), "dummyllm.pyc")


@functools.lru_cache(maxsize=None)
def script_tree():
    """dummyllm.py's syntax tree, parsed once for the tests that read it."""
    with open(SCRIPT, encoding="utf-8") as f:
        return ast.parse(f.read())


def spec(**settings):
    """A _JobSpec with test defaults, for the pure simulation functions."""
    fields = dict(op="llm.chat", args={}, timeout_ms=8000, trace_id=None, test_id=None,
                  callback_url=None, rule=None, forced_tool=None, output=None,
                  **dummyllm._simulate_settings(None, dummyllm.make_config(latency_ms=100)))
    fields.update(settings)
    return dummyllm._JobSpec(**fields)


def optional_import(name):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def needs(module, package, variable):
    """Skip a test class when its package is missing, unless `variable` is
    set (.ci/run sets it): then the missing package fails the class."""
    if module is not None:
        return lambda cls: cls
    if not os.environ.get(variable):
        return unittest.skip(f"the {package} package is not installed (.ci/run installs it)")

    def fail(cls):
        def setUp(self):
            self.fail(f"{variable} is set, but {package} is missing")
        cls.setUp = setUp
        return cls
    return fail


jsonschema = optional_import("jsonschema")
# Where npm installed the Node SDKs (.ci/run sets it), if node is here too.
NODE_DIR = os.environ.get("DUMMYLLM_NODE_DIR") if shutil.which("node") and os.path.isdir(
    os.path.join(os.environ.get("DUMMYLLM_NODE_DIR", ""), "node_modules")) else None
prometheus_parser = optional_import("prometheus_client.parser")
pydantic = optional_import("pydantic")

if pydantic is not None:  # a structured answer, as the SDKs and frameworks ask for one
    class City(pydantic.BaseModel):
        name: str
        population: int = pydantic.Field(ge=0)
        founded: datetime.date
        districts: typing.List[str] = pydantic.Field(min_length=1)


def plan(n=0, seed=1, **settings):
    return dummyllm._plan(spec(**settings), n, seed, dummyllm._DEFAULT_RANDOM_WEIGHTS, 6)


def http_bytes(method, path, body=None, headers=()):
    """One HTTP/1.1 request as bytes, with a JSON body if given."""
    data = b"" if body is None else json.dumps(body).encode()
    head = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(data)}\r\n\r\n"
            .encode() + data)


class QuickServer(dummyllm.DummyLLMServer):
    """Lingering, idle connections and event heartbeats in a blink (0.5 s, 30 s
    and 15 s in real life)."""

    linger_s = 0.05
    idle_timeout_s = 0.2
    heartbeat_s = 0.05


class FakeTimer:
    def __init__(self, at_ms, function, delay_s):
        self.at_ms, self.function, self.delay_s, self.cancelled = at_ms, function, delay_s, False

    def start(self):
        pass  # armed already: it fires when the clock passes it

    def cancel(self):
        self.cancelled = True


class FakeClock(dummyllm._Clock):
    """A clock that moves only when told; its Timers fire as it passes them."""

    def __init__(self, scale=1):
        super().__init__(scale)
        self.now, self.timers, self.armed = 1000.0, [], 0

    def now_ms(self):
        return self.now

    def of_monotonic(self, seconds):
        return self.now  # a request arrives when it is read

    def wall_ms(self):
        return 1_700_000_000_000 + round(self.real_ms(self.now))

    def timer(self, at_ms, function):
        timer = FakeTimer(at_ms, function, self.seconds_until(at_ms))
        self.timers.append(timer)
        self.armed += 1
        return timer

    def pending(self):
        return [timer for timer in self.timers if not timer.cancelled]

    def wait(self, condition, at_ms):
        """As Condition.wait, let go of the store's lock while the clock
        moves: to the first Timer due (which fires), or to at_ms."""
        condition.release()
        try:
            self.advance_to(min([at_ms] + [timer.at_ms for timer in self.pending()]))
        finally:
            condition.acquire()

    def advance_to(self, at_ms):
        self.advance(max(0.0, at_ms - self.now))

    def advance(self, ms):
        """Move on by ms, firing each Timer as its time comes."""
        target = self.now + ms
        while True:
            due = [timer for timer in self.pending() if timer.at_ms <= target]
            if not due:
                break
            timer = min(due, key=lambda timer: timer.at_ms)
            self.timers.remove(timer)
            self.now = max(self.now, timer.at_ms)
            timer.function()
        self.now = target


class SocketlessHandler(dummyllm._Handler):
    """One request answered without a socket, as CPython's test_httpservers
    answers them: the request read from bytes, the answer written into a
    buffer.  Waits move the application's fake clock; what would stay on
    the wire is noted in `ending`: "held" (nothing more is sent) or "reset"."""

    def __init__(self, app, data):  # neither setup() nor handle(): no socket
        self.server, self.client_address, self.ending = app, ("127.0.0.1", 0), "close"
        self.rfile, self.wfile = io.BufferedReader(io.BytesIO(data)), io.BytesIO()
        self._reader = types.SimpleNamespace(arrived=None, deadline=None, head_timeout_s=10)
        self._started, self.close_connection = time.perf_counter(), False
        self.handle_one_request()
        self.faulted = bool(self._fault or self._request and self._request.note.fault)

    def _wait_until(self, at_ms):
        self.server.clock.advance_to(at_ms)
        return True

    def _hold(self):
        self.close_connection, self.ending = True, "held"

    def _send_rst(self):
        self.close_connection, self.ending = True, "reset"

    def _send_timed(self, head, chunks):
        self.wfile.write(head)
        for at_ms, data in chunks:
            self.server.clock.advance_to(at_ms)
            self.wfile.write(data)
        return True


class _Received(io.RawIOBase):
    """What a socketless answer sent, read as a socket would: then the end,
    a timeout (the connection is held) or a reset."""

    def __init__(self, data, ending):
        self._data, self._ending = io.BytesIO(data), ending

    def readable(self):
        return True

    def readinto(self, buffer):
        count = self._data.readinto(buffer)
        if count == 0 and self._ending == "held":
            raise socket.timeout("timed out")
        return count


class SocketlessConnection:
    """http.client.HTTPConnection's request() and getresponse(), answered by
    an application through SocketlessHandler."""

    def __init__(self, app):
        self.app, self._sent = app, None

    def request(self, method, path, body=None, headers=None):
        body = body.encode() if isinstance(body, str) else body
        head = f"{method} {path} HTTP/1.1\r\nHost: dummyllm.test\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        if body is not None or method in ("POST", "PUT", "PATCH"):
            head += f"Content-Length: {len(body or b'')}\r\n"
        handler = SocketlessHandler(self.app, head.encode("latin-1") + b"\r\n" + (body or b""))
        self._sent = handler.wfile.getvalue(), handler.ending, method
        self.faulted = handler.faulted  # spoiled on purpose: no schema holds it

    def getresponse(self):
        data, ending, method = self._sent
        if ending == "reset":
            raise ConnectionResetError(104, "Connection reset by peer")
        received = io.BufferedReader(_Received(data, ending))
        response = http.client.HTTPResponse(types.SimpleNamespace(makefile=lambda *_: received),
                                            method=method)
        response.begin()
        return response

    def close(self):
        pass


def documented(app, method, path, status, content_type):
    """The API document's media type object for an answer (its "schema" or
    "itemSchema"), with the document's components beside it to resolve
    references, or None where it promises no schema: the route's answer
    for that status, else its default (its errors)."""
    document = app.registry.document
    path = path.partition("?")[0]
    scoped = dummyllm._TEST_PATH.match(path)  # a test's prefix (see _test_id)
    path = (scoped.group(2) or "/") if scoped else path
    try:
        route, _ = app.router.match(method, path)
    except dummyllm.ApiError:
        route = None
    if route is not None:
        responses = document["paths"][route.path.replace("+}", "}")][method.lower()]["responses"]
        answer = responses.get(str(status), responses["default"])
    else:
        answer = {"content": {"application/json": {"schema": dummyllm._ref(
            app.router.surface_of(path).error_schema)}}}
    media = answer.get("content", {}).get(content_type)
    if media is None or media.get("schema") == {"type": "string"}:
        return None
    return dict(media, components=document["components"])


def validate_documented(app, method, path, status, content_type, data):
    """Check an answer's bytes against the API document: a JSON answer
    against its schema; a stream's events against its itemSchema, each
    event's data against the contentSchema of the event of its name (unless
    it is one the document says is sent as it is)."""
    media = documented(app, method, path, status, content_type)
    if jsonschema is None or media is None:
        return
    if content_type != "text/event-stream":
        if "schema" in media:
            schema, values = media["schema"], [json.loads(data)]
        else:
            schema, values = media["itemSchema"], [json.loads(line) for line in data.splitlines()]
        for value in values:
            jsonschema.validate(value, dict(schema, components=media["components"]),
                                jsonschema.Draft202012Validator)
        return
    item = media["itemSchema"]
    for block in data.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines()
                      if line and not line.startswith(":"))
        if not fields:
            continue
        variants = [variant for variant in item.get("oneOf", [item])
                    if variant["properties"].get("event", {}).get("const") == fields.get("event")]
        assert len(variants) == 1, f"the document declares no event {fields!r}"
        jsonschema.validate(fields, variants[0])
        text = variants[0]["properties"]["data"]
        if fields["data"] in text.get("if", {}).get("enum", ()):
            continue
        jsonschema.validate(json.loads(fields["data"]), dict(
            text.get("else", text)["contentSchema"], components=media["components"]),
            jsonschema.Draft202012Validator)


class Calls:
    """Helpers that talk to an application as its clients would.  Each JSON
    answer is checked against the API document's schema for it (with the
    jsonschema package): the document cannot drift from the wire."""

    def call(self, method, path, body=None, headers=None, conn=None):
        """(status, decoded JSON body or None, response) for one request."""
        conn = conn or self.conn
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        self.assertEqual(response.getheader("Content-Type"), "application/json")
        value = json.loads(data) if data else None
        if value is not None and not getattr(conn, "faulted", False):
            validate_documented(getattr(conn, "app", self.server), method, path,
                                response.status, "application/json", data)
        return response.status, value, response

    def create(self, conn=None, **body):
        body.setdefault("op", "llm.chat")
        status, job, _ = self.call("POST", "/v1/jobs", body, conn=conn)
        self.assertEqual(status, 201, job)
        return job["id"]

    def job(self, job_id, conn=None, wait_ms=0):
        query = f"?wait_ms={wait_ms}" if wait_ms else ""
        status, job, _ = self.call("GET", f"/v1/jobs/{job_id}{query}", conn=conn)
        self.assertEqual(status, 200, job)
        return job

    def wait_for(self, job_id, conn=None):
        """The job once it has ended (a long-poll, failing after 5 s)."""
        job = self.job(job_id, conn, wait_ms=5000)
        self.assertIn(job["state"], TERMINAL, f"job {job_id} still {job['state']} after 5 s")
        return job

    def stored(self):
        return self.call("GET", "/health")[1]["jobs"]["stored"]

    def journal(self, query=""):
        status, body, _ = self.call("GET", "/v1/requests" + query)
        self.assertEqual(status, 200)
        return body["requests"]

    def assert_error(self, status, body, expected_status, code, field=None):
        self.assertEqual(status, expected_status, body)
        self.assertEqual(body["error"]["code"], code)
        self.assertIsInstance(body["error"]["message"], str)
        self.assertEqual(body["error"].get("field"), field)

    def wait_until(self, condition, timeout=5):
        """Wait for condition() to hold, checking every 10 ms; fail after timeout."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"still not so after {timeout} s")
            time.sleep(0.01)


class AppTestCase(Calls, unittest.TestCase):
    """An application for each test, answering without a socket, on a fake
    clock that moves as its answers wait (self.clock); `options` are its
    options."""

    options = {}
    app_class = dummyllm._Application

    def setUp(self):
        self.server = self.start({"latency_ms": 20, **self.options})
        self.clock = self.server.clock
        self.conn = self.connect(self.server)

    def start(self, options, app_class=None):
        options = dict(options)
        clock = options.pop("clock", None) or FakeClock(options.get("time_scale", 1))
        app = (app_class or self.app_class)(clock=clock, **{"quiet": True, **options})
        self.addCleanup(app.close)
        return app

    def connect(self, app):
        return SocketlessConnection(app)


class Logs:
    """Keeps the log's lines in `lines`."""

    def log(self, line):
        self.lines.append(line)


class LoggingApp(Logs, dummyllm._Application):
    pass


class LoggingServer(Logs, dummyllm.DummyLLMServer):
    pass


class ServerTestCase(Calls, unittest.TestCase):
    """A server on a free port for each test, for what needs its socket;
    `options` are its options."""

    options = {}
    server_class = dummyllm.DummyLLMServer

    def setUp(self):
        self.server = self.start({"latency_ms": 20, **self.options})
        self.conn = self.connect(self.server)

    def start(self, options, server_class=None):
        server = (server_class or self.server_class)(**{"port": 0, "quiet": True, **options})
        self.addCleanup(server.stop)
        return server.start()

    def connect(self, server):
        host, port = server.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=10)
        self.addCleanup(conn.close)
        return conn

    def raw(self, data, timeout=5):
        """Send raw bytes on a fresh connection; returns the socket, unread."""
        sock = socket.create_connection(self.server.server_address[:2], timeout=timeout)
        self.addCleanup(sock.close)
        sock.sendall(data)
        return sock

    def read_all(self, sock):
        """Everything the server sends until it closes the connection."""
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk

    def read_until(self, sock, end):
        data = b""
        while end not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


# --- Vocabulary -------------------------------------------------------------------

class VocabularyTest(unittest.TestCase):

    def test_every_fault_has_a_delivery_and_every_error_a_status_or_a_reason(self):
        self.assertEqual(set(dummyllm._FAULT_DELIVERY), set(dummyllm._FAULTS))
        for code, kind in dummyllm._ERRORS.items():
            with self.subTest(code=code):
                self.assertTrue(kind.message)
                self.assertTrue(kind.status is None or 400 <= kind.status <= 599)

    def test_modes_name_states_and_errors_of_the_vocabulary(self):
        for name, mode in dummyllm._MODES.items():
            with self.subTest(mode=name):
                if mode.state is None:
                    self.assertLessEqual(set(dummyllm._draws(name)), set(dummyllm._MODES))
                else:
                    self.assertIn(mode.state, dummyllm._JOB_STATES + dummyllm._REFUSED_STATES)
                    self.assertTrue(mode.error is None or mode.error in dummyllm._ERRORS)


# --- Validation and configuration -------------------------------------------------

class ConfigurationTest(unittest.TestCase):

    def test_defaults(self):
        config = dummyllm.make_config()
        self.assertEqual((config.host, config.port, config.mode, config.latency_ms, config.seed,
                          config.timeout_ms, config.max_jobs, config.max_body_bytes),
                         ("127.0.0.1", 8787, "ok", 250, None, 8000, 10000, 1 << 20))
        self.assertEqual(config.weights, {"ok": 70, "echo": 10, "slow": 10, "fail": 5,
                                          "hang": 3, "timeout": 2})

    def test_bad_values_name_the_option(self):
        for options, name in [({"mode": "fast"}, "mode"), ({"latency_ms": -1}, "latency_ms"),
                              ({"latency_ms": True}, "latency_ms"), ({"seed": 1.5}, "seed"),
                              ({"weights": {"ok": -1}}, "weights.ok"),
                              ({"weights": {"nope": 1}}, "weights.nope"),
                              ({"weights": {"ok": 0}}, "weights"), ({"port": 70000}, "port")]:
            with self.subTest(options=options):
                with self.assertRaises(ValueError) as caught:
                    dummyllm.make_config(**options)
                self.assertEqual(caught.exception.field, name)

    def test_an_integral_float_is_the_integer_it_equals(self):
        # JSON Schema's integers include 2.0; the fuzzer sends them.
        settings = dummyllm._simulate_settings(dummyllm._SIMULATE(
            {"latency_ms": 5.0, "stream": {"cut_after": 2.0}}, "simulate"),
            dummyllm.make_config())
        self.assertEqual(settings["stream"], {"cut_after": 2})
        self.assertIs(type(settings["stream"]["cut_after"]), int)
        self.assertIs(type(settings["latency_ms"]), int)

    def test_unknown_option_is_a_type_error(self):
        with self.assertRaises(TypeError):
            dummyllm.make_config(latency=5)

    def test_a_config_checks_again_to_itself(self):
        config = dummyllm.make_config(chaos_faults="reset,status:503", allow_callback_hosts="a,b")
        self.assertEqual(dummyllm.make_config(**config._asdict()), config)

    def test_command_line_then_environment_then_default(self):
        config = dummyllm._config_from_command_line(
            ["--latency-ms", "7", "--weights", "ok=1,fail=2.5"],
            {"DUMMYLLM_LATENCY_MS": "9", "DUMMYLLM_MODE": "fail", "DUMMYLLM_SEED": "42"})
        self.assertEqual((config.latency_ms, config.mode, config.seed), (7, "fail", 42))
        self.assertEqual(config.weights, {"ok": 1, "fail": 2.5})

    def test_command_line_errors_name_the_flag_or_variable(self):
        for argv, environ, named in [(["--latency-ms", "-5"], {}, "--latency-ms"),
                                     (["--latency-ms", "1_000"], {}, "--latency-ms"),
                                     (["--port", "9" * 5000], {}, "--port"),
                                     ([], {"DUMMYLLM_MODE": "nope"}, "DUMMYLLM_MODE"),
                                     (["--weights", "ok70"], {}, "--weights"),
                                     (["--bogus"], {}, "--bogus")]:
            with self.subTest(argv=argv[:2], environ=environ):
                with self.assertRaises(dummyllm._UsageError) as caught:
                    dummyllm._config_from_command_line(argv, environ)
                self.assertIn(named, str(caught.exception))

    def test_help_text_gives_each_default_once_from_the_option(self):
        text = dummyllm._argument_parser().format_help()
        for option in dummyllm._OPTIONS:
            with self.subTest(option=option.name):
                self.assertIn(option.flag, text)
                self.assertNotIn(f"({dummyllm._option_text(option.default)})", option.about)
        self.assertIn("default ok=70,echo=10,slow=10,fail=5,hang=3,timeout=2",
                      " ".join(text.split()))


class ReplyRuleTest(unittest.TestCase):
    """A rule holds when all its match keys hold for the request's facts."""

    def facts(self, messages, **facts):
        values = dict(surface="openai.chat", path="/v1/chat/completions", model="gpt-4o-mini",
                      messages=messages, headers={"x-team": "blue"}, trace_id="t-1")
        values.update(facts)
        return dummyllm._Facts(**values)

    def holds(self, match, messages=HELLO, **facts):
        rule = dummyllm._reply_rule({"match": match, "simulate": {}}, None, "runtime")
        return rule.holds(self.facts(messages, **facts))

    def test_each_match_key(self):
        tool_round = [*HELLO, {"role": "assistant", "content": ""},
                      {"role": "tool", "content": "sunny", "tool": "get_weather"}]
        for match, messages, expected in [
                ({}, HELLO, True), ({"surface": "openai.chat"}, HELLO, True),
                ({"surface": "anthropic"}, HELLO, False),
                ({"path": "/v1/chat/*"}, HELLO, True), ({"path": "/v1/messages"}, HELLO, False),
                ({"model": "gpt-4o*"}, HELLO, True), ({"model": "claude*"}, HELLO, False),
                ({"text_contains": "Hell"}, HELLO, True), ({"text_contains": "Be brief"}, HELLO,
                                                           False),  # the system's, not the user's
                ({"text_matches": "^H.l+o$"}, HELLO, True), ({"text_matches": "^x"}, HELLO, False),
                ({"last_role": "user"}, HELLO, True), ({"last_role": "tool"}, tool_round, True),
                ({"tool_result_for": "get_weather"}, tool_round, True),
                ({"tool_result_for": "get_weather"}, HELLO, False),
                ({"header": {"X-Team": "blue"}}, HELLO, True),
                ({"header": {"X-Team": "red"}}, HELLO, False),
                ({"trace_id": "t-1"}, HELLO, True),
                ({"model": "gpt-4o*", "trace_id": "other"}, HELLO, False)]:
            with self.subTest(match=match):
                self.assertIs(self.holds(match, messages), expected)

    def test_a_bad_rule_names_the_field(self):
        for rule, field in [({"match": {"text_matches": "("}, "simulate": {}},
                             "match.text_matches"),
                            ({"match": {"text_matches": "(a+)+$"}, "simulate": {}},
                             "match.text_matches"),
                            ({"match": {"surface": "bedrock"}, "simulate": {}}, "match.surface"),
                            ({"match": {"size": 1}, "simulate": {}}, "match.size"),
                            ({"simulate": {"mode": "nope"}}, "simulate.mode"),
                            ({"match": {}}, "simulate"), ([], None),
                            ({"simulate": {}, "extra": 1}, "extra")]:
            with self.subTest(rule=rule):
                with self.assertRaises(dummyllm._ValidationError) as caught:
                    dummyllm._reply_rule(rule, None, "runtime")
                self.assertEqual(caught.exception.field, field)

    def test_patterns_whose_search_can_take_minutes_are_refused(self):
        for pattern, trouble in [
                ("(a+)+$", "an unbounded repeat inside another repeat"),
                (r"(\w+\s?)*$", "an unbounded repeat inside another repeat"),
                ("(a|ab)*c", "an alternation whose choices can match the same text"),
                ("(x?)*y", "a part that can match nothing"),
                ("(ab?b?)*c", "two repeats in a row"),
                ("((a|b){1,3})*c", "can end where its next turn begins"),
                ("a*a*c", "two repeats in a row"),
                (r"\w+\d+!", "two repeats in a row"),
                ("[ab]+(?:.*?)?c", "two repeats in a row"),
                (r".{0,5}\w*c", "two repeats in a row"),
                ("(?i)^W.*weather.*paris", "two repeats in a row")]:
            with self.subTest(pattern=pattern):
                with self.assertRaises(dummyllm._ValidationError) as caught:
                    dummyllm._reply_rule({"match": {"text_matches": pattern}, "simulate": {}},
                                         None, "runtime")
                self.assertEqual(caught.exception.field, "match.text_matches")
                self.assertIn(trouble, caught.exception.message)
        for pattern in ("weather.*Paris", r"^\w+@\w+\.com$", "(foo|bar)+", r"\d+-\d+",
                        r"\bParis\b", r"\s*\w+\s*", "(a|b)*c", "[^x]*y", "x{2,5}",
                        r"(\d{1,3}\.){3}\d{1,3}", "a?.*z"):
            self.assertIsNotNone(dummyllm._reply_rule({"match": {"text_matches": pattern},
                                                       "simulate": {}}, None, "runtime"))

    def test_rules_from_make_config_and_a_file(self):
        rules = [{"match": {"model": "x"}, "simulate": {"mode": "fail"}}]
        config = dummyllm.make_config(rules=rules)
        self.assertEqual([rule.to_json(0) for rule in config.rules],
                         [{"index": 0, "source": "file", "test_id": None, **rules[0]}])
        with self.assertRaises(ValueError) as caught:
            dummyllm.make_config(rules=[{"simulate": {"latency_ms": -1}}])
        self.assertIn("rules[0].simulate.latency_ms", str(caught.exception))


# --- Simulation -------------------------------------------------------------------

class SimulationTest(unittest.TestCase):

    def test_ok_runs_after_queue_and_ends_after_latency(self):
        p = plan(mode="ok", latency_ms=100, queue_ms=30)
        self.assertEqual((p.mode, p.running_at_ms, p.ends_at_ms, p.state), ("ok", 30, 130, "ok"))
        self.assertIsNone(p.error)

    def test_replies(self):
        chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant",
                                                                  "content": "Yo"}]}
        self.assertEqual(plan(args=chat).result["text"], "Simulated reply to: Hi")
        self.assertEqual(plan(op="embed").result["text"], "ok :: op=embed")
        self.assertEqual(plan(ok_text="fixed", args=chat).result["text"], "fixed")
        self.assertEqual(plan(mode="echo", args=chat).result["text"],
                         '[{"role":"user","content":"Hi"},{"role":"assistant","content":"Yo"}]')

    def test_usage_counts_a_token_per_started_four_characters(self):
        args = {"messages": [{"role": "user", "content": "12345"},      # 2
                             {"role": "user", "content": "1234"},       # 1
                             {"role": "user", "content": [{"text": "ignored"}]}]}
        usage = plan(args=args, ok_text="123456789").result["usage"]
        self.assertEqual(usage, {"prompt_tokens": 3, "completion_tokens": 3})

    def test_slow_multiplies_latency(self):
        p = plan(mode="slow", latency_ms=50)
        self.assertEqual((p.latency_ms, p.ends_at_ms, p.state), (300, 300, "ok"))

    def test_fail(self):
        p = plan(mode="fail", fail_message="boom")
        self.assertEqual((p.state, p.ends_at_ms, p.result), ("fail", 100, None))
        self.assertEqual(p.error, {"code": "SIM_FAIL", "message": "boom"})
        self.assertEqual(plan(mode="fail").error["message"], "simulated error")

    def test_hang_never_ends_and_ignores_the_deadline(self):
        p = plan(mode="hang", timeout_ms=50, queue_ms=10)
        self.assertEqual((p.state, p.running_at_ms, p.ends_at_ms), ("running", 10, None))

    def test_timeout_ends_at_the_deadline(self):
        p = plan(mode="timeout", timeout_ms=700)
        self.assertEqual((p.state, p.ends_at_ms, p.error["code"]), ("timeout", 700, "TIMEOUT"))

    def test_server_deadline_cuts_long_jobs(self):
        p = plan(mode="ok", latency_ms=600, queue_ms=500, timeout_ms=1000)
        self.assertEqual((p.state, p.ends_at_ms, p.result), ("timeout", 1000, None))
        exact = plan(mode="ok", latency_ms=500, queue_ms=500, timeout_ms=1000)
        self.assertEqual(exact.state, "ok")
        never_runs = plan(mode="fail", queue_ms=2000, timeout_ms=1000)
        self.assertEqual((never_runs.running_at_ms, never_runs.state), (None, "timeout"))

    def test_refusing_modes_end_at_once_without_a_deadline(self):
        p = plan(mode="rate_limit", latency_ms=5000, timeout_ms=10)
        self.assertEqual((p.state, p.ends_at_ms, p.error["code"]), ("rate_limited", 0,
                                                                     "RATE_LIMITED"))

    def test_unit_draw_is_a_fixed_function(self):
        # Pinned: changing the hash breaks every user's recorded sequence.
        self.assertEqual(dummyllm._unit_draw(1337, "X", 0, "flaky"), 0.38226001581694646)

    def test_weighted_choice_walks_modes_in_table_order(self):
        weights = {"fail": 1, "ok": 1}
        self.assertEqual(dummyllm._weighted_choice(weights, 0.0), "ok")
        self.assertEqual(dummyllm._weighted_choice(weights, 0.49), "ok")
        self.assertEqual(dummyllm._weighted_choice(weights, 0.5), "fail")
        self.assertEqual(dummyllm._weighted_choice(weights, 0.999999), "fail")
        self.assertEqual(dummyllm._weighted_choice({"ok": 0, "hang": 2}, 0.0), "hang")

    def test_seeded_sequences_are_fixed(self):
        flaky = [plan(n, 1337, mode="flaky", trace_id="X").mode for n in range(6)]
        self.assertEqual(flaky, ["fail", "hang", "hang", "ok", "fail", "fail"])
        drawn = [plan(n, 1337, mode="random", trace_id="X").mode for n in range(5)]
        self.assertEqual(drawn, ["slow", "fail", "fail", "ok", "ok"])

    def test_request_weights_override_the_defaults(self):
        p = plan(mode="flaky", weights={"hang": 1})
        self.assertEqual((p.mode, p.weights), ("hang", {"hang": 1}))
        self.assertEqual(plan(mode="random", weights={"echo": 1}).mode, "echo")

    def test_a_stream_timeline_is_lazy_and_ends_as_its_failure_says(self):
        def events(text, failure=None, tool_calls=None):
            reply = dummyllm._Reply(text, tool_calls, "end", None, 0, 0, 0, dummyllm._Gaps(10, None))
            return list(dummyllm._stream_timeline(reply, failure))
        self.assertEqual(events("abcdefghi"), [
            (0, "open", None), (0, "piece", "abcd"), (10, "piece", "efgh"),
            (20, "piece", "i"), (20, "close", None)])
        self.assertEqual(events("abcdefghi", {"cut_after": 1})[-1], (0, "piece", "abcd"))
        self.assertEqual(events("abcdefghi", {"truncate_after": 2})[-1], (10, "piece", "efgh"))
        self.assertEqual(events("abcdefghi", {"error_after": 2})[-1], (20, "error", None))
        self.assertEqual(events("abcdefghi", {"malformed_after": 1})[-1],
                         (10, "malformed", ("piece", "efgh")))
        self.assertEqual(events(""), [(0, "open", None), (0, "close", None)])
        reply = dummyllm._Reply("x" * 10 ** 7, None, "end", None, 0, 0, 0, dummyllm._Gaps(1, None))
        timeline = dummyllm._stream_timeline(reply, None)
        self.assertEqual(next(timeline), (0, "open", None))  # nothing built ahead

    def test_a_distribution_draws_from_the_seeded_sequence(self):
        for dist in ("normal", "lognormal"):
            with self.subTest(dist=dist):
                profile = {"mean": 100, "stdev": 10, "dist": dist}
                draws = [dummyllm._amount(profile, (7, "k", n), "ttft", 10 ** 6)
                         for n in range(2000)]
                self.assertEqual(draws, [dummyllm._amount(profile, (7, "k", n), "ttft", 10 ** 6)
                                         for n in range(2000)])
                self.assertAlmostEqual(statistics.fmean(draws), 100, delta=5)
                self.assertAlmostEqual(statistics.pstdev(draws), 10, delta=0.5)
        wide = [dummyllm._amount({"mean": 1, "stdev": 100, "dist": "normal"}, (7, "k", n), "x",
                                 50) for n in range(200)]
        self.assertEqual((min(wide), max(wide)), (0, 50))  # clamped at zero, and at the most
        self.assertEqual(dummyllm._amount(12, (7, "k", 0), "x", 50), 12)
        for mean in (3.9e-215, 1e-300, 5e-324):  # a fuzzer's: its stdev ratio past a float
            tiny = {"mean": mean, "stdev": 64, "dist": "lognormal"}
            self.assertTrue(all(0 <= dummyllm._amount(tiny, (7, "k", n), "x", 50) <= 50
                                for n in range(100)))

    def test_time_to_first_token_and_token_gaps_follow_their_profile(self):
        profile = {"ttft_ms": {"mean": 100, "stdev": 10, "dist": "normal"},
                   "token_ms": {"mean": 10, "stdev": 1, "dist": "lognormal"},
                   "output_tokens": 2000}
        first = [plan(n, 3, **profile).latency_ms for n in range(300)]
        self.assertEqual(first, [plan(n, 3, **profile).latency_ms for n in range(300)])
        self.assertAlmostEqual(statistics.fmean(first), 100, delta=5)
        drawn = plan(0, 3, **profile)
        times = [ms for ms, event, _ in dummyllm._stream_timeline(
            dummyllm._reply(spec(**profile), drawn, None), None) if event == "piece"]
        gaps = [later - earlier for earlier, later in zip(times, times[1:])]
        self.assertEqual(len(gaps), 1999)
        self.assertAlmostEqual(statistics.fmean(gaps), 10, delta=0.5)
        self.assertAlmostEqual(statistics.pstdev(gaps), 1, delta=0.05)
        prompt = {"messages": [{"role": "user", "content": "x" * 400}]}  # 100 tokens
        self.assertEqual(plan(args=prompt, latency_ms=50, prefill_ms_per_token=0.5).latency_ms,
                         100)

    def test_reasoning_streams_first_and_counts_in_the_usage(self):
        """simulate.reasoning: a text, or a length (0: none); its pieces come
        first, a token gap apart, so a reasoning model's answer is late."""
        for reasoning, expected in (("Think it over", "Think it over"),
                                    (3, "Simulated re"), (0, None)):
            with self.subTest(reasoning=reasoning):
                drawn = plan(0, 3, reasoning=reasoning, token_ms=10)
                reply = dummyllm._reply(spec(reasoning=reasoning, token_ms=10), drawn, None)
                self.assertEqual(reply.reasoning, expected)
                thinking = dummyllm._tokens(expected or "")
                self.assertEqual(reply.completion_tokens, dummyllm._tokens(reply.text) + thinking)
                timeline = list(dummyllm._stream_timeline(reply, None))
                thoughts = [piece for _, event, piece in timeline if event == "thought"]
                self.assertEqual("".join(thoughts), expected or "")
                first = next(ms for ms, event, _ in timeline if event == "piece")
                self.assertEqual(first, 10 * (thinking + 1) if thinking else 0)
                self.assertEqual(dummyllm._piece_count(reply),
                                 sum(event not in ("open", "close") for _, event, _ in timeline))

    def test_a_tool_call_streams_its_name_then_its_arguments_in_pieces(self):
        call = {"id": "call_1", "name": "f", "arguments": {"city": "Paris"}}
        timeline = list(dummyllm._stream_timeline(
            dummyllm._Reply("", [call], "tool_calls", None, 0, 0, 0, dummyllm._Gaps(10, None)), None))
        self.assertEqual(timeline[:2], [(0, "open", None), (0, "call", 0)])
        pieces = [piece for _, event, piece in timeline if event == "arguments"]
        self.assertGreaterEqual(len(pieces), 2)
        self.assertEqual("".join(text for _, text in pieces), '{"city": "Paris"}')
        self.assertEqual([event for _, event, _ in timeline[-2:]], ["call_done", "close"])


# JSON Schemas as zod 4 emits them (z.toJSONSchema), and the edge cases of the
# keywords dummyLLM draws values for; pydantic's come from PYDANTIC_MODELS.
SCHEMA_CORPUS = {'zod user': {'$schema': 'https://json-schema.org/draft/2020-12/schema',
              'type': 'object',
              'properties': {'id': {'type': 'string',
                                    'format': 'uuid',
                                    'pattern': '^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[1-8][0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}|00000000-0000-0000-0000-000000000000|ffffffff-ffff-ffff-ffff-ffffffffffff)$'},
                             'email': {'type': 'string',
                                       'format': 'email',
                                       'pattern': "^(?:[A-Za-z0-9_'+\\-]+\\.)*[A-Za-z0-9_'+\\-]*[A-Za-z0-9_+-]@(?:[A-Za-z0-9][A-Za-z0-9\\-]*\\.)+[A-Za-z]{2,}$"},
                             'name': {'type': 'string', 'minLength': 1, 'maxLength': 40},
                             'age': {'type': 'integer', 'minimum': 0, 'maximum': 130}},
              'required': ['id', 'email', 'name'],
              'additionalProperties': False},
 'zod event': {'$schema': 'https://json-schema.org/draft/2020-12/schema',
               'type': 'object',
               'properties': {'at': {'type': 'string',
                                     'format': 'date-time',
                                     'pattern': '^(?:(?:\\d\\d[2468][048]|\\d\\d[13579][26]|\\d\\d0[48]|[02468][048]00|[13579][26]00)-02-29|\\d{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\\d|30)|(?:02)-(?:0[1-9]|1\\d|2[0-8])))T(?:(?:[01]\\d|2[0-3]):[0-5]\\d:[0-5]\\d(?:\\.\\d+)?(?:Z))$'},
                              'day': {'type': 'string',
                                      'format': 'date',
                                      'pattern': '^(?:(?:\\d\\d[2468][048]|\\d\\d[13579][26]|\\d\\d0[48]|[02468][048]00|[13579][26]00)-02-29|\\d{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\\d|30)|(?:02)-(?:0[1-9]|1\\d|2[0-8])))$'},
                              'tags': {'minItems': 1,
                                       'maxItems': 3,
                                       'type': 'array',
                                       'items': {'type': 'string'}},
                              'kind': {'type': 'string', 'enum': ['a', 'b', 'c']}},
               'required': ['at', 'day', 'tags', 'kind'],
               'additionalProperties': False},
 'zod union': {'$schema': 'https://json-schema.org/draft/2020-12/schema',
               'type': 'object',
               'properties': {'value': {'type': ['string', 'number']},
                              'maybe': {'type': ['string', 'null']},
                              'literal': {'type': 'string', 'const': 'fixed'}},
               'required': ['value', 'maybe', 'literal'],
               'additionalProperties': False},
 'zod discriminated': {'$schema': 'https://json-schema.org/draft/2020-12/schema',
                       'oneOf': [{'type': 'object',
                                  'properties': {'type': {'type': 'string', 'const': 'circle'},
                                                 'radius': {'type': 'number',
                                                            'exclusiveMinimum': 0}},
                                  'required': ['type', 'radius'],
                                  'additionalProperties': False},
                                 {'type': 'object',
                                  'properties': {'type': {'type': 'string', 'const': 'square'},
                                                 'side': {'type': 'number',
                                                          'exclusiveMinimum': 0,
                                                          'exclusiveMaximum': 10}},
                                  'required': ['type', 'side'],
                                  'additionalProperties': False}]},
 'zod nested': {'$schema': 'https://json-schema.org/draft/2020-12/schema',
                'type': 'object',
                'properties': {'order': {'type': 'object',
                                         'properties': {'items': {'type': 'array',
                                                                  'items': {'type': 'object',
                                                                            'properties': {'sku': {'type': 'string'},
                                                                                           'qty': {'type': 'integer',
                                                                                                   'exclusiveMinimum': 0,
                                                                                                   'maximum': 9007199254740991}},
                                                                            'required': ['sku',
                                                                                         'qty'],
                                                                            'additionalProperties': False}},
                                                        'total': {'type': 'number',
                                                                  'multipleOf': 0.01}},
                                         'required': ['items', 'total'],
                                         'additionalProperties': False},
                               'notes': {'default': 'none', 'type': 'string'}},
                'required': ['order', 'notes'],
                'additionalProperties': False},
 'zod tuple': {'$schema': 'https://json-schema.org/draft/2020-12/schema',
               'type': 'array',
               'prefixItems': [{'type': 'string'}, {'type': 'number'}, {'type': 'boolean'}],
               'items': False,
               'minItems': 3,
               'maxItems': 3},
 'zod record': {'$schema': 'https://json-schema.org/draft/2020-12/schema',
                'type': 'object',
                'propertyNames': {'type': 'string'},
                'additionalProperties': {'type': 'number'}},
 'zod url': {'$schema': 'https://json-schema.org/draft/2020-12/schema',
             'type': 'object',
             'properties': {'home': {'type': 'string', 'format': 'uri'},
                            'when': {'type': 'string',
                                     'pattern': '^(?:[01]\\d|2[0-3]):[0-5]\\d(?::[0-5]\\d(?:\\.\\d+)?)?$'}},
             'required': ['home', 'when'],
             'additionalProperties': False},
 'zod intersection': {'$schema': 'https://json-schema.org/draft/2020-12/schema',
                      'type': 'object',
                      'properties': {'a': {'type': 'string'}, 'b': {'type': 'number'}},
                      'required': ['a', 'b'],
                      'additionalProperties': False},
 'zod bigint_like': {'$schema': 'https://json-schema.org/draft/2020-12/schema',
                     'type': 'object',
                     'properties': {'n': {'type': 'integer',
                                          'minimum': 0,
                                          'maximum': 9007199254740991},
                                    'f': {'type': 'number', 'minimum': -5, 'maximum': 5}},
                     'required': ['n', 'f'],
                     'additionalProperties': False},
 'type list with null': {'type': ['string', 'null'], 'minLength': 3},
 'draft 4 exclusive flags': {'$schema': 'http://json-schema.org/draft-04/schema#',
                             'type': 'number',
                             'minimum': 0,
                             'exclusiveMinimum': True,
                             'maximum': 1,
                             'exclusiveMaximum': True},
 'integer multipleOf': {'type': 'integer', 'multipleOf': 7, 'minimum': 10, 'maximum': 30},
 'exclusive integer bounds': {'type': 'integer', 'exclusiveMinimum': 5, 'exclusiveMaximum': 7},
 'enum of mixed values': {'enum': [1, 'two', None, {'three': 3}]},
 'const object': {'const': {'a': [1, 2]}},
 'prefixItems and no more': {'type': 'array',
                             'prefixItems': [{'type': 'string'}, {'type': 'integer'}],
                             'items': False},
 'draft 4 tuple items': {'$schema': 'http://json-schema.org/draft-04/schema#',
                         'type': 'array',
                         'items': [{'type': 'boolean'}, {'type': 'null'}],
                         'additionalItems': False},
 'unique enum items': {'type': 'array',
                       'items': {'enum': ['x', 'y', 'z']},
                       'minItems': 3,
                       'uniqueItems': True},
 'unique booleans': {'type': 'array',
                     'items': {'type': 'boolean'},
                     'minItems': 2,
                     'uniqueItems': True},
 'allOf merge': {'allOf': [{'type': 'object',
                            'properties': {'a': {'type': 'string'}},
                            'required': ['a']},
                           {'properties': {'b': {'type': 'integer', 'minimum': 3}},
                            'required': ['b']}]},
 'anyOf first null': {'anyOf': [{'type': 'null'}, {'type': 'integer', 'minimum': 1}]},
 'recursive definitions': {'definitions': {'tree': {'type': 'object',
                                                    'properties': {'name': {'type': 'string'},
                                                                   'kids': {'type': 'array',
                                                                            'items': {'$ref': '#/definitions/tree'}}},
                                                    'required': ['name', 'kids']}},
                           '$ref': '#/definitions/tree'},
 'additionalProperties schema': {'type': 'object',
                                 'additionalProperties': {'type': 'integer'},
                                 'minProperties': 2},
 'required without properties': {'type': 'object', 'required': ['x', 'y']},
 'strict openai object': {'type': 'object',
                          'properties': {'name': {'type': 'string'},
                                         'age': {'type': ['integer', 'null']}},
                          'required': ['name', 'age'],
                          'additionalProperties': False},
 'examples preferred': {'type': 'string', 'examples': ['first example', 'second']},
 'format without type': {'format': 'email'},
 'string maxLength short': {'type': 'string', 'maxLength': 2},
 'number without bounds': {'type': 'number'},
 'negative range': {'type': 'number', 'maximum': -10, 'multipleOf': 0.25},
 'empty schema': {},
 'true schema': True,
 'hostname ipv4 ipv6 duration': {'type': 'object',
                                 'properties': {'h': {'type': 'string', 'format': 'hostname'},
                                                'v4': {'type': 'string', 'format': 'ipv4'},
                                                'v6': {'type': 'string', 'format': 'ipv6'},
                                                'd': {'type': 'string', 'format': 'duration'}},
                                 'required': ['h', 'v4', 'v6', 'd']}}

if pydantic is not None:
    class Address(pydantic.BaseModel):
        street: str
        city: str
        zip: typing.Optional[str] = None

    class Person(pydantic.BaseModel):
        name: str
        age: int = pydantic.Field(ge=0, le=150)
        address: Address
        emails: typing.List[str] = []

    class Node(pydantic.BaseModel):
        value: int
        children: typing.List["Node"] = []

    class Weather(pydantic.BaseModel):
        city: str
        unit: typing.Literal["c", "f"] = "c"

    class Colour(str, enum.Enum):
        red = "red"
        green = "green"

    class Inventory(pydantic.BaseModel):
        counts: typing.Dict[str, int]
        colours: typing.List[Colour]

    class Meeting(pydantic.BaseModel):
        when: datetime.datetime
        day: datetime.date
        id: uuid.UUID
        link: pydantic.AnyUrl

    class Cat(pydantic.BaseModel):
        kind: typing.Literal["cat"]
        lives: int = pydantic.Field(gt=0, lt=10)

    class Dog(pydantic.BaseModel):
        kind: typing.Literal["dog"]
        good: bool

    class Pet(pydantic.BaseModel):
        pet: typing.Union[Cat, Dog] = pydantic.Field(discriminator="kind")

    class Money(pydantic.BaseModel):
        amount: float = pydantic.Field(multiple_of=0.5, ge=0)
        currency: str = pydantic.Field(min_length=3, max_length=3)

    class Pair(pydantic.BaseModel):
        pair: typing.Tuple[int, str]
        maybe: typing.Optional[float]

    class Tagged(pydantic.BaseModel):
        tags: typing.List[str] = pydantic.Field(min_length=2, max_length=4)
        score: typing.Optional[typing.Union[int, str]] = None

    class Order(pydantic.BaseModel):
        items: typing.List[Address]
        customer: Person
        notes: str = pydantic.Field(default="none", examples=["leave at door"])

    PYDANTIC_MODELS = [Address, Person, Node, Weather, Inventory, Meeting, Pet, Money, Pair,
                       Tagged, Order, City]


def draw_for(schema, n=0, seed=7, key="k"):
    return dummyllm._sample(schema, dummyllm._series(seed, key, n, "json"))


class SchemaSamplerTest(unittest.TestCase):
    """JSON drawn for a schema: deterministic, and a 400 where none can be drawn."""

    def test_the_same_seed_key_and_n_draw_the_same_json(self):
        schema = SCHEMA_CORPUS["zod nested"]
        self.assertEqual(draw_for(schema, 3), draw_for(schema, 3))
        self.assertNotEqual([draw_for(schema, n) for n in range(5)],
                            [draw_for(schema, n, seed=8) for n in range(5)])

    def test_a_default_then_an_example_is_taken_as_it_is(self):
        self.assertEqual(draw_for({"type": "string", "default": "d", "examples": ["e"]}), "d")
        self.assertEqual(draw_for({"type": "string", "examples": ["e", "f"]}), "e")

    def test_a_pattern_is_met_by_a_known_format_or_a_word(self):
        self.assertEqual(draw_for({"type": "string", "pattern": "^[a-z]+$"}), "alpha")
        self.assertEqual(draw_for({"type": "string", "pattern": r"^\d\d:\d\d:\d\d$"}), "09:30:00")

    def test_what_cannot_be_drawn_is_a_400_naming_the_schema_path(self):
        for schema, field in [
                ({"type": "object", "properties": {"code": {"type": "string",
                                                            "pattern": r"^\d{3}-[A-Z]{2}$"}}},
                 "s.properties.code.pattern"),
                ({"type": "integer", "minimum": 5, "maximum": 4}, "s"),
                ({"type": "array", "items": False, "minItems": 1}, "s"),
                ({"properties": {"a": False}, "required": ["a"]}, "s.properties.a"),
                ({"$ref": "#/$defs/missing"}, "s.$ref"), ({"type": "colour"}, "s.type"),
                ({"type": "string", "format": "email", "pattern": "^x$"}, "s.pattern"),
                ({"type": "string", "minLength": "3"}, "s"),
                ({"$ref": "#"}, "s")]:
            with self.subTest(schema=schema):
                with self.assertRaises(dummyllm._ValidationError) as caught:
                    dummyllm._drawn(schema, dummyllm._series(0, "", 0, "json"), "s")
                self.assertEqual(caught.exception.field, field)

    def test_recursive_schemas_end(self):
        value = draw_for(SCHEMA_CORPUS["recursive definitions"])
        depth = 0
        while value["kids"]:
            value, depth = value["kids"][0], depth + 1
        self.assertLess(depth, 10)

    def test_a_forced_tool_is_called_and_structured_output_is_json(self):
        tool = {"name": "get_weather", "field": "tools[0].function.parameters",
                "schema": WEATHER}
        result = plan(forced_tool=tool).result
        self.assertEqual(result["text"], "")
        [call] = result["tool_calls"]
        self.assertEqual(call["name"], "get_weather")
        self.assertRegex(call["id"], r"\Acall_[0-9a-f]{24}\Z")
        self.assertIn(call["arguments"]["unit"], ("c", "f"))
        output = {"schema": WEATHER, "field": "response_format"}
        self.assertEqual(json.loads(plan(output=output).result["text"]).keys(),
                         {"city", "unit"})
        json_object = {"schema": True, "field": "response_format"}
        self.assertEqual(json.loads(plan(output=json_object, args={"messages": HELLO})
                                    .result["text"]), {"text": "Simulated reply to: Hello"})

    def test_a_jobs_free_form_args_ask_for_nothing(self):
        result = plan(args={"forced_tool": 1, "output": 2, "messages": HELLO}).result
        self.assertEqual(result["text"], "Simulated reply to: Hello")

    def test_simulate_wins_over_what_the_request_asks(self):
        tool = {"name": "f", "field": "tools", "schema": {}}
        calls = [{"name": "g", "arguments": "{not json", "id": None}]
        result = plan(forced_tool=tool, tool_calls=calls).result
        self.assertEqual([(call["name"], call["arguments"]) for call in result["tool_calls"]],
                         [("g", "{not json")])  # sent as given: the agent's error path
        self.assertEqual(plan(forced_tool=tool, ok_text="plain").result["text"],
                         "plain")


@needs(jsonschema and pydantic, "jsonschema", "DUMMYLLM_REQUIRE_JSONSCHEMA")
class SchemaCorpusTest(unittest.TestCase):
    """Every value drawn validates against its schema, by the jsonschema package."""

    def test_every_schema_of_the_corpus_gets_valid_values(self):
        corpus = {**SCHEMA_CORPUS, **{"pydantic " + model.__name__: model.model_json_schema()
                                      for model in PYDANTIC_MODELS}}
        self.assertGreaterEqual(len(corpus), 40)
        for name, schema in corpus.items():
            validator = jsonschema.validators.validator_for(
                schema, default=jsonschema.Draft202012Validator)
            validator = validator(schema, format_checker=validator.FORMAT_CHECKER)
            for n in range(20):
                with self.subTest(schema=name, n=n):
                    value = draw_for(schema, n)
                    self.assertEqual(list(validator.iter_errors(value)), [], value)


# --- Surfaces: the protocol -------------------------------------------------------

def _acme_event(render, name, data):
    return b"@" + name.encode() + b" " + data + b"\n"


class Acme(dummyllm._Surface):
    """A provider declared only here, as a new one is declared: its path,
    error shape, headers, quota headers and stream framing are its own."""

    name = "acme"
    keyed = True
    error_schema = "AcmeError"
    validation_status = 400
    error_types = {429: "slow_down", "4xx": "bad_request", "5xx": "broken"}
    finish = {"end": "done", "max_tokens": "cut", "stop_sequence": "done", "tool_calls": "tools"}
    framing = dummyllm._Framing("text/x-acme-stream", _acme_event, b"BEGIN\n", b"END\n")
    request_headers = ("acme-key",)
    quota_header = "acme-{kind}-{part}"
    REQUEST = {
        "model": dummyllm._MODEL,
        "say": dummyllm._Field(dummyllm._Text(), dummyllm._REQUIRED, "What to answer to."),
        "stream": dummyllm._Field(dummyllm._Bool(), False, "Answer as a stream of lines."),
        "max_words": dummyllm._Field(dummyllm._Int(1, 1000), None, "Cut the answer."),
        **dummyllm._EXTENSIONS,
    }

    def schemas(self):
        return {
            "AcmeError": {"type": "object", "required": ["problem", "detail"], "properties": {
                "problem": {"type": "string"}, "detail": {"type": "string"}}},
            "AcmeRequest": dummyllm._object_schema(self.REQUEST),
            "AcmeAnswer": {"type": "object", "required": ["said", "why"], "properties": {
                "said": {"type": "string"}, "why": {"type": "string"}}},
            "AcmeText": dummyllm._object({"text": {"type": "string"}}),
            "AcmeLast": dummyllm._object({"why": {"type": "string"}}),
        }

    def credential(self, request):
        return request.headers.get("acme-key")

    def error_body(self, error, status, retry_ms):
        return {"problem": self.error_type(error, status), "detail": error.message}

    def parse(self, request, config):
        values = dummyllm._with_defaults(dummyllm._given(dummyllm._json_body(request),
                                                         self.REQUEST, None), self.REQUEST,
                                         config)
        return self.call(request, config, model=values["model"], stream=values["stream"],
                         messages=[{"role": "user", "content": values["say"]}],
                         max_tokens=values["max_words"], user=None,
                         timeout_ms=values["timeout_ms"], simulate=values["simulate"])

    def answer(self, call, reply, created):
        return {"said": reply.text, "why": self.finish[reply.end]}

    def text(self, render, text):
        return {"text": text}

    def last(self, render, piece):
        return {"why": self.finish[render.reply.end]}

    stream_events = {"open": (), "call": (), "arguments": (), "call_done": (),
                     "piece": (("text", text, "AcmeText"),), "close": (("last", last, "AcmeLast"),),
                     "error": (("oops", dummyllm._Surface.error_event, "AcmeError"),)}
    routes = (dummyllm._route("POST", "/acme/v1/say", dummyllm._model_call,
                              api=dummyllm._model_api("Acme: an answer", "AcmeRequest",
                                                      {200: "AcmeAnswer", 429: None})),)


class Brittle(Acme):
    """Acme, but the last event of a reply with a "!" fails to render (a
    bug); with "!!", its error event fails too."""

    name = "brittle"

    def last(self, render, piece):
        if "!" in render.reply.text:
            raise RuntimeError("a bug in a renderer")
        return super().last(render, piece)

    def oops(self, render, piece):
        if "!!" in render.reply.text:
            raise RuntimeError("a bug in the error event too")
        return self.error_event(render, piece)

    stream_events = dict(Acme.stream_events, close=(("last", last, "AcmeLast"),),
                         error=(("oops", oops, "AcmeError"),))
    routes = (dummyllm._route("POST", "/brittle/v1/say", dummyllm._model_call,
                              api=Acme.routes[0].api),)


class Registers:
    """Registers surfaces for each test (before its application is made)."""

    surfaces = (Acme(), Brittle())

    def setUp(self):
        for surface in self.surfaces:
            dummyllm._register(surface)
            self.addCleanup(dummyllm._unregister, surface)
        super().setUp()


def acme_lines(data):
    """The events of an Acme stream: (name, JSON or None for BEGIN/END)."""
    lines = []
    for line in data.decode().splitlines():
        name, _, payload = line.partition(" ")
        lines.append((name, json.loads(payload) if payload else None))
    return lines


class SurfaceProtocolTest(Registers, AppTestCase):
    """A surface declared in this file and registered is served in full: its
    answers, streams, errors, modes, stream failures, quotas, rules, the
    journal, the verdict and the API document."""

    options = {"latency_ms": 0, "seed": 1}

    def say(self, headers=None, **body):
        body.setdefault("model", "roadrunner")
        body.setdefault("say", "Meep meep")
        self.conn.request("POST", "/acme/v1/say", json.dumps(body), headers or {})
        response = self.conn.getresponse()
        return response.status, response.read(), response

    def test_an_answer_and_a_stream(self):
        status, data, response = self.say()
        self.assertEqual((status, json.loads(data)),
                         (200, {"said": "Simulated reply to: Meep meep", "why": "done"}))
        status, data, response = self.say(stream=True, max_words=2,
                                          simulate={"token_ms": 10})
        self.assertEqual((status, response.getheader("Content-Type")),
                         (200, "text/x-acme-stream"))
        self.assertEqual(acme_lines(data), [("BEGIN", None), ("@text", {"text": "Simu"}),
                                            ("@text", {"text": "late"}),
                                            ("@last", {"why": "cut"}), ("END", None)])

    def test_every_mode(self):
        expected = {"ok": 200, "echo": 200, "slow": 200, "fail": 500, "timeout": 504,
                    "rate_limit": 429, "overloaded": 503, "quota_exhausted": 429}
        for mode, mode_status in expected.items():
            with self.subTest(mode=mode):
                status, data, response = self.say(simulate={"mode": mode})
                self.assertEqual(status, mode_status, data)
                if status != 200:
                    body = json.loads(data)
                    self.assertEqual(body["problem"], "slow_down" if status == 429 else "broken")
                    self.assertEqual(response.getheader("retry-after") is not None,
                                     mode in ("rate_limit", "overloaded"))
        with self.assertRaises(socket.timeout):  # hang: nothing is ever sent
            self.say(simulate={"mode": "hang"})
        for mode in ("flaky", "random"):  # what they draw answers as that mode does
            for _ in range(5):
                try:
                    status = self.say(simulate={"mode": mode})[0]
                except socket.timeout:
                    status = None  # hang
                self.assertIn(status, {None, *expected.values()})

    def test_every_stream_failure(self):
        def stream(kind, count=1):
            return self.say(stream=True, simulate={"stream": {kind: count}})
        _, data, _ = stream("error_after")
        self.assertEqual(acme_lines(data)[-2:], [("@oops", {
            "problem": "broken", "detail": "simulated stream error"}), ("END", None)])
        self.assertEqual([name for name, _ in acme_lines(stream("truncate_after", 2)[1])],
                         ["BEGIN", "@text", "@text"])
        data = stream("malformed_after")[1].decode().splitlines()
        self.assertEqual(json.loads(data[1].partition(" ")[2]), {"text": "Simu"})
        self.assertRaises(ValueError, json.loads, data[2].partition(" ")[2])
        self.conn.request("POST", "/acme/v1/say", json.dumps({
            "model": "m", "say": "x", "stream": True, "simulate": {"stream": {"cut_after": 1}}}))
        with self.assertRaises(http.client.IncompleteRead):
            self.conn.getresponse().read()
        self.conn.request("POST", "/acme/v1/say", json.dumps({
            "model": "m", "say": "x", "stream": True,
            "simulate": {"stream": {"stall_after": 1}}}))
        with self.assertRaises(socket.timeout):
            self.conn.getresponse().read()

    def test_its_errors_key_and_quota_headers(self):
        status, data, _ = self.say(say=5)
        self.assertEqual((status, json.loads(data)), (400, {
            "problem": "bad_request", "detail": "say must be a string"}))
        self.assertEqual(self.call("POST", "/acme/v1/nope", {})[1]["problem"], "bad_request")
        keyed = self.start({"api_key": "k", "rpm": 1})
        self.conn = self.connect(keyed)
        self.assertEqual(self.say()[0], 401)
        status, _, response = self.say({"acme-key": "k"})
        self.assertEqual((status, response.getheader("acme-requests-remaining")), (200, "0"))
        status, data, response = self.say({"acme-key": "k"})
        self.assertEqual((status, json.loads(data)["problem"]), (429, "slow_down"))
        self.assertEqual(response.getheader("acme-requests-limit"), "1")

    def test_rules_the_journal_and_the_verdict(self):
        self.server.add_rule({"match": {"surface": "acme", "text_contains": "Meep"},
                              "simulate": {"script": [
                                  {"mode": "rate_limit", "retry_after_ms": 1000}, "ok"]}})
        self.assertIn("acme", self.call("GET", "/v1/rules")[1]["surfaces"])
        headers = {"X-Trace-Id": "coyote"}
        self.assertEqual([self.say(headers)[0] for _ in range(2)], [429, 200])  # at once
        entries = self.journal("?trace_id=coyote")
        self.assertEqual([(entry["path"], entry["rule"], entry["retry_after_ms"])
                          for entry in entries],
                         [("/acme/v1/say", 0, 1000), ("/acme/v1/say", 0, None)])
        finding, = self.server.verdict("coyote")["findings"]
        self.assertEqual(finding["code"], "RETRY_AFTER_IGNORED")

    def test_the_api_document_and_cors(self):
        document = self.call("GET", "/openapi.json")[1]
        operation = document["paths"]["/acme/v1/say"]["post"]
        self.assertEqual(operation["requestBody"]["content"]["application/json"]["schema"],
                         {"$ref": "#/components/schemas/AcmeRequest"})
        self.assertEqual(operation["responses"]["default"]["content"]["application/json"]
                         ["schema"], {"$ref": "#/components/schemas/AcmeError"})
        self.assertIn("AcmeAnswer", document["components"]["schemas"])
        browser = self.start({"cors": "*"})
        self.assertIn("acme-key", browser.cors_allowed.split(", "))
        self.assertIn("Access-Control-Expose-Headers: Location", "".join(browser.cors_headers))
        self.assertIn("acme-tokens-reset", "".join(browser.cors_headers))


class StreamContentTypeTest(AppTestCase):
    """Every stream, of every surface and kind, in its vendor's content type,
    and marked for a proxy to pass through unbuffered."""

    options = {"latency_ms": 0}
    FAST = {"simulate": {"token_ms": 0}}
    CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], **FAST}
    GEMINI = {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}], **FAST}

    def content_type(self, method, path, body=None):
        self.conn.request(method, path, None if body is None else json.dumps(body))
        response = self.conn.getresponse()
        response.read()
        self.assertEqual(response.status, 200, path)
        self.assertEqual(response.getheader("X-Accel-Buffering"), "no")
        return response.getheader("Content-Type")

    def test_each_surface_and_kind(self):
        background = self.call("POST", "/v1/responses", {
            "model": "m", "input": "Hi", "background": True, **self.FAST})[1]["id"]
        for method, path, body, expected in [
                ("POST", "/v1/chat/completions", dict(self.CHAT, stream=True),
                 "text/event-stream"),
                ("POST", "/v1/completions", {"model": "m", "prompt": "Hi", "stream": True,
                                             **self.FAST}, "text/event-stream"),
                ("POST", "/v1/responses", {"model": "m", "input": "Hi", "stream": True,
                                           **self.FAST}, "text/event-stream"),
                ("POST", "/v1/responses", {"model": "m", "input": "Hi", "stream": True,
                                           "background": True, **self.FAST},
                 "text/event-stream"),
                ("GET", f"/v1/responses/{background}?stream=true", None, "text/event-stream"),
                ("GET", f"/v1/responses/{background}?stream=true&starting_after=2", None,
                 "text/event-stream"),
                ("POST", "/v1/messages", dict(self.CHAT, max_tokens=10, stream=True),
                 "text/event-stream"),
                ("POST", "/v1beta/models/g:streamGenerateContent?alt=sse", self.GEMINI,
                 "text/event-stream"),
                ("POST", "/v1beta/models/g:streamGenerateContent", self.GEMINI,
                 "application/json"),
                ("POST", "/api/chat", self.CHAT, "application/x-ndjson"),
                ("POST", "/api/generate", {"model": "m", "prompt": "Hi", **self.FAST},
                 "application/x-ndjson"),
                ("POST", "/model/m/converse-stream", {"messages": [
                    {"role": "user", "content": [{"text": "Hi"}]}], **self.FAST},
                 "application/vnd.amazon.eventstream"),
                ("POST", "/model/m/invoke-with-response-stream", {
                    "anthropic_version": "bedrock-2023-05-31", "max_tokens": 10,
                    "messages": [{"role": "user", "content": "Hi"}], **self.FAST},
                 "application/vnd.amazon.eventstream"),
                ("GET", f"/v1/jobs/{self.create(simulate={'latency_ms': 0})}/events", None,
                 "text/event-stream")]:
            with self.subTest(path=path, body=body):
                self.assertEqual(self.content_type(method, path, body), expected)


class OutputLengthTest(AppTestCase):
    """A reply of exactly the tokens asked (a token: four characters), on
    every surface, plain and streamed: the text, the usage and the number
    of streamed text chunks agree; the request's maximum cuts it, with the
    surface's length finish reason."""

    options = {"latency_ms": 0}
    ASK = [{"role": "user", "content": "Hi"}]

    # surface: (path, body given simulate and a maximum, the reply's text,
    # its usage's output tokens, its finish reason when cut, the streamed
    # text chunks)
    SURFACES = {
        "openai.chat": ("/v1/chat/completions", lambda simulate, most: dict(
            model="m", messages=OutputLengthTest.ASK, simulate=simulate,
            stream_options={"include_usage": True}, **({"max_tokens": most} if most else {})),
            lambda body: body["choices"][0]["message"]["content"],
            lambda body: body["usage"]["completion_tokens"],
            lambda body: body["choices"][0]["finish_reason"] == "length",
            lambda events: [data["choices"][0]["delta"]["content"] for _, data in events
                            if data.get("choices") and data["choices"][0]["delta"].get(
                                "content")]),
        "openai.completions": ("/v1/completions", lambda simulate, most: dict(
            model="m", prompt="Hi", simulate=simulate, **({"max_tokens": most} if most else {})),
            lambda body: body["choices"][0]["text"],
            lambda body: body["usage"]["completion_tokens"],
            lambda body: body["choices"][0]["finish_reason"] == "length",
            lambda events: [data["choices"][0]["text"] for _, data in events
                            if data.get("choices") and data["choices"][0]["text"]]),
        "openai.responses": ("/v1/responses", lambda simulate, most: dict(
            model="m", input="Hi", simulate=simulate,
            **({"max_output_tokens": most} if most else {})),
            lambda body: body["output"][0]["content"][0]["text"],
            lambda body: body["usage"]["output_tokens"],
            lambda body: body["status"] == "incomplete",
            lambda events: [data["delta"] for name, data in events
                            if name == "response.output_text.delta"]),
        "anthropic.messages": ("/v1/messages", lambda simulate, most: dict(
            model="m", messages=OutputLengthTest.ASK, simulate=simulate, max_tokens=most or 4096),
            lambda body: body["content"][0]["text"], lambda body: body["usage"]["output_tokens"],
            lambda body: body["stop_reason"] == "max_tokens",
            lambda events: [data["delta"]["text"] for name, data in events
                            if name == "content_block_delta"]),
        "gemini": ("/v1beta/models/g:generateContent", lambda simulate, most: dict(
            contents=[{"role": "user", "parts": [{"text": "Hi"}]}], simulate=simulate,
            **({"generationConfig": {"maxOutputTokens": most}} if most else {})),
            lambda body: body["candidates"][0]["content"]["parts"][0]["text"],
            lambda body: body["usageMetadata"]["candidatesTokenCount"],
            lambda body: body["candidates"][0]["finishReason"] == "MAX_TOKENS",
            lambda events: [data["candidates"][0]["content"]["parts"][0]["text"]
                            for _, data in events
                            if data["candidates"][0]["content"]["parts"][0]["text"]]),
        "ollama": ("/api/chat", lambda simulate, most: dict(
            model="m", messages=OutputLengthTest.ASK, simulate=simulate,
            **({"options": {"num_predict": most}} if most else {})),
            lambda body: body["message"]["content"], lambda body: body["eval_count"],
            lambda body: body["done_reason"] == "length",
            lambda events: [data["message"]["content"] for _, data in events
                            if data["message"]["content"]]),
    }

    def ask(self, surface, simulate, most=None, stream=False):
        path, body, *_ = self.SURFACES[surface]
        body = dict(body({"token_ms": 0, **simulate}, most), stream=stream)
        if not stream:
            status, answer, _ = self.call("POST", path, body)
            self.assertEqual(status, 200, answer)
            return answer
        if surface == "gemini":
            path = path.replace(":generateContent", ":streamGenerateContent?alt=sse")
        self.conn.request("POST", path, json.dumps(body))
        response = self.conn.getresponse()
        self.assertEqual(response.status, 200)
        if surface == "ollama":
            return [(None, json.loads(line)) for line in response.read().splitlines()]
        return sse_events(io.BytesIO(response.read().replace(b"data: [DONE]", b"")))

    def test_exactly_the_tokens_asked_plain_and_streamed(self):
        for surface, (_, _, text, used, _, chunks) in self.SURFACES.items():
            with self.subTest(surface=surface):
                answer = self.ask(surface, {"output_tokens": 37})
                self.assertEqual((len(text(answer)), used(answer)), (148, 37))
                pieces = chunks(self.ask(surface, {"output_tokens": 37}, stream=True))
                self.assertEqual(len(pieces), 37)
                self.assertEqual("".join(pieces), text(answer))

    def test_the_maximum_cuts_with_the_surfaces_length_reason(self):
        for surface, (_, _, text, used, cut, chunks) in self.SURFACES.items():
            with self.subTest(surface=surface):
                answer = self.ask(surface, {"output_tokens": 50}, most=20)
                self.assertEqual((len(text(answer)), used(answer), cut(answer)), (80, 20, True))
                self.assertEqual(len(chunks(self.ask(surface, {"output_tokens": 50}, most=20,
                                                     stream=True))), 20)
                answer = self.ask(surface, {"output_tokens": 5}, most=20)
                self.assertEqual((used(answer), cut(answer)), (5, False))

    def test_vllms_ignore_eos_and_min_tokens(self):
        for path, body, finish in [
                ("/v1/chat/completions", {"messages": self.ASK},
                 lambda answer: answer["choices"][0]["finish_reason"]),
                ("/v1/completions", {"prompt": "Hi"},
                 lambda answer: answer["choices"][0]["finish_reason"])]:
            with self.subTest(path=path):
                ask = dict(body, model="m", max_tokens=512)
                answer = self.call("POST", path, dict(ask, ignore_eos=True))[1]
                self.assertEqual((answer["usage"]["completion_tokens"], finish(answer)),
                                 (512, "length"))
                answer = self.call("POST", path, dict(ask, min_tokens=30))[1]
                self.assertEqual((answer["usage"]["completion_tokens"], finish(answer)),
                                 (30, "stop"))
                answer = self.call("POST", path, dict(ask))[1]
                self.assertLess(answer["usage"]["completion_tokens"], 30)  # as it was

    def test_a_drawn_length_is_seeded_and_json_keeps_its_own(self):
        lengths = {"mean": 60, "stdev": 20}
        first = [self.ask("openai.chat", {"output_tokens": lengths, "seed": 5})["usage"][
            "completion_tokens"] for _ in range(5)]
        self.assertEqual(len(set(first)), 5)  # each request draws its own
        self.call("POST", "/v1/reset")
        self.assertEqual([self.ask("openai.chat", {"output_tokens": lengths, "seed": 5})[
            "usage"]["completion_tokens"] for _ in range(5)], first)
        answer = self.call("POST", "/v1/chat/completions", {
            "model": "m", "messages": self.ASK, "simulate": {"output_tokens": 500},
            "response_format": {"type": "json_object"}})[1]
        json.loads(answer["choices"][0]["message"]["content"])


class IdsTest(AppTestCase):
    """The ids clients compare across calls (tool calls', responses' and
    their items') are a function of the seed (or none), the key and the
    call's place among that key's calls: a fresh server gives the same."""

    options = {"latency_ms": 0}  # no seed
    CALLS = [
        ("/v1/chat/completions", {"model": "m", "messages": HELLO, "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "tool_choice": "required"}),
        ("/v1/responses", {"model": "m", "input": "Hi", "tools": [
            {"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": "required"}),
        ("/v1/responses", {"model": "m", "input": "Hi", "store": False}),
        ("/v1/messages", {"model": "m", "max_tokens": 10, "messages": HELLO[1:], "tools": [
            {"name": "f", "input_schema": {"type": "object"}}], "tool_choice": {"type": "any"}}),
        ("/v1beta/models/g:generateContent", {"contents": [{"parts": [{"text": "Hi"}]}],
                                              "tools": [{"functionDeclarations": [{"name": "f"}]}],
                                              "toolConfig": {"functionCallingConfig": {
                                                  "mode": "ANY"}}}),
    ]

    def ids(self, conn, key):
        """Every id-like value of the answers to CALLS, made with key."""
        found = []
        for path, body in self.CALLS * 2:
            answer = self.call("POST", path, body, headers={"X-Trace-Id": key}, conn=conn)[1]
            found += re.findall(r'"(?:id|call_id|item_id)": "((?:call|resp|fc)_\w+|msg_\w{12})"',
                                json.dumps(answer))  # not a message's own: it names one answer
        return found

    def test_a_fresh_server_gives_the_same_ids(self):
        first = self.ids(self.conn, "agent-1")
        self.assertGreaterEqual(len(first), 12)
        self.assertEqual(self.ids(self.connect(self.start(self.options)), "agent-1"), first)
        self.assertTrue(set(self.ids(self.conn, "agent-2")).isdisjoint(first))


class StreamContainmentTest(Registers, ServerTestCase):
    """A frame that fails to render ends its own stream, with its surface's
    error event (or cut, if that fails too), while every other stream goes
    on; the traceback is logged once and /metrics counts it."""

    server_class = LoggingServer

    def setUp(self):
        super().setUp()
        self.server.lines = []

    def stream(self, say, conn=None):
        conn = conn or self.connect(self.server)
        conn.request("POST", "/brittle/v1/say", json.dumps({
            "model": "m", "say": say, "stream": True, "simulate": {
                "ok_text": say, "token_ms": 5}}))
        return conn.getresponse()

    def test_a_render_that_raises_ends_its_stream_alone(self):
        healthy = [self.stream("all is well " * 10) for _ in range(3)]
        broken = self.stream("Boom!")  # its last event fails
        self.assertEqual(acme_lines(broken.read()), [
            ("BEGIN", None), ("@text", {"text": "Boom"}), ("@text", {"text": "!"}),
            ("@oops", {"problem": "broken", "detail": "simulated stream error"}),
            ("END", None)])
        for response in healthy:
            self.assertEqual(acme_lines(response.read())[-2:],
                             [("@last", {"why": "done"}), ("END", None)])
        again = self.stream("all is well")
        self.assertEqual(acme_lines(again.read())[-1], ("END", None))  # the writer lives
        self.wait_until(lambda: any("Traceback" in line for line in self.server.lines))
        traceback_line, = [line for line in self.server.lines if "Traceback" in line]
        self.assertIn("RuntimeError: a bug in a renderer", traceback_line)
        self.assertIn("POST /brittle/v1/say", traceback_line)
        self.assertIn("dummyllm_stream_errors_total 1\n", self.metrics())

    def metrics(self):
        conn = self.connect(self.server)
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()

    def test_an_error_event_that_raises_too_cuts_the_stream(self):
        with self.assertRaises(http.client.IncompleteRead) as caught:
            self.stream("boom!!").read()
        self.assertNotIn(b"@oops", caught.exception.partial)
        self.assertEqual(acme_lines(self.stream("all is well").read())[-1], ("END", None))


# --- Surfaces: the job API --------------------------------------------------------

class HealthTest(AppTestCase):
    options = {"seed": 5, "mode": "flaky"}

    def test_health(self):
        status, body, _ = self.call("GET", "/health")
        self.assertEqual(status, 200)
        self.assertIs(body["ok"], True)
        self.assertEqual((body["name"], body["version"]), ("dummyLLM", dummyllm.__version__))
        self.assertAlmostEqual(body["time"], self.clock.wall_ms() / 1000, delta=2)
        self.assertEqual(body["defaults"]["mode"], "flaky")
        self.assertEqual(body["defaults"]["seed"], 5)
        self.assertEqual(body["defaults"]["latency_ms"], 20)
        self.assertEqual(body["defaults"]["timeout_ms"], 8000)
        self.assertEqual(body["defaults"]["weights"]["ok"], 70)
        self.assertEqual(body["jobs"], {"stored": 0, "active": 0, "by_state": {}})
        self.create(simulate={"mode": "hang"})
        self.assertEqual(self.call("GET", "/health")[1]["jobs"],
                         {"stored": 1, "active": 1, "by_state": {"running": 1}})


class JobLifecycleTest(AppTestCase):

    def job_keys(self):
        """The keys the API document promises every job has."""
        return set(self.call("GET", "/openapi.json")[1]["components"]["schemas"]["Job"]
                   ["required"])

    def test_create_answers_queued_with_location(self):
        status, body, response = self.call("POST", "/v1/jobs", {"op": "llm.chat"})
        self.assertEqual(status, 201)
        self.assertRegex(body["id"], r"\Ajob_[0-9a-f]{12}\Z")
        self.assertEqual(body["state"], "queued")
        self.assertAlmostEqual(body["created_at"], self.clock.wall_ms() / 1000, delta=2)
        self.assertEqual(response.getheader("Location"), "/v1/jobs/" + body["id"])

    def test_ok_job_goes_queued_running_ok(self):
        started = self.clock.now
        job_id = self.create(op="llm.chat", trace_id="t-1",
                             args={"messages": [{"role": "user", "content": "Hello"}]},
                             simulate={"mode": "ok", "latency_ms": 150, "queue_ms": 50})
        self.assertEqual(self.job(job_id)["state"], "queued")
        done = self.wait_for(job_id)
        self.assertEqual(self.clock.now - started, 200)
        self.assertEqual(set(done), self.job_keys())
        self.assertEqual(set(done), {"id", "state", "op", "trace_id", "created_at", "updated_at",
                                     "created_at_ms", "updated_at_ms", "result", "error"})
        self.assertEqual(done["state"], "ok")
        self.assertEqual(done["trace_id"], "t-1")
        self.assertEqual(done["result"], {"text": "Simulated reply to: Hello",
                                          "usage": {"prompt_tokens": 2, "completion_tokens": 7}})
        self.assertIsNone(done["error"])
        self.assertGreaterEqual(done["updated_at_ms"] - done["created_at_ms"], 200)
        self.assertEqual(done["created_at"], done["created_at_ms"] // 1000)

    def test_active_job_has_null_result_and_error(self):
        job = self.job(self.create(simulate={"mode": "hang"}))
        self.assertEqual(set(job), self.job_keys())
        self.assertIsNone(job["result"])
        self.assertIsNone(job["error"])

    def test_fail(self):
        job = self.wait_for(self.create(simulate={"mode": "fail", "fail_message": "nope"}))
        self.assertEqual(job["state"], "fail")
        self.assertEqual(job["error"], {"code": "SIM_FAIL", "message": "nope"})
        self.assertIsNone(job["result"])

    def test_echo(self):
        messages = [{"role": "user", "content": "é"}]
        job = self.wait_for(self.create(args={"messages": messages}, simulate={"mode": "echo"}))
        self.assertEqual(job["result"]["text"], '[{"role":"user","content":"é"}]')

    def test_slow_takes_six_times_the_latency(self):
        started = self.clock.now
        job = self.wait_for(self.create(simulate={"mode": "slow", "latency_ms": 50}))
        self.assertEqual(job["state"], "ok")
        self.assertEqual(self.clock.now - started, 300)

    def test_timeout_ends_at_timeout_ms(self):
        started = self.clock.now
        job = self.wait_for(self.create(timeout_ms=150, simulate={"mode": "timeout"}))
        self.assertEqual(self.clock.now - started, 150)
        self.assertEqual(job["state"], "timeout")
        self.assertEqual(job["error"]["code"], "TIMEOUT")

    def test_deadline_turns_a_long_job_into_a_timeout(self):
        job = self.wait_for(self.create(timeout_ms=100, simulate={"latency_ms": 5000}))
        self.assertEqual(job["state"], "timeout")

    def test_hang_outlives_its_timeout_until_cancelled(self):
        job_id = self.create(timeout_ms=30, simulate={"mode": "hang", "latency_ms": 0})
        self.assertEqual(self.job(job_id, wait_ms=150)["state"], "running")
        self.assertEqual(self.call("POST", f"/v1/jobs/{job_id}/cancel")[1],
                         {"id": job_id, "state": "cancelled"})
        job = self.job(job_id)
        self.assertEqual(job["state"], "cancelled")
        self.assertEqual(job["error"]["code"], "CANCELLED")

    def test_cancel_is_idempotent_and_leaves_ended_jobs_alone(self):
        job_id = self.create(simulate={"mode": "hang"})
        for _ in range(2):
            status, body, _ = self.call("POST", f"/v1/jobs/{job_id}/cancel")
            self.assertEqual((status, body), (200, {"id": job_id, "state": "cancelled"}))
        done = self.wait_for(self.create(simulate={"latency_ms": 0}))
        status, body, _ = self.call("POST", f"/v1/jobs/{done['id']}/cancel")
        self.assertEqual((status, body), (200, {"id": done["id"], "state": "ok"}))
        self.assertEqual(self.job(done["id"]), done)

    def test_cancel_queued_job(self):
        job_id = self.create(simulate={"queue_ms": 5000})
        self.assertEqual(self.call("POST", f"/v1/jobs/{job_id}/cancel")[1]["state"], "cancelled")

    def test_cancel_racing_completion_reaches_one_final_state(self):
        ids = [self.create(simulate={"latency_ms": i % 4}) for i in range(60)]
        answers = {job_id: self.call("POST", f"/v1/jobs/{job_id}/cancel")[1]["state"]
                   for job_id in ids}
        for job_id in ids:
            job = self.wait_for(job_id)
            self.assertIn(answers[job_id], ("ok", "cancelled"))
            self.assertEqual(job["state"], answers[job_id])
            self.assertGreaterEqual(job["updated_at_ms"], job["created_at_ms"])

    def test_request_view_shows_the_decision(self):
        job_id = self.create(op="llm.chat", args={"model": "m"}, timeout_ms=9000, trace_id="T",
                             simulate={"mode": "flaky", "seed": 7, "latency_ms": 30,
                                       "weights": {"fail": 1}})
        status, view, _ = self.call("GET", f"/v1/jobs/{job_id}/request")
        self.assertEqual(status, 200)
        self.assertEqual((view["op"], view["args"], view["timeout_ms"], view["trace_id"]),
                         ("llm.chat", {"model": "m"}, 9000, "T"))
        simulate = view["simulate"]
        self.assertEqual((simulate["mode"], simulate["requested_mode"], simulate["latency_ms"],
                          simulate["seed"], simulate["n"], simulate["weights"]),
                         ("fail", "flaky", 30, 7, 0, {"fail": 1}))
        self.assertEqual(view["outcome"], {"state": "fail", "at_ms": 30})

    def test_the_outcome_of_a_cancelled_job_is_what_happened(self):
        job_id = self.create(simulate={"latency_ms": 5000})
        self.assertEqual(self.call("GET", f"/v1/jobs/{job_id}/request")[1]["outcome"],
                         {"state": "ok", "at_ms": 5000})  # planned, while it runs
        self.call("POST", f"/v1/jobs/{job_id}/cancel")
        outcome = self.call("GET", f"/v1/jobs/{job_id}/request")[1]["outcome"]
        self.assertEqual(outcome["state"], "cancelled")
        self.assertLess(outcome["at_ms"], 1000)


class CapacityTest(AppTestCase):
    options = {"max_jobs": 3}

    def test_full_of_active_jobs_is_503_with_retry_after(self):
        for _ in range(3):
            self.create(simulate={"mode": "hang"})
        status, body, response = self.call("POST", "/v1/jobs", {"op": "x"})
        self.assert_error(status, body, 503, "CAPACITY")
        self.assertEqual(response.getheader("Retry-After"), "1")

    def test_the_oldest_finished_job_is_evicted(self):
        first = self.wait_for(self.create(simulate={"latency_ms": 0}))["id"]
        second = self.wait_for(self.create(simulate={"latency_ms": 0}))["id"]
        self.create(simulate={"mode": "hang"})
        self.create(simulate={"mode": "hang"})
        self.assertEqual(self.call("GET", "/v1/jobs/" + first)[0], 404)
        self.assertEqual(self.job(second)["state"], "ok")
        self.assertEqual(self.call("GET", "/health")[1]["jobs"],
                         {"stored": 3, "active": 2, "by_state": {"ok": 1, "running": 2}})


class DeterminismTest(AppTestCase):
    options = {"seed": 1337}

    def modes(self, server, trace_id, count, interleave=False):
        conn = self.connect(server)
        modes = []
        for _ in range(count):
            if interleave:
                self.create(conn=conn, trace_id="someone-else", simulate={"mode": "flaky"})
            job_id = self.create(conn=conn, trace_id=trace_id,
                                 simulate={"mode": "flaky", "latency_ms": 0})
            modes.append(self.call("GET", f"/v1/jobs/{job_id}/request", conn=conn)[1]
                         ["simulate"]["mode"])
        return modes

    def test_same_seed_and_trace_id_give_the_same_sequence_on_fresh_servers(self):
        first = self.modes(self.server, "X", 6)
        second = self.modes(self.start({"seed": 1337}), "X", 6, interleave=True)
        self.assertEqual(first, ["fail", "hang", "hang", "ok", "fail", "fail"])
        self.assertEqual(second, first)

    def test_the_request_seed_wins_and_outcomes_follow_the_draw(self):
        conn_modes = []
        for _ in range(12):
            job_id = self.create(trace_id="Y", simulate={"mode": "flaky", "seed": 99,
                                                         "latency_ms": 0})
            job = self.job(job_id, wait_ms=200)
            mode = self.call("GET", f"/v1/jobs/{job_id}/request")[1]["simulate"]["mode"]
            self.assertEqual(job["state"], {"ok": "ok", "fail": "fail", "hang": "running"}[mode])
            conn_modes.append(mode)
        expected = [plan(n, 99, mode="flaky", trace_id="Y").mode for n in range(12)]
        self.assertEqual(conn_modes, expected)

    def test_sequence_counters_are_bounded(self):
        store = self.server.store
        store.MAX_SEQUENCES = 10
        for i in range(50):
            self.create(trace_id=f"t{i}", simulate={"latency_ms": 0})
        self.assertEqual(len(store._sequences), 10)


class RequestErrorTest(AppTestCase):

    def test_unknown_id_and_path_are_404(self):
        for method, path in [("GET", "/v1/jobs/job_000000000000"),
                             ("POST", "/v1/jobs/job_000000000000/cancel"),
                             ("GET", "/v1/jobs/job_000000000000/request"), ("GET", "/nope")]:
            with self.subTest(path=path):
                status, body, _ = self.call(method, path)
                self.assertEqual(status, 404)
                self.assertEqual(body["error"]["code"], "NOT_FOUND")

    def test_wrong_method_is_405_with_allow(self):
        for method, path, allow in [("DELETE", "/health", "GET, HEAD"),
                                    ("GET", "/v1/jobs/job_x/cancel", "POST"),
                                    ("PATCH", "/v1/jobs", "POST, GET, HEAD"),
                                    ("BREW", "/v1/jobs/job_x", "GET, DELETE, HEAD")]:
            with self.subTest(method=method, path=path):
                status, body, response = self.call(method, path)
                self.assert_error(status, body, 405, "METHOD_NOT_ALLOWED")
                self.assertEqual(response.getheader("Allow"), allow)

    def test_bodies_that_are_not_json_are_400(self):
        for body in [b"", b"{", b"op=llm.chat", b"\xff\xfe{}", b"[" * 100000,
                     b'{"op": "x", "timeout_ms": NaN}', b'{"op": "x", "args": {"n": 1e999}}',
                     '{"op": "x"}'.encode("utf-16"), '{"op": "x"}'.encode("utf-32")]:
            with self.subTest(body=body[:20]):
                status, error, _ = self.call("POST", "/v1/jobs", body)
                self.assert_error(status, error, 400, "INVALID_JSON")

    def test_bad_fields_are_422_naming_the_field(self):
        cases = [
            ([1, 2], None),
            ({}, "op"), ({"op": ""}, "op"), ({"op": 5}, "op"),
            ({"op": "x", "args": []}, "args"),
            ({"op": "x", "timeout_ms": 0}, "timeout_ms"),
            ({"op": "x", "timeout_ms": 86_400_001}, "timeout_ms"),
            ({"op": "x", "timeout_ms": True}, "timeout_ms"),
            ({"op": "x", "timeout_ms": 100.5}, "timeout_ms"),
            ({"op": "x", "trace_id": 7}, "trace_id"),
            ({"op": "x", "trace_id": "t" * 257}, "trace_id"),
            ({"op": "x", "simulate": "ok"}, "simulate"),
            ({"op": "x", "simulate": {"mode": "fast"}}, "simulate.mode"),
            ({"op": "x", "simulate": {"latency": 5}}, "simulate.latency"),
            ({"op": "x", "simulate": {"latency_ms": -1}}, "simulate.latency_ms"),
            ({"op": "x", "simulate": {"latency_ms": 3_600_001}}, "simulate.latency_ms"),
            ({"op": "x", "simulate": {"latency_ms": "5"}}, "simulate.latency_ms"),
            ({"op": "x", "simulate": {"queue_ms": -1}}, "simulate.queue_ms"),
            ({"op": "x", "simulate": {"seed": False}}, "simulate.seed"),
            ({"op": "x", "simulate": {"fail_message": 3}}, "simulate.fail_message"),
            ({"op": "x", "simulate": {"ok_text": []}}, "simulate.ok_text"),
            ({"op": "x", "simulate": {"weights": [1]}}, "simulate.weights"),
            ({"op": "x", "simulate": {"weights": {"ok": -1}}}, "simulate.weights.ok"),
            ({"op": "x", "simulate": {"weights": {"ok": "1"}}}, "simulate.weights.ok"),
            ({"op": "x", "simulate": {"weights": {"ok": 0}}}, "simulate.weights"),
            ({"op": "x", "simulate": {"mode": "flaky", "weights": {"echo": 1}}},
             "simulate.weights.echo"),
            ({"op": "x", "simulate": {"script": [{"mode": "flaky", "weights": {"echo": 1}}]}},
             "simulate.script.weights.echo"),
        ]
        for body, field in cases:
            with self.subTest(body=body):
                status, error, _ = self.call("POST", "/v1/jobs", body)
                self.assert_error(status, error, 422, "VALIDATION_ERROR", field)
        self.assertEqual(self.stored(), 0)

    def test_a_lone_surrogate_is_refused_at_the_door_naming_the_field(self):
        for body, field in [(b'{"op": "\\ud800"}', "op"),
                            (b'{"op": "x", "args": {"m": ["ok", "\\udfff"]}}', "args.m[1]"),
                            (b'{"op": "x", "args": {"\\ud800": 1}}', "args.\\ud800")]:
            with self.subTest(body=body):
                status, error, _ = self.call("POST", "/v1/jobs", body)
                self.assert_error(status, error, 400, "INVALID_JSON", field)
        self.assertEqual(self.call("POST", "/v1/jobs", b'{"op": "\\ud83d\\ude00"}')[0], 201)
        for path in ("/v1/jobs", "/v1/requests", "/"):  # everything stored can be answered
            self.conn.request("GET", path)
            self.assertEqual(self.conn.getresponse().read()[:1] != b"", True)

    def test_a_404_keeps_its_body_in_the_journal(self):
        self.call("POST", "/v1/audio/speech", {"input": "hi"})
        entry, = self.journal("?path=/v1/audio/speech")
        self.assertEqual((entry["status"], json.loads(entry["body"])), (404, {"input": "hi"}))

    def test_nulls_and_unknown_top_level_keys_take_defaults(self):
        job_id = self.create(op="x", args=None, timeout_ms=None, trace_id=None, extra=1,
                             simulate={"mode": None, "seed": None, "latency_ms": None})
        view = self.call("GET", f"/v1/jobs/{job_id}/request")[1]
        self.assertEqual((view["args"], view["timeout_ms"], view["simulate"]["mode"],
                          view["simulate"]["latency_ms"]), ({}, 8000, "ok", 20))

    def test_refusing_modes_create_no_job(self):
        status, body, response = self.call("POST", "/v1/jobs", {
            "op": "x", "simulate": {"mode": "rate_limit", "retry_after_ms": 250}})
        self.assert_error(status, body, 429, "RATE_LIMITED")
        self.assertEqual(response.getheader("retry-after-ms"), "250")
        self.assertEqual(response.getheader("x-ratelimit-remaining-requests"), "0")
        status, body, _ = self.call("POST", "/v1/jobs", {
            "op": "x", "simulate": {"mode": "overloaded", "status": 529}})
        self.assert_error(status, body, 529, "OVERLOADED")
        self.assertEqual(self.stored(), 0)


# --- Surfaces: OpenAI chat --------------------------------------------------------

class ChatCalls:
    """Helpers that talk to /v1/chat/completions as any OpenAI client would."""

    def chat(self, headers=None, conn=None, **body):
        body.setdefault("model", "gpt-test")
        body.setdefault("messages", HELLO)
        return self.call("POST", "/v1/chat/completions", body, headers=headers, conn=conn)

    def open_stream(self, headers=None, **body):
        """Send a streaming request; returns the response to read events from."""
        body.setdefault("model", "gpt-test")
        body.setdefault("messages", HELLO)
        self.conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                          headers=headers or {})
        response = self.conn.getresponse()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.getheader("Content-Type"), "text/event-stream")
        return response

    def events(self, response, timed=False):
        """The data of each server-sent event, as JSON (or "[DONE]")."""
        events = []
        for line in iter(response.readline, b""):
            if line.startswith(b"data: "):
                data = line[6:].strip()
                event = "[DONE]" if data == b"[DONE]" else json.loads(data)
                events.append((time.monotonic(), event) if timed else event)
        return events

    def assert_openai_error(self, status, body, expected_status, kind, param=None, code=None):
        self.assertEqual(status, expected_status, body)
        self.assertEqual(set(body["error"]), {"message", "type", "param", "code"})
        self.assertEqual((body["error"]["type"], body["error"]["param"], body["error"]["code"]),
                         (kind, param, code))


class ChatCompletionTest(ChatCalls, AppTestCase):

    def test_completion(self):
        started = self.clock.now
        status, body, _ = self.chat(simulate={"latency_ms": 100})
        self.assertEqual(self.clock.now - started, 100)
        self.assertEqual(status, 200)
        self.assertRegex(body["id"], r"\Achatcmpl-[0-9a-f]{24}\Z")
        self.assertEqual((body["object"], body["model"]), ("chat.completion", "gpt-test"))
        self.assertAlmostEqual(body["created"], self.clock.wall_ms() / 1000, delta=2)
        choice = body["choices"][0]
        self.assertEqual(choice["message"]["role"], "assistant")
        self.assertEqual(choice["message"]["content"], "Simulated reply to: Hello")
        self.assertEqual(choice["finish_reason"], "stop")
        self.assertEqual(body["usage"], {"prompt_tokens": 5, "completion_tokens": 7,
                                         "total_tokens": 12})

    def test_max_tokens_cuts_the_text(self):
        for field in ("max_tokens", "max_completion_tokens"):
            with self.subTest(field=field):
                body = self.chat(**{field: 2}, simulate={"ok_text": "0123456789"})[1]
                self.assertEqual(body["choices"][0]["message"]["content"], "01234567")
                self.assertEqual(body["choices"][0]["finish_reason"], "length")
                self.assertEqual(body["usage"]["completion_tokens"], 2)

    def test_echo_and_slow(self):
        body = self.chat(simulate={"mode": "echo", "latency_ms": 0})[1]
        self.assertEqual(json.loads(body["choices"][0]["message"]["content"]), HELLO)
        started = self.clock.now
        self.assertEqual(self.chat(simulate={"mode": "slow", "latency_ms": 30})[0], 200)
        self.assertEqual(self.clock.now - started, 180)

    def test_fail_is_a_500_after_the_latency(self):
        started = self.clock.now
        status, body, _ = self.chat(simulate={"mode": "fail", "latency_ms": 60,
                                              "fail_message": "boom"})
        self.assertEqual(self.clock.now - started, 60)
        self.assert_openai_error(status, body, 500, "server_error")
        self.assertEqual(body["error"]["message"], "boom")

    def test_timeout_is_a_504_at_the_deadline(self):
        started = self.clock.now
        status, body, _ = self.chat(timeout_ms=120, simulate={"mode": "timeout"})
        self.assertEqual(self.clock.now - started, 120)
        self.assert_openai_error(status, body, 504, "server_error", code="timeout")
        status, body, _ = self.chat(timeout_ms=50, simulate={"latency_ms": 5000})
        self.assertEqual(status, 504)

    def test_rate_limit_is_a_429_with_retry_headers(self):
        status, body, response = self.chat(simulate={"mode": "rate_limit", "retry_after_ms": 1500})
        self.assert_openai_error(status, body, 429, "requests", code="rate_limit_exceeded")
        self.assertEqual([response.getheader(name) for name in (
            "retry-after", "retry-after-ms", "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")],
            ["2", "1500", "60", "0", "1.5s"])

    def test_overloaded_is_a_503_or_529(self):
        status, body, response = self.chat(simulate={"mode": "overloaded"})
        self.assert_openai_error(status, body, 503, "service_unavailable_error",
                                 code="server_is_overloaded")
        self.assertEqual(response.getheader("retry-after-ms"), "1000")
        self.assertEqual(self.chat(simulate={"mode": "overloaded", "status": 529})[0], 529)

    def test_seeded_choices_follow_the_trace_id_header_or_user(self):
        weights = {"ok": 1, "rate_limit": 1}

        def modes(headers=None, user=None):
            found = []
            for _ in range(6):
                status, _, _ = self.chat(headers=headers, user=user, simulate={
                    "mode": "random", "seed": 3, "latency_ms": 0, "weights": weights})
                found.append("ok" if status == 200 else "rate_limit")
            return found
        expected = [plan(n, 3, mode="random", trace_id="abc", weights=weights).mode
                    for n in range(12)]
        self.assertEqual(modes(headers={"X-Trace-Id": "abc"}), expected[:6])
        self.assertEqual(modes(user="abc"), expected[6:])

    def test_simulate_header_and_body_merge_field_by_field(self):
        header = {"X-DummyLLM-Simulate": json.dumps({"mode": "fail", "latency_ms": 0})}
        self.assertEqual(self.chat(headers=header)[0], 500)
        self.assertEqual(self.chat(headers=header, simulate={"mode": "ok"})[0], 200)
        status, body, _ = self.chat(headers=header, simulate={"fail_message": "from the body"})
        self.assertEqual((status, body["error"]["message"]), (500, "from the body"))
        status, body, _ = self.chat(headers={"X-DummyLLM-Simulate": "{nope"})
        self.assert_openai_error(status, body, 400, "invalid_request_error",
                                 param="X-DummyLLM-Simulate")
        status, body, _ = self.chat(headers={"X-DummyLLM-Simulate": '{"mode": "nope"}'})
        self.assert_openai_error(status, body, 400, "invalid_request_error",
                                 param="X-DummyLLM-Simulate.mode")

    def test_bad_requests_are_400_naming_the_param(self):
        for body, param in [({"model": ""}, "model"), ({"model": 5}, "model"),
                            ({"messages": []}, "messages"), ({"messages": [{"content": "x"}]},
                                                             "messages[0]"),
                            ({"stream": "yes"}, "stream"), ({"n": 2}, "n"),
                            ({"max_tokens": 0}, "max_tokens"), ({"user": 5}, "user"),
                            ({"stream_options": {"include_usage": 1}},
                             "stream_options.include_usage"),
                            ({"simulate": {"mode": "nope"}}, "simulate.mode"),
                            ({"simulate": {"stream": {"cut_after": 1}}}, "simulate.stream"),
                            ({"stream": True, "simulate": {"stream": {"cut": 1}}},
                             "simulate.stream.cut"),
                            ({"stream": True, "simulate": {"stream": {"cut_after": -1}}},
                             "simulate.stream.cut_after"),
                            ({"simulate": {"status": 200}}, "simulate.status"),
                            ({"simulate": {"token_ms": -1}}, "simulate.token_ms")]:
            with self.subTest(body=body):
                status, error, _ = self.chat(**body)
                self.assert_openai_error(status, error, 400, "invalid_request_error", param)
        status, error, _ = self.call("POST", "/v1/chat/completions", b"{oops")
        self.assert_openai_error(status, error, 400, "invalid_request_error")

    def test_lone_surrogates_are_refused_in_openai_shape(self):
        status, body, _ = self.call("POST", "/v1/chat/completions",
                                    b'{"model": "m", "messages": [{"role": "user", '
                                    b'"content": "\\ud800"}]}')
        self.assert_openai_error(status, body, 400, "invalid_request_error",
                                 param="messages[0].content")
        status, body, _ = self.chat(headers={"X-DummyLLM-Simulate": '{"ok_text": "\\udc00"}'})
        self.assert_openai_error(status, body, 400, "invalid_request_error",
                                 param="X-DummyLLM-Simulate.ok_text")

    def test_unknown_paths_and_methods_answer_in_openai_shape(self):
        status, body, _ = self.call("POST", "/v1/chat/nope", {})
        self.assert_openai_error(status, body, 404, "invalid_request_error", code="not_found")
        status, body, response = self.call("GET", "/v1/chat/completions")
        self.assert_openai_error(status, body, 405, "invalid_request_error")
        self.assertEqual(response.getheader("Allow"), "POST")

    def test_models(self):
        status, body, _ = self.call("GET", "/v1/models")
        self.assertEqual((status, body["object"]), (200, "list"))
        self.assertEqual(body["data"][0]["object"], "model")
        status, body, _ = self.call("GET", "/v1/models/meta-llama/Llama-3.1-8B")
        self.assertEqual((status, body["id"], body["object"]),
                         (200, "meta-llama/Llama-3.1-8B", "model"))


class ChatStreamTest(ChatCalls, AppTestCase):

    def test_stream_events(self):
        response = self.open_stream(stream_options={"include_usage": True},
                                    simulate={"latency_ms": 0, "token_ms": 0})
        events = self.events(response)
        self.assertEqual(events[-1], "[DONE]")
        chunks = events[:-1]
        self.assertEqual({chunk["object"] for chunk in chunks}, {"chat.completion.chunk"})
        self.assertEqual(len({chunk["id"] for chunk in chunks}), 1)
        self.assertEqual(chunks[0]["choices"][0]["delta"], {"role": "assistant", "content": ""})
        text = "".join(chunk["choices"][0]["delta"].get("content", "")
                       for chunk in chunks if chunk["choices"])
        self.assertEqual(text, "Simulated reply to: Hello")
        self.assertEqual(chunks[-2]["choices"][0]["finish_reason"], "stop")
        self.assertEqual(chunks[-1]["choices"], [])
        self.assertEqual(chunks[-1]["usage"], {"prompt_tokens": 5, "completion_tokens": 7,
                                               "total_tokens": 12})
        self.assertEqual(self.call("GET", "/health")[0], 200)  # the connection is reusable

    def test_stream_without_usage_has_no_usage_keys(self):
        events = self.events(self.open_stream(simulate={"latency_ms": 0, "token_ms": 0}))
        self.assertTrue(all("usage" not in event for event in events[:-1]))

    def test_max_tokens_cuts_the_stream(self):
        events = self.events(self.open_stream(max_tokens=1, simulate={
            "latency_ms": 0, "token_ms": 0, "ok_text": "0123456789"}))
        self.assertEqual([event["choices"][0]["delta"].get("content") for event in events[1:-2]],
                         ["0123"])
        self.assertEqual(events[-2]["choices"][0]["finish_reason"], "length")

    def test_cut_after(self):
        response = self.open_stream(simulate={"latency_ms": 0, "token_ms": 0,
                                              "stream": {"cut_after": 3}})
        with self.assertRaises(http.client.IncompleteRead) as caught:
            response.read()
        data = caught.exception.partial
        self.assertEqual(data.count(b'"content"'), 4)  # the role chunk's "" and 3 pieces
        self.assertNotIn(b"[DONE]", data)

    def test_error_after(self):
        response = self.open_stream(simulate={"latency_ms": 0, "token_ms": 0,
                                              "fail_message": "mid-stream",
                                              "stream": {"error_after": 1}})
        events = self.events(response)
        self.assertEqual(len(events), 3)
        self.assertEqual(events[-1], {"error": {"message": "mid-stream", "type": "server_error",
                                                "param": None, "code": None}})

    def test_failing_modes_answer_before_streaming(self):
        for simulate, status in [({"mode": "fail", "latency_ms": 0}, 500),
                                 ({"mode": "rate_limit"}, 429)]:
            with self.subTest(simulate=simulate):
                self.assertEqual(self.chat(stream=True, simulate=simulate)[0], status)



class ChatWireTest(ChatCalls, ServerTestCase):
    """What a chat stream or a hang does on a real connection."""

    def test_stream_really_streams_at_token_ms(self):
        started = time.monotonic()
        response = self.open_stream(simulate={"ttft_ms": 100, "token_ms": 40,
                                              "ok_text": "a" * 24})  # 6 content chunks
        events = self.events(response, timed=True)
        contents = [at for at, event in events if event != "[DONE]" and event["choices"]
                    and event["choices"][0]["delta"].get("content")]
        self.assertEqual(len(contents), 6)
        self.assertGreaterEqual(contents[0] - started, 0.1)
        self.assertLess(contents[0] - started, 0.1 + 0.15)  # not held back to the end
        # None comes before its time (a late first one makes no gap short).
        self.assertGreaterEqual(contents[-1] - started, 0.1 + 5 * 0.04)
        self.assertLess(contents[-1] - contents[0], 5 * 0.04 + 0.3)

    def test_stall_after(self):
        response = self.open_stream(simulate={"latency_ms": 0, "token_ms": 0,
                                              "stream": {"stall_after": 2}})
        self.conn.sock.settimeout(0.2)
        events = []
        with self.assertRaises(socket.timeout):
            for line in iter(response.readline, b""):
                if line.startswith(b"data: "):
                    events.append(json.loads(line[6:]))
        self.assertEqual(len(events), 3)  # the role chunk and 2 pieces, then silence

    def test_hang_while_streaming_sends_nothing(self):
        self.conn.sock = None
        self.conn.timeout = 0.2
        self.conn.request("POST", "/v1/chat/completions", json.dumps(
            {"model": "m", "messages": HELLO, "stream": True, "simulate": {"mode": "hang"}}))
        with self.assertRaises(socket.timeout):
            self.conn.getresponse()

    def test_hang_holds_the_connection_without_cpu_until_the_server_stops(self):
        request = http_bytes("POST", "/v1/chat/completions",
                             {"model": "m", "messages": HELLO, "simulate": {"mode": "hang"}})
        socks = [self.raw(request) for _ in range(30)]
        time.sleep(0.1)
        cpu = time.process_time()
        time.sleep(0.3)
        self.assertLess(time.process_time() - cpu, 0.06)  # a fifth of a core at most
        socks[0].settimeout(0.1)
        with self.assertRaises(socket.timeout):
            socks[0].recv(100)
        started = time.monotonic()
        self.server.stop()
        for sock in socks:
            sock.settimeout(2)
            self.assertEqual(sock.recv(100), b"")  # closed, nothing ever answered
        self.assertLess(time.monotonic() - started, 1)

    def test_a_long_stream_holds_its_text_not_its_frames(self):
        # 250,000 chunks of 1 MB of text: encoded ahead, they took about 200 MB.
        import tracemalloc
        text = "abcd" * 250_000
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.get_traced_memory()[0]
        response = self.open_stream(simulate={"latency_ms": 0, "token_ms": 1000, "ok_text": text})
        self.assertEqual(json.loads(response.readline()[6:])["choices"][0]["delta"]["role"],
                         "assistant")
        held = tracemalloc.get_traced_memory()[0] - before
        self.assertLess(held, 10 * len(text))  # the request, its JSON, the text: not frames


WEATHER = {"type": "object", "properties": {"city": {"type": "string"},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
OPENAI_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
                {"type": "function", "function": {"name": "get_time"}}]
PARIS = [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}]


class ChatAgentTest(ChatCalls, AppTestCase):
    """Tool calls, structured output and the failures SDKs do not raise on."""

    options = {"seed": 5}

    def test_scripted_tool_calls(self):
        status, body, _ = self.chat(tools=OPENAI_TOOLS, simulate={"tool_calls": PARIS + [
            {"name": "get_time", "arguments": "{not json", "id": "call_mine"}]})
        self.assertEqual(status, 200)
        [choice] = body["choices"]
        self.assertEqual((choice["finish_reason"], choice["message"]["content"]),
                         ("tool_calls", None))
        first, second = choice["message"]["tool_calls"]
        self.assertRegex(first["id"], r"\Acall_[0-9a-f]{24}\Z")
        self.assertEqual((first["type"], first["function"]),
                         ("function", {"name": "get_weather",
                                       "arguments": '{"city": "Paris", "unit": "c"}'}))
        self.assertEqual((second["id"], second["function"]["arguments"]),
                         ("call_mine", "{not json"))  # sent as given
        fresh = self.start({"latency_ms": 0, "seed": 5})  # a fresh server: the same ids
        again = self.call("POST", "/v1/chat/completions", {
            "model": "m", "messages": HELLO, "simulate": {"tool_calls": PARIS}},
            conn=self.connect(fresh))[1]
        self.assertEqual(again["choices"][0]["message"]["tool_calls"][0]["id"], first["id"])

    def test_streamed_tool_calls_send_the_name_then_the_arguments_in_pieces(self):
        events = self.events(self.open_stream(tools=OPENAI_TOOLS, simulate={
            "tool_calls": PARIS, "token_ms": 0}))
        deltas = [event["choices"][0]["delta"] for event in events[:-1] if event["choices"]]
        self.assertEqual(deltas[0], {"role": "assistant", "content": None})
        opening = deltas[1]["tool_calls"][0]
        self.assertEqual((opening["index"], opening["function"]), (0, {
            "name": "get_weather", "arguments": ""}))
        pieces = [delta["tool_calls"][0]["function"]["arguments"] for delta in deltas[2:-1]]
        self.assertGreaterEqual(len(pieces), 2)
        self.assertEqual(json.loads("".join(pieces)), PARIS[0]["arguments"])
        self.assertEqual(events[-2]["choices"][0]["finish_reason"], "tool_calls")
        self.assertEqual(events[-1], "[DONE]")

    def test_a_forced_tool_is_called_with_arguments_from_its_schema(self):
        for choice, name in [("required", "get_weather"),
                             ({"type": "function", "function": {"name": "get_time"}}, "get_time")]:
            with self.subTest(choice=choice):
                body = self.chat(tools=OPENAI_TOOLS, tool_choice=choice)[1]
                [call] = body["choices"][0]["message"]["tool_calls"]
                arguments = json.loads(call["function"]["arguments"])
                self.assertEqual(call["function"]["name"], name)
                if name == "get_weather":
                    self.assertEqual(set(arguments), {"city", "unit"})
                    self.assertIn(arguments["unit"], ("c", "f"))
        self.assertEqual(self.chat(tools=OPENAI_TOOLS)[1]["choices"][0]["finish_reason"], "stop")
        for body, param in [
                ({"tool_choice": {"type": "function", "function": {"name": "nope"}}},
                 "tool_choice.function.name"),
                ({"tool_choice": "required", "tools": []}, "tool_choice"),
                ({"tools": [{"type": "function", "function": {"name": 5}}]},
                 "tools[0].function.name")]:
            with self.subTest(body=body):
                status, error, _ = self.chat(**{"tools": OPENAI_TOOLS, **body})
                self.assert_openai_error(status, error, 400, "invalid_request_error", param=param)

    def test_structured_output_is_json_valid_against_the_schema(self):
        body = self.chat(response_format={"type": "json_schema", "json_schema": {
            "name": "weather", "strict": True, "schema": WEATHER}})[1]
        value = json.loads(body["choices"][0]["message"]["content"])
        self.assertEqual(set(value), {"city", "unit"})
        body = self.chat(response_format={"type": "json_object"})[1]
        self.assertIsInstance(json.loads(body["choices"][0]["message"]["content"]), dict)
        status, error, _ = self.chat(response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {
                "code": {"type": "string", "pattern": "^[0-9]{3}$"}}}}})
        self.assert_openai_error(status, error, 400, "invalid_request_error",
                                 param="response_format.json_schema.schema.properties.code"
                                       ".pattern")
        self.assertEqual(self.chat(response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "string", "pattern": "^[0-9]{3}$"}}},
            simulate={"ok_text": "123"})[1]["choices"][0]["message"]["content"], "123")

    def test_a_script_drives_one_tool_round_then_a_final_answer(self):
        simulate = {"script": [{"tool_calls": PARIS}, {"ok_text": "Sunny in Paris"}]}
        headers = {"X-Trace-Id": "agent-1"}
        first = self.chat(headers=headers, tools=OPENAI_TOOLS, simulate=simulate)[1]
        call = first["choices"][0]["message"]["tool_calls"][0]
        messages = [*HELLO, first["choices"][0]["message"],
                    {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
        second = self.chat(headers=headers, tools=OPENAI_TOOLS, messages=messages,
                           simulate=simulate)[1]
        self.assertEqual((second["choices"][0]["message"]["content"],
                          second["choices"][0]["finish_reason"]), ("Sunny in Paris", "stop"))

    def test_truncate_after_ends_the_stream_cleanly_without_the_finish(self):
        response = self.open_stream(simulate={"token_ms": 0, "stream": {"truncate_after": 2}})
        events = self.events(response)
        self.assertEqual([event["choices"][0]["delta"].get("content") for event in events],
                         ["", "Simu", "late"])
        self.assertTrue(all(event["choices"][0]["finish_reason"] is None for event in events))
        self.assertFalse(response.will_close)  # the body ended properly: the connection lives
        self.assertEqual(self.chat()[0], 200)

    def test_malformed_after_cuts_the_next_events_json_in_half(self):
        response = self.open_stream(simulate={"token_ms": 0, "stream": {"malformed_after": 1}})
        data = [line[6:].strip() for line in response.read().splitlines()
                if line.startswith(b"data: ")]
        self.assertEqual(len(data), 3)
        json.loads(data[1])
        with self.assertRaises(ValueError):
            json.loads(data[2])
        self.assertEqual(self.chat()[0], 200)

    def test_a_prompt_over_the_context_window(self):
        status, body, _ = self.chat(simulate={"context_window": 4})  # HELLO is 3 + 2 tokens
        self.assert_openai_error(status, body, 400, "invalid_request_error", param="messages",
                                 code="context_length_exceeded")
        self.assertIn("5 tokens > 4", body["error"]["message"])
        self.assertEqual(self.chat(simulate={"context_window": 5})[0], 200)

    def test_quota_exhausted_is_a_429_without_retry_headers(self):
        status, body, response = self.chat(simulate={"mode": "quota_exhausted"})
        self.assert_openai_error(status, body, 429, "insufficient_quota",
                                 code="insufficient_quota")
        self.assertEqual([name for name, _ in response.getheaders()
                          if name.lower().startswith(("retry-after", "x-ratelimit"))], [])


class ApiKeyTest(ChatCalls, AppTestCase):
    options = {"api_key": "sk-test"}

    def test_openai_endpoints_need_the_key(self):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test"}):
            with self.subTest(headers=headers):
                status, body, _ = self.chat(headers=headers)
                self.assert_openai_error(status, body, 401, "invalid_request_error",
                                         code="invalid_api_key")
        self.assertEqual(self.call("GET", "/v1/models")[0], 401)
        self.assertEqual(self.chat(headers={"Authorization": "Bearer sk-test"})[0], 200)
        self.assertEqual(self.call("GET", "/health")[0], 200)  # the job API is open


openai = optional_import("openai")


@needs(openai, "openai", "DUMMYLLM_REQUIRE_OPENAI")
class OpenAISDKTest(ChatCalls, ServerTestCase):
    """The real openai SDK, unchanged, pointed at dummyLLM."""

    def client(self, **options):
        options.setdefault("max_retries", 0)
        client = openai.OpenAI(base_url=self.server.url + "/v1", api_key="x", **options)
        self.addCleanup(client.close)
        return client

    def test_a_batch_from_an_uploaded_file_with_a_failure_in_it(self):
        client = self.client()
        requests = [{"custom_id": name, "method": "POST", "url": "/v1/embeddings", "body": {
            "model": "text-embedding-3-small", "input": name, **simulate}}
            for name, simulate in (("a", {}), ("b", {"simulate": {"mode": "rate_limit"}}))]
        uploaded = client.files.create(file=("requests.jsonl", "\n".join(map(
            json.dumps, requests)).encode()), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings",
                                      completion_window="24h",
                                      extra_body={"simulate": {"latency_ms": 50}})
        self.assertEqual(batch.status, "validating")
        deadline = time.monotonic() + 5
        while batch.status not in ("completed", "failed") and time.monotonic() < deadline:
            time.sleep(0.02)
            batch = client.batches.retrieve(batch.id)
        self.assertEqual((batch.status, batch.request_counts.completed,
                          batch.request_counts.failed), ("completed", 1, 1))
        output = [json.loads(line) for line in client.files.content(
            batch.output_file_id).text.splitlines()]
        self.assertEqual(len(output[0]["response"]["body"]["data"][0]["embedding"]), 1536)
        error, = map(json.loads, client.files.content(batch.error_file_id).text.splitlines())
        self.assertEqual((error["custom_id"], error["response"]["status_code"]), ("b", 429))
        self.assertEqual([listed.id for listed in client.batches.list()], [batch.id])

    def test_completion_and_extra_body(self):
        completion = self.client().chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, extra_body={"simulate": {"ok_text": "hi!"}})
        self.assertEqual(completion.choices[0].message.content, "hi!")
        self.assertEqual(completion.usage.completion_tokens, 1)

    def test_streaming(self):
        stream = self.client().chat.completions.create(
            model="m", messages=HELLO, stream=True, stream_options={"include_usage": True},
            extra_body={"simulate": {"token_ms": 1}})
        chunks = list(stream)
        self.assertEqual("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                         "Simulated reply to: Hello")
        self.assertEqual(chunks[-1].usage.total_tokens, 12)

    def test_its_retries_honour_retry_after(self):
        limited = {"mode": "rate_limit", "retry_after_ms": 200}
        completion = self.client(max_retries=2).chat.completions.create(
            model="m", messages=HELLO, user="sdk-retry",
            extra_body={"simulate": {"script": [limited, limited, "ok"]}})
        self.assertEqual(completion.choices[0].finish_reason, "stop")
        verdict = self.server.assert_client_ok("sdk-retry")
        self.assertEqual([attempt["status"] for attempt in verdict["attempts"]], [429, 429, 200])
        self.assertGreaterEqual(min(a["gap_ms"] for a in verdict["attempts"][1:]), 200)

    def test_the_verdict_sees_it_retry_an_exhausted_quota(self):
        with self.assertRaises(openai.RateLimitError):
            self.client(max_retries=1).chat.completions.create(
                model="m", messages=HELLO, user="sdk-quota",
                extra_body={"simulate": {"mode": "quota_exhausted"}})
        codes = [finding["code"] for finding in self.server.verdict("sdk-quota")["findings"]]
        self.assertEqual(codes, ["RETRIED_NON_RETRYABLE"])

    def test_parse_with_no_simulate_gives_the_model(self):
        completion = self.client().chat.completions.parse(model="gpt-4o", messages=HELLO,
                                                          response_format=City)
        self.assertIsInstance(completion.choices[0].message.parsed, City)

    def test_a_streamed_tool_call(self):
        tools = [{"type": "function", "function": {"name": "get_weather",
                                                   "parameters": WEATHER, "strict": True}}]
        with self.client().chat.completions.stream(
                model="m", messages=HELLO, tools=tools, tool_choice="required",
                extra_body={"simulate": {"token_ms": 1}}) as stream:
            completion = stream.get_final_completion()
        [call] = completion.choices[0].message.tool_calls
        self.assertEqual(set(json.loads(call.function.arguments)), {"city", "unit"})
        self.assertEqual(completion.choices[0].finish_reason, "tool_calls")

    def test_a_truncated_stream_raises_nothing(self):
        stream = self.client().chat.completions.create(
            model="m", messages=HELLO, stream=True,
            extra_body={"simulate": {"token_ms": 0, "stream": {"truncate_after": 2}}})
        chunks = list(stream)  # no error: the caller's code has to notice
        self.assertEqual("".join(chunk.choices[0].delta.content or "" for chunk in chunks),
                         "Simulate")
        self.assertEqual({chunk.choices[0].finish_reason for chunk in chunks}, {None})

    def test_quota_exhausted_is_retried_by_the_sdk_unless_told(self):
        with self.assertRaises(openai.RateLimitError) as caught:
            self.client(max_retries=2).chat.completions.create(
                model="m", messages=HELLO, extra_headers={"X-Trace-Id": "quota"},
                extra_body={"simulate": {"mode": "quota_exhausted"}})
        self.assertEqual(caught.exception.code, "insufficient_quota")
        # The SDK retries it (with backoff, no retry headers to go by): a client
        # that must not retry it has to check the code itself.
        self.assertEqual(len(self.journal("?trace_id=quota")), 3)

    def test_sdk_retries_429_honouring_retry_after_ms(self):
        with self.assertRaises(openai.RateLimitError):
            self.client(max_retries=2).chat.completions.create(
                model="m", messages=HELLO, extra_headers={"X-Trace-Id": "sdk-429"},
                extra_body={"simulate": {"mode": "rate_limit", "retry_after_ms": 150}})
        attempts = [entry["monotonic_ms"] for entry in self.journal("?trace_id=sdk-429")]
        self.assertEqual(len(attempts), 3)
        for earlier, later in zip(attempts, attempts[1:]):
            self.assertGreaterEqual(later - earlier, 150)
            self.assertLess(later - earlier, 350)  # the SDK's own back-off starts near 0.5 s

    def test_sdk_times_out_on_hang(self):
        started = time.monotonic()
        with self.assertRaises(openai.APITimeoutError):
            self.client(timeout=0.3).chat.completions.create(
                model="m", messages=HELLO, extra_body={"simulate": {"mode": "hang"}})
        self.assertLess(time.monotonic() - started, 2)

    def test_sdk_fails_on_a_cut_stream(self):
        stream = self.client().chat.completions.create(
            model="m", messages=HELLO, stream=True,
            extra_body={"simulate": {"token_ms": 0, "stream": {"cut_after": 2}}})
        received = []
        with self.assertRaises(Exception) as caught:
            for chunk in stream:
                received.append(chunk)
        self.assertNotIsInstance(caught.exception, AssertionError)
        self.assertEqual(len(received), 3)

    def test_sdk_raises_the_error_event(self):
        stream = self.client().chat.completions.create(
            model="m", messages=HELLO, stream=True,
            extra_body={"simulate": {"token_ms": 0, "stream": {"error_after": 1}}})
        with self.assertRaises(openai.APIError):
            list(stream)


# --- Surfaces: OpenAI Responses, embeddings and completions -----------------------

class ResponsesCalls:
    """Helpers that talk to /v1/responses as an OpenAI client would."""

    def respond(self, **body):
        body.setdefault("model", "gpt-test")
        body.setdefault("input", "Hello")
        return self.call("POST", "/v1/responses", body)

    def stream(self, path="/v1/responses", **body):
        body.setdefault("model", "gpt-test")
        body.setdefault("input", "Hello")
        self.conn.request("POST", path, json.dumps({**body, "stream": True}))
        response = self.conn.getresponse()
        self.assertEqual(response.status, 200)
        return sse_events(response)


class ResponsesTest(ResponsesCalls, AppTestCase):

    def test_a_response(self):
        status, body, _ = self.respond(instructions="Be brief.", metadata={"k": "v"})
        self.assertEqual(status, 200)
        self.assertRegex(body["id"], r"\Aresp_[0-9a-f]{12}\Z")
        self.assertEqual((body["object"], body["status"], body["model"], body["error"],
                          body["incomplete_details"], body["metadata"]),
                         ("response", "completed", "gpt-test", None, None, {"k": "v"}))
        self.assertEqual(body["output"], [{
            "id": "msg_" + body["id"][5:], "type": "message", "role": "assistant",
            "status": "completed", "content": [{"type": "output_text", "annotations": [],
                                                "text": "Simulated reply to: Hello"}]}])
        self.assertEqual(body["usage"], {"input_tokens": 5, "input_tokens_details": {
            "cached_tokens": 0}, "output_tokens": 7, "output_tokens_details": {
            "reasoning_tokens": 0}, "total_tokens": 12})
        self.assertIn("prompt_cache_diagnostics", body)
        self.assertEqual(self.call("GET", "/v1/responses/" + body["id"])[1], body)  # stored

    def test_max_output_tokens_makes_it_incomplete(self):
        body = self.respond(max_output_tokens=2)[1]
        self.assertEqual((body["status"], body["incomplete_details"]),
                         ("incomplete", {"reason": "max_output_tokens"}))
        self.assertEqual(body["output"][0]["content"][0]["text"], "Simulate")

    def test_input_items(self):
        body = self.respond(input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "Sunny"},
            {"role": "user", "content": "Thanks"}])[1]
        self.assertEqual(body["output"][0]["content"][0]["text"], "Simulated reply to: Thanks")

    def test_the_stream_in_openais_order(self):
        events = self.stream(simulate={"latency_ms": 0, "token_ms": 0})
        kinds = [data["type"] for _, data in events]
        self.assertEqual(kinds[:4], ["response.created", "response.in_progress",
                                     "response.output_item.added", "response.content_part.added"])
        self.assertEqual(kinds[-4:], ["response.output_text.done", "response.content_part.done",
                                      "response.output_item.done", "response.completed"])
        self.assertEqual(set(kinds[4:-4]), {"response.output_text.delta"})
        self.assertEqual([name for name, _ in events], kinds)
        self.assertEqual([data["sequence_number"] for _, data in events], list(range(len(events))))
        self.assertEqual("".join(data["delta"] for _, data in events
                                 if data["type"] == "response.output_text.delta"),
                         "Simulated reply to: Hello")
        self.assertEqual(events[-1][1]["response"]["usage"]["total_tokens"], 9)

    def test_a_failing_stream_ends_with_response_failed_and_error_after_with_error(self):
        events = self.stream(simulate={"mode": "fail", "latency_ms": 0, "fail_message": "no"})
        self.assertEqual([data["type"] for _, data in events],
                         ["response.created", "response.in_progress", "response.failed"])
        self.assertEqual(events[-1][1]["response"]["error"], {"code": "server_error",
                                                              "message": "no"})
        events = self.stream(simulate={"latency_ms": 0, "token_ms": 0, "stream": {
            "error_after": 1}})
        self.assertEqual(events[-1][1]["type"], "error")
        self.assertEqual(events[-2][1]["type"], "response.output_text.delta")

    def test_a_background_response_is_a_job(self):
        status, body, _ = self.respond(background=True, simulate={"queue_ms": 100,
                                                                  "latency_ms": 100})
        self.assertEqual((status, body["status"], body["background"]), (200, "queued", True))
        response_id = body["id"]
        self.assertEqual(self.job(response_id)["state"], "queued")  # in the job store
        self.assertIn(response_id, [job["id"] for job in self.call("GET", "/v1/jobs")[1]["jobs"]])
        self.wait_for(response_id)
        body = self.call("GET", "/v1/responses/" + response_id)[1]
        self.assertEqual((body["status"], body["output"][0]["content"][0]["text"]),
                         ("completed", "Simulated reply to: Hello"))

    def test_background_states_follow_the_job(self):
        for simulate, status in [({"mode": "hang"}, "in_progress"),
                                 ({"mode": "fail", "latency_ms": 0}, "failed"),
                                 ({"mode": "timeout"}, "failed")]:
            with self.subTest(simulate=simulate):
                response_id = self.respond(background=True, timeout_ms=50,
                                           simulate=simulate)[1]["id"]
                self.job(response_id, wait_ms=300)
                self.assertEqual(self.call("GET", "/v1/responses/" + response_id)[1]["status"],
                                 status)

    def test_cancel_and_delete(self):
        response_id = self.respond(background=True, simulate={"mode": "hang"})[1]["id"]
        status, body, _ = self.call("POST", f"/v1/responses/{response_id}/cancel")
        self.assertEqual((status, body["status"]), (200, "cancelled"))
        status, body, _ = self.call("DELETE", "/v1/responses/" + response_id)
        self.assertEqual((status, body), (200, {"id": response_id, "object": "response",
                                                "deleted": True}))
        status, body, _ = self.call("GET", "/v1/responses/" + response_id)
        self.assertEqual((status, body["error"]["code"]), (404, "not_found"))
        job_id = self.create()
        self.assertEqual(self.call("GET", "/v1/responses/" + job_id)[0], 404)

    def test_a_background_stream_can_be_resumed(self):
        events = self.stream(background=True, simulate={"latency_ms": 50, "token_ms": 0})
        kinds = [data["type"] for _, data in events]
        self.assertEqual(kinds[:3], ["response.created", "response.queued",
                                     "response.in_progress"])
        self.assertEqual(events[0][1]["response"]["status"], "queued")
        response_id = events[0][1]["response"]["id"]
        self.conn.request("GET", f"/v1/responses/{response_id}?stream=true&starting_after=5")
        again = sse_events(self.conn.getresponse())
        self.assertEqual([data for _, data in again], [data for _, data in events][6:])

    def test_resuming_past_the_last_event_is_an_empty_stream(self):
        events = self.stream(background=True, simulate={"latency_ms": 0, "token_ms": 0})
        response_id = events[0][1]["response"]["id"]
        self.conn.request("GET", f"/v1/responses/{response_id}?stream=true"
                                 f"&starting_after={len(events) + 10}")
        response = self.conn.getresponse()
        self.assertEqual((response.status, response.getheader("Content-Type"), response.read()),
                         (200, "text/event-stream", b""))

    def test_store_false_is_not_kept_and_background_needs_it(self):
        response_id = self.respond(store=False)[1]["id"]
        self.assertEqual(self.call("GET", "/v1/responses/" + response_id)[0], 404)
        status, body, _ = self.respond(store=False, background=True)
        self.assertEqual((status, body["error"]["param"]), (400, "store"))

    def test_poll_faults_and_refusals(self):
        response_id = self.respond(background=True, simulate={
            "mode": "hang", "poll_faults": [{"unknown_state": "paused"}]})[1]["id"]
        self.assertEqual(self.call("GET", "/v1/responses/" + response_id)[1]["status"], "paused")
        status, body, response = self.respond(simulate={"mode": "rate_limit"})
        self.assertEqual((status, body["error"]["code"]), (429, "rate_limit_exceeded"))
        status, body, _ = self.respond(input=[])
        self.assertEqual((status, body["error"]["param"]), (400, "input"))


class ResponsesWireTest(ResponsesCalls, ServerTestCase):
    server_class = LoggingServer

    def test_a_resumed_stream_with_nothing_left_ends_cleanly(self):
        self.server.lines = []
        events = self.stream(background=True, simulate={"latency_ms": 0, "token_ms": 0})
        self.conn.request("GET", f"/v1/responses/{events[0][1]['response']['id']}"
                                 "?stream=true&starting_after=1862")
        response = self.conn.getresponse()
        self.assertEqual((response.status, response.read()), (200, b""))
        self.assertFalse(response.will_close)  # its end was sent: the connection lives
        self.assertEqual(self.call("GET", "/health")[0], 200)
        self.assertEqual(self.server.lines, [])


class ResponsesAgentTest(ResponsesCalls, AppTestCase):
    """Function calls and structured output in the Responses API."""

    TOOLS = [{"type": "function", "name": "get_weather", "parameters": WEATHER},
             {"type": "web_search"}]  # a built-in tool, which has no name

    def test_function_call_items(self):
        body = self.respond(tools=self.TOOLS, tool_choice="required")[1]
        [item] = body["output"]
        self.assertEqual((item["type"], item["status"], item["name"]),
                         ("function_call", "completed", "get_weather"))
        self.assertRegex(item["call_id"], r"\Acall_[0-9a-f]{24}\Z")
        self.assertEqual(set(json.loads(item["arguments"])), {"city", "unit"})
        body = self.respond(tools=self.TOOLS, tool_choice={"type": "function",
                                                           "name": "get_weather"},
                            simulate={"tool_calls": PARIS})[1]
        self.assertEqual(json.loads(body["output"][0]["arguments"]), PARIS[0]["arguments"])

    def test_streamed_function_call_events(self):
        events = self.stream(tools=self.TOOLS, simulate={"tool_calls": PARIS, "token_ms": 0})
        names = [name for name, _ in events]
        self.assertEqual(names[:3], ["response.created", "response.in_progress",
                                     "response.output_item.added"])
        self.assertEqual(names[-3:], ["response.function_call_arguments.done",
                                      "response.output_item.done", "response.completed"])
        deltas = [data["delta"] for name, data in events
                  if name == "response.function_call_arguments.delta"]
        self.assertGreaterEqual(len(deltas), 2)
        done = events[-3][1]
        self.assertEqual(("".join(deltas), done["output_index"]), (done["arguments"], 0))
        self.assertEqual(events[2][1]["item"]["arguments"], "")
        self.assertEqual([data["sequence_number"] for _, data in events],
                         list(range(len(events))))

    def test_text_format_json_schema(self):
        body = self.respond(text={"format": {"type": "json_schema", "name": "w",
                                             "schema": WEATHER, "strict": True}})[1]
        self.assertEqual(set(json.loads(body["output"][0]["content"][0]["text"])),
                         {"city", "unit"})
        status, error, _ = self.respond(text={"format": {"type": "json_schema", "name": "w",
                                                         "schema": {"type": "wrong"}}})
        self.assertEqual((status, error["error"]["param"]), (400, "text.format.schema.type"))

    def test_truncate_after_leaves_out_the_completed_event(self):
        events = self.stream(simulate={"token_ms": 0, "stream": {"truncate_after": 2}})
        names = [name for name, _ in events]
        self.assertEqual(names.count("response.output_text.delta"), 2)
        self.assertNotIn("response.completed", names)
        self.assertEqual(self.respond()[0], 200)  # the same connection, still good


class EmbeddingsTest(AppTestCase):

    def embed(self, server=None, **body):
        body.setdefault("model", "text-embedding-3-small")
        return self.call("POST", "/v1/embeddings", body,
                         conn=self.connect(server) if server else None)

    def test_unit_vectors_that_depend_only_on_model_text_and_dimensions(self):
        status, body, _ = self.embed(input=["Hello", "Hello", "Other"])
        self.assertEqual(status, 200)
        self.assertEqual((body["object"], body["model"], body["usage"]),
                         ("list", "text-embedding-3-small", {"prompt_tokens": 6,
                                                             "total_tokens": 6}))
        vectors = [item["embedding"] for item in body["data"]]
        self.assertEqual([item["index"] for item in body["data"]], [0, 1, 2])
        self.assertEqual([len(vector) for vector in vectors], [1536] * 3)
        self.assertAlmostEqual(sum(value * value for value in vectors[0]), 1, places=5)
        self.assertEqual(vectors[0], vectors[1])
        self.assertNotEqual(vectors[0], vectors[2])
        again = self.embed(self.start({}), input="Hello")[1]["data"][0]["embedding"]
        self.assertEqual(again, vectors[0])  # a fresh server: the same vector
        self.assertNotEqual(self.embed(model="other", input="Hello")[1]["data"][0]["embedding"],
                            vectors[0])
        pinned = self.embed(input="Hello", dimensions=4)[1]["data"][0]["embedding"]
        self.assertEqual(pinned, dummyllm._embedding("text-embedding-3-small", "Hello", 4))

    def test_base64_is_little_endian_float32_of_the_same_vector(self):
        import base64
        plain = self.embed(input="Hello", dimensions=8)[1]["data"][0]["embedding"]
        encoded = self.embed(input="Hello", dimensions=8, encoding_format="base64")[1]
        self.assertEqual(list(struct.unpack("<8f", base64.b64decode(encoded["data"][0][
            "embedding"]))), plain)

    def test_token_lists_and_bad_input(self):
        self.assertEqual(self.embed(input=[[1, 2, 3], [4]])[1]["usage"]["prompt_tokens"], 4)
        for body, param in [({"input": ""}, "input"), ({"input": []}, "input"),
                            ({"input": ["a"] * 2049}, "input"), ({"input": [""]}, "input[0]"),
                            ({"input": "a", "dimensions": 0}, "dimensions"),
                            ({"input": "a", "encoding_format": "hex"}, "encoding_format")]:
            with self.subTest(param=param):
                status, error, _ = self.embed(**body)
                self.assertEqual((status, error["error"]["param"]), (400, param))

    CORPUS = ["How do I reset my password?", "Shipping takes three to five business days.",
              "Our refund policy allows returns within 30 days.",
              "The API rate limit is 60 requests per minute.",
              "Retries should back off exponentially after a 429.",
              "Invoices are emailed on the first day of each month.",
              "You can change the delivery address before the order ships."]
    PARAPHRASES = ["I forgot my password, how can I reset it", "how long does shipping take",
                   "what is the refund policy for returns",
                   "how many requests per minute does the API allow",
                   "should my retries back off exponentially", "when are invoices emailed",
                   "change my delivery address"]

    def nearest(self, server=None, **body):
        """The index in CORPUS of each paraphrase's nearest vector."""
        vectors = [item["embedding"] for item in self.embed(
            server, input=self.CORPUS + self.PARAPHRASES, **body)[1]["data"]]
        corpus, asked = vectors[:len(self.CORPUS)], vectors[len(self.CORPUS):]
        return [max(range(len(corpus)), key=lambda index: sum(
            a * b for a, b in zip(vector, corpus[index]))) for vector in asked]

    def test_similar_vectors_rank_the_source_of_a_paraphrase_first(self):
        in_order = list(range(len(self.CORPUS)))
        for dimensions in (1536, 256, 64):
            with self.subTest(dimensions=dimensions):
                self.assertEqual(self.nearest(dimensions=dimensions,
                                              simulate={"embedding": "similar"}), in_order)
        self.assertNotEqual(self.nearest(), in_order)  # hashed vectors: nearness means nothing
        self.assertEqual(self.nearest(self.start({"embeddings": "similar"})), in_order)
        retry, retries, shipping = self.call("POST", "/api/embed", {
            "model": "m", "input": ["Retry", "retries", "shipping"],
            "simulate": {"embedding": "similar"}})[1]["embeddings"]
        near, far = (sum(a * b for a, b in zip(retry, other)) for other in (retries, shipping))
        self.assertGreater(near, far + 0.2)  # parts of words are shared too

    def test_similar_vectors_are_pure_unit_vectors(self):
        first = self.embed(input=["Hello there", "Hello there", "!!!"], dimensions=16,
                           simulate={"embedding": "similar"})[1]["data"]
        again = self.embed(self.start({"embeddings": "similar"}), input="Hello there",
                           dimensions=16)[1]["data"][0]["embedding"]
        self.assertEqual([first[0]["embedding"], first[1]["embedding"]], [again, again])
        self.assertAlmostEqual(sum(value * value for value in again), 1, places=5)
        self.assertEqual(first[2]["embedding"],  # no word: the hashed vector
                         dummyllm._embedding("text-embedding-3-small", "!!!", 16))
        status, error, _ = self.embed(input="a", simulate={"embedding": "near"})
        self.assertEqual((status, error["error"]["param"]), (400, "simulate.embedding"))

    def test_modes_apply(self):
        self.assertEqual(self.embed(input="a", simulate={"mode": "rate_limit"})[0], 429)
        self.assertEqual(self.embed(input="a", simulate={"mode": "fail", "latency_ms": 0})[0],
                         500)


class CompletionsTest(ChatCalls, AppTestCase):

    def test_a_completion_plain_and_streamed(self):
        status, body, _ = self.call("POST", "/v1/completions", {"model": "m", "prompt": "Hello",
                                                                "max_tokens": 2})
        self.assertEqual(status, 200)
        self.assertEqual((body["object"], body["choices"][0]["text"],
                          body["choices"][0]["finish_reason"], body["usage"]["total_tokens"]),
                         ("text_completion", "Simulate", "length", 4))
        self.conn.request("POST", "/v1/completions", json.dumps({
            "model": "m", "prompt": ["Hel", "lo"], "stream": True,
            "simulate": {"token_ms": 0, "latency_ms": 0}}))
        events = self.events(self.conn.getresponse())
        self.assertEqual(events[-1], "[DONE]")
        self.assertEqual("".join(event["choices"][0]["text"] for event in events[:-1]),
                         "Simulated reply to: Hel\nlo")
        self.assertEqual(events[-2]["choices"][0]["finish_reason"], "stop")
        status, body, _ = self.call("POST", "/v1/completions", {"model": "m", "prompt": "x",
                                                                "echo": True})
        self.assert_openai_error(status, body, 400, "invalid_request_error", param="echo")


# --- Surfaces: Azure OpenAI -------------------------------------------------------

class AzureTest(AppTestCase):
    """Azure's paths, key, errors and content filter over the OpenAI surfaces."""

    options = {"latency_ms": 0}
    CHAT = {"messages": HELLO[1:]}
    DEPLOYMENT = "/openai/deployments/my-gpt/chat/completions?api-version=2024-10-21"

    def test_a_deployment_names_the_model_and_the_filter_passes_it(self):
        status, body, _ = self.call("POST", self.DEPLOYMENT, self.CHAT)
        self.assertEqual((status, body["model"], body["choices"][0]["message"]["content"]),
                         (200, "my-gpt", "Simulated reply to: Hello"))
        self.assertEqual(body["prompt_filter_results"][0]["content_filter_results"]["hate"],
                         {"filtered": False, "severity": "safe"})
        self.assertFalse(body["choices"][0]["content_filter_results"]["violence"]["filtered"])
        status, body, _ = self.call("POST", "/openai/v1/chat/completions",
                                    dict(self.CHAT, model="gpt-4o"))
        self.assertEqual((status, body["model"]), (200, "gpt-4o"))
        for path, body in [
                ("/openai/deployments/emb/embeddings?api-version=2024-10-21",
                 {"input": "Hi", "dimensions": 4}),
                ("/openai/deployments/inst/completions?api-version=2024-10-21", {"prompt": "Hi"})]:
            with self.subTest(path=path):
                self.assertEqual(self.call("POST", path, body)[0], 200)
        self.assertEqual(self.journal()[0]["surface"], "azure.chat")

    def test_what_azure_refuses_in_its_shape(self):
        path = "/openai/deployments/my-gpt/chat/completions"
        self.assertEqual(self.call("POST", path, self.CHAT)[:2], (
            404, {"error": {"code": "404", "message": "Resource not found"}}))
        self.assertEqual(self.call("POST", path, b"{")[0], 404)  # before the body is read
        status, body, _ = self.call("POST", path + "?api-version=", self.CHAT)
        self.assertEqual((status, body["error"]["param"]), (400, "api-version"))
        status, body, response = self.call("POST", self.DEPLOYMENT, dict(
            self.CHAT, simulate={"mode": "rate_limit", "retry_after_ms": 2000}))
        self.assertEqual((status, body["error"]["code"], response.getheader("retry-after")),
                         (429, "429", "2"))
        status, body, _ = self.call("POST", self.DEPLOYMENT, {"messages": []})
        self.assertEqual((status, body["error"]["type"], body["error"]["param"]),
                         (400, "invalid_request_error", "messages"))
        status, body, _ = self.call("POST", "/openai/v1/chat/completions", self.CHAT)
        self.assertEqual((status, body["error"]["param"]), (400, "model"))

    def test_the_responses_api_under_openai_and_v1(self):
        status, response, _ = self.call("POST", "/openai/responses?api-version=2025-04-01-preview",
                                        {"model": "my-deployment", "input": "Hello"})
        self.assertEqual((status, response["model"], response["output"][0]["content"][0]["text"]),
                         (200, "my-deployment", "Simulated reply to: Hello"))
        self.assertEqual(self.call("GET", f"/openai/v1/responses/{response['id']}")[1]["id"],
                         response["id"])
        self.assertEqual(self.call("GET", f"/openai/responses/{response['id']}")[:2], (
            404, {"error": {"code": "404", "message": "Resource not found"}}))
        self.assertEqual(self.call("POST", "/openai/v1/responses", {"input": "Hi"})[0], 400)

    def test_the_api_key_header(self):
        app = self.start({"api_key": "sk-azure", "latency_ms": 0})
        conn = self.connect(app)
        self.assertEqual(self.call("POST", self.DEPLOYMENT, self.CHAT, conn=conn)[:2], (401, {
            "error": {"code": "401", "message": self.call(
                "POST", self.DEPLOYMENT, self.CHAT, conn=conn)[1]["error"]["message"]}}))
        for headers in ({"api-key": "sk-azure"}, {"Authorization": "Bearer sk-azure"}):
            with self.subTest(headers=headers):
                self.assertEqual(self.call("POST", self.DEPLOYMENT, self.CHAT, headers=headers,
                                           conn=conn)[0], 200)


@needs(openai, "openai", "DUMMYLLM_REQUIRE_OPENAI")
class AzureSDKTest(ServerTestCase):
    """openai.AzureOpenAI, unchanged but for its endpoint."""

    options = {"latency_ms": 0}

    def client(self, **options):
        return openai.AzureOpenAI(azure_endpoint=self.server.url, api_key="x",
                                  api_version="2024-10-21", **options)

    def test_chat_stream_embeddings_and_completions(self):
        client = self.client()
        answer = client.chat.completions.create(model="my-gpt", messages=HELLO[1:])
        self.assertEqual((answer.model, answer.choices[0].message.content),
                         ("my-gpt", "Simulated reply to: Hello"))
        stream = client.chat.completions.create(model="my-gpt", messages=HELLO[1:], stream=True,
                                                extra_body={"simulate": {"token_ms": 0}})
        self.assertEqual("".join(chunk.choices[0].delta.content or "" for chunk in stream
                                 if chunk.choices), "Simulated reply to: Hello")
        self.assertEqual(len(client.embeddings.create(model="emb", input="Hi", dimensions=8)
                             .data[0].embedding), 8)
        self.assertEqual(client.completions.create(model="inst", prompt="Hi").choices[0].text,
                         "Simulated reply to: Hi")

    def test_the_responses_api(self):
        client = self.client(max_retries=0)
        response = client.responses.create(model="my-deployment", input="Hello")
        self.assertEqual((response.model, response.output_text),
                         ("my-deployment", "Simulated reply to: Hello"))
        self.assertEqual(client.responses.retrieve(response.id).status, "completed")
        with client.responses.stream(model="my-deployment", input="Hello",
                                     extra_body={"simulate": {"token_ms": 0}}) as stream:
            self.assertEqual(stream.get_final_response().output_text, "Simulated reply to: Hello")
        client.responses.delete(response.id)
        self.assertEqual([entry["path"] for entry in self.journal()], [
            "/openai/responses", f"/openai/responses/{response.id}", "/openai/responses",
            f"/openai/responses/{response.id}"])
        self.assertEqual(self.journal()[0]["surface"], "azure.responses")

    def test_the_sdk_retries_a_429_and_raises_it(self):
        client = self.client(max_retries=1)
        with self.assertRaises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="my-gpt", messages=HELLO[1:], extra_body={
                "simulate": {"mode": "rate_limit", "retry_after_ms": 10}})
        self.assertEqual(caught.exception.body, {"code": "429", "message": caught.exception.body[
            "message"]})
        self.assertEqual([entry["status"] for entry in self.journal()], [429, 429])


# --- Surfaces: Anthropic Messages -------------------------------------------------

def sse_events(response):
    """The (event name, data as JSON) of each server-sent event."""
    events, name = [], None
    for line in iter(response.readline, b""):
        if line.startswith(b"event: "):
            name = line[7:].strip().decode()
        elif line.startswith(b"data: "):
            events.append((name, json.loads(line[6:])))
            name = None
    return events


class AnthropicCalls:
    """Helpers that talk to /v1/messages as an Anthropic client would."""

    ASK = [{"role": "user", "content": "Hello"}]

    def message(self, headers=None, **body):
        body.setdefault("model", "claude-test")
        body.setdefault("max_tokens", 100)
        body.setdefault("messages", self.ASK)
        return self.call("POST", "/v1/messages", body, headers=headers)

    def open_stream(self, **body):
        body.setdefault("model", "claude-test")
        body.setdefault("max_tokens", 100)
        body.setdefault("messages", self.ASK)
        self.conn.request("POST", "/v1/messages", json.dumps({**body, "stream": True}))
        response = self.conn.getresponse()
        self.assertEqual((response.status, response.getheader("Content-Type")),
                         (200, "text/event-stream"))
        return response

    def assert_anthropic_error(self, status, body, response, expected_status, kind):
        self.assertEqual(status, expected_status, body)
        self.assertEqual((body["type"], body["error"]["type"]), ("error", kind))
        self.assertIsInstance(body["error"]["message"], str)
        self.assertRegex(body["request_id"], r"\Areq_[0-9a-f]{24}\Z")
        self.assertEqual(response.getheader("request-id"), body["request_id"])


class AnthropicMessagesTest(AnthropicCalls, AppTestCase):

    def test_a_message(self):
        status, body, _ = self.message(system="Be brief.")
        self.assertEqual(status, 200)
        self.assertRegex(body["id"], r"\Amsg_[0-9a-f]{24}\Z")
        self.assertEqual(body, {"id": body["id"], "type": "message", "role": "assistant",
                                "model": "claude-test",
                                "content": [{"type": "text", "text": "Simulated reply to: Hello"}],
                                "stop_reason": "end_turn", "stop_sequence": None,
                                "usage": {"input_tokens": 5, "output_tokens": 7}})

    def test_blocks_max_tokens_and_stop_sequences(self):
        ask = [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                            {"type": "image", "source": {}}]}]
        body = self.message(messages=ask, max_tokens=2)[1]
        self.assertEqual((body["content"][0]["text"], body["stop_reason"]),
                         ("Simulated reply to: Hi"[:8], "max_tokens"))
        body = self.message(stop_sequences=["END", "reply"],
                            simulate={"ok_text": "one reply END"})[1]
        self.assertEqual((body["content"][0]["text"], body["stop_reason"], body["stop_sequence"]),
                         ("one ", "stop_sequence", "reply"))

    def test_count_tokens(self):
        status, body, _ = self.call("POST", "/v1/messages/count_tokens", {
            "model": "c", "system": [{"type": "text", "text": "Be brief."}],
            "messages": self.ASK})
        self.assertEqual((status, body), (200, {"input_tokens": 5}))

    def test_the_stream_in_anthropics_order(self):
        events = sse_events(self.open_stream(simulate={"latency_ms": 0, "token_ms": 0}))
        names = [name for name, _ in events]
        self.assertEqual(names[:3], ["message_start", "content_block_start", "ping"])
        self.assertEqual(names[-3:], ["content_block_stop", "message_delta", "message_stop"])
        self.assertEqual(set(names[3:-3]), {"content_block_delta"})
        self.assertTrue(all(data["type"] == name for name, data in events))
        start = events[0][1]["message"]
        self.assertEqual((start["content"], start["stop_reason"], start["usage"]["input_tokens"]),
                         ([], None, 2))
        self.assertEqual("".join(data["delta"]["text"] for name, data in events
                                 if name == "content_block_delta"), "Simulated reply to: Hello")
        self.assertEqual(events[-2][1]["delta"]["stop_reason"], "end_turn")
        self.assertEqual(events[-2][1]["usage"], {"output_tokens": 7})

    def test_error_after_is_an_overloaded_error_event(self):
        events = sse_events(self.open_stream(simulate={"latency_ms": 0, "token_ms": 0,
                                                       "stream": {"error_after": 2}}))
        self.assertEqual([name for name, _ in events][-3:],
                         ["content_block_delta", "content_block_delta", "error"])
        self.assertEqual(events[-1][1], {"type": "error", "error": {
            "type": "overloaded_error", "message": "Overloaded"}})

    def test_cut_after(self):
        response = self.open_stream(simulate={"latency_ms": 0, "token_ms": 0,
                                              "stream": {"cut_after": 1}})
        with self.assertRaises(http.client.IncompleteRead) as caught:
            response.read()
        self.assertNotIn(b"message_stop", caught.exception.partial)

    def test_errors_in_anthropics_shape(self):
        status, body, response = self.message(max_tokens=None)
        self.assert_anthropic_error(status, body, response, 400, "invalid_request_error")
        self.assertIn("max_tokens", body["error"]["message"])
        status, body, response = self.message(messages=[{"role": "system", "content": "x"}])
        self.assert_anthropic_error(status, body, response, 400, "invalid_request_error")
        self.assertIn("messages[0]", body["error"]["message"])
        status, body, response = self.call("POST", "/v1/messages/nope", {})
        self.assert_anthropic_error(status, body, response, 404, "not_found_error")
        for simulate, expected, kind in [
                ({"mode": "fail", "latency_ms": 0}, 500, "api_error"),
                ({"mode": "overloaded"}, 529, "overloaded_error"),
                ({"mode": "overloaded", "status": 503}, 503, "overloaded_error"),
                ({"mode": "timeout"}, 504, "timeout_error")]:
            with self.subTest(simulate=simulate):
                status, body, response = self.message(simulate=simulate, timeout_ms=50)
                self.assert_anthropic_error(status, body, response, expected, kind)

    def test_rate_limit_headers(self):
        started = self.clock.wall_ms() / 1000
        status, body, response = self.message(simulate={"mode": "rate_limit",
                                                        "retry_after_ms": 3000})
        self.assert_anthropic_error(status, body, response, 429, "rate_limit_error")
        self.assertEqual([response.getheader(name) for name in (
            "retry-after", "anthropic-ratelimit-requests-limit",
            "anthropic-ratelimit-requests-remaining")], ["3", "60", "0"])
        reset = time.mktime(time.strptime(response.getheader("anthropic-ratelimit-requests-reset"),
                                          "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
        self.assertAlmostEqual(reset, started + 3, delta=2)

    def test_the_key_of_seeded_sequences_is_metadata_user_id(self):
        script = {"script": ["rate_limit", "ok"], "latency_ms": 0}
        statuses = [self.message(metadata={"user_id": "u1"}, simulate=script)[0]
                    for _ in range(3)]
        self.assertEqual(statuses, [429, 200, 200])
        self.assertEqual(self.message(headers={"X-DummyLLM-Simulate": json.dumps(script),
                                               "X-Trace-Id": "t1"})[0], 429)


class AnthropicToolUseTest(AnthropicCalls, AppTestCase):
    """tool_use blocks, streamed as Anthropic streams them, and the errors apps must handle."""

    TOOLS = [{"name": "get_weather", "input_schema": WEATHER}, {"name": "get_time",
                                                                "input_schema": {
                                                                    "type": "object"}}]

    def test_tool_use_blocks(self):
        body = self.message(tools=self.TOOLS, tool_choice={"type": "tool", "name": "get_time"})[1]
        self.assertEqual(body["stop_reason"], "tool_use")
        [block] = body["content"]
        self.assertEqual((block["type"], block["name"], block["input"]),
                         ("tool_use", "get_time", {}))
        body = self.message(tools=self.TOOLS, tool_choice={"type": "any"})[1]
        self.assertEqual(set(body["content"][0]["input"]), {"city", "unit"})
        status, error, response = self.message(tools=self.TOOLS, tool_choice={
            "type": "tool", "name": "nope"})
        self.assert_anthropic_error(status, error, response, 400, "invalid_request_error")
        self.assertIn("tool_choice.name", error["error"]["message"])

    def test_streamed_tool_use(self):
        events = sse_events(self.open_stream(tools=self.TOOLS, simulate={
            "tool_calls": PARIS, "token_ms": 0}))
        names = [name for name, _ in events]
        self.assertEqual(names[:3], ["message_start", "ping", "content_block_start"])
        self.assertEqual(events[2][1]["content_block"]["input"], {})
        deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
        self.assertGreaterEqual(len(deltas), 2)
        self.assertEqual({delta["type"] for delta in deltas}, {"input_json_delta"})
        self.assertEqual(json.loads("".join(delta["partial_json"] for delta in deltas)),
                         PARIS[0]["arguments"])
        self.assertEqual(names[-3:], ["content_block_stop", "message_delta", "message_stop"])
        self.assertEqual(events[-2][1]["delta"]["stop_reason"], "tool_use")

    def test_a_tool_result_is_the_last_turn(self):
        self.call("POST", "/v1/rules", {"match": {"tool_result_for": "get_weather",
                                                  "last_role": "tool"},
                                        "simulate": {"ok_text": "Sunny"}})
        messages = [*self.ASK, {"role": "assistant", "content": [{
            "type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                          "content": "sunny"}]}]
        self.assertEqual(self.message(messages=messages)[1]["content"][0]["text"], "Sunny")

    def test_truncate_after_leaves_out_message_stop(self):
        events = sse_events(self.open_stream(simulate={"token_ms": 0,
                                                       "stream": {"truncate_after": 2}}))
        names = [name for name, _ in events]
        self.assertEqual(names.count("content_block_delta"), 2)
        self.assertNotIn("message_stop", names)
        self.assertNotIn("message_delta", names)

    def test_the_context_window_and_the_spend_limit(self):
        status, body, response = self.message(simulate={"context_window": 1})
        self.assert_anthropic_error(status, body, response, 400, "invalid_request_error")
        self.assertTrue(body["error"]["message"].startswith("prompt is too long"))
        status, body, response = self.message(simulate={"mode": "quota_exhausted"})
        self.assert_anthropic_error(status, body, response, 429, "rate_limit_error")
        self.assertEqual(body["error"]["details"],
                         {"error_code": "enforced_spend_limit_reached"})
        self.assertIsNone(response.getheader("retry-after"))


class AnthropicKeyTest(AnthropicCalls, AppTestCase):
    options = {"api_key": "sk-ant"}

    def test_x_api_key_or_bearer(self):
        status, body, response = self.message()
        self.assert_anthropic_error(status, body, response, 401, "authentication_error")
        self.assertEqual(self.message(headers={"x-api-key": "sk-ant",
                                               "anthropic-version": "2023-06-01"})[0], 200)
        self.assertEqual(self.message(headers={"Authorization": "Bearer sk-ant"})[0], 200)


class PayloadLimitTest(AnthropicCalls, AppTestCase):
    options = {"max_body_bytes": 100}

    def test_too_large_is_request_too_large(self):
        status, body, response = self.message(messages=[{"role": "user", "content": "x" * 200}])
        self.assert_anthropic_error(status, body, response, 413, "request_too_large")


# --- Surfaces: Gemini -------------------------------------------------------------

ASK_GEMINI = {"contents": [{"role": "user", "parts": [{"text": "Hello"}]}]}


class GeminiCalls:
    """Helpers that talk to Gemini's endpoints as its clients would."""

    def generate(self, model="gemini-test", call="generateContent", version="v1beta",
                 headers=None, query="", **body):
        return self.call("POST", f"/{version}/models/{model}:{call}{query}",
                         {**ASK_GEMINI, **body}, headers=headers)

    def stream(self, query="?alt=sse", **simulate):
        self.conn.request("POST", f"/v1beta/models/g:streamGenerateContent{query}",
                          json.dumps({**ASK_GEMINI, "simulate": {"latency_ms": 0, "token_ms": 0,
                                                                 **simulate}}))
        return self.conn.getresponse()

    def assert_google_error(self, status, body, expected_status, google_status):
        self.assertEqual(status, expected_status, body)
        self.assertEqual((body["error"]["code"], body["error"]["status"]),
                         (expected_status, google_status))
        self.assertIsInstance(body["error"]["message"], str)


class GeminiTest(GeminiCalls, AppTestCase):

    def test_a_calls_path_is_its_own_not_a_models(self):
        # /v1/models/{id+} (OpenAI's) and /v1beta/models/{model} match it too.
        for version in ("v1beta", "v1"):
            with self.subTest(version=version):
                status, body, response = self.call("GET", f"/{version}/models/g:countTokens")
                self.assert_google_error(status, body, 405, "NOT_FOUND")
                self.assertEqual(response.getheader("Allow"), "POST")
        self.assertEqual(self.call("GET", "/v1/models/ft:gpt-4o:acme:1")[1]["id"],
                         "ft:gpt-4o:acme:1")

    def test_generate_content_under_v1beta_and_v1(self):
        for version in ("v1beta", "v1"):
            with self.subTest(version=version):
                status, body, _ = self.generate(version=version, systemInstruction={
                    "parts": [{"text": "Be brief."}]})
                self.assertEqual(status, 200)
                self.assertEqual(body["candidates"], [{
                    "content": {"role": "model", "parts": [{"text": "Simulated reply to: Hello"}]},
                    "finishReason": "STOP", "index": 0}])
                self.assertEqual(body["usageMetadata"], {"promptTokenCount": 5,
                                                         "candidatesTokenCount": 7,
                                                         "totalTokenCount": 12})
                self.assertEqual(body["modelVersion"], "gemini-test")
                self.assertIsInstance(body["responseId"], str)

    def test_max_output_tokens_and_stop_sequences(self):
        body = self.generate(generationConfig={"maxOutputTokens": 1})[1]
        self.assertEqual(body["candidates"][0]["finishReason"], "MAX_TOKENS")
        self.assertEqual(body["candidates"][0]["content"]["parts"][0]["text"], "Simu")
        body = self.generate(generationConfig={"stopSequences": ["reply"]})[1]
        self.assertEqual(body["candidates"][0]["content"]["parts"][0]["text"], "Simulated ")

    def test_stream_as_server_sent_events(self):
        response = self.stream()
        self.assertEqual(response.getheader("Content-Type"), "text/event-stream")
        events = [data for _, data in sse_events(response)]
        self.assertEqual("".join(event["candidates"][0]["content"]["parts"][0]["text"]
                                 for event in events), "Simulated reply to: Hello")
        self.assertEqual(events[-1]["candidates"][0]["finishReason"], "STOP")
        self.assertEqual(events[-1]["usageMetadata"]["totalTokenCount"], 9)
        self.assertNotIn("finishReason", events[0]["candidates"][0])

    def test_stream_as_one_json_array(self):
        response = self.stream(query="")
        self.assertEqual(response.getheader("Content-Type"), "application/json")
        events = json.loads(response.read())
        self.assertEqual(len(events), 8)  # 7 pieces, then the finish
        self.assertEqual(events[-1]["candidates"][0]["finishReason"], "STOP")
        response = self.stream(query="", stream={"error_after": 1})
        events = json.loads(response.read())
        self.assertEqual(events[-1], {"error": {"code": 500, "message": "simulated stream error",
                                                "status": "INTERNAL"}})

    def test_error_after_as_an_event(self):
        events = [data for _, data in sse_events(self.stream(stream={"error_after": 2}))]
        self.assertEqual(len(events), 3)
        self.assertEqual(events[-1]["error"]["status"], "INTERNAL")

    def test_count_tokens_and_models(self):
        status, body, _ = self.call("POST", "/v1/models/g:countTokens", ASK_GEMINI)
        self.assertEqual((status, body), (200, {"totalTokens": 2}))
        status, body, _ = self.call("GET", "/v1beta/models")
        self.assertEqual((status, body["models"][0]["name"]), (200, "models/gemini-dummyllm"))
        status, body, _ = self.call("GET", "/v1beta/models/gemini-2.5-pro")
        self.assertEqual((status, body["name"]), (200, "models/gemini-2.5-pro"))

    def test_errors_in_googles_shape(self):
        status, body, _ = self.call("POST", "/v1beta/models/g:generateContent", {"contents": []})
        self.assert_google_error(status, body, 400, "INVALID_ARGUMENT")
        self.assertIn("contents", body["error"]["message"])
        for call in ("generateContent", "countTokens"):
            status, body, _ = self.call("POST", f"/v1beta/models/g:{call}", {
                "contents": [{"parts": [{"text": "Hi"}, {"text": 7}]}]})
            self.assert_google_error(status, body, 400, "INVALID_ARGUMENT")
            self.assertIn("contents[0].parts[1].text", body["error"]["message"])
        status, body, _ = self.call("POST", "/v1beta/files", {})
        self.assert_google_error(status, body, 404, "NOT_FOUND")
        for simulate, expected, google_status in [
                ({"mode": "fail", "latency_ms": 0}, 500, "INTERNAL"),
                ({"mode": "overloaded"}, 503, "UNAVAILABLE"),
                ({"mode": "timeout"}, 504, "DEADLINE_EXCEEDED")]:
            with self.subTest(simulate=simulate):
                status, body, _ = self.generate(simulate=simulate, timeout_ms=50)
                self.assert_google_error(status, body, expected, google_status)

    def test_429_carries_retry_info(self):
        status, body, response = self.generate(simulate={"mode": "rate_limit",
                                                         "retry_after_ms": 1500})
        self.assert_google_error(status, body, 429, "RESOURCE_EXHAUSTED")
        self.assertEqual(body["error"]["details"], [{
            "@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1.5s"}])
        self.assertEqual(response.getheader("retry-after"), "2")


class GeminiFunctionCallTest(GeminiCalls, AppTestCase):
    """functionCall parts, responseSchema, and the errors apps must handle."""

    TOOLS = [{"functionDeclarations": [
        {"name": "get_weather", "parameters": {
            "type": "OBJECT", "properties": {"city": {"type": "STRING"},
                                             "unit": {"type": "STRING", "enum": ["c", "f"]}},
            "required": ["city", "unit"]}},
        {"name": "get_time", "parameters_json_schema": {"type": "object", "properties": {
            "zone": {"type": "string"}}, "required": ["zone"]}}]}]

    def test_mode_any_calls_a_function(self):
        for config, name, keys in [({"mode": "ANY"}, "get_weather", {"city", "unit"}),
                                   ({"mode": "ANY", "allowedFunctionNames": ["get_time"]},
                                    "get_time", {"zone"})]:
            with self.subTest(config=config):
                body = self.generate(tools=self.TOOLS, toolConfig={
                    "functionCallingConfig": config})[1]
                [part] = body["candidates"][0]["content"]["parts"]
                self.assertEqual((part["functionCall"]["name"], set(part["functionCall"]["args"])),
                                 (name, keys))
                self.assertEqual(body["candidates"][0]["finishReason"], "STOP")
        body = self.generate(tools=self.TOOLS)[1]  # AUTO: text
        self.assertIn("text", body["candidates"][0]["content"]["parts"][0])

    def test_a_streamed_function_call_comes_whole(self):
        self.conn.request("POST", "/v1beta/models/g:streamGenerateContent?alt=sse", json.dumps({
            **ASK_GEMINI, "tools": self.TOOLS, "simulate": {"token_ms": 0, "tool_calls": PARIS}}))
        events = sse_events(self.conn.getresponse())
        self.assertEqual(events[0][1]["candidates"][0]["content"]["parts"][0]["functionCall"][
            "args"], PARIS[0]["arguments"])
        self.assertEqual(events[-1][1]["candidates"][0]["finishReason"], "STOP")

    def test_response_schema_and_json_mime_type(self):
        schema = self.TOOLS[0]["functionDeclarations"][0]["parameters"]
        body = self.generate(generationConfig={"responseMimeType": "application/json",
                                               "responseSchema": schema})[1]
        text = body["candidates"][0]["content"]["parts"][0]["text"]
        self.assertEqual(set(json.loads(text)), {"city", "unit"})
        body = self.generate(generationConfig={"responseMimeType": "application/json"})[1]
        self.assertIsInstance(json.loads(body["candidates"][0]["content"]["parts"][0]["text"]),
                              dict)

    def test_a_json_schema_is_an_object_or_a_boolean(self):
        body = self.generate(generationConfig={"responseJsonSchema": True})[1]
        json.loads(body["candidates"][0]["content"]["parts"][0]["text"])
        for schema, reason in (("0", "must be a JSON Schema: an object or a boolean"),
                               (False, "is false: no value is valid")):
            status, body, _ = self.generate(generationConfig={"responseJsonSchema": schema})
            self.assert_google_error(status, body, 400, "INVALID_ARGUMENT")
            self.assertEqual(body["error"]["message"],
                             "generationConfig.responseJsonSchema " + reason)
        # Both refusals are declared in the document, where the fuzzer reads them.
        refuses = self.call("GET", "/openapi.json")[1]["paths"][
            "/v1beta/models/{model}:generateContent"]["post"]["x-dummyllm-refuses"]
        self.assertIn("generationConfig.responseJsonSchema", refuses)

    def test_truncate_after_leaves_out_the_finish(self):
        response = self.stream(stream={"truncate_after": 2})
        events = sse_events(response)
        self.assertEqual(len(events), 2)
        self.assertTrue(all("finishReason" not in data["candidates"][0] for _, data in events))

    def test_the_context_window_and_the_quota(self):
        status, body, _ = self.generate(simulate={"context_window": 1})
        self.assert_google_error(status, body, 400, "INVALID_ARGUMENT")
        status, body, response = self.generate(simulate={"mode": "quota_exhausted"})
        self.assert_google_error(status, body, 429, "RESOURCE_EXHAUSTED")
        self.assertNotIn("details", body["error"])  # no RetryInfo: do not retry
        self.assertIsNone(response.getheader("retry-after"))


class GeminiKeyTest(GeminiCalls, AppTestCase):
    options = {"api_key": "g-key"}

    def test_x_goog_api_key_or_the_key_parameter(self):
        status, body, _ = self.generate()
        self.assert_google_error(status, body, 401, "UNAUTHENTICATED")
        self.assertEqual(self.generate(headers={"x-goog-api-key": "g-key"})[0], 200)
        self.assertEqual(self.generate(query="?key=g-key")[0], 200)


# --- Surfaces: Ollama -------------------------------------------------------------

class OllamaCalls:
    def lines(self, path, **body):
        self.conn.request("POST", path, json.dumps(body))
        response = self.conn.getresponse()
        self.assertEqual(response.getheader("Content-Type"), "application/x-ndjson")
        return [json.loads(line) for line in response.read().splitlines()]


class OllamaTest(OllamaCalls, AppTestCase):

    def test_chat_streams_ndjson_by_default(self):
        lines = self.lines("/api/chat", model="llama3.2", messages=[
            {"role": "user", "content": "Hello"}], simulate={"latency_ms": 30, "token_ms": 10})
        self.assertEqual("".join(line["message"]["content"] for line in lines),
                         "Simulated reply to: Hello")
        self.assertTrue(all(line["done"] is False for line in lines[:-1]))
        final = lines[-1]
        self.assertEqual((final["done"], final["done_reason"], final["eval_count"],
                          final["prompt_eval_count"]), (True, "stop", 7, 2))
        self.assertEqual(final["total_duration"], (30 + 6 * 10) * 1_000_000)
        self.assertEqual(final["eval_duration"], 60 * 1_000_000)
        self.assertEqual(final["prompt_eval_duration"] + final["eval_duration"],
                         final["total_duration"])
        self.assertRegex(final["created_at"], r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z\Z")

    def test_chat_and_generate_in_one_object(self):
        status, body, _ = self.call("POST", "/api/chat", {
            "model": "m", "stream": False, "options": {"num_predict": 1},
            "messages": [{"role": "user", "content": "Hello"}]})
        self.assertEqual((status, body["message"], body["done_reason"]),
                         (200, {"role": "assistant", "content": "Simu"}, "length"))
        status, body, _ = self.call("POST", "/api/generate", {"model": "m", "prompt": "Hi",
                                                              "stream": False})
        self.assertEqual((body["response"], body["done"], body["context"]),
                         ("Simulated reply to: Hi", True, []))

    def test_embed_gives_the_vectors_of_v1_embeddings(self):
        status, body, _ = self.call("POST", "/api/embed", {"model": "nomic", "input": ["a", "b"]})
        self.assertEqual((status, len(body["embeddings"])), (200, 2))
        openai_vector = self.call("POST", "/v1/embeddings", {"model": "nomic", "input": "a"})[1]
        self.assertEqual(body["embeddings"][0], openai_vector["data"][0]["embedding"])
        self.assertEqual(self.call("POST", "/api/embeddings", {"model": "nomic", "prompt": "a"})
                         [1]["embedding"], body["embeddings"][0])

    def test_models_show_ps_version(self):
        self.assertEqual(self.call("GET", "/api/tags")[1]["models"][0]["name"], "dummyllm:latest")
        self.assertEqual(self.call("GET", "/api/ps")[1]["models"][0]["name"], "dummyllm:latest")
        self.assertIn("version", self.call("GET", "/api/version")[1])
        self.assertEqual(self.call("POST", "/api/show", {"model": "llama3.2"})[1]["modelfile"],
                         "FROM llama3.2")

    def test_errors_are_an_error_string_and_stream_faults_are_lines(self):
        status, body, _ = self.call("POST", "/api/chat", {"messages": []})
        self.assertEqual((status, set(body)), (400, {"error"}))
        self.assertIn("model", body["error"])
        status, body, response = self.call("POST", "/api/chat", {
            "model": "m", "stream": False, "simulate": {"mode": "rate_limit"}})
        self.assertEqual((status, response.getheader("retry-after")), (429, "1"))
        lines = self.lines("/api/chat", model="m", messages=[{"role": "user", "content": "Hi"}],
                           simulate={"latency_ms": 0, "token_ms": 0, "stream": {"error_after": 1},
                                     "fail_message": "gone"})
        self.assertEqual(lines[-1], {"error": "gone"})
        self.conn.close()  # the server closed it after the error line
        self.conn.request("POST", "/api/chat", json.dumps({
            "model": "m", "messages": [{"role": "user", "content": "Hi"}],
            "simulate": {"latency_ms": 0, "token_ms": 0, "stream": {"cut_after": 1}}}))
        with self.assertRaises(http.client.IncompleteRead):
            self.conn.getresponse().read()


class OllamaAgentTest(OllamaCalls, AppTestCase):
    """Tool calls (arguments as an object), format, and a truncated stream."""

    def test_tool_calls_plain_and_streamed(self):
        ask = {"model": "llama3.2", "messages": [{"role": "user", "content": "Weather?"}],
               "tools": OPENAI_TOOLS}
        status, body, _ = self.call("POST", "/api/chat", {**ask, "stream": False, "simulate": {
            "tool_calls": PARIS}})
        self.assertEqual(status, 200)
        [call] = body["message"]["tool_calls"]
        self.assertEqual(call["function"]["arguments"], PARIS[0]["arguments"])
        lines = self.lines("/api/chat", **ask, simulate={"tool_calls": PARIS, "token_ms": 0})
        self.assertEqual(lines[0]["message"]["tool_calls"][0]["function"]["name"],
                         "get_weather")
        self.assertEqual((lines[-1]["done"], lines[-1]["done_reason"]), (True, "stop"))

    def test_format_json_and_a_schema(self):
        ask = {"model": "llama3.2", "stream": False, "messages": [{"role": "user",
                                                                  "content": "Weather?"}]}
        body = self.call("POST", "/api/chat", {**ask, "format": WEATHER})[1]
        self.assertEqual(set(json.loads(body["message"]["content"])), {"city", "unit"})
        body = self.call("POST", "/api/generate", {"model": "m", "prompt": "x", "stream": False,
                                                   "format": "json"})[1]
        self.assertIsInstance(json.loads(body["response"]), dict)
        status, body, _ = self.call("POST", "/api/generate", {"model": "m", "prompt": "x",
                                                              "format": "yaml"})
        self.assertEqual((status, body), (400, {"error": 'format must be "json" or a JSON '
                                                         'Schema'}))

    def test_truncate_after_leaves_out_the_done_line(self):
        lines = self.lines("/api/chat", model="m", messages=[{"role": "user", "content": "Hi"}],
                           simulate={"token_ms": 0, "stream": {"truncate_after": 3}})
        self.assertEqual(len(lines), 3)
        self.assertTrue(all(line["done"] is False for line in lines))


# --- Surfaces: Amazon Bedrock -----------------------------------------------------

class OpenRouterTest(ChatCalls, AppTestCase):
    """OpenAI's chat under /api/v1, in OpenRouter's errors, with its reasoning."""

    options = {"latency_ms": 0}
    ASK = {"model": "deepseek/deepseek-r1", "messages": [{"role": "user", "content": "Hello"}]}

    def test_its_reasoning_shown_or_left_out(self):
        message = self.call("POST", "/api/v1/chat/completions", dict(
            self.ASK, reasoning={"effort": "high"}))[1]["choices"][0]["message"]
        self.assertEqual((message["content"], message["reasoning"]),
                         ("Simulated reply to: Hello", "Simulated reasoning about: Hello"))
        body = self.call("POST", "/api/v1/chat/completions", dict(
            self.ASK, reasoning={"effort": "high", "exclude": True}))[1]
        self.assertNotIn("reasoning", body["choices"][0]["message"])
        self.assertEqual(body["usage"]["completion_tokens_details"], {"reasoning_tokens": 8})
        self.conn.request("POST", "/api/v1/chat/completions", json.dumps(dict(
            self.ASK, stream=True, include_reasoning=True, simulate={"token_ms": 0})))
        deltas = [event["choices"][0]["delta"] for event in self.events(
            self.conn.getresponse()) if event != "[DONE]"]
        self.assertEqual("".join(delta.get("reasoning", "") for delta in deltas),
                         "Simulated reasoning about: Hello")
        self.assertNotIn("reasoning", self.call("POST", "/api/v1/chat/completions", self.ASK)[1][
            "choices"][0]["message"])

    def test_its_errors_and_models(self):
        status, body, _ = self.call("POST", "/api/v1/chat/completions", dict(
            self.ASK, simulate={"mode": "rate_limit"}))
        self.assertEqual((status, body), (429, {"error": {
            "code": 429, "message": "simulated rate limit: too many requests"}}))
        status, body, _ = self.call("POST", "/api/v1/chat/completions", {"model": "m"})
        self.assertEqual((status, body["error"]["code"]), (400, 400))
        self.assertEqual(self.call("GET", "/api/v1/models")[1]["data"][0]["id"], "dummyllm")
        self.assertEqual(self.journal()[0]["surface"], "openrouter")


class CohereTest(AppTestCase):
    """Cohere's v2 chat: its answer, events, finish reasons and errors."""

    options = {"latency_ms": 0}
    ASK = {"model": "command-a-03-2025", "messages": [{"role": "user", "content": "Hello"}]}
    TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]

    def test_a_message_and_its_usage(self):
        status, body, _ = self.call("POST", "/v2/chat", dict(self.ASK, max_tokens=2))
        self.assertEqual((status, body["finish_reason"], body["message"]), (
            200, "MAX_TOKENS", {"role": "assistant",
                                "content": [{"type": "text", "text": "Simulate"}]}))
        self.assertRegex(body["id"], r"\A[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-")
        self.assertEqual(body["usage"]["tokens"], {"input_tokens": 2, "output_tokens": 2})
        self.assertEqual(self.journal()[-1]["surface"], "cohere")

    def test_its_events(self):
        self.conn.request("POST", "/v2/chat", json.dumps(dict(
            self.ASK, stream=True, thinking={"type": "enabled"}, simulate={"token_ms": 0})))
        events = sse_events(self.conn.getresponse())
        self.assertTrue(all(name == data["type"] for name, data in events))
        self.assertEqual([(name, data.get("index")) for name, data in events[:2]],
                         [("message-start", None), ("content-start", 0)])
        by_index = collections.defaultdict(str)
        for name, data in events:
            if name == "content-delta":
                content = data["delta"]["message"]["content"]
                by_index[data["index"]] += content.get("thinking", content.get("text", ""))
        self.assertEqual(dict(by_index), {0: "Simulated reasoning about: Hello",
                                          1: "Simulated reply to: Hello"})
        self.assertEqual(events[-1][1]["delta"]["finish_reason"], "COMPLETE")
        self.conn.request("POST", "/v2/chat", json.dumps(dict(
            self.ASK, stream=True, tools=self.TOOLS, tool_choice="REQUIRED",
            simulate={"token_ms": 0})))
        events = sse_events(self.conn.getresponse())
        self.assertEqual([name for name, _ in events[:2]], ["message-start", "tool-call-start"])
        start = events[1][1]["delta"]["message"]["tool_calls"]
        self.assertEqual((start["function"]["name"], start["function"]["arguments"]),
                         ("get_weather", ""))
        arguments = "".join(data["delta"]["message"]["tool_calls"]["function"]["arguments"]
                            for name, data in events if name == "tool-call-delta")
        self.assertEqual(set(json.loads(arguments)), {"city", "unit"})
        self.assertEqual(events[-1][1]["delta"]["finish_reason"], "TOOL_CALL")

    def test_a_tool_loop(self):
        status, body, _ = self.call("POST", "/v2/chat", dict(self.ASK, tools=self.TOOLS,
                                                              simulate={"tool_calls": PARIS}))
        [call] = body["message"]["tool_calls"]
        self.assertEqual((body["finish_reason"], json.loads(call["function"]["arguments"])),
                         ("TOOL_CALL", PARIS[0]["arguments"]))
        self.call("POST", "/v1/rules", {"match": {"tool_result_for": "get_weather"},
                                        "simulate": {"ok_text": "Sunny"}})
        answered = self.call("POST", "/v2/chat", dict(self.ASK, tools=self.TOOLS, messages=[
            *self.ASK["messages"], {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]))[1]
        self.assertEqual(answered["message"]["content"][0]["text"], "Sunny")

    def test_its_errors(self):
        status, body, _ = self.call("POST", "/v2/chat", {"messages": []})
        self.assertEqual((status, set(body)), (400, {"id", "message"}))
        self.assertEqual(body["message"], "messages must be a non-empty array of messages")
        status, body, response = self.call("POST", "/v2/chat", dict(
            self.ASK, simulate={"mode": "rate_limit", "retry_after_ms": 2000}))
        self.assertEqual((status, response.getheader("retry-after")), (429, "2"))
        self.conn.request("POST", "/v2/chat", json.dumps(dict(
            self.ASK, stream=True, simulate={"token_ms": 0, "stream": {"error_after": 1}})))
        last = sse_events(self.conn.getresponse())[-1][1]
        self.assertEqual(last, {"type": "message-end", "delta": {
            "finish_reason": "ERROR", "error": "simulated stream error"}})


def eventstream_messages(data):
    """The messages of an AWS event stream, as (headers, payload): each
    frame's lengths and both its CRC32s checked, as the format says."""
    messages = []
    while data:
        total, headers_length = struct.unpack(">II", data[:8])
        assert struct.unpack(">I", data[8:12])[0] == zlib.crc32(data[:8]), "prelude CRC"
        assert struct.unpack(">I", data[total - 4:total])[0] == zlib.crc32(data[:total - 4])
        head, at, headers = data[12:12 + headers_length], 0, {}
        while at < len(head):
            name_length = head[at]
            name = head[at + 1:at + 1 + name_length].decode()
            kind, value_length = struct.unpack(">BH", head[at + 1 + name_length:
                                                           at + 4 + name_length])
            assert kind == 7, "a string header"
            start = at + 4 + name_length
            headers[name] = head[start:start + value_length].decode()
            at = start + value_length
        messages.append((headers, json.loads(data[12 + headers_length:total - 4])))
        data = data[total:]
    return messages


class BedrockCalls:
    MESSAGES = [{"role": "user", "content": [{"text": "Hello"}]}]
    TOOLS = {"tools": [{"toolSpec": {"name": "get_weather", "inputSchema": {"json": WEATHER}}}],
             "toolChoice": {"any": {}}}
    MODEL = "anthropic.claude-3-haiku-20240307-v1%3A0"  # as botocore sends it

    def converse(self, stream=False, headers=None, **body):
        """(status, headers, body: JSON, or the event stream's messages)."""
        path = f"/model/{self.MODEL}/converse" + ("-stream" if stream else "")
        self.conn.request("POST", path, json.dumps({"messages": self.MESSAGES, **body}),
                          headers or {})
        response = self.conn.getresponse()
        data = response.read()
        if response.getheader("Content-Type") == "application/vnd.amazon.eventstream":
            return response.status, response, eventstream_messages(data)
        return response.status, response, json.loads(data)


class BedrockTest(BedrockCalls, AppTestCase):
    """Converse and InvokeModel on the wire, the event stream decoded here."""

    options = {"latency_ms": 0}

    def test_converse_answers_a_message(self):
        status, _, body = self.converse(inferenceConfig={"maxTokens": 2})
        self.assertEqual((status, body["output"]["message"]["content"], body["stopReason"]),
                         (200, [{"text": "Simulate"}], "max_tokens"))  # 2 tokens
        self.assertEqual(body["usage"], {"inputTokens": 2, "outputTokens": 2, "totalTokens": 4})
        self.assertEqual(self.journal()[-1]["surface"], "bedrock.converse")
        [tool] = self.converse(toolConfig=self.TOOLS)[2]["output"]["message"]["content"]
        self.assertEqual((set(tool["toolUse"]), tool["toolUse"]["name"]),
                         ({"toolUseId", "name", "input"}, "get_weather"))

    def test_converse_stream_frames(self):
        status, response, messages = self.converse(stream=True)
        self.assertEqual(status, 200)
        self.assertEqual({headers[":message-type"] for headers, _ in messages}, {"event"})
        events = [(headers[":event-type"], payload) for headers, payload in messages]
        self.assertEqual([name for name, _ in events[:2]], ["messageStart", "contentBlockDelta"])
        self.assertEqual("".join(payload["delta"]["text"] for name, payload in events
                                 if name == "contentBlockDelta"), "Simulated reply to: Hello")
        self.assertEqual([name for name, _ in events[-3:]],
                         ["contentBlockStop", "messageStop", "metadata"])
        self.assertEqual(events[-2][1], {"stopReason": "end_turn"})
        tools = [name for name, _ in [(headers[":event-type"], payload) for headers, payload
                                      in self.converse(stream=True, toolConfig=self.TOOLS)[2]]]
        self.assertEqual(tools[:3], ["messageStart", "contentBlockStart", "contentBlockDelta"])

    def test_a_stream_error_is_an_exception_frame(self):
        messages = self.converse(stream=True, simulate={"stream": {"error_after": 2}})[2]
        headers, payload = messages[-1]
        self.assertEqual((headers[":message-type"], headers[":exception-type"]),
                         ("exception", "modelStreamErrorException"))
        self.assertEqual(payload["originalStatusCode"], 500)
        self.assertEqual(len(messages), 4)  # messageStart, two deltas, the exception

    def test_errors_are_bedrocks_exceptions(self):
        for simulate, status, kind in [
                ({"mode": "rate_limit"}, 429, "ThrottlingException"),
                ({"mode": "overloaded"}, 503, "ServiceUnavailableException"),
                ({"mode": "timeout", "latency_ms": 0}, 408, "ModelTimeoutException"),
                ({"mode": "fail"}, 500, "InternalServerException"),
                ({"mode": "quota_exhausted"}, 400, "ServiceQuotaExceededException")]:
            with self.subTest(kind=kind):
                answer, response, body = self.converse(simulate=simulate, timeout_ms=10)
                self.assertEqual((answer, response.getheader("x-amzn-ErrorType")), (status, kind))
                self.assertEqual(set(body), {"message"})
        status, response, body = self.converse(inferenceConfig={"maxTokens": 0})
        self.assertEqual((status, response.getheader("x-amzn-ErrorType")),
                         (400, "ValidationException"))
        self.assertIn("inferenceConfig.maxTokens", body["message"])
        self.assertEqual(self.converse(toolConfig={"tools": 7})[0], 400)

    def test_the_model_is_the_paths_and_rules_know_the_surface(self):
        self.server.add_rule({"match": {"surface": "bedrock.converse",
                                        "model": "anthropic.claude-3-haiku-*"},
                              "simulate": {"ok_text": "from the rule"}})
        self.assertEqual(self.converse()[2]["output"]["message"]["content"][0]["text"],
                         "from the rule")

    def test_invoke_model_with_an_anthropic_body(self):
        body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 50,
                "messages": [{"role": "user", "content": "Hello"}]}
        status, message, _ = self.call("POST", f"/model/{self.MODEL}/invoke", body)
        self.assertEqual((status, message["type"], message["model"]),
                         (200, "message", "anthropic.claude-3-haiku-20240307-v1:0"))
        self.conn.request("POST", f"/model/{self.MODEL}/invoke-with-response-stream",
                          json.dumps(body))
        messages = eventstream_messages(self.conn.getresponse().read())
        self.assertEqual({headers[":event-type"] for headers, _ in messages}, {"chunk"})
        events = [json.loads(base64.b64decode(payload["bytes"])) for _, payload in messages]
        self.assertEqual([event["type"] for event in events[:2]],
                         ["message_start", "content_block_start"])
        self.assertEqual(events[-1], {"type": "message_stop"})
        status, answer, response = self.call("POST", f"/model/{self.MODEL}/invoke",
                                             dict(body, anthropic_version=None))
        self.assertEqual((status, response.getheader("x-amzn-ErrorType")),
                         (400, "ValidationException"))


boto3 = optional_import("boto3")
botocore_exceptions = optional_import("botocore.exceptions")


@needs(boto3, "boto3", "DUMMYLLM_REQUIRE_BOTO3")
class BedrockSDKTest(BedrockCalls, ServerTestCase):
    """boto3's bedrock-runtime client and the anthropic SDK's
    AnthropicBedrock, unchanged, with only their endpoint pointed here."""

    MODEL = "anthropic.claude-3-haiku-20240307-v1:0"

    def client(self, simulate=None, **config):
        client = boto3.client("bedrock-runtime", region_name="us-east-1",
                              endpoint_url=self.server.url, aws_access_key_id="x",
                              aws_secret_access_key="x",
                              config=boto3.session.Config(**config) if config else None)
        if simulate is not None:  # boto3 sends no field it does not know: a header does
            def add(request, **_):
                request.headers["X-DummyLLM-Simulate"] = json.dumps(simulate)
            client.meta.events.register("before-send.bedrock-runtime.*", add)
        self.addCleanup(client.close)
        return client

    def test_converse_and_its_stream(self):
        client = self.client()
        answer = client.converse(modelId=self.MODEL, messages=self.MESSAGES)
        self.assertEqual(answer["output"]["message"]["content"][0]["text"],
                         "Simulated reply to: Hello")
        events = list(client.converse_stream(modelId=self.MODEL, messages=self.MESSAGES,
                                             toolConfig=self.TOOLS)["stream"])
        self.assertEqual(json.loads("".join(event["contentBlockDelta"]["delta"]["toolUse"][
            "input"] for event in events if "contentBlockDelta" in event)).keys(),
            {"city", "unit"})
        self.assertEqual(events[-2], {"messageStop": {"stopReason": "tool_use"}})

    def test_throttling_is_retried_by_botocore(self):
        client = self.client({"mode": "rate_limit"}, retries={"total_max_attempts": 2,
                                                              "mode": "standard"})
        with self.assertRaises(client.exceptions.ThrottlingException):
            client.converse(modelId=self.MODEL, messages=self.MESSAGES)
        self.assertEqual([entry["status"] for entry in self.journal()], [429, 429])
        stream = self.client({"stream": {"error_after": 1}}).converse_stream(
            modelId=self.MODEL, messages=self.MESSAGES)["stream"]
        self.addCleanup(stream.close)  # its connection, left mid-stream
        with self.assertRaises(botocore_exceptions.EventStreamError) as raised:
            list(stream)
        self.assertEqual(raised.exception.response["Error"]["Code"],
                         "modelStreamErrorException")

    def test_invoke_model_and_anthropic_bedrock(self):
        client = self.client()
        body = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 50,
                           "messages": [{"role": "user", "content": "Hello"}]})
        answer = json.loads(client.invoke_model(modelId=self.MODEL, body=body)["body"].read())
        self.assertEqual(answer["content"][0]["text"], "Simulated reply to: Hello")
        chunks = [json.loads(event["chunk"]["bytes"]) for event in
                  client.invoke_model_with_response_stream(modelId=self.MODEL, body=body)["body"]]
        self.assertEqual(chunks[-1], {"type": "message_stop"})
        if anthropic is None:
            return
        bedrock = anthropic.AnthropicBedrock(base_url=self.server.url, aws_access_key="x",
                                             aws_secret_key="x", aws_region="us-east-1")
        self.addCleanup(bedrock.close)
        message = bedrock.messages.create(model=self.MODEL, max_tokens=50, messages=[
            {"role": "user", "content": "Hello"}])
        self.assertEqual(message.content[0].text, "Simulated reply to: Hello")
        with bedrock.messages.stream(model=self.MODEL, max_tokens=50, messages=[
                {"role": "user", "content": "Hello"}]) as stream:
            self.assertEqual(stream.get_final_text(), "Simulated reply to: Hello")


# --- Surfaces: Google Vertex AI ---------------------------------------------------

class VertexTest(AppTestCase):
    """Gemini and Anthropic's models under a Vertex AI project and location."""

    options = {"latency_ms": 0}
    GEMINI = "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-flash"
    CLAUDE = "/v1/projects/p/locations/us-east5/publishers/anthropic/models/"
    ASK = {"anthropic_version": "vertex-2023-10-16", "max_tokens": 20,
           "messages": [{"role": "user", "content": "Hello"}]}

    def test_gemini_under_a_project(self):
        contents = {"contents": [{"role": "user", "parts": [{"text": "Hello"}]}]}
        for version in ("/v1", "/v1beta1"):
            status, body, _ = self.call("POST", self.GEMINI.replace("/v1", version, 1)
                                        + ":generateContent", contents)
            self.assertEqual((status, body["candidates"][0]["content"]["parts"][0]["text"]),
                             (200, "Simulated reply to: Hello"))
        self.assertEqual(self.journal()[-1]["surface"], "vertex.gemini")
        status, body, _ = self.call("POST", self.GEMINI + ":generateContent", {"contents": []})
        self.assertEqual((status, body["error"]["status"]), (400, "INVALID_ARGUMENT"))

    def test_anthropic_raw_predict(self):
        status, message, _ = self.call("POST", self.CLAUDE + "claude-sonnet-4-5@20250929"
                                       ":rawPredict", self.ASK)
        self.assertEqual((status, message["model"], message["content"][0]["text"]),
                         (200, "claude-sonnet-4-5@20250929", "Simulated reply to: Hello"))
        self.conn.request("POST", self.CLAUDE + "claude-sonnet-4-5:streamRawPredict",
                          json.dumps(dict(self.ASK, stream=True)))
        response = self.conn.getresponse()
        self.assertEqual(response.getheader("Content-Type"), "text/event-stream")
        self.assertIn(b"event: message_stop", response.read())
        status, body, _ = self.call("POST", self.CLAUDE + "count-tokens:rawPredict", {
            "model": "claude-sonnet-4-5", "messages": self.ASK["messages"]})
        self.assertEqual((status, body), (200, {"input_tokens": 2}))
        status, body, _ = self.call("POST", self.CLAUDE + "claude:rawPredict",
                                    dict(self.ASK, anthropic_version=None))
        self.assertEqual((status, body["error"]["type"]), (400, "invalid_request_error"))


# --- Surfaces: batches ------------------------------------------------------------

class OpenAIBatchCalls:
    """Helpers that upload files and make batches as an OpenAI client would."""

    BOUNDARY = "dummyllm-form"

    def upload(self, content, purpose="batch", filename="requests.jsonl", headers=None):
        """(status, body) of POST /v1/files with a multipart/form-data body."""
        body = (f'--{self.BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
                f'{purpose}\r\n--{self.BOUNDARY}\r\nContent-Disposition: form-data; '
                f'name="file"; filename="{filename}"\r\nContent-Type: application/octet-stream'
                f'\r\n\r\n').encode() + content + f"\r\n--{self.BOUNDARY}--\r\n".encode()
        return self.call("POST", "/v1/files", body, {
            "Content-Type": f"multipart/form-data; boundary={self.BOUNDARY}",
            **(headers or {})})[:2]

    @staticmethod
    def chat_line(custom_id, url="/v1/chat/completions", **simulate):
        return {"custom_id": custom_id, "method": "POST", "url": url, "body": {
            "model": "gpt-4o-mini", "messages": [{"role": "user", "content": custom_id}],
            **({"simulate": simulate} if simulate else {})}}

    def batch(self, lines, **simulate):
        """The batch made of a file of these lines (dicts, or text as it is)."""
        status, file = self.upload(b"\n".join(
            line.encode() if isinstance(line, str) else json.dumps(line).encode()
            for line in lines))
        self.assertEqual(status, 200, file)
        status, batch, _ = self.call("POST", "/v1/batches", {
            "input_file_id": file["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h", "simulate": simulate or None})
        self.assertEqual(status, 200, batch)
        return batch

    def retrieve(self, batch_id):
        return self.call("GET", f"/v1/batches/{batch_id}")[1]

    def content(self, file_id):
        """The lines of a file, as JSON."""
        self.conn.request("GET", f"/v1/files/{file_id}/content")
        response = self.conn.getresponse()
        data = response.read()
        self.assertEqual((response.status, response.getheader("Content-Type")),
                         (200, "application/octet-stream"), data)
        return [json.loads(line) for line in data.splitlines()]


class ReasoningTest(BedrockCalls, AppTestCase):
    """A reasoning model's thinking, as each API shows it and counts it."""

    options = {"latency_ms": 0, "seed": 7}
    THINKING = {"type": "enabled", "budget_tokens": 1024}

    def anthropic(self, **body):
        return self.call("POST", "/v1/messages", {
            "model": "claude-test", "max_tokens": 2048, "thinking": self.THINKING,
            "messages": [{"role": "user", "content": "Hello"}], **body})

    def test_anthropic_thinking_is_a_signed_block_first_and_streamed_as_deltas(self):
        status, message, _ = self.anthropic(simulate={"token_ms": 0})
        self.assertEqual(status, 200, message)
        thinking, text = message["content"]
        self.assertEqual((thinking["type"], thinking["thinking"], text["type"]),
                         ("thinking", "Simulated reasoning about: Hello", "text"))
        self.assertEqual(message["usage"]["output_tokens"], 8 + 7)  # thinking and text
        self.conn.request("POST", "/v1/messages", json.dumps({
            "model": "claude-test", "max_tokens": 2048, "thinking": self.THINKING,
            "stream": True, "messages": [{"role": "user", "content": "Hello"}],
            "simulate": {"token_ms": 0}}))
        events = sse_events(self.conn.getresponse())
        self.assertEqual([(name, data.get("index")) for name, data in events[:3]], [
            ("message_start", None), ("content_block_start", 0), ("ping", None)])
        deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
        self.assertEqual("".join(delta.get("thinking", "") for delta in deltas),
                         thinking["thinking"])
        self.assertEqual([delta["signature"] for delta in deltas
                          if delta["type"] == "signature_delta"], [thinking["signature"]])
        self.assertEqual({data["index"] for name, data in events
                          if name == "content_block_delta"
                          and data["delta"]["type"] == "text_delta"}, {1})
        # A fresh server with the same seed signs the same; another seed does not.
        again = self.start({"latency_ms": 0, "seed": 7})
        self.assertEqual(self.call("POST", "/v1/messages", {
            "model": "claude-test", "max_tokens": 2048, "thinking": self.THINKING,
            "messages": [{"role": "user", "content": "Hello"}]},
            conn=self.connect(again))[1]["content"][0]["signature"], thinking["signature"])
        self.assertNotEqual(self.anthropic(simulate={"seed": 8})[1]["content"][0]["signature"],
                            thinking["signature"])

    def test_simulate_reasoning_sets_its_text_or_length_or_turns_it_off(self):
        self.assertEqual(self.anthropic(simulate={"reasoning": "Hmm."})[1]["content"][0][
            "thinking"], "Hmm.")
        self.assertEqual(len(self.anthropic(simulate={"reasoning": 50})[1]["content"][0][
            "thinking"]), 200)
        self.assertEqual([block["type"] for block in self.anthropic(simulate={
            "reasoning": 0})[1]["content"]], ["text"])
        self.assertEqual([block["type"] for block in self.anthropic(thinking=None, simulate={
            "reasoning": "Hmm."})[1]["content"]], ["thinking", "text"])

    def test_anthropic_refuses_a_budget_it_cannot_keep(self):
        status, body, _ = self.anthropic(max_tokens=1024)
        self.assertEqual((status, body["error"]["message"]),
                         (400, "max_tokens must be greater than thinking.budget_tokens"))
        status, body, _ = self.anthropic(thinking={"type": "enabled"})
        self.assertEqual((status, body["error"]["message"]), (
            400, "thinking.budget_tokens is required when thinking is enabled"))
        status, body, _ = self.anthropic(thinking={"type": "enabled", "budget_tokens": 100})
        self.assertEqual(status, 400)
        self.assertIn("thinking.budget_tokens", body["error"]["message"])

    def test_openai_chat_counts_reasoning_tokens(self):
        ask = {"model": "o4-mini", "messages": [{"role": "user", "content": "Hello"}]}
        usage = self.call("POST", "/v1/chat/completions", dict(ask, reasoning_effort="low"))[1][
            "usage"]
        self.assertEqual(usage, {"prompt_tokens": 2, "completion_tokens": 7 + 8,
                                 "total_tokens": 17,
                                 "completion_tokens_details": {"reasoning_tokens": 8}})
        usage = self.call("POST", "/v1/chat/completions", dict(ask, reasoning_effort="none"))[1][
            "usage"]
        self.assertNotIn("completion_tokens_details", usage)
        self.assertEqual(self.call("POST", "/v1/chat/completions", dict(
            ask, reasoning_effort="huge"))[0], 400)

    def test_responses_a_reasoning_item_first_and_its_summary_streamed(self):
        ask = {"model": "o4-mini", "input": "Hello",
               "reasoning": {"effort": "low", "summary": "auto"}}
        response = self.call("POST", "/v1/responses", ask)[1]
        thought, message = response["output"]
        self.assertEqual((thought["type"], thought["summary"], message["type"]), (
            "reasoning", [{"type": "summary_text", "text": "Simulated reasoning about: Hello"}],
            "message"))
        self.assertEqual(base64.b64decode(thought["encrypted_content"]).decode(),
                         "Simulated reasoning about: Hello")
        self.assertEqual(response["usage"]["output_tokens_details"], {"reasoning_tokens": 8})
        self.assertEqual(response["reasoning"], {"effort": "low", "summary": "auto"})
        self.conn.request("POST", "/v1/responses", json.dumps(
            dict(ask, stream=True, simulate={"token_ms": 0})))
        events = sse_events(self.conn.getresponse())
        names = [name for name, _ in events]
        self.assertEqual(names[2:4], ["response.output_item.added",
                                      "response.reasoning_summary_part.added"])
        self.assertEqual("".join(data["delta"] for name, data in events
                                 if name == "response.reasoning_summary_text.delta"),
                         "Simulated reasoning about: Hello")
        self.assertEqual({data["output_index"] for name, data in events
                          if name == "response.output_text.delta"}, {1})
        self.assertEqual([dict(item, id=None) for item in events[-1][1]["response"]["output"]],
                         [dict(item, id=None) for item in response["output"]])
        plain = self.call("POST", "/v1/responses", dict(ask, reasoning={"effort": "low"}))[1]
        self.assertEqual(plain["output"][0]["summary"], [])

    def test_bedrock_reasoning_content_and_its_deltas(self):
        thinking = {"additionalModelRequestFields": {"thinking": self.THINKING}}
        reasoning, text = self.converse(**thinking)[2]["output"]["message"]["content"]
        self.assertEqual(reasoning["reasoningContent"]["reasoningText"]["text"],
                         "Simulated reasoning about: Hello")
        self.assertEqual(text, {"text": "Simulated reply to: Hello"})
        events = [(headers[":event-type"], payload) for headers, payload in self.converse(
            stream=True, simulate={"token_ms": 0}, **thinking)[2]]
        deltas = [payload for name, payload in events if name == "contentBlockDelta"]
        self.assertEqual("".join(delta["delta"]["reasoningContent"].get("text", "")
                                 for delta in deltas if delta["contentBlockIndex"] == 0),
                         "Simulated reasoning about: Hello")
        self.assertEqual(deltas[dummyllm._tokens("Simulated reasoning about: Hello")]["delta"],
                         {"reasoningContent": {"signature": reasoning["reasoningContent"][
                             "reasoningText"]["signature"]}})
        self.assertEqual({delta["contentBlockIndex"] for delta in deltas if "text" in delta[
            "delta"]}, {1})

    def test_gemini_thought_parts_and_their_count(self):
        ask = {"contents": [{"role": "user", "parts": [{"text": "Hello"}]}], "generationConfig": {
            "thinkingConfig": {"include_thoughts": True, "thinking_budget": 512}}}
        answer = self.call("POST", "/v1beta/models/gemini-test:generateContent", ask)[1]
        thought, text = answer["candidates"][0]["content"]["parts"]
        self.assertEqual((thought["thought"], thought["text"]),
                         (True, "Simulated reasoning about: Hello"))
        self.assertIn("thoughtSignature", text)
        self.assertEqual(answer["usageMetadata"], {
            "promptTokenCount": 2, "candidatesTokenCount": 7, "thoughtsTokenCount": 8,
            "totalTokenCount": 17})
        hidden = dict(ask, generationConfig={"thinkingConfig": {"thinkingBudget": 512}})
        answer = self.call("POST", "/v1beta/models/gemini-test:generateContent", hidden)[1]
        self.assertEqual(len(answer["candidates"][0]["content"]["parts"]), 1)
        self.assertEqual(answer["usageMetadata"]["thoughtsTokenCount"], 8)


class OpenAIBatchesTest(OpenAIBatchCalls, AppTestCase):
    """A batch is a job on the store's clock: validating while queued,
    in_progress while running, then its output and error files."""

    def test_a_batch_runs_and_writes_its_output_and_error_files(self):
        batch = self.batch([self.chat_line("ok"), self.chat_line("fails", mode="fail"),
                            self.chat_line("hangs", mode="hang")], queue_ms=100, latency_ms=1000)
        self.assertEqual((batch["status"], batch["request_counts"], batch["output_file_id"]),
                         ("validating", {"total": 3, "completed": 0, "failed": 0}, None))
        self.clock.advance(100)
        self.assertEqual(self.retrieve(batch["id"])["status"], "in_progress")
        status, early, _ = self.call("GET", f"/v1/files/file-{batch['id']}-output")
        self.assertEqual((status, early["error"]["param"]), (404, "id"))  # not written yet
        self.clock.advance(1000)
        batch = self.retrieve(batch["id"])
        self.assertEqual((batch["status"], batch["request_counts"]),
                         ("completed", {"total": 3, "completed": 1, "failed": 2}))
        self.assertIsNotNone(batch["completed_at"])
        output, errors = (self.content(batch[key]) for key in ("output_file_id",
                                                                "error_file_id"))
        self.assertEqual([(line["custom_id"], line["response"]["status_code"],
                           line["response"]["body"]["choices"][0]["message"]["content"])
                          for line in output], [("ok", 200, "Simulated reply to: ok")])
        self.assertEqual([(line["custom_id"], line["response"] and (
            line["response"]["status_code"], line["response"]["body"]["error"]["type"]),
            line["error"] and line["error"]["code"]) for line in errors],
            [("fails", (500, "server_error"), None), ("hangs", None, "batch_expired")])
        status, described, _ = self.call("GET", f"/v1/files/{batch['output_file_id']}")
        self.assertEqual((status, described["purpose"]), (200, "batch_output"))

    def test_a_batch_expires_fails_or_is_cancelled_as_its_job_ends(self):
        expired = self.batch([self.chat_line("a"), self.chat_line("b")], mode="timeout",
                             latency_ms=50)
        self.clock.advance(dummyllm._BATCH_WINDOW_MS)
        expired = self.retrieve(expired["id"])
        self.assertEqual((expired["status"], expired["output_file_id"],
                          expired["request_counts"]["failed"]), ("expired", None, 2))
        self.assertEqual([line["error"]["code"] for line in self.content(
            expired["error_file_id"])], ["batch_expired"] * 2)
        failed = self.batch([self.chat_line("a")], mode="fail", latency_ms=50)
        self.clock.advance(50)
        failed = self.retrieve(failed["id"])
        self.assertEqual((failed["status"], failed["errors"]["data"][0]["code"]),
                         ("failed", "server_error"))
        running = self.batch([self.chat_line("a")], latency_ms=5000)
        status, cancelled, _ = self.call("POST", f"/v1/batches/{running['id']}/cancel")
        self.assertEqual((status, cancelled["status"], cancelled["output_file_id"]),
                         (200, "cancelled", None))
        self.assertIsNotNone(cancelled["cancelled_at"])

    def test_a_file_that_is_not_a_batch_fails_it_with_its_lines_at_fault(self):
        batch = self.batch(["{not json", self.chat_line("a", url="/v1/embeddings"),
                            self.chat_line("b"), self.chat_line("b")], latency_ms=100)
        self.clock.advance(0)
        failed = self.retrieve(batch["id"])
        self.assertEqual(failed["status"], "failed")
        self.assertEqual([(error["code"], error["line"]) for error in failed["errors"]["data"]],
                         [("invalid_json_line", 1), ("mismatched_endpoint", 2),
                          ("duplicate_custom_id", 4)])

    def test_bad_uploads_and_batches_are_refused_naming_the_field(self):
        for content_type, body, param in [
                ("application/json", b"{}", None),
                (f"multipart/form-data; boundary={self.BOUNDARY}", b"--x", None)]:
            status, error, _ = self.call("POST", "/v1/files", body, {"Content-Type": content_type})
            self.assertEqual((status, error["error"]["param"]), (400, param))
        self.assertEqual(self.upload(b"x", purpose="memes")[1]["error"]["param"], "purpose")
        file_id = self.upload(b"{}")[1]["id"]
        for body, param in [({"input_file_id": "file-nope"}, "input_file_id"),
                            ({"endpoint": "/v1/moderations"}, "endpoint"),
                            ({"completion_window": "1h"}, "completion_window")]:
            with self.subTest(param=param):
                status, error, _ = self.call("POST", "/v1/batches", {
                    "input_file_id": file_id, "endpoint": "/v1/chat/completions",
                    "completion_window": "24h", **body})
                self.assertEqual((status, error["error"]["param"]),
                                 (404 if param == "input_file_id" else 400, param))
        streamed = self.batch([dict(self.chat_line("s"), body=dict(self.chat_line("s")["body"],
                                                                    stream=True))], latency_ms=0)
        line, = self.content(self.retrieve(streamed["id"])["error_file_id"])
        self.assertEqual((line["response"]["status_code"],
                          line["response"]["body"]["error"]["param"]), (400, "stream"))
        for path in ("/v1/batches/batch_000000000000", "/v1/files/file-nope",
                     "/v1/files/file-batch_000000000000-output"):
            self.assertEqual(self.call("GET", path)[0], 404)

    def test_files_and_batches_are_listed_newest_first(self):
        first = self.upload(b"a", filename="a.jsonl")[1]
        self.upload(b"b", purpose="user_data")
        listed = self.call("GET", "/v1/files?purpose=batch")[1]
        self.assertEqual([file["id"] for file in listed["data"]][-1], first["id"])
        self.assertTrue(all(file["purpose"] == "batch" for file in listed["data"]))
        self.assertEqual(self.call("DELETE", f"/v1/files/{first['id']}")[1]["deleted"], True)
        self.assertEqual(self.call("GET", f"/v1/files/{first['id']}")[0], 404)
        made = [self.batch([self.chat_line("x")])["id"] for _ in range(3)]
        page = self.call("GET", "/v1/batches?limit=2")[1]
        self.assertEqual(([batch["id"] for batch in page["data"]], page["has_more"]),
                         (made[:0:-1], True))
        rest = self.call("GET", f"/v1/batches?limit=2&after={page['last_id']}")[1]
        self.assertEqual(([batch["id"] for batch in rest["data"]], rest["has_more"]),
                         ([made[0]], False))

    def test_a_batch_is_a_job_its_polls_are_journaled_and_reset_forgets_its_file(self):
        batch = self.batch([self.chat_line("a")], latency_ms=100)
        jobs = self.call("GET", "/v1/jobs?op=openai.batch")[1]["jobs"]
        self.assertEqual([job["id"] for job in jobs], [batch["id"]])
        self.retrieve(batch["id"])
        polled = self.call("GET", "/v1/requests")[1]["requests"][-1]
        self.assertEqual(polled["job_id"], batch["id"])
        self.assertEqual(self.call("POST", "/v1/reset")[1]["removed"]["files"], 1)


class AnthropicBatchesTest(AnthropicCalls, AppTestCase):
    """A message batch is a job: in_progress, then ended with a result per request."""

    def create(self, requests, **simulate):
        status, batch, _ = self.call("POST", "/v1/messages/batches", {
            "requests": requests, "simulate": simulate or None})
        self.assertEqual(status, 200, batch)
        return batch

    @staticmethod
    def request(custom_id, **simulate):
        return {"custom_id": custom_id, "params": {
            "model": "claude-test", "max_tokens": 50, "messages": AnthropicCalls.ASK,
            **({"simulate": simulate} if simulate else {})}}

    def results(self, batch_id):
        self.conn.request("GET", f"/v1/messages/batches/{batch_id}/results")
        response = self.conn.getresponse()
        data = response.read()
        self.assertEqual(response.status, 200, data)
        validate_documented(self.server, "GET", f"/v1/messages/batches/{batch_id}/results", 200,
                            response.getheader("Content-Type"), data)
        return [(line["custom_id"], line["result"]) for line in map(json.loads,
                                                                     data.splitlines())]

    def test_a_batch_runs_and_its_results_are_read_a_line_each(self):
        bad = {"custom_id": "bad", "params": {"model": "claude-test", "messages": self.ASK}}
        batch = self.create([self.request("ok"), self.request("fails", mode="fail"), bad],
                            latency_ms=500)
        self.assertEqual((batch["processing_status"], batch["request_counts"]["processing"],
                          batch["results_url"]), ("in_progress", 3, None))
        status, error, response = self.call("GET", f"/v1/messages/batches/{batch['id']}/results")
        self.assert_anthropic_error(status, error, response, 404, "not_found_error")
        status, error, response = self.call("DELETE", f"/v1/messages/batches/{batch['id']}")
        self.assert_anthropic_error(status, error, response, 400, "invalid_request_error")
        self.clock.advance(500)
        ended = self.call("GET", f"/v1/messages/batches/{batch['id']}")[1]
        self.assertEqual((ended["processing_status"], ended["request_counts"]), ("ended", {
            "processing": 0, "succeeded": 1, "errored": 2, "canceled": 0, "expired": 0}))
        self.assertTrue(ended["results_url"].endswith(f"/v1/messages/batches/{batch['id']}"
                                                      "/results"))
        results = self.results(batch["id"])
        self.assertEqual([(custom_id, result["type"]) for custom_id, result in results],
                         [("ok", "succeeded"), ("fails", "errored"), ("bad", "errored")])
        self.assertEqual(results[0][1]["message"]["content"][0]["text"],
                         "Simulated reply to: Hello")
        self.assertEqual((results[2][1]["error"]["error"]["type"],
                          results[2][1]["error"]["error"]["message"]),
                         ("invalid_request_error", "max_tokens is required"))
        status, deleted, _ = self.call("DELETE", f"/v1/messages/batches/{batch['id']}")
        self.assertEqual((status, deleted["type"]), (200, "message_batch_deleted"))
        self.assertEqual(self.call("GET", f"/v1/messages/batches/{batch['id']}")[0], 404)

    def test_a_cancelled_or_expired_batch_ends_with_every_request_so(self):
        running = self.create([self.request("a"), self.request("b")], latency_ms=5000)
        cancelled = self.call("POST", f"/v1/messages/batches/{running['id']}/cancel")[1]
        self.assertEqual((cancelled["processing_status"], cancelled["request_counts"]["canceled"],
                          cancelled["cancel_initiated_at"] is not None), ("ended", 2, True))
        self.assertEqual(self.results(running["id"]), [("a", {"type": "canceled"}),
                                                       ("b", {"type": "canceled"})])
        expiring = self.create([self.request("a")], mode="timeout")
        self.clock.advance(dummyllm._BATCH_WINDOW_MS)
        self.assertEqual(self.results(expiring["id"]), [("a", {"type": "expired"})])

    def test_requests_are_checked_naming_the_one_at_fault(self):
        for requests, param in [([], "requests"),
                                ([self.request("a"), self.request("a")], "requests[1].custom_id"),
                                ([self.request("no spaces")], "requests[0].custom_id"),
                                ([{"custom_id": "a", "params": []}], "requests[0].params")]:
            with self.subTest(param=param):
                status, error, response = self.call("POST", "/v1/messages/batches",
                                                    {"requests": requests})
                self.assert_anthropic_error(status, error, response, 400,
                                            "invalid_request_error")
                self.assertIn(param, error["error"]["message"])

    def test_batches_are_listed_newest_first(self):
        made = [self.create([self.request("a")])["id"] for _ in range(3)]
        page = self.call("GET", "/v1/messages/batches?limit=2")[1]
        self.assertEqual(([batch["id"] for batch in page["data"]], page["has_more"]),
                         (made[:0:-1], True))
        older = self.call("GET", f"/v1/messages/batches?after_id={page['last_id']}")[1]
        self.assertEqual([batch["id"] for batch in older["data"]], [made[0]])
        newer = self.call("GET", f"/v1/messages/batches?before_id={made[0]}&limit=1")[1]
        self.assertEqual(([batch["id"] for batch in newer["data"]], newer["has_more"]),
                         ([made[1]], True))


# --- Surfaces: MCP ----------------------------------------------------------------

mcp = optional_import("mcp")

MCP_WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "inputSchema": {"type": "object", "required": ["city"],
                           "properties": {"city": {"type": "string"}}},
           "cases": [{"arguments": {"city": "Paris"}, "content": "Sunny, 21 C"}],
           "content": "Cloudy"}
MCP_TOOLS = [
    MCP_WEATHER,
    {"name": "deploy", "script": [{"simulate": {"mode": "fail", "fail_message": "disk full"}},
                                  {"content": "deployed"}]},
    {"name": "stats", "outputSchema": {"type": "object", "required": ["n"], "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 9}}}},
    {"name": "build", "progress": 3, "simulate": {"latency_ms": 400}},
    {"name": "search", "rpc_error": {"code": -32050, "message": "index offline",
                                     "data": {"retry": True}}},
]


class McpCalls:
    """A client of /mcp, as the SDKs send its messages."""

    HEADERS = {"Accept": "application/json, text/event-stream"}

    def rpc(self, method, params=None, session=None, headers=None, rpc_id=1):
        """(status, JSON body or None, response) of one JSON-RPC message (a
        notification when rpc_id is None)."""
        message = {"jsonrpc": "2.0", "method": method, **({"params": params} if params else {})}
        if rpc_id is not None:
            message["id"] = rpc_id
        return self.call("POST", "/mcp", message, headers={
            **self.HEADERS, **({"Mcp-Session-Id": session} if session else {}), **(headers or {})})

    def session(self, version="2025-11-25", headers=None):
        status, body, response = self.rpc("initialize", {
            "protocolVersion": version, "capabilities": {},
            "clientInfo": {"name": "test", "version": "1"}}, headers=headers)
        self.assertEqual(status, 200, body)
        return response.getheader("Mcp-Session-Id")

    def call_tool(self, name, arguments=None, session=None, headers=None, **params):
        status, body, _ = self.rpc("tools/call", dict(params, name=name, arguments=arguments or {}),
                                   session or self.session(), headers)
        self.assertEqual(status, 200, body)
        return body

    def text(self, body):
        self.assertEqual(len(body["result"]["content"]), 1, body)
        return body["result"]["content"][0]["text"]

    def assert_rpc_error(self, status, body, expected_status, code, data_code=None):
        self.assertEqual((status, body["jsonrpc"], body["error"]["code"]),
                         (expected_status, "2.0", code), body)
        if data_code is not None:
            self.assertEqual(body["error"]["data"]["code"], data_code)


class McpTest(McpCalls, AppTestCase):
    """The transport and the methods, as the MCP specification says them."""

    options = {"mcp_tools": MCP_TOOLS, "latency_ms": 0}

    def test_initialize_agrees_a_version_and_opens_a_session(self):
        for offered, agreed in [("2025-06-18", "2025-06-18"), ("2025-03-26", "2025-03-26"),
                                ("2099-01-01", "2025-11-25")]:
            with self.subTest(offered=offered):
                status, body, response = self.rpc("initialize", {
                    "protocolVersion": offered, "capabilities": {},
                    "clientInfo": {"name": "test", "version": "1"}}, rpc_id="init")
                self.assertEqual((status, body["id"]), (200, "init"))
                self.assertEqual(body["result"]["protocolVersion"], agreed)
                self.assertEqual(body["result"]["serverInfo"]["name"], "dummyLLM")
                self.assertIn("tools", body["result"]["capabilities"])
                self.assertRegex(response.getheader("Mcp-Session-Id"), "^[0-9a-f]{32}$")

    def test_a_message_after_initialize_needs_an_open_session(self):
        status, body, _ = self.rpc("tools/list")
        self.assert_rpc_error(status, body, 400, -32600)
        self.assertEqual(body["error"]["data"]["field"], "Mcp-Session-Id")
        self.assert_rpc_error(*self.rpc("tools/list", session="f" * 32)[:2], 404, -32600,
                              "NOT_FOUND")
        session = self.session()
        self.assert_rpc_error(*self.rpc("ping", session=session, headers={
            "MCP-Protocol-Version": "2024-01-01"})[:2], 400, -32600)
        self.assertEqual(self.rpc("ping", session=session)[:2],
                         (200, {"jsonrpc": "2.0", "id": 1, "result": {}}))
        status, body, response = self.call("GET", "/mcp", headers={"Mcp-Session-Id": session})
        self.assert_rpc_error(status, body, 405, -32600, "METHOD_NOT_ALLOWED")
        self.assertEqual(response.getheader("Allow"), "POST, DELETE")
        status, _, _ = self.call("DELETE", "/mcp", headers={"Mcp-Session-Id": session})
        self.assertEqual(status, 200)
        self.assertEqual(self.rpc("ping", session=session)[0], 404)
        self.assertEqual(self.call("GET", "/mcp", headers={"Mcp-Session-Id": session})[0], 404)

    def test_notifications_are_accepted_without_an_answer(self):
        session = self.session()
        self.conn.request("POST", "/mcp", json.dumps({
            "jsonrpc": "2.0", "method": "notifications/initialized"}),
            {**self.HEADERS, "Mcp-Session-Id": session})
        response = self.conn.getresponse()
        self.assertEqual((response.status, response.read()), (202, b""))

    def test_messages_that_are_not_json_rpc_are_refused(self):
        session = self.session()
        headers = {**self.HEADERS, "Mcp-Session-Id": session}
        for body, status, code in [
                ("{", 400, -32700), ("[]", 400, -32600),
                ({"method": "ping", "id": 1}, 400, -32600),
                ({"jsonrpc": "2.0", "method": "ping", "id": None}, 400, -32600),
                ({"jsonrpc": "2.0", "method": 7, "id": 1}, 400, -32600),
                ({"jsonrpc": "2.0", "method": "ping", "id": 1, "params": []}, 400, -32600),
                ({"jsonrpc": "2.0", "method": "sampling/nope", "id": 1}, 200, -32601)]:
            with self.subTest(body=body):
                answer = self.call("POST", "/mcp", body, headers=headers)
                self.assert_rpc_error(*answer[:2], status, code)
        self.assert_rpc_error(*self.call("POST", "/mcp", {"jsonrpc": "2.0", "method": "ping",
                                                         "id": 1}, headers={
            "Accept": "application/json", "Mcp-Session-Id": session})[:2], 406, -32600,
            "NOT_ACCEPTABLE")
        self.assert_rpc_error(*self.rpc("ping", session=session, headers={
            "Origin": "http://evil.example"})[:2], 403, -32600, "FORBIDDEN")
        self.assertEqual(self.rpc("ping", session=session, headers={
            "Origin": "http://localhost:3000"})[0], 200)

    def test_tools_list_shows_what_a_client_needs_and_no_more(self):
        status, body, _ = self.rpc("tools/list", session=self.session())
        tools = {tool["name"]: tool for tool in body["result"]["tools"]}
        self.assertEqual(list(tools), [tool["name"] for tool in MCP_TOOLS])
        self.assertEqual(tools["get_weather"], {
            "name": "get_weather", "description": "The weather in a city",
            "inputSchema": MCP_WEATHER["inputSchema"]})
        self.assertEqual(tools["deploy"]["inputSchema"], {"type": "object"})
        self.assertIn("outputSchema", tools["stats"])
        for method, key in [("resources/list", "resources"), ("prompts/list", "prompts"),
                            ("resources/templates/list", "resourceTemplates")]:
            self.assertEqual(self.rpc(method, session=self.session())[1]["result"], {key: []})

    def test_a_call_takes_its_case_else_the_tools_content(self):
        session = self.session()
        paris = self.call_tool("get_weather", {"city": "Paris"}, session)
        self.assertEqual(paris["result"], {"content": [{"type": "text", "text": "Sunny, 21 C"}],
                                           "isError": False})
        self.assertEqual(self.text(self.call_tool("get_weather", {"city": "Oslo"}, session)),
                         "Cloudy")

    def test_a_script_answers_each_keys_calls_in_turn(self):
        session = self.session()
        for key in ("a", "b"):
            first = self.call_tool("deploy", session=session, headers={"X-Trace-Id": key})
            self.assertEqual((first["result"]["isError"], self.text(first)),
                             (True, "Tool deploy failed: disk full"))
            then = [self.text(self.call_tool("deploy", session=session, headers={
                "X-Trace-Id": key})) for _ in range(2)]
            self.assertEqual(then, ["deployed", "deployed"])  # the last step repeats

    def test_arguments_the_schema_refuses(self):
        """Since 2025-11-25 (SEP-1303) an error result the model can read;
        before, a JSON-RPC error naming the argument."""
        refused = self.call_tool("get_weather", {"city": 7})
        self.assertEqual((refused["result"]["isError"], self.text(refused)), (
            True, "Invalid arguments for tool get_weather: arguments.city must be of type string"))
        status, body, _ = self.rpc("tools/call", {"name": "get_weather", "arguments": {}},
                                   self.session("2025-06-18"))
        self.assert_rpc_error(status, body, 200, -32602, "VALIDATION_ERROR")
        self.assertEqual(body["error"]["data"]["field"], "params.arguments.city")
        self.assertEqual(body["error"]["message"], "params.arguments.city is required")
        status, body, _ = self.rpc("tools/call", {"name": "nope"}, self.session())
        self.assert_rpc_error(status, body, 200, -32602)
        self.assertEqual(body["error"]["message"], "Unknown tool: nope")

    def test_the_modes_are_the_tools_outcomes(self):
        session = self.session()
        fail = self.call_tool("deploy", session=session, headers={
            "X-DummyLLM-Simulate": json.dumps({"script": None, "mode": "fail"})})
        self.assertTrue(fail["result"]["isError"])
        started = self.clock.now
        timeout = self.call_tool("get_weather", {"city": "Rome"}, session, _meta={
            "dummyllm/simulate": {"mode": "timeout"}})
        self.assertEqual(self.text(timeout), "Tool get_weather timed out after 8000 ms")
        self.assertEqual(self.clock.now - started, 8000)
        status, body, response = self.rpc("tools/call", {
            "name": "get_weather", "arguments": {"city": "Rome"},
            "_meta": {"dummyllm/simulate": {"mode": "rate_limit", "retry_after_ms": 2000}}},
            session)
        self.assert_rpc_error(status, body, 429, -32600, "RATE_LIMITED")
        self.assertEqual(response.getheader("retry-after-ms"), "2000")
        status, body, _ = self.rpc("tools/call", {"name": "search"}, session)
        self.assertEqual((status, body["error"]), (200, {
            "code": -32050, "message": "index offline", "data": {"retry": True}}))
        self.assertEqual(self.text(self.call_tool("get_weather", {"city": "Rome"}, session,
                                                  _meta={"dummyllm/simulate": {"mode": "echo"}})),
                         '{"city": "Rome"}')

    def test_a_hung_call_gets_no_answer(self):
        session = self.session()
        self.conn.request("POST", "/mcp", json.dumps({
            "jsonrpc": "2.0", "id": 9, "method": "tools/call",
            "params": {"name": "deploy", "_meta": {"dummyllm/simulate": {"mode": "hang"}}}}),
            {**self.HEADERS, "Mcp-Session-Id": session})
        with self.assertRaises(socket.timeout):
            self.conn.getresponse()
        [entry] = self.journal("?limit=1")
        self.assertEqual((entry["status"], entry["mcp"]["outcome"]), (None, "hang"))

    def test_structured_content_is_drawn_from_the_output_schema(self):
        answers = []
        for _ in range(2):  # seeded: the same on a fresh server
            answers.append(self.call_tool("stats", headers={"X-DummyLLM-Simulate": json.dumps({
                "seed": 4})})["result"])
            self.call("POST", "/v1/reset")
        self.assertEqual(answers[0], answers[1])
        structured = answers[0]["structuredContent"]
        self.assertIn(structured["n"], range(10))
        self.assertEqual(json.loads(answers[0]["content"][0]["text"]), structured)

    def open_events(self, name, session=None, **meta):
        """(content type, [(clock ms after the request, event data)]) of a
        tool call answered as an event stream."""
        started = self.clock.now
        self.conn.request("POST", "/mcp", json.dumps({
            "jsonrpc": "2.0", "id": 5, "method": "tools/call",
            "params": {"name": name, "_meta": {"progressToken": "p1", **meta}}}),
            {**self.HEADERS, "Mcp-Session-Id": session or self.session()})
        response = self.conn.getresponse()
        self.assertEqual(response.status, 200)
        data = b""
        with contextlib.suppress(ValueError, http.client.IncompleteRead):  # a cut stream
            for line in iter(response.readline, b""):
                data += line
        if not meta:
            validate_documented(self.server, "POST", "/mcp", 200, "text/event-stream", data)
        events = [block.split("data: ", 1)[1] for block in data.decode().split("\n\n")
                  if "data: " in block]
        return response.getheader("Content-Type"), events, self.clock.now - started

    def test_progress_notifications_come_before_the_result(self):
        content_type, events, elapsed = self.open_events("build")
        self.assertEqual(content_type, "text/event-stream")
        events = [json.loads(event) for event in events]
        self.assertEqual([event.get("params", {}).get("progress") for event in events],
                         [1, 2, 3, None])
        self.assertEqual(events[0]["params"], {"progressToken": "p1", "progress": 1, "total": 3})
        self.assertEqual((events[-1]["id"], self.text(events[-1])),
                         (5, "Simulated result of build"))
        self.assertEqual(elapsed, 400)

    def test_a_stream_failure_breaks_the_tools_stream(self):
        for failure, last in [({"cut_after": 1}, "progress"), ({"truncate_after": 3}, "progress"),
                              ({"error_after": 2}, "error"), ({"malformed_after": 3}, "cut")]:
            with self.subTest(failure=failure):
                _, events, _ = self.open_events("build", **{
                    "dummyllm/simulate": {"stream": failure}})
                if last == "cut":
                    self.assertRaises(ValueError, json.loads, events[-1])
                    continue
                self.assertEqual(len(events), next(iter(failure.values())) + (last == "error"))
                self.assertIn(last, json.loads(events[-1]).get("method", "error"))

    def test_tools_added_at_run_time_are_their_tests_alone(self):
        status, body, _ = self.call("POST", "/v1/mcp/tools", {"name": "lookup", "content": "a"},
                                    headers={"X-Test-Id": "a"})
        self.assertEqual((status, body["tools"][0]["test_id"]), (201, "a"))
        self.call("POST", "/v1/mcp/tools", dict(MCP_WEATHER, content="Snow", cases=None),
                  headers={"X-Test-Id": "a"})
        listed = lambda test: [tool["name"] for tool in self.rpc(
            "tools/list", session=self.session(headers={"X-Test-Id": test}),
            headers={"X-Test-Id": test})[1]["result"]["tools"]]
        self.assertEqual(listed("a"), ["get_weather", "deploy", "stats", "build", "search",
                                       "lookup"])
        self.assertNotIn("lookup", listed("b"))
        self.assertEqual(self.text(self.call_tool(
            "get_weather", {"city": "Paris"}, self.session(headers={"X-Test-Id": "a"}),
            headers={"X-Test-Id": "a"})), "Snow")
        status, body, _ = self.call("POST", "/v1/mcp/tools", {"name": "x", "inputSchema": {
            "type": "string"}})
        self.assert_error(status, body, 422, "VALIDATION_ERROR", "inputSchema")
        self.assertEqual(self.call("DELETE", "/v1/mcp/tools?test_id=a")[1],
                         {"removed": {"mcp_tools": 2}})
        self.assertEqual(len(self.call("GET", "/v1/mcp/tools")[1]["tools"]), len(MCP_TOOLS))

    def test_a_session_belongs_to_its_test(self):
        session = self.session(headers={"X-Test-Id": "a"})
        self.assertEqual(self.rpc("ping", session=session, headers={"X-Test-Id": "b"})[0], 404)
        self.assertEqual(self.call("POST", "/v1/reset?test_id=a")[1]["removed"]["mcp_sessions"], 1)
        self.assertEqual(self.rpc("ping", session=session, headers={"X-Test-Id": "a"})[0], 404)


class McpToolsOptionTest(unittest.TestCase):

    def test_a_tools_file_is_checked_like_a_request(self):
        for tools, named in [([{"name": "a b"}], "tools[0].name"),
                             ([{"name": "a"}, {"name": "a"}], "'a' twice"),
                             ([{"name": "a", "cases": [{"content": "x"}]}],
                              "tools[0].cases[0].arguments is required"),
                             ([{"name": "a", "rpc_error": {"code": "x", "message": "m"}}],
                              "tools[0].rpc_error.code"),
                             ([{"name": "a", "simulate": {"mode": "nope"}}],
                              "tools[0].simulate.mode")]:
            with self.subTest(named=named):
                with self.assertRaises(ValueError) as raised:
                    dummyllm.make_config(mcp_tools=tools)
                self.assertIn(named, str(raised.exception))


# --- Surfaces: each provider's SDK, unchanged -------------------------------------

anthropic = optional_import("anthropic")
genai = optional_import("google.genai")


@needs(anthropic, "anthropic", "DUMMYLLM_REQUIRE_ANTHROPIC")
class AnthropicSDKTest(AnthropicCalls, ServerTestCase):
    """The real anthropic SDK, unchanged, pointed at dummyLLM."""

    def client(self, **options):
        options.setdefault("max_retries", 0)
        client = anthropic.Anthropic(base_url=self.server.url, api_key="x", **options)
        self.addCleanup(client.close)
        return client

    def test_a_tool_loop_with_thinking_sends_its_blocks_back(self):
        """The SDK's stream gathers the thinking block and its signature; a
        loop that sends the turn back whole goes on, one that drops the
        thinking block gets Anthropic's 400 and a finding."""
        client = self.client()
        ask = dict(model="claude-sonnet-4-5", max_tokens=2048,
                   thinking={"type": "enabled", "budget_tokens": 1024},
                   tools=[{"name": "get_weather", "input_schema": WEATHER}])
        question = {"role": "user", "content": "Weather in Paris?"}
        with client.messages.stream(messages=[question], tool_choice={"type": "any"},
                                    extra_headers={"X-Trace-Id": "careful"}, **ask) as stream:
            turn = stream.get_final_message()
        self.assertEqual([block.type for block in turn.content], ["thinking", "tool_use"])
        result = {"role": "user", "content": [{"type": "tool_result",
                                               "tool_use_id": turn.content[1].id,
                                               "content": "sunny"}]}
        final = client.messages.create(messages=[
            question, {"role": "assistant", "content": turn.content}, result],
            extra_headers={"X-Trace-Id": "careful"}, **ask)
        self.assertEqual(final.content[-1].text, "Simulated reply to: Weather in Paris?")
        with self.assertRaises(anthropic.BadRequestError) as refused:
            client.messages.create(messages=[
                question, {"role": "assistant", "content": turn.content[1:]}, result],
                extra_headers={"X-Trace-Id": "careless"}, **ask)
        self.assertIn("Expected `thinking` or `redacted_thinking`", refused.exception.message)
        self.assertTrue(self.server.verdict("careful")["ok"])
        self.assertEqual([finding["code"] for finding in
                          self.server.verdict("careless")["findings"]], ["DROPPED_THINKING"])

    def test_a_message_batch_and_its_results(self):
        client = self.client()
        batch = client.messages.batches.create(requests=[
            {"custom_id": "ok", "params": {"model": "claude-test", "max_tokens": 20,
                                           "messages": self.ASK}},
            {"custom_id": "overloaded", "params": {"model": "claude-test", "max_tokens": 20,
                                                   "messages": self.ASK,
                                                   "simulate": {"mode": "overloaded"}}}],
            extra_body={"simulate": {"latency_ms": 50}})
        self.assertEqual(batch.processing_status, "in_progress")
        deadline = time.monotonic() + 5
        while batch.processing_status != "ended" and time.monotonic() < deadline:
            time.sleep(0.02)
            batch = client.messages.batches.retrieve(batch.id)
        self.assertEqual((batch.request_counts.succeeded, batch.request_counts.errored), (1, 1))
        results = {entry.custom_id: entry.result for entry in
                   client.messages.batches.results(batch.id)}
        self.assertEqual(results["ok"].message.content[0].text, "Simulated reply to: Hello")
        self.assertEqual(results["overloaded"].error.error.type, "overloaded_error")
        self.assertEqual(client.messages.batches.delete(batch.id).type, "message_batch_deleted")

    def test_a_streamed_tool_use_and_the_spend_limit(self):
        tools = [{"name": "get_weather", "description": "Weather", "input_schema": WEATHER}]
        with self.client().messages.stream(model="claude-test", max_tokens=100,
                                           messages=self.ASK, tools=tools,
                                           tool_choice={"type": "any"}) as stream:
            message = stream.get_final_message()
        self.assertEqual(message.stop_reason, "tool_use")
        self.assertEqual(set(message.content[0].input), {"city", "unit"})
        with self.assertRaises(anthropic.RateLimitError) as caught:
            self.client().messages.create(model="m", max_tokens=10, messages=self.ASK,
                                          extra_body={"simulate": {"mode": "quota_exhausted"}})
        self.assertEqual(type(caught.exception).__name__,
                         getattr(anthropic, "EnforcedSpendLimitReachedError",
                                 anthropic.RateLimitError).__name__)

    def test_create(self):
        message = self.client().messages.create(model="claude-test", max_tokens=100,
                                                messages=self.ASK)
        self.assertEqual((message.content[0].text, message.stop_reason, message.usage.output_tokens),
                         ("Simulated reply to: Hello", "end_turn", 7))

    def test_stream_text_and_final_message(self):
        with self.client().messages.stream(model="c", max_tokens=100, messages=self.ASK,
                                           extra_body={"simulate": {"token_ms": 1}}) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        self.assertEqual(text, "Simulated reply to: Hello")
        self.assertEqual((final.content[0].text, final.stop_reason, final.usage.output_tokens),
                         (text, "end_turn", 7))

    def test_retries_429_twice_with_the_advertised_spacing(self):
        message = self.client(max_retries=2).messages.create(
            model="c", max_tokens=100, messages=self.ASK,
            extra_headers={"X-Trace-Id": "sdk-429"},
            extra_body={"simulate": {"script": ["rate_limit", "rate_limit", "ok"],
                                     "retry_after_ms": 150}})
        self.assertEqual(message.stop_reason, "end_turn")
        attempts = self.journal("?trace_id=sdk-429")
        self.assertEqual([entry["status"] for entry in attempts], [429, 429, 200])
        for earlier, later in zip(attempts, attempts[1:]):
            self.assertGreaterEqual(later["monotonic_ms"] - earlier["monotonic_ms"], 150)

    def test_529_is_its_overloaded_error(self):
        with self.assertRaises(anthropic.OverloadedError):
            self.client().messages.create(model="c", max_tokens=10, messages=self.ASK,
                                          extra_body={"simulate": {"mode": "overloaded"}})

    def test_hang_ends_in_its_timeout_error(self):
        started = time.monotonic()
        with self.assertRaises(anthropic.APITimeoutError):
            self.client(timeout=0.3).messages.create(model="c", max_tokens=10, messages=self.ASK,
                                                     extra_body={"simulate": {"mode": "hang"}})
        self.assertLess(time.monotonic() - started, 2)

    def test_a_cut_stream_raises(self):
        received = []
        with self.assertRaises(Exception) as caught:
            with self.client().messages.stream(
                    model="c", max_tokens=100, messages=self.ASK,
                    extra_body={"simulate": {"token_ms": 0, "stream": {"cut_after": 2}}}) as stream:
                received.extend(stream.text_stream)
        self.assertNotIsInstance(caught.exception, AssertionError)
        self.assertEqual(received, ["Simu", "late"])


@needs(genai, "google-genai", "DUMMYLLM_REQUIRE_GOOGLE")
class GoogleGenAISDKTest(GeminiCalls, ServerTestCase):
    """The real google-genai SDK, unchanged, pointed at dummyLLM."""

    def client(self, **http_options):
        client = genai.Client(api_key="x", http_options=genai.types.HttpOptions(
            base_url=self.server.url, **http_options))
        self.addCleanup(client.close)
        return client

    def simulate(self, **settings):
        return genai.types.GenerateContentConfig(http_options=genai.types.HttpOptions(
            extra_body={"simulate": settings}))

    def test_function_calling_mode_any_and_a_response_schema(self):
        def get_weather(city: str) -> str:
            """The weather of a city."""
            return "sunny"
        types = genai.types
        response = self.client().models.generate_content(
            model="gemini-2.5-flash", contents="Weather in Paris?",
            config=types.GenerateContentConfig(
                tools=[get_weather],
                automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
                tool_config=types.ToolConfig(function_calling_config=types.FunctionCallingConfig(
                    mode="ANY"))))
        [call] = response.function_calls
        self.assertEqual((call.name, set(call.args)), ("get_weather", {"city"}))
        response = self.client().models.generate_content(
            model="gemini-2.5-flash", contents="A city?", config=types.GenerateContentConfig(
                response_mime_type="application/json", response_schema=City))
        self.assertIsInstance(response.parsed, City)

    def test_generate_content(self):
        response = self.client().models.generate_content(model="gemini-2.5-flash",
                                                         contents="Hello")
        self.assertEqual(response.text, "Simulated reply to: Hello")
        self.assertEqual(response.usage_metadata.total_token_count, 9)

    def test_generate_content_stream(self):
        chunks = list(self.client().models.generate_content_stream(
            model="gemini-2.5-flash", contents="Hello", config=self.simulate(token_ms=1)))
        self.assertEqual("".join(chunk.text or "" for chunk in chunks), "Simulated reply to: Hello")
        self.assertEqual(chunks[-1].candidates[0].finish_reason, "STOP")

    def test_a_429_with_retry_info(self):
        with self.assertRaises(genai.errors.ClientError) as caught:
            self.client().models.generate_content(
                model="m", contents="x", config=self.simulate(mode="rate_limit",
                                                              retry_after_ms=1500))
        self.assertEqual((caught.exception.code, caught.exception.status),
                         (429, "RESOURCE_EXHAUSTED"))
        self.assertEqual(caught.exception.details["error"]["details"][0]["retryDelay"], "1.5s")

    def test_hang_with_an_http_timeout(self):
        started = time.monotonic()
        with self.assertRaises(Exception) as caught:
            self.client(timeout=300).models.generate_content(
                model="m", contents="x", config=self.simulate(mode="hang"))
        self.assertIn("Timeout", type(caught.exception).__name__)
        self.assertLess(time.monotonic() - started, 2)



agents = optional_import("agents")
agents_mcp = optional_import("agents.mcp")
ollama = optional_import("ollama")
cohere = optional_import("cohere")
groq = optional_import("groq")


@needs(openai, "openai", "DUMMYLLM_REQUIRE_OPENAI")
class OpenAIMoreSDKTest(ServerTestCase):
    """The openai SDK on the Responses API, embeddings and completions."""

    def client(self):
        client = openai.OpenAI(base_url=self.server.url + "/v1", api_key="x", max_retries=0)
        self.addCleanup(client.close)
        return client

    def test_responses_plain_and_streamed(self):
        response = self.client().responses.create(model="gpt-4.1", input="Hello")
        self.assertEqual((response.status, response.output_text), ("completed",
                                                                    "Simulated reply to: Hello"))
        events = list(self.client().responses.create(
            model="gpt-4.1", input="Hello", stream=True, extra_body={"simulate": {"token_ms": 1}}))
        self.assertEqual(events[-1].type, "response.completed")
        self.assertEqual(events[-1].response.output_text, "Simulated reply to: Hello")

    def test_background_create_retrieve_completed_and_cancel(self):
        client = self.client()
        response = client.responses.create(model="gpt-4.1", input="Hello", background=True,
                                           extra_body={"simulate": {"latency_ms": 50}})
        self.assertEqual(response.status, "queued")
        self.wait_until(lambda: client.responses.retrieve(response.id).status == "completed")
        self.assertEqual(client.responses.retrieve(response.id).output_text,
                         "Simulated reply to: Hello")
        hanging = client.responses.create(model="gpt-4.1", input="Hello", background=True,
                                          extra_body={"simulate": {"mode": "hang"}})
        self.assertEqual(client.responses.cancel(hanging.id).status, "cancelled")

    def test_embeddings_base64_by_default_and_float(self):
        client = self.client()
        default = client.embeddings.create(model="text-embedding-3-small", input="Hello")
        floats = client.embeddings.create(model="text-embedding-3-small", input="Hello",
                                          encoding_format="float")
        self.assertEqual(len(default.data[0].embedding), 1536)
        self.assertEqual(default.data[0].embedding, floats.data[0].embedding)

    def test_completions(self):
        completion = self.client().completions.create(model="gpt-3.5-turbo-instruct",
                                                      prompt="Hello")
        self.assertEqual(completion.choices[0].text, "Simulated reply to: Hello")


@needs(agents, "openai-agents", "DUMMYLLM_REQUIRE_AGENTS")
class OpenAIAgentsTest(ServerTestCase):
    """The openai-agents default Runner, on the Responses API."""

    def test_the_default_runner(self):
        async def run():
            async with openai.AsyncOpenAI(base_url=self.server.url + "/v1", api_key="x",
                                          max_retries=0) as client:
                agents.set_default_openai_client(client, use_for_tracing=False)
                agents.set_tracing_disabled(True)
                return await agents.Runner.run(agents.Agent(name="helper",
                                                            instructions="Be brief."), "Hello")
        self.assertEqual(asyncio.run(run()).final_output, "Simulated reply to: Hello")
        self.assertEqual([entry["path"] for entry in self.journal()], ["/v1/responses"])

    def test_a_function_tool_loop(self):
        calls = []

        @agents.function_tool
        def get_weather(city: str) -> str:
            """The weather of a city."""
            calls.append(city)
            return "sunny"
        script = {"script": [{"tool_calls": PARIS[:1]}, {"ok_text": "Sunny in Paris"}]}

        async def run(model, key, simulate):
            async with openai.AsyncOpenAI(
                    base_url=self.server.url + "/v1", api_key="x", max_retries=0,
                    default_headers={"X-Trace-Id": key,
                                     "X-DummyLLM-Simulate": json.dumps(simulate)}) as client:
                agent = agents.Agent(name="weather", tools=[get_weather],
                                     model=model(model="gpt-4o", openai_client=client))
                return await agents.Runner.run(agent, "Weather in Paris?", run_config=(
                    agents.RunConfig(tracing_disabled=True)))
        for model in (agents.OpenAIResponsesModel, agents.OpenAIChatCompletionsModel):
            for simulate in (script, dict(script, reasoning=5)):  # a reasoning model's too
                key = f"{model.__name__}-{'reasoning' in simulate}"
                with self.subTest(key=key):
                    self.assertEqual(asyncio.run(run(model, key, simulate)).final_output,
                                     "Sunny in Paris")
                    self.assertTrue(self.server.verdict(key)["ok"])
        self.assertEqual(calls, ["Paris"] * 4)


@needs(groq, "groq", "DUMMYLLM_REQUIRE_GROQ")
class GroqSDKTest(ServerTestCase):
    """groq.Groq, unchanged but for its base URL: it posts to
    /openai/v1/chat/completions, Azure's v1 path, the same chat."""

    options = {"latency_ms": 0}

    def test_chat_its_stream_and_a_rate_limit(self):
        client = groq.Groq(base_url=self.server.url, api_key="x", max_retries=0)
        self.addCleanup(client.close)
        ask = dict(model="llama-3.3-70b-versatile", messages=[{"role": "user", "content": "Hello"}])
        self.assertEqual(client.chat.completions.create(**ask).choices[0].message.content,
                         "Simulated reply to: Hello")
        stream = client.chat.completions.create(stream=True, **ask)
        self.assertEqual("".join(chunk.choices[0].delta.content or "" for chunk in stream
                                 if chunk.choices), "Simulated reply to: Hello")
        with self.assertRaises(groq.RateLimitError):
            client.chat.completions.create(extra_body={"simulate": {"mode": "rate_limit"}},
                                           **ask)


@needs(cohere, "cohere", "DUMMYLLM_REQUIRE_COHERE")
class CohereSDKTest(ServerTestCase):
    """cohere.ClientV2, unchanged but for its base URL."""

    options = {"latency_ms": 0}
    ASK = [{"role": "user", "content": "Hello"}]

    def setUp(self):
        super().setUp()
        caught = warnings.catch_warnings()
        caught.__enter__()
        self.addCleanup(caught.__exit__, None, None, None)
        # cohere 7 reads its models' fields the way pydantic 2 deprecates.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="cohere")

    def client(self):
        client = cohere.ClientV2(api_key="x", base_url=self.server.url)
        self.addCleanup(client._client_wrapper.httpx_client.httpx_client.close)
        return client

    def test_chat_its_stream_and_a_tool_loop(self):
        client = self.client()
        answer = client.chat(model="command-a-03-2025", messages=self.ASK)
        self.assertEqual((answer.message.content[0].text, answer.finish_reason),
                         ("Simulated reply to: Hello", "COMPLETE"))
        events = list(client.chat_stream(model="command-a-03-2025", messages=self.ASK,
                                         thinking={"type": "enabled"}))
        self.assertEqual([event.type for event in events[:2]], ["message-start", "content-start"])
        self.assertEqual("".join(event.delta.message.content.text or "" for event in events
                                 if event.type == "content-delta"), "Simulated reply to: Hello")
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
        called = client.chat(model="c", messages=self.ASK, tools=tools, tool_choice="REQUIRED")
        [call] = called.message.tool_calls
        self.assertEqual((called.finish_reason, call.function.name), ("TOOL_CALL", "get_weather"))
        final = client.chat(model="c", tools=tools, messages=[
            *self.ASK, {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
        self.assertEqual(final.message.content[0].text, "Simulated reply to: Hello")

    def test_its_errors_are_the_sdks(self):
        client = self.client()
        with self.assertRaises(cohere.TooManyRequestsError):
            client.chat(model="c", messages=self.ASK, request_options={
                "max_retries": 0, "additional_body_parameters": {"simulate": {
                    "mode": "rate_limit"}}})
        with self.assertRaises(cohere.BadRequestError):
            client.chat(model="c", messages=[], request_options={"max_retries": 0})
        [*_, end] = client.chat_stream(model="c", messages=self.ASK, request_options={
            "additional_body_parameters": {"simulate": {"stream": {"error_after": 2}}}})
        self.assertEqual((end.delta.finish_reason, end.delta.error),
                         ("ERROR", "simulated stream error"))


@needs(ollama, "ollama", "DUMMYLLM_REQUIRE_OLLAMA")
class OllamaSDKTest(ServerTestCase):
    """The ollama Python client, unchanged, pointed at dummyLLM."""

    ASK = [{"role": "user", "content": "Hello"}]

    def client(self, **options):
        client = ollama.Client(host=self.server.url, **options)
        self.addCleanup(client.close)
        return client

    def test_tool_calls_and_format(self):
        def get_weather(city: str) -> str:
            """The weather of a city."""
            return "sunny"
        scripted = {"X-DummyLLM-Simulate": json.dumps({"tool_calls": PARIS[:1]})}
        for stream in (False, True):
            with self.subTest(stream=stream):
                answer = self.client(headers=scripted).chat(
                    model="llama3.2", messages=self.ASK, tools=[get_weather], stream=stream)
                message = (answer if not stream else next(iter(answer))).message
                self.assertEqual(message.tool_calls[0].function.arguments,
                                 PARIS[0]["arguments"])
        answer = self.client().chat(model="llama3.2", messages=self.ASK,
                                    format=City.model_json_schema())
        self.assertIsInstance(City.model_validate_json(answer.message.content), City)

    def test_chat_plain_and_streamed(self):
        self.assertEqual(self.client().chat(model="llama3.2", messages=self.ASK).message.content,
                         "Simulated reply to: Hello")
        parts = list(self.client().chat(model="llama3.2", messages=self.ASK, stream=True))
        self.assertEqual("".join(part.message.content for part in parts),
                         "Simulated reply to: Hello")
        self.assertTrue(parts[-1].done)

    def test_embed(self):
        response = self.client().embed(model="nomic-embed-text", input=["a", "b"])
        self.assertEqual([len(vector) for vector in response.embeddings], [1536, 1536])

    def test_fail_raises_response_error(self):
        with self.assertRaises(ollama.ResponseError) as caught:
            self.client(headers={"X-DummyLLM-Simulate": '{"mode": "fail", "latency_ms": 0}'}
                        ).chat(model="m", messages=self.ASK)
        self.assertEqual(caught.exception.status_code, 500)

    def test_hang_with_a_client_timeout(self):
        started = time.monotonic()
        with self.assertRaises(Exception) as caught:
            self.client(timeout=0.3, headers={"X-DummyLLM-Simulate": '{"mode": "hang"}'}).chat(
                model="m", messages=self.ASK)
        self.assertIn("Timeout", type(caught.exception).__name__)
        self.assertLess(time.monotonic() - started, 2)


@needs(mcp, "mcp", "DUMMYLLM_REQUIRE_MCP")
class McpSDKTest(ServerTestCase):
    """The official mcp SDK's client, unchanged, pointed at /mcp."""

    options = {"mcp_tools": MCP_TOOLS, "latency_ms": 0}

    def setUp(self):
        super().setUp()
        logger = logging.getLogger("mcp")  # it logs each broken answer's traceback
        self.addCleanup(logger.setLevel, logger.level)
        logger.setLevel(logging.CRITICAL)

    def run_client(self, use, **options):
        async def run():
            async with mcp.Client(self.server.url + "/mcp", **options) as client:
                return await use(client)
        return asyncio.run(run())

    def test_list_and_call_tools(self):
        progress = []

        async def use(client):
            async def on_progress(done, total, message):
                progress.append((done, total))
            listed = await client.list_tools()
            weather = await client.call_tool("get_weather", {"city": "Paris"})
            refused = await client.call_tool("get_weather", {"city": 7})
            build = await client.call_tool("build", {}, progress_callback=on_progress)
            stats = await client.call_tool("stats", {})
            return [tool.name for tool in listed.tools], weather, refused, build, stats
        names, weather, refused, build, stats = self.run_client(use)
        self.assertEqual(names, [tool["name"] for tool in MCP_TOOLS])
        self.assertEqual((weather.is_error, weather.content[0].text), (False, "Sunny, 21 C"))
        self.assertTrue(refused.is_error)
        self.assertEqual((build.content[0].text, progress),
                         ("Simulated result of build", [(1, 3), (2, 3), (3, 3)]))
        self.assertIsInstance(stats.structured_content["n"], int)

    def test_each_fault_reaches_the_caller_as_an_error(self):
        for simulate, says in [
                ({"fault": {"status": 503}}, "simulated HTTP 503 fault"),
                ({"mode": "rate_limit"}, "simulated rate limit"),
                ({"fault": "malformed"}, "Failed to parse JSON response"),
                ({"stream": {"cut_after": 1}}, "SSE stream ended without a response"),
                ({"stream": {"error_after": 1}}, "the tool's answer failed"),
                (None, "index offline")]:
            with self.subTest(simulate=simulate):
                async def use(client):
                    name = "search" if simulate is None else "build"
                    await client.call_tool(name, {}, progress_callback=None, meta={
                        "progressToken": "p", "dummyllm/simulate": simulate or {}})
                with self.assertRaises(Exception) as raised:
                    self.run_client(use)
                error = raised.exception
                while isinstance(error, BaseExceptionGroup):
                    error = error.exceptions[0]
                self.assertIsInstance(error, mcp.MCPError)
                self.assertIn(says, str(error))

    def test_a_call_past_the_clients_timeout_is_cancelled(self):
        async def use(client):
            with self.assertRaises(mcp.MCPError) as raised:
                await client.call_tool("deploy", {}, read_timeout_seconds=0.3, meta={
                    "dummyllm/simulate": {"mode": "hang"}})
            return str(raised.exception)
        self.assertIn("timed out", self.run_client(use))
        self.wait_until(lambda: any(entry["mcp"] and entry["mcp"]["cancels"] is not None
                                    for entry in self.server.journal.find()))
        findings = self.server.verdict(settle_ms=0)["findings"]
        self.assertEqual([finding["code"] for finding in findings], [])


@needs(genai, "google-genai", "DUMMYLLM_REQUIRE_GOOGLE")
class VertexSDKTest(ServerTestCase):
    """google-genai with vertexai=True and the anthropic SDK's
    AnthropicVertex, unchanged, with only their base URL pointed here."""

    def test_google_genai_on_vertex(self):
        from google.oauth2.credentials import Credentials  # google-genai's own dependency
        client = genai.Client(vertexai=True, project="p", location="us-central1",
                              credentials=Credentials(token="x"),
                              http_options=genai.types.HttpOptions(base_url=self.server.url))
        self.addCleanup(client.close)
        self.assertEqual(client.models.generate_content(model="gemini-2.5-flash",
                                                        contents="Hello").text,
                         "Simulated reply to: Hello")
        self.assertEqual("".join(chunk.text for chunk in client.models.generate_content_stream(
            model="gemini-2.5-flash", contents="Hello")), "Simulated reply to: Hello")
        self.assertEqual(client.models.count_tokens(model="gemini-2.5-flash",
                                                    contents="Hello").total_tokens, 2)

    def test_anthropic_vertex(self):
        if anthropic is None:
            self.skipTest("the anthropic package is not installed")
        client = anthropic.AnthropicVertex(region="us-east5", project_id="p", access_token="x",
                                           base_url=self.server.url + "/v1", max_retries=0)
        self.addCleanup(client.close)
        ask = {"model": "claude-sonnet-4-5@20250929", "max_tokens": 50,
               "messages": [{"role": "user", "content": "Hello"}]}
        self.assertEqual(client.messages.create(**ask).content[0].text,
                         "Simulated reply to: Hello")
        with client.messages.stream(**ask) as stream:
            self.assertEqual(stream.get_final_text(), "Simulated reply to: Hello")
        with self.assertRaises(anthropic.InternalServerError):
            client.messages.create(**ask, extra_headers={
                "X-DummyLLM-Simulate": json.dumps({"mode": "fail"})})


# --- Surfaces: agent frameworks, unchanged ----------------------------------------

pydantic_ai = optional_import("pydantic_ai")
langchain_openai = optional_import("langchain_openai")
instructor = optional_import("instructor")


def raised_name(call):
    """The name a test would catch of what call() raises, as the README's
    table writes it (google-genai's by its path under google), or None."""
    try:
        call()
    except Exception as error:
        module = type(error).__module__
        package = (".".join(module.split(".")[1:3]) if module.startswith("google.")
                   else module.split(".")[0])
        return f"{package}.{type(error).__name__}"
    return None


class SDKFailureTableTest(ServerTestCase):
    """The README's table of what each failure raises, by SDK, is what each
    SDK installed raises (CI installs them all)."""

    options = {"latency_ms": 0, "timeout_ms": 200}
    TIMEOUT_S = 0.5

    def openai(self, simulate, stream):
        client = openai.OpenAI(base_url=self.server.url + "/v1", api_key="x", max_retries=0,
                               timeout=self.TIMEOUT_S)
        answer = client.chat.completions.create(model="m", messages=HELLO[1:], stream=stream,
                                                extra_body={"simulate": simulate})
        if stream:
            list(answer)

    def anthropic(self, simulate, stream):
        client = anthropic.Anthropic(base_url=self.server.url, api_key="x", max_retries=0,
                                     timeout=self.TIMEOUT_S)
        answer = client.messages.create(model="m", max_tokens=100, messages=HELLO[1:],
                                        stream=stream, extra_body={"simulate": simulate})
        if stream:
            list(answer)

    def google_genai(self, simulate, stream):
        client = genai.Client(api_key="x", http_options=genai.types.HttpOptions(
            base_url=self.server.url, timeout=int(self.TIMEOUT_S * 1000),
            headers={"X-DummyLLM-Simulate": json.dumps(simulate)}))
        if stream:
            list(client.models.generate_content_stream(model="m", contents="Hello"))
        else:
            client.models.generate_content(model="m", contents="Hello")

    def ollama(self, simulate, stream):
        client = ollama.Client(host=self.server.url, timeout=self.TIMEOUT_S,
                               headers={"X-DummyLLM-Simulate": json.dumps(simulate)})
        answer = client.chat(model="m", messages=HELLO[1:], stream=stream)
        if stream:
            list(answer)

    @staticmethod
    def table():
        with open(README, encoding="utf-8") as f:
            text = f.read()
        lines = text.partition("<!-- sdk-raises:")[2].splitlines()[1:]
        rows = [[cell.strip() for cell in line.strip("|").split("|")]
                for line in itertools.takewhile(lambda line: line.startswith("|"), lines)]
        return rows[0][1:], rows[2:]

    def test_the_readme_table_is_what_each_sdk_raises(self):
        sdks, rows = self.table()
        self.assertEqual(sdks, ["openai", "anthropic", "google-genai", "ollama"])
        installed = {"openai": openai, "anthropic": anthropic, "google-genai": genai,
                     "ollama": ollama}
        checked = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)  # the clients, left unclosed
            for row in rows:
                kind, _, name = row[0].partition(" ")
                simulate = {"mode": {"mode": name}, "fault": {"fault": name},
                            "stream": {"stream": {name: 2}}}[kind]
                for sdk, expected in zip(sdks, row[1:]):
                    if installed[sdk] is None:
                        continue
                    with self.subTest(row=row[0], sdk=sdk):
                        call = getattr(self, sdk.replace("-", "_"))
                        got = raised_name(lambda: call(dict(simulate, token_ms=0),
                                                       kind == "stream"))
                        self.assertEqual(got or "—", expected)
                        checked += 1
            gc.collect()
        if os.environ.get("DUMMYLLM_REQUIRE_OPENAI"):  # CI: every SDK is there
            self.assertEqual(checked, len(rows) * len(sdks))


# Each row's call with the Node SDKs: what it threw (the SDK's own classes
# as SDK.Name), the stream part that said it failed, null when it returned,
# "waits" when it had not ended in 1.5 s.
NODE_RAISES = """\
import OpenAI from "openai";
import Anthropic from "@anthropic-ai/sdk";
import * as ai from "ai";
import { createOpenAI } from "@ai-sdk/openai";
const [base, rowsJson] = process.argv.slice(2);
const rows = JSON.parse(rowsJson);
const hello = [{ role: "user", content: "Hello" }];
const openai = new OpenAI({ baseURL: base + "/v1", apiKey: "x", maxRetries: 0, timeout: 500 });
const anthropic = new Anthropic({ baseURL: base, apiKey: "x", maxRetries: 0, timeout: 500 });
const sdks = {
  openai: [OpenAI, async (simulate, stream) => {
    const answer = await openai.chat.completions.create({ model: "m", messages: hello, stream, simulate });
    if (stream) for await (const _ of answer) {}
  }],
  anthropic: [Anthropic, async (simulate, stream) => {
    const answer = await anthropic.messages.create({ model: "m", max_tokens: 100, messages: hello, stream, simulate });
    if (stream) for await (const _ of answer) {}
  }],
  ai: [ai, async (simulate, stream) => {  // the Vercel AI SDK: the setting in the header
    const model = createOpenAI({ baseURL: base + "/v1", apiKey: "x",
      headers: { "X-DummyLLM-Simulate": JSON.stringify(simulate) } }).chat("m");
    const options = { model, prompt: "Hello", maxRetries: 0, abortSignal: AbortSignal.timeout(500) };
    if (!stream) return void await ai.generateText(options);
    for await (const part of ai.streamText({ ...options, onError: () => {} }).fullStream) {
      if (part.type === "error") throw part.error;
      if (part.type === "abort") return "abort part";
    }
  }],
};
const named = (sdk, prefix, error) => {
  if (!(error instanceof Error)) return "error part";
  const type = error.constructor;
  const name = type.name === "DOMException" ? error.name : type.name;
  return (sdk[type.name] === type ? prefix + "." : "") + name;
};
const result = {};
for (const [name, [sdk, call]] of Object.entries(sdks)) {
  const prefix = name === "ai" ? "ai" : sdk.name;
  result[name] = [];
  for (const [simulate, stream] of rows) {
    const run = call(simulate, stream).then((value) => value || null);
    let timer;
    const waited = new Promise((resolve) => { timer = setTimeout(resolve, 1500, "waits"); });
    try {
      result[name].push(await Promise.race([run, waited]));
      run.catch(() => {});
    } catch (error) {
      result[name].push(named(sdk, prefix, error));
    } finally {
      clearTimeout(timer);
    }
  }
}
console.log(JSON.stringify(result));
process.exit(0);
"""


@needs(NODE_DIR, "the Node SDKs (npm)", "DUMMYLLM_REQUIRE_NODE")
class NodeSDKFailureTableTest(ServerTestCase):
    """The README's table of what each failure raises in the Node SDKs."""

    options = SDKFailureTableTest.options

    def test_the_readme_table_is_what_each_node_sdk_raises(self):
        with open(README, encoding="utf-8") as f:
            lines = f.read().partition("<!-- sdk-raises-node:")[2].splitlines()[1:]
        rows = [[cell.strip() for cell in line.strip("|").split("|")]
                for line in itertools.takewhile(lambda line: line.startswith("|"), lines)]
        self.assertEqual(rows[0][1:], ["openai (Node)", "@anthropic-ai/sdk", "ai (Vercel)"])
        calls = []
        for row in rows[2:]:
            kind, _, name = row[0].partition(" ")
            simulate = {"mode": {"mode": name}, "fault": {"fault": name},
                        "stream": {"stream": {name: 2}}}[kind]
            calls.append([dict(simulate, token_ms=0), kind == "stream"])
        script = os.path.join(NODE_DIR, f"raises-{os.getpid()}.mjs")
        with open(script, "w", encoding="utf-8") as file:
            file.write(NODE_RAISES)
        self.addCleanup(os.unlink, script)
        run = subprocess.run(["node", script, self.server.url, json.dumps(calls)], cwd=NODE_DIR,
                             capture_output=True, text=True, timeout=120)
        raised = json.loads(run.stdout)
        for row, *got in zip(rows[2:], raised["openai"], raised["anthropic"], raised["ai"]):
            with self.subTest(row=row[0]):
                self.assertEqual([name or "—" for name in got], row[1:])


@needs(pydantic_ai, "pydantic-ai", "DUMMYLLM_REQUIRE_PYDANTIC_AI")
class PydanticAITest(ServerTestCase):
    """pydantic-ai's Agent on the OpenAI chat model."""

    def run_agent(self, prompt, headers=None, **options):
        """The output of an Agent's run, its client closed after."""
        from pydantic_ai.models.openai import OpenAIChatModel
        from pydantic_ai.providers.openai import OpenAIProvider

        async def run():
            async with openai.AsyncOpenAI(base_url=self.server.url + "/v1", api_key="x",
                                          max_retries=0, default_headers=headers) as client:
                agent = pydantic_ai.Agent(OpenAIChatModel("gpt-4o", provider=OpenAIProvider(
                    openai_client=client)), **options)
                return (await agent.run(prompt)).output
        return asyncio.run(run())

    def test_an_agent_calls_its_tool_on_a_scripted_tool_call_and_finishes(self):
        script = {"script": [{"tool_calls": PARIS[:1]}, {"ok_text": "Sunny in Paris"}]}
        calls = []

        def get_weather(city: str, unit: str) -> str:
            calls.append((city, unit))
            return "sunny"
        for key, simulate in (("pydantic-ai-1", script), ("reasoning", dict(script, reasoning=5))):
            with self.subTest(key=key):
                output = self.run_agent("Weather in Paris?", tools=[get_weather], headers={
                    "X-Trace-Id": key, "X-DummyLLM-Simulate": json.dumps(simulate)})
                self.assertEqual(output, "Sunny in Paris")
                self.assertTrue(self.server.verdict(key)["ok"])
        self.assertEqual(calls, [("Paris", "c")] * 2)

    def test_output_type_works_with_no_simulate_at_all(self):
        self.assertIsInstance(self.run_agent("A city?", output_type=City), City)

    def test_reply_rules_drive_the_loop_with_no_header(self):
        self.server.add_rule({"match": {"last_role": "user", "text_contains": "weather"},
                              "simulate": {"tool_calls": PARIS[:1]}})
        self.server.add_rule({"match": {"tool_result_for": "get_weather"},
                              "simulate": {"ok_text": "It is sunny"}})

        def get_weather(city: str, unit: str) -> str:
            return "sunny"
        self.assertEqual(self.run_agent("What is the weather in Paris?", tools=[get_weather]),
                         "It is sunny")
        self.assertEqual([entry["rule"] for entry in self.journal()], [0, 1])


@needs(langchain_openai, "langchain-openai", "DUMMYLLM_REQUIRE_LANGCHAIN")
class LangChainTest(ServerTestCase):
    """LangChain's ChatOpenAI."""

    def model(self):
        return langchain_openai.ChatOpenAI(model="gpt-4o", base_url=self.server.url + "/v1",
                                           api_key="x", max_retries=0)

    def test_bind_tools_gets_tool_calls(self):
        from langchain_core.tools import tool

        @tool
        def get_weather(city: str, unit: str) -> str:
            """The weather of a city."""
            return "sunny"
        message = self.model().bind_tools([get_weather], tool_choice="required").invoke(
            "Weather in Paris?")
        [call] = message.tool_calls
        self.assertEqual((call["name"], set(call["args"])), ("get_weather", {"city", "unit"}))
        message = self.model().bind_tools([get_weather]).invoke(
            "Weather in Paris?", extra_body={"simulate": {"tool_calls": PARIS[:1]}})
        self.assertEqual(message.tool_calls[0]["args"], PARIS[0]["arguments"])

    def test_with_structured_output_returns_the_model(self):
        for method in ("json_schema", "function_calling"):
            with self.subTest(method=method):
                city = self.model().with_structured_output(City, method=method).invoke("A city?")
                self.assertIsInstance(city, City)


@needs(instructor, "instructor", "DUMMYLLM_REQUIRE_INSTRUCTOR")
class InstructorTest(ServerTestCase):
    """instructor, in its default mode (a forced tool call)."""

    def test_the_default_mode_returns_a_valid_model(self):
        client = instructor.from_openai(openai.OpenAI(base_url=self.server.url + "/v1",
                                                      api_key="x", max_retries=0))
        city = client.chat.completions.create(model="gpt-4o", response_model=City,
                                              messages=[{"role": "user", "content": "A city?"}])
        self.assertIsInstance(city, City)
        self.assertEqual(json.loads(self.journal()[0]["body"])["tool_choice"]["function"]["name"],
                         "City")


@needs(agents, "openai-agents", "DUMMYLLM_REQUIRE_AGENTS")
class McpAgentTest(ServerTestCase):
    """An openai-agents agent with /mcp as its MCP server: its first tool
    call fails, it calls again and answers."""

    options = {"mcp_tools": [dict(MCP_WEATHER, cases=None, script=[
        {"simulate": {"mode": "fail", "fail_message": "weather service down"}},
        {"content": "Sunny, 21 C"}])], "latency_ms": 0}

    def test_the_agent_recovers_from_a_failed_tool_call(self):
        call = [{"name": "get_weather", "arguments": {"city": "Paris"}}]
        script = {"script": [{"tool_calls": call}, {"tool_calls": call},
                             {"ok_text": "Sunny in Paris"}]}

        async def run():
            async with openai.AsyncOpenAI(
                    base_url=self.server.url + "/v1", api_key="x", max_retries=0,
                    default_headers={"X-Trace-Id": "agent",
                                     "X-DummyLLM-Simulate": json.dumps(script)}) as client:
                async with agents_mcp.MCPServerStreamableHttp(
                        params={"url": self.server.url + "/mcp",
                                "headers": {"X-Trace-Id": "agent"}}, name="tools") as tools:
                    agent = agents.Agent(name="weather", mcp_servers=[tools],
                                         model=agents.OpenAIChatCompletionsModel(
                                             model="gpt-4o", openai_client=client))
                    return await agents.Runner.run(agent, "Weather in Paris?", run_config=(
                        agents.RunConfig(tracing_disabled=True)))
        self.assertEqual(asyncio.run(run()).final_output, "Sunny in Paris")
        self.server.assert_client_ok("agent")
        self.assertEqual(self.server.mcp_report("agent")["keys"], [{
            "key": "agent", "tools": {"get_weather": {"calls": 2, "failed": 1}},
            "never_called": []}])
        model_calls = [entry for entry in self.server.journal.find(trace_id="agent")
                       if entry["surface"] is not None]
        self.assertIn("weather service down", model_calls[1]["tool_results"][0])


# --- Surfaces: retries, the journal and the server's own endpoints ----------------

class ScriptTest(AppTestCase):
    options = {"seed": 1}

    def modes(self, server, count, script, trace_id="T"):
        conn = self.connect(server)
        found = []
        for _ in range(count):
            status, body, _ = self.call("POST", "/v1/jobs", {
                "op": "x", "trace_id": trace_id, "simulate": {"latency_ms": 0, "script": script}},
                conn=conn)
            if status != 201:
                found.append(status)
                continue
            view = self.call("GET", f"/v1/jobs/{body['id']}/request", conn=conn)[1]
            found.append((view["simulate"]["mode"], view["simulate"]["latency_ms"],
                          view["simulate"]["script_step"]))
        return found

    def test_fail_twice_then_succeed_on_every_fresh_server(self):
        script = ["fail", {"mode": "fail", "latency_ms": 50}, "rate_limit", "ok"]
        expected = [("fail", 0, 0), ("fail", 50, 1), 429, ("ok", 0, 3), ("ok", 0, 4)]
        self.assertEqual(self.modes(self.server, 5, script), expected)
        self.assertEqual(self.modes(self.start({"seed": 1}), 5, script), expected)

    def test_counters_are_per_key_listed_and_reset(self):
        self.modes(self.server, 3, ["fail", "ok"], trace_id="A")
        self.modes(self.server, 1, ["fail", "ok"], trace_id="B")
        self.assertEqual(self.call("GET", "/v1/scripts")[1]["scripts"],
                         [{"key": "A", "test_id": None, "attempts": 3},
                          {"key": "B", "test_id": None, "attempts": 1}])
        status, body, _ = self.call("POST", "/v1/reset")
        self.assertEqual(status, 200)
        self.assertEqual(body["removed"]["script_counters"], 2)
        self.assertEqual(self.call("GET", "/v1/scripts")[1]["scripts"], [])
        self.assertEqual(self.modes(self.server, 1, ["fail", "ok"], trace_id="A"),
                         [("fail", 0, 0)])

    def test_chat_scripts_follow_the_trace_id_header(self):
        statuses = [self.call("POST", "/v1/chat/completions", {
            "model": "m", "messages": HELLO,
            "simulate": {"latency_ms": 0, "script": ["rate_limit", "overloaded", "ok"]}},
            headers={"X-Trace-Id": "c1"})[0] for _ in range(4)]
        self.assertEqual(statuses, [429, 503, 200, 200])

    def test_a_replayed_idempotency_key_takes_no_step(self):
        body = {"op": "x", "trace_id": "R", "simulate": {"latency_ms": 0,
                                                        "script": ["fail", "hang", "ok"]}}
        key = {"Idempotency-Key": "once"}
        first = self.call("POST", "/v1/jobs", body, headers=key)[1]["id"]
        self.assertEqual(self.call("POST", "/v1/jobs", body, headers=key)[1]["id"], first)
        second = self.create(**body)
        self.assertEqual(self.call("GET", f"/v1/jobs/{second}/request")[1]["simulate"]["mode"],
                         "hang")

    def test_bad_scripts_are_422(self):
        for script, field in [("fail", "simulate.script"), ([], "simulate.script"),
                              (["nope"], "simulate.script[0]"), ([3], "simulate.script[0]"),
                              ([{"mode": "nope"}], "simulate.script[0].mode"),
                              ([{"script": ["ok"]}], "simulate.script[0].script"),
                              ([{"latency": 1}], "simulate.script[0].latency")]:
            with self.subTest(script=script):
                status, body, _ = self.call("POST", "/v1/jobs", {"op": "x",
                                                                 "simulate": {"script": script}})
                self.assert_error(status, body, 422, "VALIDATION_ERROR", field)


class PollFaultTest(AppTestCase):

    def test_poll_faults_hit_the_kth_poll(self):
        job_id = self.create(simulate={"mode": "hang", "poll_faults": [
            None, "reset", {"unknown_state": "paused"}, {"status": 503}]})
        path = "/v1/jobs/" + job_id
        self.assertEqual(self.job(job_id)["state"], "running")
        with self.assertRaises(ConnectionResetError):
            self.call("GET", path)
        self.assertEqual(self.job(job_id)["state"], "paused")
        self.assertEqual(self.call("GET", path)[0], 503)
        self.assertEqual(self.job(job_id)["state"], "running")
        self.assertEqual(self.call("GET", path + "/request")[1]["polls"], 5)


class IdempotencyTest(AppTestCase):
    options = {"seed": 1}

    def test_a_lost_acknowledgement_with_and_without_an_idempotency_key(self):
        body = {"op": "charge", "simulate": {"latency_ms": 0, "script": [
            {"fault": "reset", "fault_phase": "after"}, "ok"]}}
        key = {"Idempotency-Key": "pay-1"}
        with self.assertRaises(ConnectionResetError):
            self.call("POST", "/v1/jobs", body, headers=key)
        status, job, response = self.call("POST", "/v1/jobs", body, headers=key)
        self.assertEqual((status, response.getheader("Idempotent-Replayed")), (200, "true"))
        self.assertEqual(self.stored(), 1)  # the work ran once
        self.assertEqual(self.journal("?path=/v1/jobs")[0]["job_id"], job["id"])
        status, error, _ = self.call("POST", "/v1/jobs", {"op": "other"}, headers=key)
        self.assert_error(status, error, 409, "IDEMPOTENCY_CONFLICT", "Idempotency-Key")

        self.call("POST", "/v1/reset")
        with self.assertRaises(ConnectionResetError):
            self.call("POST", "/v1/jobs", body)
        self.assertEqual(self.call("POST", "/v1/jobs", body)[0], 201)
        self.assertEqual(self.stored(), 2)  # without a key, the work ran twice


class JitterTest(AppTestCase):
    options = {"seed": 1}

    def test_jitter_is_bounded_and_seeded(self):
        def latencies(server):
            conn = self.connect(server)
            found = []
            for _ in range(20):
                job_id = self.create(conn=conn, trace_id="J",
                                     simulate={"latency_ms": 100, "jitter_ms": 30})
                found.append(self.call("GET", f"/v1/jobs/{job_id}/request", conn=conn)[1]
                             ["simulate"]["latency_ms"])
            return found
        first = latencies(self.server)
        self.assertTrue(all(70 <= latency <= 130 for latency in first), first)
        self.assertGreater(len(set(first)), 5)
        self.assertEqual(latencies(self.start({"seed": 1})), first)


class JournalTest(AppTestCase):
    options = {"seed": 1, "journal_size": 5}

    def test_entries(self):
        self.call("GET", "/health")  # not journaled
        self.call("POST", "/v1/jobs", {"op": "x", "trace_id": "t1", "pad": "p" * 5000},
                  headers={"Idempotency-Key": "k", "User-Agent": "tester/1", "X-Other": "no"})
        self.call("GET", "/nope?a=1", headers={"X-Trace-Id": "t2"})
        first, second = self.journal()
        self.assertEqual((first["method"], first["path"], first["status"], first["trace_id"]),
                         ("POST", "/v1/jobs", 201, "t1"))
        self.assertRegex(first["job_id"], r"\Ajob_")
        self.assertEqual(first["headers"], {"Idempotency-Key": "k", "User-Agent": "tester/1"})
        self.assertEqual((len(first["body"]), first["body_truncated"]), (4096, True))
        self.assertIsNone(first["fault"])
        self.assertAlmostEqual(first["at_ms"], self.clock.wall_ms(), delta=2000)
        self.assertLessEqual(first["monotonic_ms"], second["monotonic_ms"])
        self.assertEqual((second["path"], second["query"], second["status"], second["trace_id"]),
                         ("/nope", "a=1", 404, "t2"))

    def test_filters_bounds_and_clear(self):
        for i in range(8):
            self.call("POST", "/v1/jobs", {"op": "x", "trace_id": f"t{i % 2}"})
        entries = self.journal()
        self.assertEqual(len(entries), 5)  # --journal-size
        self.assertEqual([entry["seq"] for entry in entries], sorted(e["seq"] for e in entries))
        self.assertEqual({entry["trace_id"] for entry in self.journal("?trace_id=t1")}, {"t1"})
        self.assertEqual(len(self.journal("?trace_id=t1&limit=1")), 1)
        self.assertEqual(self.journal("?path=/nope"), [])
        status, body, _ = self.call("GET", "/v1/requests?limit=0")
        self.assert_error(status, body, 422, "VALIDATION_ERROR", "limit")
        status, body, _ = self.call("DELETE", "/v1/requests")
        self.assertEqual((status, body["removed"]["journal_entries"]), (200, 5))
        self.assertEqual(self.journal(), [])

    def test_a_client_retry_loop_seen_through_the_journal(self):
        body = {"op": "x", "trace_id": "retry-1", "simulate": {"script": [
            {"fault": {"status": 503}}, {"fault": {"status": 503}}, "ok"]}}
        for attempt in range(3):
            if self.call("POST", "/v1/jobs", body)[0] == 201:
                break
            self.clock.advance(50 * 2 ** attempt)  # the client's back-off
        attempts = self.journal("?trace_id=retry-1")
        self.assertEqual([entry["status"] for entry in attempts], [503, 503, 201])
        gaps = [later["monotonic_ms"] - earlier["monotonic_ms"]
                for earlier, later in zip(attempts, attempts[1:])]
        self.assertGreaterEqual(gaps[0], 50)
        self.assertGreaterEqual(gaps[1], 100)


class ChaosTest(AppTestCase):
    options = {"seed": 9, "chaos": 0.5, "chaos_faults": "reset,status:503,disconnect"}

    def faults(self, server):
        for _ in range(20):
            try:
                conn = self.connect(server)
                self.call("POST", "/v1/jobs", {"op": "x"}, conn=conn)
            except (ConnectionError, http.client.HTTPException):
                pass
        conn = self.connect(server)
        status, body, _ = self.call("GET", "/v1/requests", conn=conn)
        return [entry["fault"] for entry in body["requests"]]

    def test_the_same_run_order_gives_the_same_faults(self):
        first = self.faults(self.server)
        self.assertEqual(len(first), 20)
        self.assertTrue(5 <= sum(fault is not None for fault in first) <= 15, first)
        self.assertEqual(set(map(json.dumps, first)) - {"null"},
                         {'"reset"', '"disconnect"', '{"status": 503, "retry_after_ms": null}'})
        self.assertEqual(self.faults(self.start(self.options)), first)
        self.assertEqual(self.call("GET", "/health")[1]["chaos"]["rate"], 0.5)


class LongPollTest(AppTestCase):

    def test_a_waiter_returns_soon_after_the_job_ends(self):
        job_id = self.create(simulate={"latency_ms": 200})
        status, job, _ = self.call("GET", f"/v1/jobs/{job_id}?wait_ms=5000")
        ended_ms = job["updated_at_ms"]
        self.assertEqual((status, job["state"]), (200, "ok"))
        self.assertEqual(self.clock.wall_ms(), ended_ms)  # at once

    def test_a_waiter_gives_up_after_wait_ms(self):
        job_id = self.create(simulate={"mode": "hang"})
        started = self.clock.now
        self.assertEqual(self.job(job_id, wait_ms=150)["state"], "running")
        self.assertEqual(self.clock.now - started, 150)

    def test_bad_wait_ms_is_422(self):
        job_id = self.create()
        for value in ("-1", "60001", "abc", "9" * 5000):
            status, body, _ = self.call("GET", f"/v1/jobs/{job_id}?wait_ms={value}")
            self.assert_error(status, body, 422, "VALIDATION_ERROR", "wait_ms")



class LongPollWireTest(ServerTestCase):

    def test_200_idle_waiters_cost_no_cpu(self):
        job_id = self.create(simulate={"mode": "hang"})
        socks = [self.raw(http_bytes("GET", f"/v1/jobs/{job_id}?wait_ms=60000"))
                 for _ in range(200)]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # their arrival done (slower on a busy machine)
            cpu = time.process_time()
            time.sleep(0.1)
            if time.process_time() - cpu < 0.01:
                break
        gc.collect()  # other tests' garbage is not the waiters' cost
        cpu = time.process_time()
        time.sleep(0.3)
        self.assertLess(time.process_time() - cpu, 0.06)  # a fifth of a core at most
        self.call("POST", f"/v1/jobs/{job_id}/cancel")
        for sock in socks:
            self.assertIn(b'"state":"cancelled"', self.read_until(sock, b"}}"))


class ListAndDeleteTest(AppTestCase):

    def test_newest_first_with_filters_and_a_cursor(self):
        ids = [self.create(op="a" if i % 2 else "b", trace_id=f"t{i % 3}",
                           simulate={"mode": "hang" if i < 2 else "ok", "latency_ms": 0})
               for i in range(7)]
        for job_id in ids[2:]:
            self.wait_for(job_id)
        status, page, _ = self.call("GET", "/v1/jobs?limit=3")
        self.assertEqual(status, 200)
        self.assertEqual([job["id"] for job in page["jobs"]], ids[:-4:-1])
        rest = self.call("GET", f"/v1/jobs?limit=3&after={page['next']}")[1]
        last = self.call("GET", f"/v1/jobs?limit=3&after={rest['next']}")[1]
        self.assertEqual([job["id"] for job in rest["jobs"] + last["jobs"]], ids[-4::-1])
        self.assertIsNone(last["next"])
        self.assertEqual({job["id"] for job in self.call("GET", "/v1/jobs?state=running")[1]
                          ["jobs"]}, set(ids[:2]))
        self.assertEqual([job["id"] for job in self.call("GET", "/v1/jobs?op=a&trace_id=t1")[1]
                          ["jobs"]], [ids[1]])
        for query, field in [("state=paused", "state"), ("limit=0", "limit"), ("after=x", "after"),
                             ("limit=" + "9" * 5000, "limit")]:
            status, body, _ = self.call("GET", "/v1/jobs?" + query)
            self.assert_error(status, body, 422, "VALIDATION_ERROR", field)

    def test_delete_cancels_and_forgets(self):
        job_id = self.create(simulate={"mode": "hang"})
        self.conn.request("DELETE", "/v1/jobs/" + job_id)
        response = self.conn.getresponse()
        self.assertEqual((response.status, response.read(), response.getheader("Content-Length")),
                         (204, b"", None))
        self.assertEqual(self.call("GET", "/v1/jobs/" + job_id)[0], 404)
        self.assertEqual(self.call("DELETE", "/v1/jobs/" + job_id)[0], 404)
        self.assertEqual(self.stored(), 0)


class JobEventsTest(ServerTestCase):
    server_class = QuickServer

    def test_one_event_now_and_at_each_transition_then_the_end(self):
        started = time.monotonic()
        job_id = self.create(simulate={"queue_ms": 50, "latency_ms": 50})
        self.conn.request("GET", f"/v1/jobs/{job_id}/events")
        response = self.conn.getresponse()
        self.assertEqual(response.getheader("Content-Type"), "text/event-stream")
        events = []
        for line in iter(response.readline, b""):
            if line.startswith(b"event: "):
                self.assertEqual(line, b"event: state\n")
            elif line.startswith(b"data: "):
                events.append((json.loads(line[6:])["state"], time.monotonic() - started))
        self.assertEqual([state for state, _ in events], ["queued", "running", "ok"])
        self.assertGreaterEqual(events[1][1], 0.05)
        self.assertGreaterEqual(events[2][1], 0.1)
        self.assertEqual(self.call("GET", "/health")[0], 200)  # the connection lives on

    def test_heartbeats_while_nothing_happens(self):
        job_id = self.create(simulate={"mode": "hang"})
        self.conn.request("GET", f"/v1/jobs/{job_id}/events")
        response = self.conn.getresponse()
        lines = [response.readline() for _ in range(5)]
        self.assertIn(b": heartbeat\n", lines)
        self.call("POST", f"/v1/jobs/{job_id}/cancel", conn=self.connect(self.server))
        self.assertIn(b'"state":"cancelled"', response.read())

    def test_unknown_job_is_404(self):
        self.assertEqual(self.call("GET", "/v1/jobs/job_000000000000/events")[0], 404)


class ReplyRulesTest(ChatCalls, AppTestCase):
    """Reply rules: POST, GET and DELETE /v1/rules, --rules, and their precedence."""

    FILE_RULE = {"match": {"model": "file-*"}, "simulate": {"ok_text": "from the file"}}
    options = {"rules": [FILE_RULE]}

    def add(self, rule):
        status, body, _ = self.call("POST", "/v1/rules", rule)
        self.assertEqual(status, 201, body)
        return body

    def test_add_list_and_clear(self):
        rule = {"match": {"text_contains": "weather"}, "simulate": {"tool_calls": PARIS}}
        listed = {"index": 1, "source": "runtime", "test_id": None, **rule}
        self.assertEqual(self.add(rule), listed)
        status, body, _ = self.call("GET", "/v1/rules")
        self.assertEqual(body["rules"], [{"index": 0, "source": "file", "test_id": None,
                                          **self.FILE_RULE}, listed])
        self.assertIn("openai.chat", body["surfaces"])
        self.assertIn("anthropic", body["surfaces"])
        asked = self.chat(messages=[{"role": "user", "content": "The weather?"}])[1]
        self.assertEqual(asked["choices"][0]["finish_reason"], "tool_calls")
        self.assertEqual(self.call("DELETE", "/v1/rules")[1], {"removed": {"rules": 1}})
        self.assertEqual(len(self.call("GET", "/v1/rules")[1]["rules"]), 1)

    def test_reset_clears_the_rules_added_at_run_time_only(self):
        self.add({"simulate": {"ok_text": "runtime"}})
        self.assertEqual(self.call("POST", "/v1/reset")[1]["removed"]["rules"], 1)
        self.assertEqual(self.chat(model="file-1")[1]["choices"][0]["message"]["content"],
                         "from the file")
        self.assertEqual(self.chat()[1]["choices"][0]["message"]["content"],
                         "Simulated reply to: Hello")

    def test_the_body_then_the_header_then_the_first_rule_field_by_field(self):
        self.add({"match": {"trace_id": "p"}, "simulate": {
            "mode": "fail", "fail_message": "rule", "latency_ms": 0}})
        self.add({"match": {"trace_id": "p"}, "simulate": {"fail_message": "second rule"}})
        trace = {"X-Trace-Id": "p"}
        header = {**trace, "X-DummyLLM-Simulate": json.dumps({"fail_message": "header"})}
        for headers, simulate, message in [
                (trace, None, "rule"), (header, None, "header"),
                (header, {"fail_message": "body"}, "body")]:
            with self.subTest(message=message):
                status, body, _ = self.chat(headers=headers, simulate=simulate)
                self.assertEqual((status, body["error"]["message"]), (500, message))
        self.assertEqual(self.chat(headers=trace, simulate={"mode": "ok"})[0], 200)
        self.assertEqual([entry["rule"] for entry in self.journal("?path=/v1/chat/completions")],
                         [1, 1, 1, 1])

    def test_the_request_view_names_the_rule(self):
        self.add({"match": {"surface": "openai.responses"}, "simulate": {"ok_text": "r"}})
        body = self.call("POST", "/v1/responses", {"model": "m", "input": "x"})[1]
        self.assertEqual(body["output"][0]["content"][0]["text"], "r")
        self.assertEqual(self.call("GET", f"/v1/jobs/{body['id']}/request")[1]["rule"], 1)
        self.assertIsNone(self.call("GET", f"/v1/jobs/{self.create()}/request")[1]["rule"])

    def test_a_bad_rule_is_a_422_naming_the_field(self):
        for rule, field in [({"match": {"text_matches": "(("}, "simulate": {}},
                             "match.text_matches"),
                            ({"match": {"text_matches": "(a+)+$"}, "simulate": {}},
                             "match.text_matches"),
                            ({"simulate": {"stream": {"nope": 1}}}, "simulate.stream.nope"),
                            ({"match": {"last_role": "robot"}, "simulate": {}},
                             "match.last_role"), ([1], None)]:
            with self.subTest(rule=rule):
                status, body, _ = self.call("POST", "/v1/rules", rule)
                self.assert_error(status, body, 422, "VALIDATION_ERROR", field)

    def test_a_rules_setting_a_call_cannot_take_is_left_out(self):
        self.add({"simulate": {"tool_calls": PARIS, "stream": {"truncate_after": 1}}})
        body = self.chat()[1]  # not streamed: no stream failure
        self.assertEqual(body["choices"][0]["finish_reason"], "tool_calls")
        status, body, _ = self.call("POST", "/v1/embeddings", {"model": "e", "input": "x"})
        self.assertEqual((status, len(body["data"])), (200, 1))  # no tool calls there
        status, body, _ = self.call("POST", "/v1/embeddings", {
            "model": "e", "input": "x", "simulate": {"tool_calls": PARIS}})
        self.assertEqual((status, body["error"]["param"]), (400, "simulate.tool_calls"))

    def test_embedded_add_rule(self):
        listed = self.server.add_rule({"match": {"model": "emb"}, "simulate": {"ok_text": "e"}})
        self.assertEqual((listed["index"], listed["source"]), (1, "runtime"))
        self.assertEqual(self.chat(model="emb")[1]["choices"][0]["message"]["content"], "e")
        with self.assertRaises(ValueError):
            self.server.add_rule({"match": {"colour": "red"}, "simulate": {}})


class ResetTest(ServerTestCase):

    def test_reset_cancels_everything_and_leaves_no_thread(self):
        threads = threading.active_count()
        waiter = self.connect(self.server)
        job_id = self.create(simulate={"mode": "hang"})
        self.create(simulate={"latency_ms": 60_000})
        waiter.request("GET", f"/v1/jobs/{job_id}?wait_ms=10000")
        while self.server.store._jobs[job_id].changed is None:  # until the waiter waits
            time.sleep(0.001)
        status, body, _ = self.call("POST", "/v1/reset")
        self.assertEqual(status, 200)
        self.assertEqual((body["removed"]["jobs"], body["removed"]["active_jobs_cancelled"]), (2, 2))
        self.assertEqual(json.loads(waiter.getresponse().read())["state"], "cancelled")
        self.assertEqual(self.stored(), 0)
        self.assertEqual(self.server.store._due.next_time(), None)  # no transition is pending
        self.assertLessEqual(threading.active_count(), threads + 3)  # 2 connections, a Timer


class TestScopeTest(OpenAIBatchCalls, ChatCalls, AppTestCase):
    """Tests that share a server each keep to their own scope, by the
    X-Test-Id header or a /test/{id} prefix on the base URL: scripts,
    sequences, idempotency keys, rules, quotas, the journal, the verdict."""

    options = {"seed": 7}
    SCRIPT = {"latency_ms": 0, "script": ["rate_limit", "ok"]}

    def as_test(self, test_id, **body):
        return self.chat(headers={"X-Test-Id": test_id, "X-Trace-Id": "agent"}, **body)

    def test_scripts_and_sequences_start_over_in_each_test(self):
        first = [self.as_test("a", simulate=self.SCRIPT)[0] for _ in range(2)]
        second = [self.as_test("b", simulate=self.SCRIPT)[0] for _ in range(2)]
        self.assertEqual((first, second), ([429, 200], [429, 200]))
        ids = [self.as_test(test, tools=OPENAI_TOOLS, simulate={"tool_calls": PARIS})[1][
            "choices"][0]["message"]["tool_calls"][0]["id"] for test in ("c", "d")]
        self.assertEqual(ids[0], ids[1])  # each test's sequence is a fresh server's
        self.assertEqual({(row["key"], row["test_id"]) for row in self.call(
            "GET", "/v1/scripts?test_id=a")[1]["scripts"]}, {("agent", "a")})

    def test_a_base_url_prefix_is_a_test_id(self):
        status, body, _ = self.call("POST", "/test/tests%2Fa.py%3A%3Atest_x/v1/chat/completions",
                                    {"model": "m", "messages": HELLO})
        self.assertEqual(status, 200, body)
        entry = self.journal("?test_id=tests/a.py::test_x")[-1]
        self.assertEqual((entry["path"], entry["test_id"]), ("/v1/chat/completions",
                                                             "tests/a.py::test_x"))
        self.assertEqual(self.call("GET", "/test/tests%2Fa.py%3A%3Atest_x/v1/requests")[1][
            "requests"], [entry])
        status, body, _ = self.call("POST", "/test/x/v1/chat/completions",
                                    {"model": "m", "messages": HELLO}, headers={"X-Test-Id": "y"})
        self.assert_openai_error(status, body, 400, "invalid_request_error", "X-Test-Id")
        status, body, _ = self.call("POST", "/test//v1/chat/completions", {})
        self.assertEqual(status, 400, body)

    def test_a_rule_added_for_a_test_holds_for_it_alone(self):
        rule = {"match": {}, "simulate": {"ok_text": "for a"}}
        status, listed, _ = self.call("POST", "/v1/rules", rule, headers={"X-Test-Id": "a"})
        self.assertEqual((status, listed["test_id"]), (201, "a"))
        reply = self.as_test("a")[1]["choices"][0]["message"]["content"]
        other = self.as_test("b")[1]["choices"][0]["message"]["content"]
        self.assertEqual((reply, other), ("for a", "Simulated reply to: Hello"))
        self.assertEqual(self.call("GET", "/v1/rules?test_id=b")[1]["rules"], [])
        self.assertEqual(len(self.call("GET", "/v1/rules")[1]["rules"]), 1)

    def test_quotas_idempotency_and_verdicts_are_the_tests_own(self):
        for test in ("a", "b"):
            self.assertEqual(self.as_test(test, simulate={"rpm": 1})[0], 200)
        self.assertEqual(self.as_test("a", simulate={"rpm": 1})[0], 429)
        jobs = {self.call("POST", "/v1/jobs", {"op": "x"}, headers={
            "Idempotency-Key": "k", "X-Test-Id": test})[1]["id"] for test in ("a", "b")}
        self.assertEqual(len(jobs), 2)
        for _ in range(3):  # test b retries a 429 at once: its verdict, not a's
            self.as_test("b", simulate={"mode": "rate_limit", "retry_after_ms": 1000})
        findings = {test: {finding["code"] for finding in self.call(
            "GET", f"/v1/verdict?test_id={test}")[1]["findings"]} for test in ("a", "b")}
        self.assertIn("RETRY_AFTER_IGNORED", findings["b"])
        self.assertNotIn("RETRY_AFTER_IGNORED", findings["a"])
        self.assertEqual(self.server.verdict(test_id="a")["findings"],
                         self.call("GET", "/v1/verdict", headers={"X-Test-Id": "a"})[1][
                             "findings"])

    def test_a_reset_of_one_test_leaves_the_others(self):
        for test in ("a", "b"):
            self.as_test(test, simulate=self.SCRIPT)
            self.call("POST", "/v1/rules", {"match": {}, "simulate": {"ok_text": test}},
                      headers={"X-Test-Id": test})
            self.call("POST", "/v1/jobs", {"op": "x", "simulate": {"mode": "hang"}},
                      headers={"X-Test-Id": test})
            self.upload(b"{}", headers={"X-Test-Id": test})
            self.call("POST", "/v1/mcp/tools", {"name": "lookup"}, headers={"X-Test-Id": test})
            self.call("POST", "/mcp", {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                                       "params": {"protocolVersion": "2025-11-25"}},
                      headers={"X-Test-Id": test})
        status, body, _ = self.call("POST", "/v1/reset?test_id=a")
        self.assertEqual((status, body["removed"]), (200, {
            "jobs": 1, "active_jobs_cancelled": 1, "script_counters": 1, "sequences": 2,
            "idempotency_keys": 0, "files": 1, "journal_entries": 6, "rules": 1,
            "mcp_tools": 1, "mcp_sessions": 1}))
        self.assertEqual(self.journal("?test_id=a"), [])
        self.assertEqual(len(self.journal("?test_id=b")), 6)
        self.assertEqual(len(self.call("GET", "/v1/files", headers={"X-Test-Id": "b"})[1][
            "data"]), 1)
        self.assertEqual(self.as_test("a", simulate=self.SCRIPT)[0], 429)  # from the start
        self.assertEqual(self.as_test("b", simulate=self.SCRIPT)[0], 200)  # where b was
        self.assertEqual([rule["test_id"] for rule in self.call("GET", "/v1/rules")[1][
            "rules"]], ["b"])
        self.assertEqual(self.stored(), 1)


_METRIC_LINE = re.compile(r'[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*",?)*\})?'
                          r' [-+]?([0-9.]+([eE][-+]?[0-9]+)?|NaN|\+Inf|-Inf)')


class MetricsTest(AppTestCase):

    def test_metrics_follow_the_exposition_format(self):
        self.wait_for(self.create(simulate={"mode": "fail", "latency_ms": 0}))
        self.create(simulate={"mode": "hang"})
        self.call("POST", "/v1/jobs", {"op": "x", "simulate": {"fault": "status:503"}})
        self.call("GET", "/nope")
        self.conn.request("GET", "/metrics")
        response = self.conn.getresponse()
        self.assertEqual(response.getheader("Content-Type"), "text/plain; version=0.0.4; charset=utf-8")
        text = response.read().decode()
        self.assertTrue(text.endswith("\n"))
        types = {}
        for line in text.splitlines():
            if line.startswith("# HELP "):
                continue
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ")
                types[name] = kind
                continue
            self.assertRegex(line, _METRIC_LINE)
        for name, kind in types.items():
            self.assertEqual(name.endswith("_total"), kind == "counter", name)
        self.assertEqual(types["dummyllm_job_duration_seconds"], "histogram")
        for sample in ['dummyllm_jobs_created_total{mode="fail"} 1',
                       'dummyllm_jobs_created_total{mode="hang"} 1',
                       'dummyllm_jobs_finished_total{state="fail"} 1',
                       "dummyllm_jobs_active 1",
                       'dummyllm_http_requests_total{method="GET",route="unmatched",status="404"} 1',
                       'dummyllm_http_requests_total{method="POST",route="/v1/jobs",status="503"} 1',
                       'dummyllm_faults_injected_total{kind="status"} 1',
                       'dummyllm_job_duration_seconds_bucket{le="+Inf"} 1',
                       "dummyllm_job_duration_seconds_count 1"]:
            self.assertIn(sample + "\n", text)

    def metrics(self):
        self.conn.request("GET", "/metrics")
        return self.conn.getresponse().read().decode()

    def test_vllms_metrics_by_model_name(self):
        for model, tokens in (("llama", 7), ("llama", 5), ("qwen", 3)):
            self.conn.request("POST", "/v1/chat/completions", json.dumps({
                "model": model, "messages": HELLO, "max_tokens": tokens, "ignore_eos": True,
                "stream": True, "simulate": {"latency_ms": 100, "token_ms": 10}}))
            self.conn.getresponse().read()
        self.call("POST", "/v1/chat/completions", {"model": "qwen", "messages": HELLO,
                                                   "simulate": {"latency_ms": 50}})
        text = self.metrics()
        for sample in ['vllm:num_requests_running{model_name="llama"} 0',
                       'vllm:generation_tokens_total{model_name="llama"} 12',
                       'vllm:request_success_total{model_name="llama",finished_reason="length"} 2',
                       'vllm:request_success_total{model_name="qwen",finished_reason="stop"} 1',
                       'vllm:time_to_first_token_seconds_bucket{model_name="qwen",le="0.06"} 1',
                       'vllm:time_to_first_token_seconds_sum{model_name="llama"} 0.2',
                       'vllm:inter_token_latency_seconds_count{model_name="llama"} 10',
                       'vllm:e2e_request_latency_seconds_sum{model_name="qwen"} 0.17']:
            self.assertIn(sample + "\n", text)

    @needs(prometheus_parser, "prometheus-client", "DUMMYLLM_REQUIRE_PROMETHEUS")
    def test_prometheus_clients_parser_reads_them(self):
        self.call("POST", "/v1/chat/completions", {"model": "llama", "messages": HELLO})
        families = {family.name: family
                    for family in prometheus_parser.text_string_to_metric_families(self.metrics())}
        self.assertEqual(families["vllm:time_to_first_token_seconds"].type, "histogram")
        self.assertEqual(families["vllm:prompt_tokens"].type, "counter")
        [running] = families["vllm:num_requests_running"].samples
        self.assertEqual((running.labels, running.value), ({"model_name": "llama"}, 0))


class RouteFactsTest(unittest.TestCase):

    def test_each_route_is_one_entry_with_every_fact(self):
        seen = set()
        for route in dummyllm._registry().routes:
            with self.subTest(path=route.path, method=route.method):
                self.assertNotIn((route.method, route.path), seen)
                seen.add((route.method, route.path))
                self.assertTrue(route.api["summary"])
                self.assertIsInstance(route.surface, dummyllm._Surface)
        quiet = {route.path for route in dummyllm._registry().routes if not route.journal}
        self.assertEqual(quiet, {"/health", "/v1/requests", "/v1/verdict", "/journal",
                                 "/v1/mcp/report"})

    def test_unmatched_paths_answer_in_the_nearest_routes_format(self):
        router = dummyllm._registry().router
        self.assertIs(router.surface_of("/v1/chat/nope"), dummyllm._OPENAI_CHAT)
        self.assertIs(router.surface_of("/v1/models/a/b"), dummyllm._OPENAI_CHAT)
        self.assertIs(router.surface_of("/v1/jobs/x/nope"), dummyllm._JOB_API)
        self.assertIs(router.surface_of("/v1/audio/speech"), dummyllm._JOB_API)
        self.assertIs(router.surface_of("/v1/messages/nope"), dummyllm._ANTHROPIC_MESSAGES)
        self.assertIs(router.surface_of("/v1beta/files"), dummyllm._GEMINI)
        self.assertIs(router.surface_of("/nope"), dummyllm._JOB_API)


# --- Job store --------------------------------------------------------------------

class JobStoreTest(unittest.TestCase):

    def store(self, scale=1, **options):
        self.clock = FakeClock(scale)
        store = dummyllm._JobStore(dummyllm.make_config(**options), self.clock)
        self.addCleanup(store.close)
        return store

    def state(self, store, job_id):
        return store._jobs[job_id].state  # as the Timer left it, no operation applying it

    def test_queued_running_ok_on_the_timer_alone(self):
        store = self.store()
        job = store.create(spec(queue_ms=50, latency_ms=100)).job
        self.assertEqual(job["state"], "queued")
        self.clock.advance(49)
        self.assertEqual(self.state(store, job["id"]), "queued")
        self.clock.advance(1)
        self.assertEqual(self.state(store, job["id"]), "running")
        self.clock.advance(99)
        self.assertEqual(self.state(store, job["id"]), "running")
        self.clock.advance(1)
        done = store.poll(job["id"])[0]
        self.assertEqual((done["state"], done["result"]["text"]), ("ok", "ok :: op=llm.chat"))
        self.assertEqual(done["updated_at_ms"] - done["created_at_ms"], 150)
        self.assertEqual(self.clock.pending(), [])

    def test_answers_do_not_wait_for_the_timer(self):
        store = self.store(max_jobs=2)
        ids = []
        for _ in range(5):  # evicts, never 503
            ids.append(store.create(spec(latency_ms=10))[1]["id"])
            self.clock.now += 10  # time passes, the Timer does not fire
        self.assertEqual(store.poll(ids[-1])[0]["state"], "ok")
        self.assertEqual(store.counts(), {"stored": 2, "active": 0, "by_state": {"ok": 2}})

    def test_a_24_hour_timeout(self):
        store = self.store()
        job_id = store.create(spec(mode="timeout", timeout_ms=86_400_000))[1]["id"]
        self.clock.advance(86_399_999)
        self.assertEqual(self.state(store, job_id), "running")
        self.clock.advance(1)
        self.assertEqual(store.poll(job_id)[0]["error"]["code"], "TIMEOUT")

    def test_hang_arms_nothing_and_never_ends(self):
        store = self.store()
        job_id = store.create(spec(mode="hang", timeout_ms=10))[1]["id"]
        self.clock.advance(0)
        self.assertEqual(self.clock.pending(), [])
        self.clock.advance(10 ** 9)
        self.assertEqual(store.poll(job_id)[0]["state"], "running")
        self.assertEqual(store.cancel(job_id)["state"], "cancelled")

    def test_cancel_racing_the_transition(self):
        store = self.store()
        on_time = store.create(spec(latency_ms=100))[1]["id"]
        self.clock.now += 1
        late = store.create(spec(latency_ms=100))[1]["id"]
        self.clock.now += 99  # the first is due, and the Timer has not fired yet
        self.assertEqual(store.cancel(on_time)["state"], "ok")  # its transition came first
        self.assertEqual(store.cancel(late)["state"], "cancelled")
        self.clock.advance(5)  # the Timer fires, and changes nothing
        self.assertEqual([store.poll(job_id)[0]["state"] for job_id in (on_time, late)],
                         ["ok", "cancelled"])

    def test_time_scale_is_the_clocks_alone(self):
        store = self.store(scale=0.1)
        job_id = store.create(spec(latency_ms=1000))[1]["id"]
        timer, = self.clock.pending()
        self.assertAlmostEqual(timer.delay_s, 0.1)  # 1000 simulated ms, 100 real
        self.clock.advance(1000)
        self.assertEqual(self.state(store, job_id), "ok")
        self.assertEqual(store.request_view(job_id)["simulate"]["latency_ms"], 1000)
        self.assertAlmostEqual(store.metrics()[3].sum, 0.1)  # durations are real seconds

    def test_one_timer_for_the_earliest_rearmed_only_when_an_earlier_one_comes(self):
        store = self.store()
        for latency in (300, 200, 200, 250):
            store.create(spec(latency_ms=latency))
        self.assertEqual(self.clock.armed, 2)  # for 300, then for 200
        self.assertEqual([timer.at_ms for timer in self.clock.pending()], [1200])
        self.clock.advance(300)
        self.assertEqual(store.counts()["by_state"], {"ok": 4})
        self.assertEqual(self.clock.armed, 4)  # and for 250, then 300

    def test_transitions_within_a_millisecond_share_a_firing(self):
        store = self.store()
        for _ in range(4):
            store.create(spec(latency_ms=100))
            self.clock.now += 0.25
        self.clock.advance(100)
        self.assertEqual(store.counts()["by_state"], {"ok": 4})
        self.assertLessEqual(self.clock.armed, 2)

    def test_cancelled_transitions_do_not_pile_up(self):
        store = self.store()
        for _ in range(1000):
            store.cancel(store.create(spec(mode="timeout", timeout_ms=86_400_000))[1]["id"])
        self.assertLess(len(store._due), 200)

    def test_close_disarms_the_timer(self):
        store = self.store()
        store.create(spec(latency_ms=60_000))
        store.close()
        self.assertEqual(self.clock.pending(), [])

    def test_a_replay_takes_no_script_step_and_no_seeded_draw(self):
        store = self.store()
        scripted = spec(trace_id="K", seed=1, mode="flaky",
                        script=({"mode": "fail"}, {"mode": "hang"}, {"mode": "ok"}))
        key = ("pay-1", "fingerprint")
        first, job, replayed, _ = store.create(scripted, key)
        self.assertEqual((first.mode, replayed), ("fail", False))
        for _ in range(3):
            self.assertEqual(store.create(scripted, key)[1]["id"], job["id"])
        second = store.create(scripted)[0]
        self.assertEqual(second.mode, "hang")
        self.assertEqual(store.request_view(store.list_jobs()[0][0]["id"])["simulate"]["n"], 1)

    def test_a_lost_request_takes_its_step_and_creates_nothing(self):
        store = self.store()
        scripted = spec(trace_id="L", script=({"fault": dummyllm._Fault("reset", None, None,
                                                                         None)}, {}))
        taken, job, _, _ = store.create(scripted)
        self.assertEqual((taken.fault.kind, job), ("reset", None))
        self.assertIsNone(store.create(scripted)[0].fault)
        self.assertEqual(store.counts()["stored"], 1)


def ten_tokens(gap_ms=10, end="end"):
    """A reply of ten one-token pieces, gap_ms apart: 90 ms from first to last."""
    return dummyllm._Reply("x" * 40, None, end, None, 3, 10, 0, dummyllm._Gaps(gap_ms, None))


class SlotsTest(unittest.TestCase):
    """--slots, --queue and --load-factor on the fake clock: N calls
    generate, M wait in arrival order, one more is refused."""

    def capacity(self, **options):
        clock = FakeClock()
        return dummyllm._Capacity(dummyllm.make_config(**options), clock), clock

    def book(self, capacity, due_ms=1000):
        return capacity.book("m", 1000, due_ms, ten_tokens(), 503)

    def test_n_generate_m_wait_and_one_more_is_refused(self):
        capacity, clock = self.capacity(slots=2, queue=1)
        starts = [self.book(capacity)[0] for _ in range(3)]
        self.assertEqual(starts, [1000, 1000, 1090])  # the third waits for the first slot
        with self.assertRaises(dummyllm.ApiError) as refused:
            self.book(capacity)
        self.assertEqual((refused.exception.code, refused.exception.status), ("OVERLOADED", 503))
        self.assertEqual(refused.exception.retry_after_ms, 90)  # until the waiting call starts
        self.assertEqual({model: counted[:2] for model, counted in capacity.snapshot().items()},
                         {"m": (2, 1)})
        clock.advance(90)  # the first two end; the third generates
        self.assertEqual(capacity.snapshot()["m"][:2], (1, 0))
        self.assertEqual(self.book(capacity, due_ms=clock.now)[0], clock.now)

    def test_without_a_queue_bound_calls_wait_in_arrival_order(self):
        capacity, _ = self.capacity(slots=1)
        self.assertEqual([self.book(capacity)[0] for _ in range(4)], [1000, 1090, 1180, 1270])
        capacity, _ = self.capacity(slots=1, queue=0)
        self.book(capacity)
        with self.assertRaises(dummyllm.ApiError):
            self.book(capacity)

    def test_token_gaps_follow_the_load_factor(self):
        capacity, _ = self.capacity(slots=3, load_factor=3)
        gaps = []
        for _ in range(3):
            start_ms, reply = self.book(capacity)
            gaps.append(reply.gap(1))
        self.assertEqual(gaps, [10, 20, 30])  # x1 alone, x3 with every slot held
        self.assertEqual(self.book(capacity)[0], 1090)  # the first call's slot, stretched not

    def test_the_metrics_count_what_vllm_counts(self):
        capacity, clock = self.capacity()
        self.book(capacity, due_ms=1100)
        capacity.book("m", 1000, 1100, ten_tokens(end="max_tokens"), 503)
        running, waiting, counts = capacity.snapshot()["m"]
        self.assertEqual((running, waiting), (2, 0))  # no --slots: nothing waits
        self.assertEqual((counts.ttft.sum, counts.e2e.sum), (0.2, 0.38))
        self.assertEqual((sum(counts.itl.counts), round(counts.itl.sum, 6)), (18, 0.18))
        self.assertEqual((counts.prompt_tokens, counts.generation_tokens), (6, 20))
        self.assertEqual(counts.finished, {"stop": 1, "length": 1})
        clock.advance(190)
        self.assertEqual(capacity.snapshot()["m"][:2], (0, 0))


    def test_a_long_tally_is_summed_as_it_grows(self):
        capacity, _ = self.capacity()
        for _ in range(dummyllm._Capacity.TALLY + 10):
            self.book(capacity)
        self.assertEqual(len(capacity._tally), 10)  # the first TALLY calls already summed
        counts = capacity.snapshot()["m"][2]
        self.assertEqual((sum(counts.e2e.counts), sum(counts.itl.counts)),
                         (dummyllm._Capacity.TALLY + 10, 9 * (dummyllm._Capacity.TALLY + 10)))
        self.assertAlmostEqual(counts.e2e.sum, 0.09 * (dummyllm._Capacity.TALLY + 10))


class SlotsAppTest(ChatCalls, AppTestCase):
    """Slots through the surfaces: each refuses in its own shape."""

    options = {"latency_ms": 0, "slots": 1, "queue": 0, "served_models": ("llama", "qwen")}

    def test_a_full_server_answers_each_surfaces_overloaded_error(self):
        self.server.capacity.book("llama", self.clock.now, self.clock.now,
                                  ten_tokens(gap_ms=1000), 503)  # a call in flight for 9 s
        ask = [{"role": "user", "content": "Hi"}]
        for path, body, status in [
                ("/v1/chat/completions", {"model": "m", "messages": ask}, 503),
                ("/v1/messages", {"model": "m", "messages": ask, "max_tokens": 5}, 529),
                ("/v1beta/models/g:generateContent",
                 {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}, 503)]:
            with self.subTest(path=path):
                answered, body, response = self.call("POST", path, body)
                self.assertEqual(answered, status, body)
                self.assertEqual(response.getheader("retry-after"), "9")

    def test_a_plain_answer_is_sent_at_its_last_token_and_models_are_listed(self):
        before = self.clock.now
        answer = self.chat(simulate={"output_tokens": 10, "token_ms": 10})[1]
        self.assertEqual(answer["usage"]["completion_tokens"], 10)
        self.assertEqual(self.clock.now - before, 90)
        self.assertEqual([model["id"] for model in self.call("GET", "/v1/models")[1]["data"]],
                         ["llama", "qwen"])


# --- Verdict ----------------------------------------------------------------------

class VerdictTestCase(AppTestCase):
    """The clients written in these tests wait by moving the fake clock, so
    every gap the verdict measures is exact."""

    options = {"latency_ms": 0, "seed": 1}

    def send(self, method, path, body=None, headers=None):
        """(status, lower-case headers, body) of one request on a connection
        of its own; status None when the answer was lost."""
        conn = self.connect(self.server)
        try:
            conn.request(method, path, None if body is None else json.dumps(body), headers or {})
            response = conn.getresponse()
            data = response.read()
        except (ConnectionError, http.client.HTTPException, socket.timeout):
            return None, {}, None
        headers = {name.lower(): value for name, value in response.getheaders()}
        return response.status, headers, data

    def chat(self, key, steps, content="Hello", **body):
        """One chat call with key, scripted by steps (the same for each call)."""
        return self.send("POST", "/v1/chat/completions", dict({
            "model": "m", "messages": [{"role": "user", "content": content}],
            "simulate": {"script": steps}}, **body), {"X-Trace-Id": key})

    def retry_loop(self, send, delays, honour_retry_after=False, retry_statuses=(429, 500, 503)):
        """The client under test: send until an answer that is not worth
        retrying, waiting delays[i] ms before retry i (or what retry-after-ms
        asks, when honouring it); the statuses it saw."""
        statuses = []
        for delay in [*delays, None]:
            status, headers, _ = send()
            statuses.append(status)
            if delay is None or (status is not None and status not in retry_statuses):
                break
            if honour_retry_after and "retry-after-ms" in headers:
                delay = max(delay, int(headers["retry-after-ms"]))
            self.clock.advance(delay)
        return statuses

    def findings(self, trace_id=None, **query):
        return {finding["code"]: finding for finding in
                self.server.verdict(trace_id, **query)["findings"]}

    def seqs(self, trace_id=None):
        return [attempt["seq"] for attempt in self.server.verdict(trace_id)["attempts"]]


class VerdictTest(VerdictTestCase):

    RATE_LIMITED = {"mode": "rate_limit", "retry_after_ms": 1000}

    def test_a_retry_before_retry_after_is_an_error(self):
        steps = [self.RATE_LIMITED, self.RATE_LIMITED, "ok"]
        self.assertEqual(self.retry_loop(lambda: self.chat("eager", steps), [100, 1000]),
                         [429, 429, 200])
        verdict = self.server.verdict("eager")
        self.assertFalse(verdict["ok"])
        [finding] = verdict["findings"]
        self.assertEqual((finding["code"], finding["severity"], finding["key"]),
                         ("RETRY_AFTER_IGNORED", "error", "eager"))
        first, early, late = verdict["attempts"]
        self.assertEqual(finding["evidence"], [early["seq"]])
        self.assertIn("came 100 ms after a 429 that asked for 1000 ms", finding["message"])
        self.assertEqual([(a["status"], a["gap_ms"], a["retry_after_ms"], a["retry"])
                          for a in verdict["attempts"]],
                         [(429, None, 1000, False), (429, 100, 1000, True),
                          (200, 1000, None, True)])
        self.assertEqual((first["at_ms"], early["at_ms"], late["at_ms"]), (0, 100, 1100))

    def test_a_client_that_honours_retry_after_is_ok(self):
        steps = [self.RATE_LIMITED, self.RATE_LIMITED, "ok"]
        self.retry_loop(lambda: self.chat("patient", steps), [100, 100], honour_retry_after=True)
        verdict = self.server.assert_client_ok("patient")
        self.assertEqual((verdict["requests"], verdict["findings"]), (3, []))

    def test_retries_at_a_constant_gap_have_no_backoff(self):
        steps = ["fail"] * 3 + ["ok"]
        self.retry_loop(lambda: self.chat("flat", steps), [100, 100, 100])
        finding = self.findings("flat")["NO_BACKOFF"]
        self.assertEqual((finding["severity"], finding["evidence"]), ("warning", self.seqs()[1:]))
        self.assertIn("3 retries of request 0 came 100, 100, 100 ms apart", finding["message"])
        self.assertTrue(self.server.verdict("flat")["ok"])  # a warning only...
        for errors in (["NO_BACKOFF"], "NO_BACKOFF,GAVE_UP"):  # as a list, or as the query
            verdict = self.server.verdict("flat", errors=errors)
            self.assertFalse(verdict["ok"])                # ...unless raised
            self.assertEqual(verdict["findings"][0]["severity"], "error")

    def test_growing_gaps_are_backoff(self):
        self.retry_loop(lambda: self.chat("exp", ["fail"] * 3 + ["ok"]), [100, 200, 400])
        self.assertEqual(self.findings("exp"), {})

    def test_keys_retrying_in_step_are_a_herd(self):
        for key in ("a", "b", "c"):
            self.retry_loop(lambda: self.chat(key, ["fail", "fail", "ok"]), [100, 200])
        finding = self.findings()["NO_JITTER"]
        self.assertEqual(finding["key"], None)
        self.assertEqual(len(finding["evidence"]), 6)
        self.assertIn("3 keys (a, b, c) retried after the same gaps: 100, 200 ms",
                      finding["message"])
        self.assertNotIn("NO_JITTER", self.findings("a"))  # one key is no herd

    def test_jittered_keys_are_no_herd(self):
        for index, key in enumerate(("a", "b", "c")):
            self.retry_loop(lambda: self.chat(key, ["fail", "fail", "ok"]),
                            [100 + 7 * index, 200 + 13 * index])
        self.assertEqual(self.findings(), {})

    def test_repeating_a_bad_request_is_an_error(self):
        bad = {"model": "m", "messages": "not a list"}
        self.retry_loop(lambda: self.send("POST", "/v1/chat/completions", bad,
                                          {"X-Trace-Id": "stubborn"}), [100],
                        retry_statuses=(400,))
        finding = self.findings("stubborn")["RETRIED_NON_RETRYABLE"]
        self.assertEqual(finding["severity"], "error")
        self.assertIn("repeated request 0, answered 400 VALIDATION_ERROR", finding["message"])

    def test_repeating_an_exhausted_quota_is_an_error(self):
        self.retry_loop(lambda: self.chat("broke", ["quota_exhausted"]), [100],
                        retry_statuses=(429,))
        self.assertIn("RETRIED_NON_RETRYABLE", self.findings("broke"))

    def test_stopping_at_a_bad_request_is_ok(self):
        statuses = self.retry_loop(lambda: self.send(
            "POST", "/v1/chat/completions", {"model": "m"}, {"X-Trace-Id": "wise"}), [100])
        self.assertEqual(statuses, [400])
        self.clock.advance(5000)
        self.server.assert_client_ok("wise")
        self.assertEqual(self.findings("wise"), {})  # not GAVE_UP either

    def test_giving_up_on_a_retryable_failure(self):
        self.retry_loop(lambda: self.chat("quitter", ["overloaded"] * 3 + ["ok"]), [100, 200],
                        honour_retry_after=True)
        self.assertEqual(self.findings("quitter"), {})  # not settled yet
        self.clock.advance(2000)
        finding = self.findings("quitter")["GAVE_UP"]
        self.assertEqual(finding["evidence"], self.seqs()[-1:])
        self.assertIn("ended 503 and was not tried again", finding["message"])
        self.assertNotIn("GAVE_UP", self.findings("quitter", settle_ms=60_000))

    def test_retrying_to_success_is_not_giving_up(self):
        self.retry_loop(lambda: self.chat("stayer", ["overloaded"] * 2 + ["ok"]), [100, 200],
                        honour_retry_after=True)
        self.clock.advance(5000)
        self.assertEqual(self.findings("stayer"), {})

    def test_too_many_attempts_are_a_storm(self):
        self.retry_loop(lambda: self.chat("storm", ["fail"]), [100 * 2 ** i for i in range(11)])
        finding = self.findings("storm")["RETRY_STORM"]
        self.assertEqual(finding["evidence"], self.seqs()[10:])
        self.assertIn("tried 12 times, more than max_attempts=10", finding["message"])
        self.assertNotIn("RETRY_STORM", self.findings("storm", max_attempts=12))

    def test_more_than_twenty_attempts_in_a_second_are_a_storm(self):
        self.retry_loop(lambda: self.chat("burst", ["fail"] * 21 + ["ok"]), [10] * 21)
        finding = self.findings("burst", max_attempts=100)["RETRY_STORM"]
        self.assertEqual(finding["evidence"], self.seqs()[20:])  # the 21st and 22nd
        self.retry_loop(lambda: self.chat("calm", ["fail"] * 5 + ["ok"]), [60] * 21)
        self.assertNotIn("RETRY_STORM", self.findings("calm"))

    def test_a_second_job_after_a_lost_answer_is_duplicate_work(self):
        body = {"op": "x", "trace_id": "dup", "simulate": {"script": [
            {"fault": {"status": 503}, "fault_phase": "after"}, "ok"]}}
        self.assertEqual(self.retry_loop(lambda: self.send("POST", "/v1/jobs", body), [100]),
                         [503, 201])
        finding = self.findings("dup")["DUPLICATE_WORK"]
        self.assertEqual((finding["severity"], finding["evidence"]), ("error", self.seqs()))
        self.assertIn("whose job_", finding["message"])
        self.assertEqual(self.server.store.counts()["stored"], 2)

    def test_an_idempotency_key_makes_the_retry_safe(self):
        body = {"op": "x", "trace_id": "safe", "simulate": {"script": [
            {"fault": {"status": 503}, "fault_phase": "after"}, "ok"]}}
        statuses = self.retry_loop(lambda: self.send("POST", "/v1/jobs", body,
                                                     {"Idempotency-Key": "once"}), [100])
        self.assertEqual(statuses, [503, 200])  # the replay
        verdict = self.server.assert_client_ok("safe")
        self.assertEqual([a["idempotency_key"] for a in verdict["attempts"]], ["once"] * 2)

    def poll(self, job_id, every_ms, times):
        for _ in range(times):
            self.send("GET", f"/v1/jobs/{job_id}")
            self.clock.advance(every_ms)

    def test_polling_faster_than_min_poll_ms(self):
        job_id = json.loads(self.send("POST", "/v1/jobs", {
            "op": "x", "trace_id": "eager", "simulate": {"latency_ms": 1000}})[2])["id"]
        self.poll(job_id, 10, 20)
        finding = self.findings("eager")["POLL_TOO_FAST"]
        self.assertIn(f"20 polls of {job_id} came 10 ms apart on average", finding["message"])
        self.assertEqual(len(finding["evidence"]), 19)
        self.assertNotIn("POLL_TOO_FAST", self.findings("eager", min_poll_ms=10))

    def test_polling_on_after_the_end(self):
        job_id = json.loads(self.send("POST", "/v1/jobs", {
            "op": "x", "trace_id": "late", "simulate": {"latency_ms": 100}})[2])["id"]
        self.poll(job_id, 500, 10)  # ends at 100 ms; seen ended at 500
        finding = self.findings("late")["POLL_TOO_FAST"]
        self.assertIn("4 polls", finding["message"])
        self.assertIn("more than 2000 ms after request 2 said it had ended", finding["message"])

    def test_polling_at_a_sane_pace_until_the_end(self):
        job_id = json.loads(self.send("POST", "/v1/jobs", {
            "op": "x", "trace_id": "calm", "simulate": {"latency_ms": 1000}})[2])["id"]
        self.poll(job_id, 250, 5)
        self.clock.advance(5000)
        self.assertEqual(self.findings("calm"), {})

    def test_a_job_left_running_was_not_cancelled(self):
        job_id = json.loads(self.send("POST", "/v1/jobs", {
            "op": "x", "trace_id": "left", "simulate": {"mode": "hang"}})[2])["id"]
        self.poll(job_id, 500, 3)  # then the client's own deadline passes
        self.assertEqual(self.findings("left"), {})
        self.clock.advance(2000)
        finding = self.findings("left")["NO_CANCEL"]
        self.assertEqual(finding["evidence"], self.seqs()[-1:])
        self.assertIn(f"{job_id} was last seen active", finding["message"])

    def test_a_job_that_ended_by_itself_was_not_left_running(self):
        retried = {"op": "x", "trace_id": "quick", "simulate": {"latency_ms": 0, "script": [
            {"fault": {"status": 503}}, "ok"]}}
        self.assertEqual(self.retry_loop(lambda: self.send("POST", "/v1/jobs", retried), [100]),
                         [503, 201])  # and never polled: it had ended at once
        self.send("POST", "/v1/jobs", {"op": "x", "trace_id": "hooked", "simulate": {
            "latency_ms": 500}, "callback_url": "http://127.0.0.1:9/hook"})  # told, not polled
        self.send("POST", "/v1/jobs", {"op": "x", "trace_id": "long", "simulate": {
            "latency_ms": 60_000}})
        self.clock.advance(5000)
        self.assertEqual((self.findings("quick"), self.findings("hooked")), ({}, {}))
        self.assertIn("NO_CANCEL", self.findings("long"))  # still running when let be

    def test_a_cancelled_job_was_not_left_running(self):
        job_id = json.loads(self.send("POST", "/v1/jobs", {
            "op": "x", "trace_id": "tidy", "simulate": {"mode": "hang"}})[2])["id"]
        self.poll(job_id, 500, 3)
        self.assertEqual(self.send("POST", f"/v1/jobs/{job_id}/cancel")[0], 200)
        self.clock.advance(5000)
        self.assertEqual(self.findings("tidy"), {})

    def test_a_background_response_left_running(self):
        status, _, data = self.send("POST", "/v1/responses", {
            "model": "m", "input": "hi", "background": True,
            "simulate": {"mode": "hang"}}, {"X-Trace-Id": "bg"})
        self.assertEqual(status, 200)
        self.send("GET", "/v1/responses/" + json.loads(data)["id"])
        self.clock.advance(2000)
        self.assertIn("NO_CANCEL", self.findings("bg"))

    def stream(self, key, steps, content="Hello"):
        status, _, data = self.chat(key, steps, content, stream=True)
        return data

    def test_a_truncated_stream_taken_as_whole(self):
        data = self.stream("trusting", [{"stream": {"truncate_after": 1}}])
        self.assertNotIn(b"[DONE]", data)
        self.stream("trusting", ["ok"], content="And then?")  # the next turn, as if all was well
        finding = self.findings("trusting")["TRUNCATED_STREAM_ACCEPTED"]
        self.assertEqual(finding["evidence"], self.seqs()[:1])
        self.assertIn("(truncate_after) and was not tried again", finding["message"])
        self.assertNotIn("GAVE_UP", self.findings("trusting"))
        self.assertEqual(self.server.verdict("trusting")["attempts"][0]["fault"],
                         "truncate_after")

    def test_a_truncated_stream_retried(self):
        steps = [{"stream": {"truncate_after": 1}}, "ok"]
        for _ in range(2):
            data = self.stream("careful", steps)
            if b"[DONE]" in data:
                break
            self.clock.advance(100)
        self.clock.advance(5000)
        self.assertEqual(self.findings("careful"), {})

    def test_assert_client_ok_lists_the_findings(self):
        steps = [self.RATE_LIMITED, "ok"]
        self.retry_loop(lambda: self.chat("eager", steps), [10])
        with self.assertRaises(AssertionError) as caught:
            self.server.assert_client_ok("eager")
        self.assertIn("RETRY_AFTER_IGNORED (error): request 1 came 10 ms after a 429",
                      str(caught.exception))

    def test_the_verdict_over_http(self):
        self.retry_loop(lambda: self.chat("http", [self.RATE_LIMITED, "ok"]), [10])
        self.send("GET", "/v1/jobs/job_000000000000", headers={"X-Trace-Id": "other"})
        status, body, _ = self.call("GET", "/v1/verdict?trace_id=http")
        self.assertEqual((status, body["ok"], body["requests"]), (200, False, 2))
        self.assertEqual(self.call("GET", "/v1/verdict?key=http")[1], body)
        self.assertEqual(self.call("GET", "/v1/verdict?key=http&trace_id=ftp")[1]["requests"],
                         0)  # both narrow
        self.assertEqual(self.call("GET", "/v1/verdict?since_seq=1&trace_id=http")[1][
            "requests"], 1)
        self.assertEqual(self.call("GET", "/v1/verdict?path=/v1/jobs/job_000000000000")[1][
            "requests"], 1)
        raised = self.call("GET", "/v1/verdict?errors=RETRY_AFTER_IGNORED,NO_BACKOFF")[1]
        self.assertEqual(raised["findings"][0]["severity"], "error")
        for query, field in (("settle_ms=soon", "settle_ms"), ("since_seq=-1", "since_seq"),
                             ("errors=NOPE", "errors"), ("settle_ms=", "settle_ms")):
            with self.subTest(query=query):
                status, body, _ = self.call("GET", "/v1/verdict?" + query)
                self.assert_error(status, body, 422, "VALIDATION_ERROR", field)
        with self.assertRaises(ValueError):
            self.server.verdict(settle_ms="soon")
        self.assertEqual(self.server.journal.find(path="/v1/verdict"), [])  # not journaled


class QuotaTest(VerdictTestCase):
    """--rpm and --tpm on the fake clock: the headers say when the next
    request succeeds, to the millisecond."""

    options = {"latency_ms": 0, "rpm": 3}

    def call_as(self, key, surface="openai", **simulate):
        if surface == "anthropic":
            return self.send("POST", "/v1/messages", {
                "model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}],
                "simulate": simulate}, {"x-api-key": key})
        return self.send("POST", "/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": "Hi"}],
            "simulate": simulate}, {"Authorization": "Bearer " + key})

    def test_the_retry_after_is_the_true_wait(self):
        remaining = []
        for _ in range(3):
            status, headers, _ = self.call_as("sk-a")
            self.assertEqual((status, headers["x-ratelimit-limit-requests"]), (200, "3"))
            remaining.append(headers["x-ratelimit-remaining-requests"])
            self.clock.advance(1000)
        self.assertEqual(remaining, ["2", "1", "0"])
        status, headers, body = self.call_as("sk-a")
        self.assertEqual(status, 429)
        self.assertEqual(json.loads(body)["error"]["code"], "rate_limit_exceeded")
        wait = int(headers["retry-after-ms"])
        self.assertEqual((wait, headers["retry-after"], headers["x-ratelimit-reset-requests"]),
                         (57_000, "57", "57s"))
        self.clock.advance(wait - 1)
        status, headers, _ = self.call_as("sk-a")
        self.assertEqual((status, headers["retry-after-ms"]), (429, "1"))
        self.clock.advance(1)
        self.assertEqual(self.call_as("sk-a")[0], 200)  # the first request left the window
        self.assertEqual(self.call_as("sk-a")[0], 429)  # the second has not yet

    def test_refused_requests_do_not_count(self):
        for _ in range(3):
            self.call_as("sk-a")
        for _ in range(10):
            self.assertEqual(self.call_as("sk-a")[0], 429)
        self.clock.advance(60_000)
        self.assertEqual([self.call_as("sk-a")[0] for _ in range(4)], [200, 200, 200, 429])
        health = self.call("GET", "/health")[1]["quotas"]
        self.assertEqual(health, {"rpm": 3, "tpm": None, "keys": 1,
                                  "refused": {"requests": 11}})
        self.assertIn('dummyllm_quota_refused_total{limit="requests"} 11',
                      self.send("GET", "/metrics")[2].decode())
        self.clock.advance(60_000)
        self.assertEqual(self.call("GET", "/health")[1]["quotas"]["keys"], 0)  # all left

    def test_each_key_has_its_own_window(self):
        for _ in range(3):
            self.call_as("sk-a")
        self.assertEqual(self.call_as("sk-a")[0], 429)
        self.assertEqual(self.call_as("sk-b")[0], 200)
        status, _, _ = self.chat("no-api-key", ["ok"])  # keyed by X-Trace-Id
        self.assertEqual(status, 200)
        self.assertEqual(self.call_as("sk-c", rpm=1)[0], 200)  # simulate.rpm
        self.assertEqual(self.call_as("sk-c", rpm=1)[0], 429)

    def test_tokens_per_minute(self):
        self.server = self.start({"latency_ms": 0, "tpm": 100, "clock": self.clock})
        self.conn = self.connect(self.server)
        big = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40}
        seen = []
        for _ in range(3):
            status, headers, _ = self.send("POST", "/v1/chat/completions", big,
                                           {"Authorization": "Bearer sk-t"})
            seen.append((status, headers.get("x-ratelimit-remaining-tokens")))
            self.clock.advance(10_000)
        self.assertEqual(seen, [(200, "59"), (200, "18"), (429, "18")])
        self.assertEqual(headers["retry-after-ms"], "40000")  # when the first leaves

    def test_anthropic_says_it_in_its_headers(self):
        status, headers, _ = self.call_as("sk-a", "anthropic")
        self.assertEqual((status, headers["anthropic-ratelimit-requests-limit"],
                          headers["anthropic-ratelimit-requests-remaining"]), (200, "3", "2"))
        self.assertNotIn("x-ratelimit-limit-requests", headers)
        for _ in range(2):
            self.call_as("sk-a", "anthropic")
        status, headers, body = self.call_as("sk-a", "anthropic")
        self.assertEqual((status, json.loads(body)["error"]["type"]), (429, "rate_limit_error"))
        self.assertEqual(headers["retry-after-ms"], "60000")
        self.assertRegex(headers["anthropic-ratelimit-requests-reset"],
                         r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\Z")

    def test_a_quota_refusal_is_judged_like_any_429(self):
        for _ in range(4):
            self.call_as("sk-a")
        self.call_as("sk-a")  # at once, although told to wait a minute
        finding = self.findings()["RETRY_AFTER_IGNORED"]
        self.assertEqual(finding["evidence"], self.seqs()[4:])
        for _ in range(2):  # keyed by the body's user: the refusal is that key's too
            self.send("POST", "/v1/chat/completions", {"model": "m", "user": "u-1", "messages": [
                {"role": "user", "content": "Hi"}], "simulate": {"rpm": 1}})
        self.assertEqual([a["status"] for a in self.server.verdict("u-1")["attempts"]],
                         [200, 429])


class QuotaRateTest(AppTestCase):
    """Clients that keep calling: each call takes 200 ms on the clock."""

    options = {"latency_ms": 0, "rpm": 20}

    def call_as(self, key):
        status, _, response = self.call("POST", "/v1/chat/completions", {
            "model": "m", "messages": HELLO}, headers={"Authorization": "Bearer " + key})
        self.clock.advance(200)
        return status, response

    def test_a_client_that_waits_as_told_always_gets_in(self):
        statuses, start = [], self.clock.now
        while self.clock.now - start < 90_000:
            status, response = self.call_as("sk-r")
            statuses.append(status)
            if status == 429:
                self.clock.advance(int(response.getheader("retry-after-ms")))
        refusals = [i for i, status in enumerate(statuses) if status == 429]
        self.assertEqual(statuses[:21], [200] * 20 + [429])
        self.assertTrue(all(statuses[i + 1] == 200 for i in refusals[:-1]), statuses)

    def test_no_minute_holds_more_than_the_limit(self):
        admitted, start = [], self.clock.now
        while self.clock.now - start < 90_000:  # a minute and a half
            if self.call_as("sk-h")[0] == 200:
                admitted.append(self.clock.now)
        self.assertEqual(len(admitted), 40)  # the first minute's, then the second's
        self.assertGreaterEqual(admitted[20] - admitted[0], 60_000)


class McpVerdictTest(McpCalls, VerdictTestCase):
    """The verdict's findings on an agent's tool use, each with an agent
    written here that earns it and one that does not."""

    options = {"mcp_tools": MCP_TOOLS, "latency_ms": 0, "seed": 1}

    def codes(self, key="agent"):
        return set(self.findings(key))

    def test_arguments_the_schema_refuses(self):
        self.call_tool("get_weather", {"town": "Paris"}, headers={"X-Trace-Id": "agent"})
        finding = self.findings("agent")["TOOL_ARGUMENTS_REFUSED"]
        self.assertEqual(finding["severity"], "warning")
        self.call_tool("get_weather", {"city": "Paris"}, headers={"X-Trace-Id": "good"})
        self.assertEqual(self.codes("good"), set())

    def test_a_failed_call_repeated_unchanged(self):
        session = self.session()
        fail = json.dumps({"script": None, "mode": "fail"})
        for attempt in range(4):
            self.call_tool("deploy", {"env": "prod"}, session, headers={
                "X-Trace-Id": "agent", "X-DummyLLM-Simulate": fail})
            if attempt == 2:
                self.assertEqual(self.codes(), set())  # twice repeated: not yet
        finding = self.findings("agent")["TOOL_RETRIED_UNCHANGED"]
        self.assertEqual((finding["severity"], len(finding["evidence"])), ("error", 1))
        for env in ("prod", "staging", "dev", "test"):  # changed each time
            self.call_tool("deploy", {"env": env}, session, headers={
                "X-Trace-Id": "good", "X-DummyLLM-Simulate": fail})
        self.assertEqual(self.codes("good"), set())

    def agent_step(self, key, tool_result):
        """A model call of an agent that sends back tool_result (None: none)."""
        messages = [{"role": "user", "content": "Deploy"}]
        if tool_result is not None:
            messages += [{"role": "assistant", "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "deploy", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": tool_result}]
        status, _, _ = self.send("POST", "/v1/chat/completions", {
            "model": "m", "messages": messages}, {"X-Trace-Id": key})
        self.assertEqual(status, 200)

    def test_an_error_result_the_next_model_call_leaves_out(self):
        for key, sends_back in [("agent", None), ("good", "Error: Tool deploy failed: disk full. "
                                                          "Try again.")]:
            failed = self.call_tool("deploy", headers={"X-Trace-Id": key})
            self.assertTrue(failed["result"]["isError"])
            self.agent_step(key, sends_back)
        finding = self.findings("agent")["TOOL_ERROR_IGNORED"]
        self.assertEqual(finding["severity"], "error")
        self.assertIn("the error result of deploy", finding["message"])
        self.assertEqual(self.codes("good"), set())

    def hang(self, key, session, rpc_id):
        self.conn.request("POST", "/mcp", json.dumps({
            "jsonrpc": "2.0", "id": rpc_id, "method": "tools/call",
            "params": {"name": "deploy", "_meta": {"dummyllm/simulate": {"mode": "hang"}}}}),
            {**self.HEADERS, "Mcp-Session-Id": session, "X-Trace-Id": key})
        self.assertRaises(socket.timeout, self.conn.getresponse)

    def test_a_hung_call_never_cancelled(self):
        for key in ("agent", "good", "closes"):
            self.hang(key, self.session(), 3)
        self.rpc("notifications/cancelled", {"requestId": 3, "reason": "timed out"},
                 self.journal("?trace_id=good")[0]["mcp"]["session"], {"X-Trace-Id": "good"},
                 rpc_id=None)
        self.call("DELETE", "/mcp", headers={"Mcp-Session-Id": self.journal(
            "?trace_id=closes")[0]["mcp"]["session"], "X-Trace-Id": "closes"})
        self.assertEqual(self.codes(), set())  # not yet: settle_ms has not passed
        self.clock.advance(2000)
        self.assertEqual(self.findings("agent")["TOOL_HANG_NOT_CANCELLED"]["severity"], "warning")
        self.assertEqual(self.codes("good") | self.codes("closes"), set())

    def test_mcp_messages_are_not_judged_as_http_retries(self):
        session = self.session(headers={"X-Trace-Id": "agent"})
        for _ in range(3):  # an SDK retries the stream it may open
            self.call("GET", "/mcp", headers={"Mcp-Session-Id": session, "X-Trace-Id": "agent"})
        self.clock.advance(5000)
        verdict = self.server.verdict("agent")
        self.assertEqual((verdict["findings"], verdict["attempts"]), ([], []))

    def test_the_report_says_which_tools_each_key_called(self):
        session = self.session()
        for key, calls in [("a", ["deploy", "deploy", "stats"]), ("b", ["get_weather"])]:
            for name in calls:
                self.call_tool(name, {"city": "Oslo"} if name == "get_weather" else {},
                               session, headers={"X-Trace-Id": key})
        status, report, _ = self.call("GET", "/v1/mcp/report")
        self.assertEqual(status, 200)
        self.assertEqual(report["declared"], [tool["name"] for tool in MCP_TOOLS])
        self.assertEqual(report["keys"][0], {
            "key": "a", "tools": {"deploy": {"calls": 2, "failed": 1},
                                  "stats": {"calls": 1, "failed": 0}},
            "never_called": ["get_weather", "build", "search"]})
        self.assertEqual(self.call("GET", "/v1/mcp/report?trace_id=b")[1]["keys"], [{
            "key": "b", "tools": {"get_weather": {"calls": 1, "failed": 0}},
            "never_called": ["deploy", "stats", "build", "search"]}])


class StrictConversationTest(VerdictTestCase):
    """Conversations the real APIs refuse are refused here, in each
    vendor's words, and named in the verdict; --lenient takes them."""

    CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}

    def refused(self, path, body, key="agent"):
        status, _, data = self.send("POST", path, body, {"X-Trace-Id": key})
        self.assertEqual(status, 400, data)
        return json.loads(data)

    def test_openai_chat(self):
        user = {"role": "user", "content": "Hi"}
        asked = {"role": "assistant", "tool_calls": [self.CALL, dict(self.CALL, id="call_2")]}
        cases = [
            ([user, {"role": "tool", "tool_call_id": "call_1", "content": "x"}],
             "ORPHAN_TOOL_RESULT", "messages.[1].role", "Invalid parameter: messages with role "
             "'tool' must be a response to a preceeding message with 'tool_calls'."),
            ([user, asked, {"role": "tool", "tool_call_id": "call_9", "content": "x"}],
             "ORPHAN_TOOL_RESULT", "messages.[2].tool_call_id", "Invalid parameter: "
             "'tool_call_id' of 'call_9' not found in 'tool_calls' of previous message."),
            ([user, asked, {"role": "tool", "tool_call_id": "call_1", "content": "x"}, user],
             "UNANSWERED_TOOL_CALL", "messages.[1].role", "An assistant message with "
             "'tool_calls' must be followed by tool messages responding to each "
             "'tool_call_id'. The following tool_call_ids did not have response messages: "
             "call_2"),
        ]
        for messages, code, param, message in cases:
            with self.subTest(code=code, param=param):
                body = self.refused("/v1/chat/completions", {"model": "m", "messages": messages})
                self.assertEqual(body["error"], {"message": message, "type":
                                                 "invalid_request_error", "param": param,
                                                 "code": None})
        answered = [user, asked, {"role": "tool", "tool_call_id": "call_2", "content": "x"},
                    {"role": "tool", "tool_call_id": "call_1", "content": "y"}]
        self.assertEqual(self.send("POST", "/v1/chat/completions", {
            "model": "m", "messages": answered})[0], 200)
        self.assertEqual(sorted(self.findings("agent")), ["ORPHAN_TOOL_RESULT",
                                                          "UNANSWERED_TOOL_CALL"])
        self.assertEqual(self.findings("agent")["ORPHAN_TOOL_RESULT"]["evidence"], [0, 1])

    def test_anthropic(self):
        ask = {"role": "user", "content": "Hi"}
        use = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                                                 "name": "f", "input": {}}]}
        result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                               "content": "x"}]}
        cases = [
            ([ask, {"role": "assistant", "content": "ok"}, result], "messages.2.content.0: "
             "unexpected `tool_use_id` found in `tool_result` blocks: toolu_1. Each "
             "`tool_result` block must have a corresponding `tool_use` block in the previous "
             "message."),
            ([ask, use, ask], "messages.1: `tool_use` ids were found without `tool_result` "
             "blocks immediately after: toolu_1. Each `tool_use` block must have a "
             "corresponding `tool_result` block in the next message."),
        ]
        for messages, message in cases:
            with self.subTest(message=message[:20]):
                body = self.refused("/v1/messages", {"model": "m", "max_tokens": 10,
                                                     "messages": messages})
                self.assertEqual(body["error"], {"type": "invalid_request_error",
                                                 "message": message})
        self.assertEqual(self.send("POST", "/v1/messages", {
            "model": "m", "max_tokens": 10, "messages": [ask, use, result]})[0], 200)

    def test_a_thinking_block_dropped_or_edited(self):
        thinking = {"type": "enabled", "budget_tokens": 1024}
        ask = {"model": "m", "max_tokens": 2048, "thinking": thinking,
               "tools": [{"name": "f", "input_schema": {"type": "object"}}]}
        question = {"role": "user", "content": "Hi"}
        first = json.loads(self.send("POST", "/v1/messages", dict(
            ask, messages=[question], tool_choice={"type": "any"}))[2])
        thought, use = first["content"]

        def answer(content):
            return dict(ask, messages=[question, {"role": "assistant", "content": content}, {
                "role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"],
                                             "content": "x"}]}])
        dropped = self.refused("/v1/messages", answer([use]), key="dropped")
        self.assertTrue(dropped["error"]["message"].startswith(
            "messages.1.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
            "`tool_use`. When `thinking` is enabled, a final `assistant` message must start "
            "with a thinking block"), dropped)
        edited = self.refused("/v1/messages", answer([dict(thought, thinking="Other."), use]),
                              key="edited")
        self.assertEqual(edited["error"]["message"],
                         "messages.1.content.0: Invalid `signature` in `thinking` block")
        self.assertEqual(self.send("POST", "/v1/messages", answer([thought, use]))[0], 200)
        self.assertEqual(list(self.findings("dropped")), ["DROPPED_THINKING"])
        self.assertEqual(list(self.findings("edited")), ["EDITED_THINKING"])
        self.assertFalse(self.server.verdict("edited")["ok"])
        without = dict(answer([use]), thinking=None)  # the rule holds only with thinking on
        self.assertEqual(self.send("POST", "/v1/messages", without)[0], 200)

    def test_responses(self):
        tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
        first = json.loads(self.send("POST", "/v1/responses", {
            "model": "m", "input": "Hi", "tools": tools, "tool_choice": "required"})[2])
        call_id = first["output"][0]["call_id"]
        output = {"type": "function_call_output", "call_id": call_id, "output": "x"}
        cases = [
            ({"previous_response_id": "resp_000000000000", "input": "Hi"},
             "UNKNOWN_PREVIOUS_RESPONSE", "previous_response_id", "previous_response_not_found",
             "Previous response with id 'resp_000000000000' not found."),
            ({"input": [output]}, "ORPHAN_TOOL_RESULT", "input", None,
             f"No tool call found for function call output with call_id {call_id}."),
            ({"previous_response_id": first["id"], "input": "Next"}, "UNANSWERED_TOOL_CALL",
             "input", None, f"No tool output found for function call {call_id}."),
        ]
        for body, finding, param, code, message in cases:
            with self.subTest(finding=finding):
                error = self.refused("/v1/responses", dict(body, model="m"), key=finding)
                self.assertEqual(error["error"], {"message": message, "type":
                                                  "invalid_request_error", "param": param,
                                                  "code": code})
                self.assertEqual(list(self.findings(finding)), [finding])
        self.assertEqual(self.send("POST", "/v1/responses", {
            "model": "m", "previous_response_id": first["id"], "input": [output]})[0], 200)

    def test_gemini(self):
        call = {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}}]}
        response = {"role": "user", "parts": [{"functionResponse": {"name": "f",
                                                                    "response": {}}}]}
        question = {"role": "user", "parts": [{"text": "Hi"}]}
        for contents, message in (
                ([question, response], "Please ensure that function response turn comes "
                                       "immediately after a function call turn."),
                ([question, call, {"role": "user", "parts": response["parts"] * 2}],
                 "Please ensure that the number of function response parts is equal to the "
                 "number of function call parts of the function call turn.")):
            with self.subTest(message=message[:30]):
                body = self.refused("/v1beta/models/g:generateContent", {"contents": contents})
                self.assertEqual(body["error"], {"code": 400, "message": message,
                                                 "status": "INVALID_ARGUMENT"})
        self.assertEqual(self.send("POST", "/v1beta/models/g:generateContent", {
            "contents": [question, call, response]})[0], 200)

    def test_bedrock_converse(self):
        path = "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"
        question = {"role": "user", "content": [{"text": "Hi"}]}
        uses = {"role": "assistant", "content": [
            {"toolUse": {"toolUseId": f"tooluse_{n}", "name": "f", "input": {}}} for n in (1, 2)]}

        def results(*ids):
            return {"role": "user", "content": [{"toolResult": {
                "toolUseId": tool_use_id, "content": [{"text": "x"}]}} for tool_use_id in ids]}
        for messages, code, message in (
                ([uses, question], "VALIDATION_ERROR", "A conversation must start with a user "
                 "message. Try again with a conversation that starts with a user message."),
                ([question, {"role": "assistant", "content": [{"text": "ok"}]},
                  results("tooluse_1")], "ORPHAN_TOOL_RESULT", "The number of toolResult "
                 "blocks at messages.2.content exceeds the number of toolUse blocks of previous "
                 "turn."),
                ([question, uses, results("tooluse_2")], "UNANSWERED_TOOL_CALL", "Expected "
                 "toolResult blocks at messages.2.content for the following Ids: tooluse_1")):
            with self.subTest(code=code):
                status, headers, data = self.send("POST", path, {"messages": messages},
                                                  {"X-Trace-Id": code})
                self.assertEqual((status, headers["x-amzn-errortype"], json.loads(data)),
                                 (400, "ValidationException", {"message": message}))
        self.assertEqual(list(self.findings("UNANSWERED_TOOL_CALL")), ["UNANSWERED_TOOL_CALL"])
        self.assertEqual(self.send("POST", path, {"messages": [
            question, uses, results("tooluse_2", "tooluse_1")]})[0], 200)

    def test_bedrock_invoke_passes_on_anthropics(self):
        status, headers, data = self.send(
            "POST", "/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke", {
                "anthropic_version": "bedrock-2023-05-31", "max_tokens": 10, "messages": [
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                  "content": "x"}]}]})
        self.assertEqual((status, headers["x-amzn-errortype"]), (400, "ValidationException"))
        self.assertEqual(json.loads(data)["message"], "The model returned the following errors: "
                         "messages.0.content.0: unexpected `tool_use_id` found in "
                         "`tool_result` blocks: t. Each `tool_result` block must have a "
                         "corresponding `tool_use` block in the previous message.")

    def test_lenient_takes_them(self):
        lenient = self.connect(self.start({"latency_ms": 0, "lenient": True}))
        for path, body in (
                ("/v1/chat/completions", {"model": "m", "messages": [
                    {"role": "tool", "tool_call_id": "c", "content": "x"}]}),
                ("/v1/messages", {"model": "m", "max_tokens": 10, "messages": [
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                  "content": "x"}]}]}),
                ("/v1/responses", {"model": "m", "previous_response_id": "resp_0",
                                   "input": "Hi"}),
                ("/v1beta/models/g:generateContent", {"contents": [{"role": "user", "parts": [
                    {"functionResponse": {"name": "f", "response": {}}}]}]})):
            with self.subTest(path=path):
                self.assertEqual(self.call("POST", path, body, conn=lenient)[0], 200)


# --- Server -----------------------------------------------------------------------

class HttpTest(ServerTestCase):
    options = {"max_body_bytes": 1000}
    server_class = QuickServer

    def exchange(self, data, read_until=b"}"):
        """Send raw bytes on a fresh connection; everything answered up to read_until."""
        return self.read_until(self.raw(data), read_until)

    def test_head(self):
        self.conn.request("HEAD", "/health")
        response = self.conn.getresponse()
        self.assertEqual(response.status, 200)
        self.assertGreater(int(response.getheader("Content-Length")), 0)
        self.assertEqual(response.read(), b"")
        self.assertEqual(self.call("GET", "/health")[0], 200)

    def test_too_large_is_413_without_reading_the_body(self):
        answer = self.exchange(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000"
                               b"\r\n\r\n" + b"{" * 100)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertIn(b'"PAYLOAD_TOO_LARGE"', answer)
        self.assertIn(b"Connection: close", answer)

    def test_too_large_with_expect_100_is_refused_before_the_body(self):
        answer = self.exchange(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
                               b"Expect: 100-continue\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)

    def test_expect_100_continue(self):
        body = json.dumps({"op": "x"}).encode()
        sock = self.raw(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        self.assertTrue(sock.recv(100).startswith(b"HTTP/1.1 100 Continue"))
        sock.sendall(body)
        self.assertTrue(self.read_until(sock, b"}").startswith(b"HTTP/1.1 201 "))

    def test_chunked_body(self):
        body = json.dumps({"op": "chunked.op"}).encode()
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:5], body[5:]))
        answer = self.exchange(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                               b"\r\n\r\n" + chunks + b"0\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 201 "), answer)

    def test_chunked_body_over_the_limit_is_413(self):
        chunk = b"a" * 600
        answer = self.exchange(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                               b"\r\n\r\n" + (b"258\r\n" + chunk + b"\r\n") * 2 + b"0\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)

    def test_malformed_content_length_is_400(self):
        for value in (b"1_0", b"1 2", b"+2", b"-1", b"0x2", b"\xd9\xa1"):
            with self.subTest(value=value):
                answer = self.exchange(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: "
                                       + value + b"\r\n\r\n{}")
                self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
                self.assertIn(b'"BAD_REQUEST"', answer)

    def test_malformed_request_line_is_a_json_400(self):
        answer = self.exchange(b"GARBAGE\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
        self.assertIn(b"Content-Type: application/json", answer)

    def test_malformed_headers(self):
        for request, status in [
                (b"GET /health HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", b"400"),
                (b"GET /health HTTP/1.1\r\nNo colon here\r\n\r\n", b"400"),
                (b"GET /health HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", b"431"),
                (b"GET /health HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", b"431"),
                (b"GET /health HTTP/2.0\r\n\r\n", b"505"),
                (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"414")]:
            with self.subTest(request=request[:40], status=status):
                answer = self.exchange(request)
                self.assertTrue(answer.startswith(b"HTTP/1.1 " + status), answer[:200])
                self.assertIn(b"Content-Type: application/json", answer)
                self.assertIn(b"Connection: close", answer)

    def test_header_names_are_case_insensitive_and_http_1_0_closes(self):
        body = b'{"op": "x"}'
        answer = self.exchange(b"POST /v1/jobs HTTP/1.0\r\ncOnTeNt-LeNgTh: %d\r\n\r\n%s"
                               % (len(body), body))
        self.assertTrue(answer.startswith(b"HTTP/1.1 201 "), answer)
        self.assertIn(b"Connection: close", answer)
        answer = self.exchange(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        self.assertIn(b"Connection: keep-alive", answer)

    def test_keep_alive_survives_errors_with_bodies(self):
        self.assertEqual(self.call("POST", "/nope", {"op": "x"})[0], 404)
        self.assertEqual(self.call("PUT", "/v1/jobs", {"op": "x"})[0], 405)
        self.assertEqual(self.call("POST", "/v1/jobs", b"{bad")[0], 400)
        self.assertEqual(self.call("POST", "/v1/jobs", {"op": ""})[0], 422)
        self.assertEqual(self.call("POST", "/v1/jobs", {"op": "x"})[0], 201)

    def test_idle_connections_are_closed(self):
        sock = self.raw(b"")
        started = time.monotonic()
        self.assertEqual(sock.recv(100), b"")
        self.assertLess(time.monotonic() - started, 2)

    def test_every_response_is_one_send_with_content_length(self):
        answer = self.exchange(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", b"}}")
        head, _, body = answer.partition(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        self.assertEqual(len(body), length)


class BrokenApp(LoggingApp):
    """An application with a bug: every answer to /boom raises."""

    def answer(self, request):
        if request.path == "/boom":
            raise RuntimeError("the secret detail")
        return super().answer(request)


class InternalErrorTest(AppTestCase):
    app_class = BrokenApp

    def test_a_bug_is_a_500_for_the_client_and_one_traceback_in_the_log(self):
        self.server.lines = []
        status, body, _ = self.call("GET", "/boom")
        self.assert_error(status, body, 500, "INTERNAL")
        self.assertNotIn("secret", json.dumps(body))
        self.assertEqual(self.call("GET", "/health")[0], 200)  # the connection lives on
        traceback_line, = [line for line in self.server.lines if "Traceback" in line]
        self.assertIn("RuntimeError: the secret detail", traceback_line)
        self.assertIn("GET /boom", traceback_line)


class FaultTest(ServerTestCase):
    options = {"seed": 1}

    def create_with(self, **simulate):
        return self.raw(http_bytes("POST", "/v1/jobs", {"op": "x", "simulate": simulate},
                                   [("Connection", "close")]))

    def read_all_quietly(self, sock):
        try:
            self.read_all(sock)
        except ConnectionResetError:
            pass

    def test_reset_is_a_tcp_rst(self):
        sock = self.create_with(fault="reset")
        with self.assertRaises(ConnectionResetError):
            self.read_all(sock)

    def test_disconnect_closes_cleanly_without_an_answer(self):
        self.assertEqual(self.read_all(self.create_with(fault="disconnect")), b"")

    def test_empty_is_a_200_without_a_body(self):
        self.conn.request("POST", "/v1/jobs", json.dumps({"op": "x", "simulate": {
            "fault": "empty"}}))
        response = self.conn.getresponse()
        self.assertEqual((response.status, response.read()), (200, b""))

    def test_malformed_is_a_200_with_half_a_json_body(self):
        self.conn.request("POST", "/v1/jobs", json.dumps({"op": "x", "simulate": {
            "fault": "malformed"}}))
        response = self.conn.getresponse()
        self.assertEqual(response.status, 200)
        body = response.read()
        self.assertTrue(body.startswith(b'{"id":"job_'), body)
        with self.assertRaises(ValueError):
            json.loads(body)

    def test_dribble_sends_the_right_answer_slowly(self):
        started = time.monotonic()
        sock = self.create_with(fault="dribble", dribble_ms=40)
        first = sock.recv(65536)
        data = first + self.read_until(sock, b"}")
        self.assertLess(len(first), len(data))
        self.assertGreaterEqual(time.monotonic() - started, 7 * 0.04)
        self.assertTrue(data.startswith(b"HTTP/1.1 201 "), data)
        self.assertEqual(json.loads(data.partition(b"\r\n\r\n")[2])["state"], "queued")

    def test_status_faults(self):
        status, body, response = self.call("POST", "/v1/jobs", {"op": "x", "simulate": {
            "fault": {"status": 502, "retry_after_ms": 2500}}})
        self.assert_error(status, body, 502, "INJECTED_FAULT")
        self.assertEqual((response.getheader("retry-after"), response.getheader("retry-after-ms")),
                         ("3", "2500"))
        status, body, _ = self.call("POST", "/v1/jobs", {"op": "x", "simulate": {
            "fault": "status:529"}})
        self.assert_error(status, body, 529, "OVERLOADED")
        self.assertIsNone(_.getheader("retry-after"))

    def test_a_status_fault_takes_the_requests_retry_after_ms(self):
        response = self.call("POST", "/v1/jobs", {"op": "x", "simulate": {
            "fault": "status:503", "retry_after_ms": 2000}})[2]
        self.assertEqual((response.status, response.getheader("retry-after-ms")), (503, "2000"))
        response = self.call("POST", "/v1/chat/completions", {
            "model": "m", "messages": HELLO, "simulate": {
                "fault": {"status": 429, "retry_after_ms": 100}, "retry_after_ms": 2000}})[2]
        self.assertEqual(response.getheader("retry-after-ms"), "100")  # the fault's own wins

    def test_fault_phase_before_creates_nothing_and_after_creates_the_job(self):
        for fault in ("reset", "disconnect", {"status": 503}):
            with self.subTest(fault=fault):
                self.call("POST", "/v1/reset")
                self.read_all_quietly(self.create_with(fault=fault))
                self.assertEqual(self.stored(), 0)
                self.read_all_quietly(self.create_with(fault=fault, fault_phase="after"))
                self.assertEqual(self.stored(), 1)

    def test_chat_faults(self):
        with self.assertRaises(ConnectionResetError):
            self.read_all(self.raw(http_bytes("POST", "/v1/chat/completions", {
                "model": "m", "messages": HELLO, "simulate": {"fault": "reset"}})))
        status, body, _ = self.call("POST", "/v1/chat/completions", {
            "model": "m", "messages": HELLO, "simulate": {"fault": "status:429"}})
        self.assertEqual((status, body["error"]["code"]), (429, "rate_limit_exceeded"))

    def test_bad_faults_are_422(self):
        for simulate, field in [({"fault": "explode"}, "simulate.fault"),
                                ({"fault": {"status": 200}}, "simulate.fault.status"),
                                ({"fault": {"unknown_state": "x"}}, "simulate.fault"),
                                ({"fault": "status:abc"}, "simulate.fault"),
                                ({"fault_phase": "during"}, "simulate.fault_phase"),
                                ({"dribble_ms": -1}, "simulate.dribble_ms"),
                                ({"jitter_ms": -1}, "simulate.jitter_ms"),
                                ({"poll_faults": "reset"}, "simulate.poll_faults"),
                                ({"poll_faults": [None, "boom"]}, "simulate.poll_faults[1]")]:
            with self.subTest(simulate=simulate):
                status, body, _ = self.call("POST", "/v1/jobs", {"op": "x", "simulate": simulate})
                self.assert_error(status, body, 422, "VALIDATION_ERROR", field)

    def test_a_thousand_resets_leave_the_server_serving(self):
        threads = threading.active_count()
        for _ in range(1000):
            self.read_all_quietly(self.create_with(fault="reset"))
        self.assertEqual(self.call("GET", "/health")[0], 200)
        self.wait_until(lambda: threading.active_count() <= threads + 1)


class RuntimeOptionsTest(AppTestCase):
    options = {"time_scale": 0.1, "cors": "http://app.test", "log_format": "json",
               "quiet": False}
    app_class = LoggingApp

    def setUp(self):
        super().setUp()
        self.server.lines = []

    def test_time_scale_shortens_every_simulated_duration(self):
        started = self.clock.now
        job = self.wait_for(self.create(simulate={"latency_ms": 1000}))
        self.assertEqual(self.clock.real_ms(self.clock.now - started), 100)
        self.assertEqual(job["state"], "ok")
        response = self.call("POST", "/v1/jobs", {"op": "x", "simulate": {
            "mode": "rate_limit", "retry_after_ms": 2000}})[2]
        self.assertEqual(response.getheader("retry-after-ms"), "200")
        self.assertEqual(self.call("GET", "/health")[1]["time_scale"], 0.1)

    def test_cors_headers_and_preflight(self):
        response = self.call("GET", "/health")[2]
        self.assertEqual(response.getheader("Access-Control-Allow-Origin"), "http://app.test")
        self.conn.request("OPTIONS", "/v1/jobs", headers={
            "Origin": "http://app.test", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,idempotency-key"})
        response = self.conn.getresponse()
        response.read()
        self.assertEqual(response.status, 204)
        self.assertEqual(response.getheader("Access-Control-Allow-Methods"), "POST, GET, HEAD")
        self.assertEqual(response.getheader("Access-Control-Allow-Headers"),
                         "content-type,idempotency-key")

    def test_json_access_log(self):
        job_id = self.create(trace_id="log-1")
        entry = json.loads(self.server.lines[-1])
        self.assertEqual({key: entry[key] for key in ("method", "path", "status", "job_id",
                                                      "trace_id")},
                         {"method": "POST", "path": "/v1/jobs", "status": 201, "job_id": job_id,
                          "trace_id": "log-1"})
        self.assertIsInstance(entry["ms"], float)


# --- Server: recording ------------------------------------------------------------

# What the upstream of these tests answers: text, tool calls and JSON that
# only it gives, with a time to the first token and gaps of its own.
UPSTREAM_RULES = [
    {"match": {"text_contains": "weather"}, "simulate": {
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}],
        "latency_ms": 60, "token_ms": 20}},
    {"match": {"text_contains": "twice"}, "simulate": {
        "script": [{"ok_text": "the first answer"}, {"ok_text": "the second answer"}]}},
    {"match": {"text_contains": "limit"}, "simulate": {"mode": "rate_limit",
                                                       "retry_after_ms": 1500}},
    {"match": {"text_contains": "broken"}, "simulate": {"stream": {"cut_after": 3}}},
    {"match": {"text_contains": "timed"}, "simulate": {"ok_text": "An answer in time",
                                                       "latency_ms": 200, "token_ms": 25}},
    {"match": {}, "simulate": {"ok_text": "An answer only the upstream gives, 7f3a9c",
                               "latency_ms": 80, "token_ms": 5}},
]
UPSTREAM = {"rules": UPSTREAM_RULES, "latency_ms": 0}  # no time but the rules' own
SECRET = "sk-recorded-secret-4242"


class Recordings:
    """Record what a client's calls get from an upstream dummyLLM, then
    replay the recording with no upstream."""

    def record(self, use, path=None, **options):
        """(what use(url) gave through a recorder in front of an upstream,
        the path of the recording)."""
        path = path or self.recording_path()
        upstream = self.start(UPSTREAM)
        recorder = self.start({"record": upstream.url, "record_to": path, **options})
        recorded = use(recorder.url)
        upstream.stop()
        recorder.stop()
        return recorded, path

    def replay(self, use, path, **options):
        return use(self.start({"rules": path, **options}).url)

    @staticmethod
    def rules_in(path):
        with open(path, encoding="utf-8") as file:
            return json.load(file)

    def record_and_replay(self, use):
        recorded, path = self.record(use)
        return recorded, self.replay(use, path)

    def recording_path(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        return os.path.join(directory, "recordings.json")


class RecordReplayTest(Recordings, ServerTestCase):
    """--record and replay, on the wire."""

    ASK = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}]}

    def chat(self, url, body=None, headers=None):
        """(status, lower-case headers, body bytes) of a chat call."""
        host, _, port = url.partition("//")[2].partition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        self.addCleanup(conn.close)
        conn.request("POST", "/v1/chat/completions", json.dumps(body or self.ASK), {
            "Authorization": "Bearer " + SECRET, "Content-Type": "application/json",
            **(headers or {})})
        response = conn.getresponse()
        try:
            data = response.read()
        except http.client.IncompleteRead as cut:
            data = cut.partial + b"<cut>"
        return response.status, {name.lower(): value for name, value in
                                 response.getheaders()}, data

    def test_an_answer_replays_byte_for_byte_and_no_key_is_written(self):
        def use(url):
            return [self.chat(url)[2], self.chat(url, dict(self.ASK, stream=True))[2]]
        recorded, path = self.record(use)
        self.assertIn(b"7f3a9c", recorded[0])
        self.assertEqual(self.replay(use, path), recorded)
        with open(path, encoding="utf-8") as file:
            text = file.read()
        self.assertNotIn(SECRET, text)
        plain, streamed = json.loads(text)  # "stream": true is another request
        self.assertEqual(set(plain["match"]), {"surface", "model", "request"})
        self.assertNotEqual(plain["match"]["request"], streamed["match"]["request"])
        self.assertEqual([len(rule["simulate"]["replay"]) for rule in (plain, streamed)], [1, 1])
        self.assertEqual(dummyllm.make_config(rules=path).rules[0].match["model"], "gpt-4o")

    def test_a_stream_replays_at_its_recorded_times(self):
        """The recording keeps the upstream's timing, and a replay sends
        each frame at its recorded time: to the millisecond on the fake
        clock, within 10% on the wire."""
        ask = {"model": "m", "stream": True, "messages": [
            {"role": "user", "content": "timed"}]}
        recorded, path = self.record(lambda url: self.chat(url, ask)[2])
        [rule] = self.rules_in(path)
        times = [ms for ms, _ in rule["simulate"]["replay"][0]["frames"]]
        text_frames = [ms for ms, text in rule["simulate"]["replay"][0]["frames"]
                       if '"content":"' in text and '"content":""' not in text]
        # The upstream's latency_ms and token_ms, and what the wire and a busy
        # machine add (the recorder cannot see a frame before it is sent).
        self.assertTrue(200 <= text_frames[0] <= 200 * 1.5, text_frames)
        self.assertTrue(200 + 25 * (len(text_frames) - 1) <= text_frames[-1]
                        <= (200 + 25 * (len(text_frames) - 1)) * 1.5, text_frames)
        host, port = self.start({"rules": path}).server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=10)
        self.addCleanup(conn.close)
        started = time.monotonic()
        conn.request("POST", "/v1/chat/completions", json.dumps(ask))
        response = conn.getresponse()
        arrived = [(time.monotonic() - started) * 1000 for line in iter(response.readline, b"")
                   if line.startswith(b"data: ")]
        # Never early; late by what a busy machine adds (on time within 4 ms at
        # idle; 64 ms for a first chunk under two busy loops), and 10%.
        for replayed, recorded_ms in zip(arrived, times):
            self.assertTrue(recorded_ms - 2 <= replayed <= recorded_ms * 1.1 + 60,
                            (replayed, recorded_ms))
        app = dummyllm._Application(clock=FakeClock(), rules=path, quiet=True)
        self.addCleanup(app.close)
        conn = SocketlessConnection(app)
        started = app.clock.now
        sent = []
        original = SocketlessHandler._send_timed

        def timed(handler, head, chunks):
            return original(handler, head, ((at_ms, sent.append(at_ms - started) or data)
                                            for at_ms, data in chunks))
        with unittest.mock.patch.object(SocketlessHandler, "_send_timed", timed):
            conn.request("POST", "/v1/chat/completions", json.dumps(ask))
            self.assertEqual(conn.getresponse().read(), recorded)
        self.assertEqual([round(ms, 1) for ms in sent], times)

    def test_the_same_call_twice_replays_both_answers_in_order(self):
        ask = {"model": "m", "messages": [{"role": "user", "content": "say it twice"}]}

        def use(url):
            return [json.loads(self.chat(url, ask, {"X-Trace-Id": "k"})[2])["choices"][0][
                "message"]["content"] for _ in range(3)]
        recorded, path = self.record(use)
        self.assertEqual(recorded, ["the first answer", "the second answer",
                                    "the second answer"])
        self.assertEqual(self.replay(use, path), recorded)
        [rule] = self.rules_in(path)
        self.assertEqual((rule["match"]["trace_id"], len(rule["simulate"]["replay"])), ("k", 3))

    def test_upstream_failures_replay_as_they_were(self):
        def use(url):
            limited = self.chat(url, {"model": "m", "messages": [
                {"role": "user", "content": "over the limit"}]})
            cut = self.chat(url, {"model": "m", "stream": True, "messages": [
                {"role": "user", "content": "a broken stream"}]})
            return limited[0], limited[1]["retry-after-ms"], limited[2], cut[2]
        recorded, path = self.record(use)
        self.assertEqual(recorded[:2], (429, "1500"))
        self.assertTrue(recorded[3].endswith(b"<cut>"))
        self.assertEqual(self.replay(use, path), recorded)

    def test_simulate_still_applies_on_a_replay(self):
        _, path = self.record(lambda url: [self.chat(url), self.chat(
            url, dict(self.ASK, stream=True))])
        url = self.start({"rules": path}).url
        fault = {"X-DummyLLM-Simulate": json.dumps({"fault": {"status": 503}})}
        self.assertEqual(self.chat(url, headers=fault)[0], 503)
        script = {"X-DummyLLM-Simulate": json.dumps({"script": ["rate_limit", "ok"]}),
                  "X-Trace-Id": "s"}
        self.assertEqual([self.chat(url, headers=script)[0] for _ in range(2)], [429, 200])
        cut = {"X-DummyLLM-Simulate": json.dumps({"stream": {"cut_after": 2}})}
        data = self.chat(url, dict(self.ASK, stream=True), cut)[2]
        self.assertEqual((data.count(b"data: "), data.endswith(b"<cut>")), (2, True))
        started = time.monotonic()
        instant = {"X-DummyLLM-Simulate": json.dumps({"replay_timing": "instant"})}
        self.assertEqual(self.chat(url, dict(self.ASK, stream=True), instant)[0], 200)
        self.assertLess(time.monotonic() - started, 0.08)  # recorded: 80 ms to the first token

    def test_record_on_miss_forwards_only_what_no_rule_matches(self):
        _, path = self.record(lambda url: self.chat(url))
        upstream = self.start(UPSTREAM)
        recorder = self.start({"record": upstream.url, "rules": path, "record_to": path})
        self.assertIn(b"7f3a9c", self.chat(recorder.url)[2])  # from the recording
        self.assertEqual(upstream.journal.find(), [])
        other = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Another"}]}
        self.assertIn(b"7f3a9c", self.chat(recorder.url, other)[2])  # from the upstream
        self.assertEqual(len(upstream.journal.find()), 1)
        self.chat(recorder.url, other)  # now a recording of its own
        self.assertEqual(len(upstream.journal.find()), 1)
        self.assertEqual(len(self.rules_in(path)), 2)

    def test_strict_rules_name_the_nearest_rule(self):
        _, path = self.record(lambda url: self.chat(url))
        url = self.start({"rules": path, "strict_rules": True}).url
        status, _, body = self.chat(url, {"model": "gpt-4o", "messages": [
            {"role": "user", "content": "Goodbye"}]})
        self.assertEqual(status, 404)
        self.assertRegex(json.loads(body)["error"]["message"], r"the nearest, rules\[0\] \("
                         r"recorded from http://127\.0\.0\.1:\d+ on .*: 'Hello'\), misses on "
                         r"request$")

    def test_an_upstream_out_of_reach_is_a_502_and_nothing_is_recorded(self):
        port = free_port()  # nothing listens there
        path = self.recording_path()
        url = self.start({"record": f"openai=http://127.0.0.1:{port}", "record_to": path}).url
        status, _, body = self.chat(url)
        self.assertEqual(status, 502)
        self.assertIn(f"the upstream http://127.0.0.1:{port} could not be reached",
                      json.loads(body)["error"]["message"])  # in OpenAI's shape
        self.assertFalse(os.path.exists(path))

    def test_redact_and_the_size_bound(self):
        recorded, path = self.record(lambda url: [self.chat(url)[2], self.chat(
            url, dict(self.ASK, stream=True))[2]], redact="7f3a9c", record_max_bytes=1024)
        self.assertIn(b"7f3a9c", recorded[0])
        self.assertIn(b"data: [DONE]", recorded[1])  # the client got all of it
        plain, streamed = self.rules_in(path)
        self.assertIn("[redacted]", plain["simulate"]["replay"][0]["body"])
        self.assertNotIn("7f3a9c", json.dumps(plain))
        [recording] = streamed["simulate"]["replay"]
        self.assertTrue(recording["truncated"])
        self.assertLessEqual(sum(len(text) for _, text in recording["frames"]), 1024)

    def test_record_options(self):
        config = dummyllm.make_config(record="openai=https://api.openai.com,http://h:8080/gw")
        self.assertEqual([(upstream.surface, upstream.host, upstream.port, upstream.path)
                          for upstream in config.record],
                         [("openai", "api.openai.com", 443, ""), (None, "h", 8080, "/gw")])
        self.assertTrue(config.record[0].serves("openai.chat"))
        self.assertFalse(config.record[0].serves("anthropic.messages"))
        for bad in ("ftp://x", "http://x?a=b", "not a url"):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                dummyllm.make_config(record=bad)
        path = self.recording_path()
        with open(path, "w") as file:
            file.write('{"not": "rules"}')
        with self.assertRaises(ValueError):
            dummyllm.DummyLLMServer(port=0, record="http://127.0.0.1:9", record_to=path)


@needs(openai, "openai", "DUMMYLLM_REQUIRE_OPENAI")
class RecordReplaySDKTest(Recordings, ServerTestCase):
    """A recording made through each SDK replays for that SDK: every answer
    the same, as the SDK parses it."""

    def require(self, module, package, variable):
        if module is None:
            if os.environ.get(variable):
                self.fail(f"{variable} is set, but {package} is missing")
            self.skipTest(f"the {package} package is not installed")

    def test_openai(self):
        def use(url):
            client = openai.OpenAI(base_url=url + "/v1", api_key=SECRET, max_retries=0)
            self.addCleanup(client.close)
            ask = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}]}
            return [client.chat.completions.create(**ask).model_dump(),
                    [chunk.model_dump() for chunk in client.chat.completions.create(
                        **ask, stream=True)],
                    client.chat.completions.create(model="gpt-4o", messages=[
                        {"role": "user", "content": "weather?"}], tools=OPENAI_TOOLS
                    ).model_dump(),
                    client.responses.create(model="gpt-4o", input="Hello").model_dump(),
                    client.embeddings.create(model="text-embedding-3-small",
                                             input="Hello").model_dump()]
        recorded, replayed = self.record_and_replay(use)
        self.assertEqual(recorded[0]["choices"][0]["message"]["content"],
                         "An answer only the upstream gives, 7f3a9c")
        self.assertEqual(recorded[2]["choices"][0]["message"]["tool_calls"][0]["function"][
            "name"], "get_weather")
        self.assertEqual(replayed, recorded)

    def test_anthropic(self):
        self.require(anthropic, "anthropic", "DUMMYLLM_REQUIRE_ANTHROPIC")

        def use(url):
            client = anthropic.Anthropic(base_url=url, api_key=SECRET, max_retries=0)
            self.addCleanup(client.close)
            ask = {"model": "claude-sonnet-4-5", "max_tokens": 200, "messages": [
                {"role": "user", "content": "weather in Paris?"}], "tools": [
                {"name": "get_weather", "input_schema": WEATHER}]}
            with client.messages.stream(**ask) as stream:
                events = [event.model_dump() for event in stream]
            return [client.messages.create(**ask).model_dump(), events]
        recorded, replayed = self.record_and_replay(use)
        self.assertEqual(recorded[0]["content"][0]["name"], "get_weather")
        self.assertEqual(replayed, recorded)

    def test_google_genai(self):
        self.require(genai, "google-genai", "DUMMYLLM_REQUIRE_GOOGLE")

        def use(url):
            client = genai.Client(api_key=SECRET, http_options=genai.types.HttpOptions(
                base_url=url))
            self.addCleanup(client.close)
            def dumped(response):  # without the headers, whose Date is the replay's
                return response.model_dump(exclude={"sdk_http_response"})
            return [dumped(client.models.generate_content(model="gemini-2.5-flash",
                                                          contents="Hello")),
                    [dumped(chunk) for chunk in client.models.generate_content_stream(
                        model="gemini-2.5-flash", contents="Hello")]]
        recorded, replayed = self.record_and_replay(use)
        self.assertEqual(recorded[0]["candidates"][0]["content"]["parts"][0]["text"],
                         "An answer only the upstream gives, 7f3a9c")
        self.assertEqual(replayed, recorded)

    def test_bedrock(self):
        """Its binary event stream is recorded in base64."""
        self.require(boto3, "boto3", "DUMMYLLM_REQUIRE_BOTO3")

        def use(url):
            client = boto3.client("bedrock-runtime", region_name="us-east-1", endpoint_url=url,
                                  aws_access_key_id="x", aws_secret_access_key="x")
            self.addCleanup(client.close)
            ask = {"modelId": "anthropic.claude-3-haiku-20240307-v1:0",
                   "messages": [{"role": "user", "content": [{"text": "Hello"}]}]}
            answer = client.converse(**ask)
            del answer["ResponseMetadata"]  # its Date is the replay's
            return [answer, list(client.converse_stream(**ask)["stream"])]
        recorded, path = self.record(use)
        self.assertEqual(recorded[0]["output"]["message"]["content"][0]["text"],
                         "An answer only the upstream gives, 7f3a9c")
        self.assertEqual(self.replay(use, path), recorded)
        self.assertTrue(self.rules_in(path)[1]["simulate"]["replay"][0]["base64"])

    def test_ollama(self):
        self.require(ollama, "ollama", "DUMMYLLM_REQUIRE_OLLAMA")

        def use(url):
            client = ollama.Client(host=url)
            self.addCleanup(client.close)
            ask = {"model": "llama3.2", "messages": [{"role": "user", "content": "Hello"}]}
            return [client.chat(**ask).model_dump(),
                    [part.model_dump() for part in client.chat(**ask, stream=True)]]
        recorded, replayed = self.record_and_replay(use)
        self.assertEqual(recorded[0]["message"]["content"],
                         "An answer only the upstream gives, 7f3a9c")
        self.assertEqual(replayed, recorded)


class WebhookTest(AppTestCase):
    """Callbacks go to a real receiver, on the real clock at --time-scale
    0.1: attempts get 500 ms, back-offs are 50 and 100 ms."""

    options = {"time_scale": 0.1, "clock": dummyllm._Clock(0.1)}

    def setUp(self):
        super().setUp()
        self.received = []
        arrived = self.arrived = threading.Semaphore(0)
        received = self.received

        class Receiver(http.server.BaseHTTPRequestHandler):
            statuses = [500, 200]  # the first attempt fails

            def do_POST(self):
                received.append((time.monotonic(), json.loads(
                    self.rfile.read(int(self.headers["Content-Length"])))))
                self.send_response(self.statuses.pop(0) if self.statuses else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                arrived.release()

            def log_message(self, *args):
                pass

        receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
        threading.Thread(target=receiver.serve_forever, args=(0.01,), daemon=True).start()
        self.addCleanup(receiver.server_close)
        self.addCleanup(receiver.shutdown)
        self.hook = f"http://127.0.0.1:{receiver.server_address[1]}/hook?x=1"

    def callback(self, job_id, conn=None):
        return self.call("GET", f"/v1/jobs/{job_id}/request", conn=conn)[1]["callback"]

    def test_the_final_job_is_posted_with_retries(self):
        job_id = self.create(callback_url=self.hook, simulate={"latency_ms": 0})
        for _ in range(2):
            self.assertTrue(self.arrived.acquire(timeout=5))
        self.assertEqual([job["id"] for _, job in self.received], [job_id, job_id])
        self.assertEqual(self.received[-1][1]["state"], "ok")
        self.assertGreaterEqual(self.received[1][0] - self.received[0][0], 0.045)
        self.wait_until(lambda: len(self.callback(job_id)["attempts"]) == 2)  # once read
        callback = self.callback(job_id)
        self.assertEqual(callback["url"], self.hook)
        self.assertEqual([a["status"] for a in callback["attempts"]], [500, 200])

    def test_a_silent_host_delays_only_its_own_callbacks(self):
        silent = socket.socket()
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # connects, never answers
        server = self.start({"time_scale": 0.02, "clock": dummyllm._Clock(0.02)})
        # attempts get 100 ms, back-offs 10 and 20
        conn = self.connect(server)
        silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}/hook"
        stuck = [self.create(conn=conn, callback_url=silent_url, simulate={"latency_ms": 0})
                 for _ in range(8)]
        started = time.monotonic()
        self.create(conn=conn, callback_url=self.hook, simulate={"latency_ms": 0})
        self.assertTrue(self.arrived.acquire(timeout=5))
        self.assertLess(time.monotonic() - started, 0.5)
        self.wait_until(lambda: len(self.callback(stuck[0], conn)["attempts"]) == 3)
        attempts = self.callback(stuck[0], conn)["attempts"]
        self.assertTrue(all("error" in attempt for attempt in attempts))
        self.assertLess(attempts[-1]["at_ms"] - attempts[0]["at_ms"], 2000)  # not 2 x 5 s

    def test_only_loopback_targets_unless_allowed(self):
        for url in ("http://example.com/hook", "http://10.0.0.1/x", "ftp://127.0.0.1/x",
                    "http://[::1", "nope"):
            with self.subTest(url=url):
                status, body, _ = self.call("POST", "/v1/jobs", {"op": "x", "callback_url": url})
                self.assert_error(status, body, 422, "VALIDATION_ERROR", "callback_url")
        allowed = self.start({"allow_callback_hosts": "hooks.test"})
        conn = self.connect(allowed)
        self.assertEqual(self.call("POST", "/v1/jobs", {
            "op": "x", "callback_url": "http://hooks.test:9/x"}, conn=conn)[0], 201)


class QuickLingerServer(dummyllm.DummyLLMServer):
    """Connections park 50 ms after their last answer (0.5 s in real life)."""

    linger_s = 0.05


def process_threads(pid=None):
    with open(f"/proc/{pid or 'self'}/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


@unittest.skipUnless(os.path.exists("/proc/self/status"), "counts threads in /proc")
class CrowdTest(ServerTestCase):
    server_class = QuickLingerServer
    CROWD = 1000

    def open_crowd(self, count):
        socks = [self.raw(http_bytes("GET", "/health")) for _ in range(count)]
        for sock in socks:
            self.assertTrue(self.read_until(sock, b"}}").startswith(b"HTTP/1.1 200 "))
        return socks

    def parked(self):
        return self.server.connections()[1]

    def test_idle_connections_hold_no_thread_and_leave_together_quickly(self):
        threads = process_threads()
        socks = self.open_crowd(self.CROWD)
        self.wait_until(lambda: self.parked() == self.CROWD)
        self.assertLess(process_threads(), threads + 20)  # not a thread each
        worst, stop = [0.0], threading.Event()

        def probe():
            conn = self.connect(self.server)
            while not stop.is_set():
                started = time.monotonic()
                conn.request("GET", "/health")
                conn.getresponse().read()
                worst[0] = max(worst[0], time.monotonic() - started)
                time.sleep(0.01)
        prober = threading.Thread(target=probe)
        prober.start()
        for sock in socks:
            sock.close()
        self.wait_until(lambda: self.server.connections()[0] <= 1)  # only the prober's
        stop.set()
        prober.join()
        self.assertLess(worst[0], 1.0)
        started = time.monotonic()
        self.server.stop()
        self.assertLess(time.monotonic() - started, 1.0)

    def test_a_returning_client_is_answered_from_the_parking(self):
        sock, = self.open_crowd(1)
        self.wait_until(lambda: self.parked() == 1)
        sock.sendall(http_bytes("GET", "/health"))
        self.assertTrue(self.read_until(sock, b"}}").startswith(b"HTTP/1.1 200 "))

    def test_hang_holds_no_thread(self):
        threads = process_threads()
        request = http_bytes("POST", "/v1/chat/completions",
                             {"model": "m", "messages": HELLO, "simulate": {"mode": "hang"}})
        socks = [self.raw(request) for _ in range(300)]
        self.wait_until(lambda: self.server.connections()[2] == 300)
        self.assertLess(process_threads(), threads + 20)
        socks[0].close()
        self.wait_until(lambda: self.server.connections()[2] == 299)  # its client left: closed


class MaxConnectionsTest(ServerTestCase):
    server_class = QuickLingerServer
    options = {"max_connections": 10}

    def test_at_the_cap_the_longest_idle_connection_makes_room(self):
        idle = []
        for _ in range(9):  # idle in this order
            idle.append(self.raw(http_bytes("GET", "/health")))
            self.read_until(idle[-1], b"}}")
        self.wait_until(lambda: self.server.connections()[1] == 9)
        self.assertEqual(self.call("GET", "/health")[0], 200)  # the 10th
        fresh = self.raw(http_bytes("GET", "/health"))  # the 11th: the oldest idle goes
        self.assertTrue(self.read_until(fresh, b"}}").startswith(b"HTTP/1.1 200 "))
        self.assertEqual(self.read_all(idle[0]), b"")

    def test_with_none_idle_a_newcomer_gets_a_fast_503(self):
        request = http_bytes("POST", "/v1/chat/completions",
                             {"model": "m", "messages": HELLO, "simulate": {"mode": "hang"}})
        held = [self.raw(request) for _ in range(10)]
        self.wait_until(lambda: self.server.connections()[2] == 10)
        started = time.monotonic()
        answer = self.read_all(self.raw(http_bytes("GET", "/health")))
        self.assertLess(time.monotonic() - started, 1)
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer)
        self.assertIn(b'"TOO_MANY_CONNECTIONS"', answer)
        self.assertIn(b"Retry-After: 1", answer)
        held[0].close()
        self.wait_until(lambda: self.server.connections()[0] == 9)
        self.assertEqual(self.call("GET", "/health", conn=self.connect(self.server))[0], 200)


class SlowClientTest(ServerTestCase):
    """Tricklers: a request must arrive within head_timeout_s once begun."""

    class Server(QuickServer):
        head_timeout_s = 0.3
        linger_s = 0.05

    server_class = Server

    def trickle(self, data, gap_s=0.05, read=None):
        sock = self.raw(b"")
        started = time.monotonic()
        try:
            for byte in data:
                sock.sendall(bytes([byte]))
                time.sleep(gap_s)
        except OSError:
            pass  # refused meanwhile
        return (read or self.read_all)(sock), time.monotonic() - started

    def test_a_trickled_head_is_cut_off_with_408(self):
        answer, elapsed = self.trickle(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100)
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)
        self.assertIn(b'"REQUEST_TIMEOUT"', answer)
        self.assertLess(elapsed, 3)

    def test_a_trickled_body_is_cut_off_with_408(self):
        sock = self.raw(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        started = time.monotonic()
        try:
            for _ in range(60):
                sock.sendall(b" ")
                time.sleep(0.05)
        except OSError:
            pass
        answer = self.read_all(sock)
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)
        self.assertLess(time.monotonic() - started, 3.5)

    def test_an_answer_the_client_does_not_read_is_given_up(self):
        class Server(LoggingServer):
            send_timeout_s = 0.15
            lines = []
        server = self.start({"latency_ms": 0, "quiet": False, "max_body_bytes": 16 << 20},
                            Server)
        body = {"model": "m", "messages": [{"role": "user", "content": "x" * (8 << 20)}],
                "simulate": {"mode": "echo"}}  # more than the socket buffers hold
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that reads slowly
        sock.connect(server.server_address[:2])
        self.addCleanup(sock.close)
        sock.sendall(http_bytes("POST", "/v1/chat/completions", body, [("Connection", "close")]))
        self.wait_until(lambda: server.connections()[0] == 0)  # reads nothing until given up
        answer = self.read_all(sock)
        length = int(re.search(rb"Content-Length: (\d+)", answer).group(1))
        self.assertLess(len(answer.partition(b"\r\n\r\n")[2]), length)  # cut off
        self.assertEqual(self.call("GET", "/health", conn=self.connect(server))[0], 200)
        self.assertEqual([line for line in Server.lines if "Traceback" in line], [])

    def test_a_slow_but_steady_request_within_the_deadline_is_served(self):
        answer, _ = self.trickle(http_bytes("GET", "/health"), gap_s=0.005,
                                 read=lambda sock: self.read_until(sock, b"\r\n\r\n"))
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)


@unittest.skipUnless(sys.platform.startswith("linux"), "sets RLIMIT_NOFILE in a subprocess")
class FileLimitTest(Calls, unittest.TestCase):
    """At the open-file limit, fresh clients are still answered and nothing spins."""

    def start(self, *args):
        import resource

        def limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        # The script's main(), its connections parking 50 ms after their last
        # answer (0.5 s in real life); SIGUSR2 prints its threads' stacks.
        self.stacks = tempfile.TemporaryFile("w+")
        self.addCleanup(self.stacks.close)
        run = ("import faulthandler, signal, sys, dummyllm; "
               "faulthandler.register(signal.SIGUSR2, sys.stderr); "
               "dummyllm.DummyLLMServer.linger_s = 0.05; "
               "sys.exit(dummyllm.main(sys.argv[1:]))")
        proc = subprocess.Popen([sys.executable, "-c", run, "--port", "0", *args],
                                cwd=compiled(), stdout=subprocess.PIPE, stderr=self.stacks,
                                text=True, preexec_fn=limit)
        self.addCleanup(proc.stdout.close)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        return proc, int(proc.stdout.readline().rsplit(":", 1)[1])

    def cpu_s(self, pid):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def crowd_then_health(self, *args):
        proc, port = self.start("--quiet", *args)
        socks = []
        for _ in range(100):  # more than 64 open files
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            self.addCleanup(sock.close)
            socks.append(sock)
        # Accepted up to the limit, they linger 50 ms and park, then the limit bites.
        self.wait_until(lambda: len(os.listdir(f"/proc/{proc.pid}/fd")) > 50
                        and process_threads(proc.pid) < 10)
        cpu = self.cpu_s(proc.pid)
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        self.assertEqual(conn.getresponse().status, 200)
        conn.close()
        self.assertLess(time.monotonic() - started, 1)
        time.sleep(0.2)
        self.assertLess(self.cpu_s(proc.pid) - cpu, 0.13)  # no spinning: two thirds of a core
        for sock in socks:
            sock.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        self.assertEqual(conn.getresponse().status, 200)  # recovered
        conn.close()
        proc.terminate()
        try:
            self.assertEqual(proc.wait(5), 0)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR2)
            time.sleep(0.5)
            self.stacks.seek(0)
            self.fail("no exit 5 s after SIGTERM; its threads:\n" + self.stacks.read())

    def test_the_default_cap_keeps_below_the_limit(self):
        self.crowd_then_health()

    def test_at_the_limit_itself_the_longest_idle_connection_makes_room(self):
        self.crowd_then_health("--max-connections", "1000")


@unittest.skipIf(dummyllm._ARRIVAL_STAMPS is None, "the kernel's arrival stamps are Linux's")
class ArrivalStampTest(unittest.TestCase):
    """Simulated time counts from when a request reached the machine, as the
    kernel stamped it, not from when a thread got round to reading it."""

    def test_a_read_knows_when_its_bytes_arrived(self):
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname())
            self.addCleanup(client.close)
            server_side, _ = listener.accept()
            self.addCleanup(server_side.close)
            reader = dummyllm._RequestReader(server_side, 10)
            for _ in range(100):  # the kernel starts stamping a moment after it is asked
                client.sendall(b"\r\n")
                reader.readinto(bytearray(2))
                if reader.arrived is not None:
                    break
                time.sleep(0.01)
            client.sendall(b"GET /health HTTP/1.1\r\n")
            sent = time.monotonic()
            time.sleep(0.2)  # the bytes wait in the kernel, as behind a busy GIL
            self.assertEqual(reader.readinto(bytearray(100)), 22)
            self.assertLess(abs(reader.arrived - sent), 0.1)


class HttpHardeningTest(ServerTestCase):
    options = {"cors": "http://app.test"}

    def exchange(self, data):
        return self.read_all(self.raw(data))

    def test_the_whole_head_is_capped_at_64_kib(self):
        fields = b"".join(b"X-%d: %s\r\n" % (i, b"a" * 30000) for i in range(3))
        answer = self.exchange(b"GET /health HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 431 "), answer[:100])

    def test_control_characters_in_header_values_are_400(self):
        for value in (b"x-a\rSet-Cookie: pwned=1", b"a\x00b", b"a\x1bb"):
            with self.subTest(value=value):
                answer = self.exchange(b"OPTIONS /v1/jobs HTTP/1.1\r\nHost: x\r\n"
                                       b"Access-Control-Request-Headers: " + value + b"\r\n\r\n")
                self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:100])
                self.assertNotIn(b"pwned", answer)

    def test_cors_echoes_only_a_list_of_header_names(self):
        for requested, echoed in [("content-type, x-trace-id", "content-type, x-trace-id"),
                                  ("content-type; evil", self.server.cors_allowed)]:
            self.conn.request("OPTIONS", "/v1/jobs", headers={
                "Access-Control-Request-Headers": requested})
            response = self.conn.getresponse()
            response.read()
            self.assertEqual(response.getheader("Access-Control-Allow-Headers"), echoed)

    def test_an_enormous_content_length_is_413(self):
        answer = self.exchange(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: "
                               + b"9" * 5000 + b"\r\n\r\n{}")
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:100])

    def test_content_length_with_transfer_encoding_is_answered_then_closed(self):
        body = b'{"op": "x"}'
        answer = self.exchange(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                               % (len(body), body))
        self.assertTrue(answer.startswith(b"HTTP/1.1 201 "), answer[:100])
        self.assertIn(b"Connection: close", answer)

    def test_transfer_codings_other_than_chunked_are_501(self):
        for coding in (b"xchunked", b"gzip, chunked", b"gzip"):
            with self.subTest(coding=coding):
                answer = self.exchange(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: "
                                       + coding + b"\r\n\r\n0\r\n\r\n")
                self.assertTrue(answer.startswith(b"HTTP/1.1 501 "), answer[:100])

    def test_http_1_1_needs_a_host(self):
        answer = self.exchange(b"GET /health HTTP/1.1\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:100])
        self.assertIn(b"Host", answer)

    def test_empty_lines_before_a_request_are_ignored(self):
        sock = self.raw(b"\r\n\r\n" + http_bytes("GET", "/health"))
        self.assertTrue(self.read_until(sock, b"}}").startswith(b"HTTP/1.1 200 "))

    def test_bearer_is_case_insensitive(self):
        server = self.start({"api_key": "k"})
        for scheme in ("Bearer", "bearer", "BEARER"):
            self.assertEqual(self.call("GET", "/v1/models", headers={
                "Authorization": f"{scheme} k"}, conn=self.connect(server))[0], 200)


class AdminKeyTest(AppTestCase):
    options = {"admin_key": "adm"}

    def test_state_changing_control_endpoints_need_the_admin_key(self):
        job_id = self.create()
        rule = json.dumps({"simulate": {"mode": "ok"}})
        for method, path, body in [("DELETE", "/v1/jobs/" + job_id, None),
                                   ("POST", "/v1/reset", None), ("DELETE", "/v1/requests", None),
                                   ("POST", "/v1/rules", rule), ("DELETE", "/v1/rules", None)]:
            with self.subTest(path=path):
                status, answer, _ = self.call(method, path, body)
                self.assert_error(status, answer, 401, "UNAUTHORIZED")
                self.assertIn("--admin-key", answer["error"]["message"])
                self.conn.request(method, path, body, headers={"Authorization": "Bearer adm"})
                response = self.conn.getresponse()
                response.read()
                self.assertIn(response.status, (200, 201, 204))
        self.assertEqual(self.call("POST", "/v1/jobs", {"op": "x"})[0], 201)  # the rest is open

    def test_a_warning_without_it_on_an_open_address(self):
        proc = subprocess.Popen([sys.executable, compiled_script(), "--port", "0", "--host",
                                 "0.0.0.0", "--quiet"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.stderr.close)
        self.addCleanup(proc.stdout.close)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        self.assertIn("listening on", proc.stdout.readline())
        self.assertIn("without --admin-key", proc.stderr.readline())
        proc.terminate()
        self.assertEqual(proc.wait(5), 0)


class LogEscapeTest(ServerTestCase):
    options = {"quiet": False}
    server_class = LoggingServer

    def test_control_characters_reach_the_text_log_escaped(self):
        self.server.lines = []
        self.read_until(self.raw(b"GET /\x1b[2Jx HTTP/1.1\r\nHost: x\r\n\r\n"), b"}}")
        line, = [line for line in self.server.lines if " 404 " in line]
        self.assertNotIn("\x1b", line)
        self.assertIn("\\x1b[2Jx", line)


class EmbeddingTest(unittest.TestCase):
    """The README's way to use dummyLLM from another project's tests."""

    def test_start_server_is_a_context_manager_that_frees_its_port(self):
        with dummyllm.start_server(mode="fail", latency_ms=0) as server:
            self.assertRegex(server.url, r"\Ahttp://127\.0\.0\.1:\d+\Z")
            host, port = server.server_address[:2]
            conn = http.client.HTTPConnection(host, port, timeout=5)
            conn.request("GET", "/health")
            self.assertEqual(json.loads(conn.getresponse().read())["defaults"]["mode"], "fail")
            conn.close()
        with self.assertRaises(OSError):
            socket.create_connection((host, port), timeout=1).close()

    def test_start_use_reset_stop(self):
        with dummyllm.start_server(latency_ms=0, seed=3) as server:
            host, port = server.server_address[:2]
            conn = http.client.HTTPConnection(host, port, timeout=5)
            conn.request("POST", "/v1/jobs", json.dumps({"op": "x"}))
            response = conn.getresponse()
            self.assertEqual((response.status, response.read()[:7]), (201, b'{"id":"'))
            removed = server.reset()
            self.assertEqual(removed["jobs"], 1)
            conn.request("GET", "/health")
            self.assertEqual(json.loads(conn.getresponse().read())["jobs"]["stored"], 0)
            conn.close()

    def test_all_names_what_a_user_may_import_and_the_rest_is_private(self):
        tree = script_tree()
        public = set()
        for node in tree.body:
            names = []
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [target.id for target in node.targets if isinstance(target, ast.Name)]
            public.update(name for name in names if not name.startswith("_"))
        hooks = {name for name in public if name.startswith("pytest_")}  # the plugin's
        self.assertEqual(hooks, {"pytest_addoption", "pytest_configure"})
        self.assertEqual(public - hooks, set(dummyllm.__all__) - {"__version__"})
        for name in dummyllm.__all__:
            self.assertTrue(hasattr(dummyllm, name), name)


def free_port():
    """A port for a server started later, in another process: one no socket
    has, below the range the kernel gives port 0 and clients (32768 and up
    here), so that no other server or client of the suite takes it meanwhile."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as file:
            low = int(file.read().split()[0])
    except OSError:
        low = 32768  # Linux's default; macOS and Windows begin at 49152
    for port in random.sample(range(max(1024, low - 8192), low), 64):
        with socket.socket() as free:
            try:
                free.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError("no free port")


NGINX = shutil.which("nginx") or next(
    (path for path in ("/usr/sbin/nginx",) if os.access(path, os.X_OK)), None)


@needs(NGINX, "nginx", "DUMMYLLM_REQUIRE_NGINX")
class ReplicaIdsTest(AppTestCase):
    """--replica I/N: every id the server makes begins its hex part with I."""

    options = {"replica": "11/16", "latency_ms": 0}

    def test_job_and_response_ids_begin_with_the_replicas_digit(self):
        self.assertRegex(self.create(), r"\Ajob_b[0-9a-f]{11}\Z")
        for store in (True, False):
            response = self.call("POST", "/v1/responses", {"model": "m", "input": "Hi",
                                                           "store": store})[1]
            self.assertRegex(response["id"], r"\Aresp_b[0-9a-f]{11}\Z")


class ReplicasBehindNginxTest(unittest.TestCase):
    """Three replicas behind nginx with the README's configuration, as written
    (its ports changed): ids route to their replica, keys hash to one."""

    @classmethod
    def setUpClass(cls):
        cls.replicas = [dummyllm.start_server(replica=f"{index}/3", seed=1337, latency_ms=0)
                        for index in range(3)]
        cls.directory = tempfile.mkdtemp()
        cls.port = free_port()
        with open(README, encoding="utf-8") as file:
            text = file.read()
        [conf] = re.findall(r"^```nginx\n(.*?)^```$", text, re.M | re.S)
        for index, replica in enumerate(cls.replicas):
            conf = conf.replace(f"127.0.0.1:880{index + 1}", replica.url.partition("//")[2])
        conf = conf.replace("listen 8787;", f"listen 127.0.0.1:{cls.port};")
        with open(os.path.join(cls.directory, "dummyllm.conf"), "w") as file:
            file.write(conf)
        with open(os.path.join(cls.directory, "nginx.conf"), "w") as file:
            file.write(f"""
                worker_processes 1; pid nginx.pid; error_log error.log;
                events {{}}
                http {{
                    access_log off;
                    client_body_temp_path body; proxy_temp_path proxy;
                    fastcgi_temp_path fastcgi; uwsgi_temp_path uwsgi; scgi_temp_path scgi;
                    include dummyllm.conf;
                }}""")
        cls.nginx = subprocess.Popen([NGINX, "-p", cls.directory, "-c", "nginx.conf",
                                      "-g", "daemon off;"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", cls.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or cls.nginx.poll() is not None:
                    cls.tearDownClass()
                    raise RuntimeError("nginx did not start: " + cls.nginx.stderr.read())
                time.sleep(0.05)

    @classmethod
    def tearDownClass(cls):
        cls.nginx.terminate()
        cls.nginx.wait(10)
        cls.nginx.stderr.close()
        for replica in cls.replicas:
            replica.stop()
        shutil.rmtree(cls.directory, ignore_errors=True)

    def call(self, method, path, body=None, headers=None, port=None):
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=10)
        self.addCleanup(conn.close)
        conn.request(method, path, None if body is None else json.dumps(body), headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    def modes(self, port, key):
        """The modes a key's six flaky jobs drew, and the replicas that made them."""
        ids = [self.call("POST", "/v1/jobs", {"op": "x", "simulate": {"mode": "flaky"}},
                         {"X-Trace-Id": key}, port)[1]["id"] for _ in range(6)]
        return ([self.call("GET", f"/v1/jobs/{job_id}/request", port=port)[1]["simulate"][
            "mode"] for job_id in ids], {job_id[4] for job_id in ids})

    def test_a_seeded_key_walks_the_same_sequence_as_on_one_server(self):
        with dummyllm.start_server(seed=1337, latency_ms=0) as alone:
            expected, _ = self.modes(alone.url.rpartition(":")[2], "walk")
        modes, replicas = self.modes(None, "walk")
        self.assertEqual(modes, expected)
        self.assertEqual(len(replicas), 1)  # one replica holds the key

    def test_every_poll_and_cancel_reaches_its_jobs_replica(self):
        ids = [self.call("POST", "/v1/jobs", {"op": "x", "simulate": {"mode": "hang"}})[1]["id"]
               for _ in range(9)]
        self.assertEqual({job_id[4] for job_id in ids}, {"0", "1", "2"})  # round robin
        for job_id in ids:
            self.assertEqual(self.call("GET", "/v1/jobs/" + job_id)[1]["state"], "running")
            self.assertEqual(self.call("POST", f"/v1/jobs/{job_id}/cancel")[1]["state"],
                             "cancelled")

    def test_a_stream_passes_through_as_it_is_sent(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        self.addCleanup(conn.close)
        started = time.monotonic()
        conn.request("POST", "/v1/chat/completions", json.dumps({
            "model": "m", "messages": HELLO, "stream": True,
            "simulate": {"token_ms": 150, "output_tokens": 4}}))
        response = conn.getresponse()
        first = response.readline()
        first_at = time.monotonic() - started
        response.read()
        self.assertTrue(first.startswith(b"data: "))
        self.assertLess(first_at, 0.3)  # the last of four chunks goes 0.45 s after the first
        self.assertGreater(time.monotonic() - started, 0.43)

    def test_the_verdict_for_a_key_counts_all_its_requests(self):
        key = {"X-Trace-Id": "verdict-key"}
        for _ in range(2):
            self.call("POST", "/v1/chat/completions", {"model": "m", "messages": HELLO},
                      headers=key)
        job_id = self.call("POST", "/v1/jobs", {"op": "x"}, headers=key)[1]["id"]
        for _ in range(2):
            self.call("GET", "/v1/jobs/" + job_id)  # no key: routed by the id
        status, verdict = self.call("GET", "/v1/verdict?trace_id=verdict-key")
        self.assertEqual((status, verdict["requests"]), (200, 5))


# --- API document and pages -------------------------------------------------------

class OpenAPITest(AppTestCase):

    def test_the_document_covers_the_router(self):
        status, document, _ = self.call("GET", "/openapi.json")
        self.assertEqual((status, document["openapi"]), (200, "3.2.0"))
        for route in dummyllm._registry().routes:
            with self.subTest(method=route.method, path=route.path):
                operation = document["paths"][route.path.replace("+}", "}")][route.method.lower()]
                self.assertTrue(operation["summary"])
                self.assertTrue(operation["responses"])
                for name in re.findall(r"\{(\w+)\+?\}", route.path):
                    self.assertIn(name, [p["name"] for p in operation["parameters"]])
        schemas = document["components"]["schemas"]
        self.assertEqual(set(schemas["Simulate"]["properties"]), set(dummyllm._SIMULATE_FIELDS))
        mode, null = schemas["Simulate"]["properties"]["mode"]["anyOf"]
        self.assertEqual((mode["enum"], null), (list(dummyllm._MODES), {"type": "null"}))
        self.assertEqual(schemas["Simulate"]["properties"]["latency_ms"]["anyOf"][0]["maximum"],
                         3_600_000)
        refs = set(re.findall(r'"#/components/schemas/(\w+)"', json.dumps(document)))
        self.assertLessEqual(refs, set(schemas))

    def test_every_stream_is_declared_as_sent(self):
        tool = {"tool_calls": [{"name": "f", "arguments": {"a": 1}}]}
        calls = [("/v1/chat/completions", {"model": "m", "messages": HELLO, "stream": True,
                                           "stream_options": {"include_usage": True}}),
                 ("/v1/completions", {"model": "m", "prompt": "Hi", "stream": True}),
                 ("/v1/responses", {"model": "m", "input": "Hi", "stream": True}),
                 ("/v1/messages", {"model": "m", "max_tokens": 50, "messages": HELLO[1:],
                                   "stream": True}),
                 ("/v1beta/models/g:streamGenerateContent", {"contents": [
                     {"role": "user", "parts": [{"text": "Hi"}]}]}),
                 ("/v1beta/models/g:streamGenerateContent?alt=sse", {"contents": [
                     {"role": "user", "parts": [{"text": "Hi"}]}]}),
                 ("/api/chat", {"model": "m", "messages": HELLO}),
                 ("/api/generate", {"model": "m", "prompt": "Hi"})]
        seen = set()
        for path, body in calls:
            for simulate in ({}, tool, {"stream": {"error_after": 2}}):
                if path in ("/v1/completions", "/api/generate") and simulate is tool:
                    continue  # these have no tools
                with self.subTest(path=path, simulate=simulate):
                    self.conn.request("POST", path, json.dumps(dict(body, simulate=simulate)))
                    response = self.conn.getresponse()
                    data, kind = response.read(), response.getheader("Content-Type")
                    self.assertEqual(response.status, 200, data)
                    validate_documented(self.server, "POST", path, 200, kind, data)
                    seen.add(kind)
        response_id = self.call("POST", "/v1/responses", {"model": "m", "input": "Hi"})[1]["id"]
        job_id = self.create(simulate={"latency_ms": 0})
        for path in (f"/v1/responses/{response_id}?stream=true&starting_after=2",
                     f"/v1/jobs/{job_id}/events"):
            with self.subTest(path=path):
                self.conn.request("GET", path)
                response = self.conn.getresponse()
                validate_documented(self.server, "GET", path, 200,
                                    response.getheader("Content-Type"), response.read())
        self.assertEqual(seen, {"text/event-stream", "application/x-ndjson", "application/json"})

    def test_query_parameters_are_documented_by_the_rules_that_check_them(self):
        document = self.call("GET", "/openapi.json")[1]
        limit, = [p for p in document["paths"]["/v1/jobs"]["get"]["parameters"]
                  if p["name"] == "limit"]
        self.assertEqual((limit["schema"]["minimum"], limit["schema"]["maximum"]), (1, 1000))
        status, body, _ = self.call("GET", "/v1/jobs?limit=1001")
        self.assert_error(status, body, 422, "VALIDATION_ERROR", "limit")

    def test_pages_are_self_contained(self):
        for path in ("/docs", "/", "/journal"):
            with self.subTest(path=path):
                self.conn.request("GET", path)
                response = self.conn.getresponse()
                page = response.read().decode()
                self.assertEqual(response.getheader("Content-Type"), "text/html; charset=utf-8")
                self.assertIn("<script>", page)
                page = page.replace('"http://www.w3.org/2000/svg"', "")  # a name, not a fetch
                self.assertEqual(re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", page), [])
                self.assertNotRegex(page, r"<(script|link|img)[^>]+(src|href)=\"(?!data:)")

    def test_the_dashboard_takes_its_states_from_the_vocabulary(self):
        self.conn.request("GET", "/")
        page = self.conn.getresponse().read().decode()
        self.assertIn("const STATES = " + json.dumps(list(dummyllm._JOB_STATES)) + ";", page)


# schemathesis hooks: what a request asked for is no failure, and what the
# document says the server refuses beyond its schemas is no rejection of
# good data.  The journal says which: the error code the server answered a
# case with (User-Agent carries the case's id), and the field at fault.
FUZZ_HOOKS = """
import json, os, urllib.request
import schemathesis
from schemathesis import checks as core
from schemathesis.specs.openapi import checks as openapi

URL = os.environ["DUMMYLLM_URL"]
SIMULATED = set(os.environ["DUMMYLLM_SIMULATED_CODES"].split(","))
# What leaves no answer to check (a broken or silent connection, a hang, the
# modes that draw one, a recording of a broken stream) becomes what answers;
# no wait is longer than an hour.
SILENT = {"reset": "dribble", "disconnect": "dribble", "empty": "malformed",
          "hang": "timeout", "flaky": "fail", "random": "ok"}
STREAM = {"cut_after": "error_after", "stall_after": "truncate_after"}
HOUR_MS = 3600000
DOCUMENT = {}


# A reply's length (a number or a distribution) of 64 tokens at most: a
# stream of a million tokens outlasts the request timeout.
def shorter(length):
    if isinstance(length, (int, float)) and not isinstance(length, bool):
        return min(length, 64)
    if isinstance(length, dict):
        return {key: shorter(item) if key in ("mean", "stdev") else item
                for key, item in length.items()}
    return length


def tame(value):
    if isinstance(value, list):
        return [tame(item) for item in value]
    if isinstance(value, str):
        return SILENT.get(value, value)
    if not isinstance(value, dict):
        return value
    tamed = {}
    for key, item in value.items():
        if key in STREAM and len(value) == 1:
            key = STREAM[key]
        if key == "end" and item == "cut":  # a recording of a broken stream
            continue
        if key == "hang" and "timeout" not in value:
            key = "timeout"
        if key.endswith("_ms") and isinstance(item, (int, float)) and HOUR_MS < item <= 86400000:
            item = HOUR_MS
        if key in ("output_tokens", "min_tokens") or (
                key in ("max_tokens", "max_completion_tokens") and value.get("ignore_eos")):
            item = shorter(item)
        tamed[key] = tame(item)
    return tamed


@schemathesis.hook
def before_call(context, case, kwargs):
    if isinstance(case.body, (dict, list)):
        case.body = tame(case.body)
    headers = dict(case.headers or {})
    try:
        headers["X-DummyLLM-Simulate"] = json.dumps(tame(json.loads(
            headers["X-DummyLLM-Simulate"])))
    except (KeyError, TypeError, ValueError):
        pass
    headers["User-Agent"] = "schemathesis " + case.id
    case.headers = headers
    if isinstance((case.query or {}).get("wait_ms"), int) and case.query["wait_ms"] > 2000:
        case.query["wait_ms"] = 2000


def get(path):
    with urllib.request.urlopen(URL + path, timeout=30) as answer:
        return json.load(answer)


def entry(case):
    for found in get("/v1/requests?limit=200")["requests"]:
        if found["headers"].get("User-Agent") == "schemathesis " + case.id:
            return found
    return None


def asked_for(case):
    found = entry(case)
    return found is not None and (found["code"] in SIMULATED or found["fault"] is not None
                                  or found["stream_failure"] is not None
                                  or found["recording"] is not None)


def declared_refusal(case):
    if not DOCUMENT:
        DOCUMENT.update(get("/openapi.json"))
    refuses = DOCUMENT["paths"][case.operation.path][case.operation.method.lower()].get(
        "x-dummyllm-refuses", {})
    found = entry(case)
    field = (found or {}).get("field") or ""
    return any(field == name or field.startswith((name + ".", name + "[")) for name in refuses)


def unless(excused, check):
    def wrapped(ctx, response, case):
        try:
            return check(ctx, response, case)
        except Exception:
            if excused(case):
                return None
            raise
    wrapped.__name__ = check.__name__ + "_unless_asked"
    schemathesis.check(wrapped)


# A form's parts are bytes on the wire, whatever a fuzzer drew for them: a
# part's JSON type (a number for a file) cannot be broken there.
def form_body(case):
    return case.media_type == "multipart/form-data"


for check in (core.not_a_server_error, openapi.status_code_conformance,
              openapi.content_type_conformance, openapi.response_schema_conformance,
              openapi.response_headers_conformance):
    unless(asked_for, check)
unless(lambda case: asked_for(case) or form_body(case), openapi.negative_data_rejection)
unless(lambda case: asked_for(case) or declared_refusal(case), openapi.positive_data_acceptance)
"""
WRAPPED_CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
                  "response_schema_conformance", "response_headers_conformance",
                  "negative_data_rejection", "positive_data_acceptance")


@needs(importlib.util.find_spec("schemathesis"), "schemathesis", "DUMMYLLM_REQUIRE_SCHEMATHESIS")
class FuzzTest(unittest.TestCase):
    """schemathesis, every phase (stateful too), against a server process:
    no server error and no answer but as /openapi.json declares it, except
    the failures a request asked for (a fault, a mode, a deadline)."""

    MAX_TIME_S = 100

    def test_the_document_holds_under_a_fuzzer(self):
        hooks = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, hooks)
        with open(os.path.join(hooks, "dummyllm_fuzz_hooks.py"), "w") as file:
            file.write(FUZZ_HOOKS)
        server = subprocess.Popen([sys.executable, compiled_script(), "--port", "0", "--quiet",
                                   "--latency-ms", "0", "--time-scale", "0.001"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: (server.kill(), server.wait(), server.stdout.close(),
                                 server.stderr.close()))
        url = server.stdout.readline().split()[-1]
        simulated = {mode.error for mode in dummyllm._MODES.values() if mode.error} | {
            "INJECTED_FAULT", "CONTEXT_LENGTH_EXCEEDED"}
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", url + "/openapi.json",
             "--checks", "all", "--exclude-checks", ",".join(WRAPPED_CHECKS),
             "--max-time", str(self.MAX_TIME_S), "--request-timeout", "20", "--no-color"],
            capture_output=True, text=True, timeout=self.MAX_TIME_S * 3, cwd=hooks, env=dict(
                os.environ, PYTHONPATH=hooks, SCHEMATHESIS_HOOKS="dummyllm_fuzz_hooks",
                DUMMYLLM_URL=url, DUMMYLLM_SIMULATED_CODES=",".join(sorted(simulated))))
        summary = run.stdout.rpartition("\n=")[2].strip(" =\n")
        print(f"\nschemathesis: {summary}", file=sys.stderr)
        found = re.search(r"^=+ (ERRORS|FAILURES) =+$.*?(?=^=+ (WARNINGS|SUMMARY) =+$)",
                          run.stdout, re.S | re.M)
        self.assertEqual(run.returncode, 0, "\n".join(
            line[:400] for line in (found.group(0) if found else run.stdout).splitlines())
            + run.stderr[-3000:])
        server.kill()
        self.assertEqual(server.stderr.read(), "")  # no traceback


PYTEST_EXAMPLE = """
import json, os, urllib.error, urllib.request

SCRIPT = {"latency_ms": 0, "script": ["rate_limit", "ok"]}


def chat(simulate):
    request = urllib.request.Request(
        os.environ["OPENAI_BASE_URL"] + "/chat/completions", headers={"X-Trace-Id": "k"},
        data=json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                         "simulate": simulate}).encode())
    try:
        with urllib.request.urlopen(request) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def test_first(dummyllm):
    assert [chat(SCRIPT), chat(SCRIPT)] == [429, 200]


def test_second(dummyllm):  # the same script starts over in a test of its own
    assert [chat(SCRIPT), chat(SCRIPT)] == [429, 200]
    assert [entry["status"] for entry in dummyllm.requests()] == [429, 200]
    assert os.environ["OPENAI_API_KEY"] and os.environ["ANTHROPIC_BASE_URL"] == dummyllm.url


def test_options(dummyllm_server):
    with urllib.request.urlopen(dummyllm_server.url + "/health") as answer:
        defaults = json.load(answer)["defaults"]
    assert (defaults["seed"], defaults["latency_ms"]) == (42, 5)


def test_fails(dummyllm):
    chat({"mode": "fail", "latency_ms": 0})
    assert False
"""


@needs(importlib.util.find_spec("pytest"), "pytest", "DUMMYLLM_REQUIRE_PYTEST")
class PytestPluginTest(unittest.TestCase):
    """`pytest -p dummyllm` in a project of its own: a server per session,
    a scope per test, options from the command line and pytest.ini, and a
    failing test's requests and verdict in its report."""

    XDIST = importlib.util.find_spec("xdist") or os.environ.get("DUMMYLLM_REQUIRE_XDIST")
    RUNS = {  # name: (arguments, conftest.py)
        "plugin": (("-p", "dummyllm"), None),
        "conftest": (("-k", "not fails"), 'pytest_plugins = ["dummyllm"]\n'),
        "bad option": (("-p", "dummyllm", "--dummyllm-latency-ms", "-1"), None),
        **({"xdist": (("-p", "dummyllm", "-n", "2", "-k", "not fails"), None)} if XDIST else {}),
    }

    @classmethod
    def setUpClass(cls):
        # The runs go at once: each is mostly pytest's own start (0.5 to 1 s).
        cls.runs, cls.projects = {}, []
        for name, (args, conftest) in cls.RUNS.items():
            project = tempfile.mkdtemp()
            cls.projects.append(project)
            for file_name, text in (("test_example.py", PYTEST_EXAMPLE),
                                    ("pytest.ini", "[pytest]\ndummyllm_latency_ms = 5\n"),
                                    ("conftest.py", conftest)):
                if text is not None:
                    with open(os.path.join(project, file_name), "w") as file:
                        file.write(text)
            cls.runs[name] = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 "--dummyllm-seed", "42", *args], cwd=project, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=compiled()))

    @classmethod
    def tearDownClass(cls):
        for run in cls.runs.values():
            with contextlib.suppress(ProcessLookupError):
                run.kill()
            run.communicate()
        for project in cls.projects:
            shutil.rmtree(project)

    def pytest(self, name):
        run = self.runs[name]
        stdout, stderr = run.communicate(timeout=120)
        return types.SimpleNamespace(returncode=run.returncode, stdout=stdout, stderr=stderr)

    def test_each_test_its_own_scope_and_a_failure_shows_its_requests(self):
        run = self.pytest("plugin")
        self.assertEqual(run.returncode, 1, run.stdout + run.stderr)
        self.assertIn("1 failed, 3 passed", run.stdout)
        report = run.stdout.partition("dummyllm: this test's requests and verdict")[2]
        self.assertEqual(report.splitlines()[1:3], [
            "POST /v1/chat/completions -> 500 trace_id=k code=SIM_FAIL", "verdict: ok"])
        self.assertEqual(run.stderr, "")

    def test_enabled_from_a_conftest(self):
        run = self.pytest("conftest")
        self.assertEqual(run.returncode, 0, run.stdout + run.stderr)
        self.assertIn("3 passed", run.stdout)

    def test_a_bad_option_is_a_usage_error(self):
        run = self.pytest("bad option")
        self.assertEqual(run.returncode, 4)  # pytest's usage error: no test ran
        self.assertIn("ERROR: dummyllm: --latency-ms must be", run.stderr)

    @unittest.skipUnless(XDIST, "the pytest-xdist package is not installed")
    def test_a_server_per_xdist_worker(self):
        run = self.pytest("xdist")
        self.assertEqual(run.returncode, 0, run.stdout + run.stderr)
        self.assertIn("3 passed", run.stdout)


def _find_browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


class WebDriver:
    """Just enough of the W3C WebDriver protocol, over http.client."""

    ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

    def __init__(self, chromium, driver):
        self.port = free_port()
        self.process = subprocess.Popen([driver, f"--port={self.port}"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.profile = tempfile.mkdtemp()
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.call("GET", "/status")["ready"]:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.05)
        self.session = self.call("POST", "/session", {"capabilities": {"alwaysMatch": {
            "goog:chromeOptions": {"binary": chromium, "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--user-data-dir=" + self.profile]}}}})[
            "sessionId"]

    def call(self, method, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, None if body is None else json.dumps(body),
                         {"Content-Type": "application/json"})
            answer = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        if isinstance(answer.get("value"), dict) and "error" in answer["value"]:
            raise RuntimeError(answer["value"]["error"] + ": " + answer["value"].get("message", ""))
        return answer["value"]

    def command(self, method, path, body=None):
        return self.call(method, f"/session/{self.session}{path}", body)

    def open(self, url):
        self.command("POST", "/url", {"url": url})

    def script(self, source, *args):
        return self.command("POST", "/execute/sync", {"script": source, "args": list(args)})

    def wait_for(self, source, timeout=10):
        """Poll a script until it returns something true; returns that."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.script(source)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for: {source}")
            time.sleep(0.05)

    def click(self, css):
        element = self.command("POST", "/element", {"using": "css selector", "value": css})
        self.command("POST", f"/element/{element[self.ELEMENT]}/click", {})

    def quit(self):
        try:
            self.command("DELETE", "")
        finally:
            self.process.terminate()
            self.process.wait(10)
            shutil.rmtree(self.profile, ignore_errors=True)


@unittest.skipIf(_find_browser() is None and not os.environ.get("DUMMYLLM_REQUIRE_BROWSER"),
                 "chromium and chromedriver are not installed (.ci/run installs them)")
class BrowserTest(ServerTestCase):
    """The docs page and the dashboard in headless Chromium (one browser for
    them all), on a server whose clock the test moves."""

    @classmethod
    def setUpClass(cls):
        cls.browser = WebDriver(*_find_browser()) if _find_browser() else None

    @classmethod
    def tearDownClass(cls):
        if cls.browser is not None:
            cls.browser.quit()

    def setUp(self):
        self.clock = FakeClock()
        self.options = {"clock": self.clock}
        super().setUp()
        self.assertIsNotNone(self.browser, "DUMMYLLM_REQUIRE_BROWSER is set, but no browser")

    def test_the_try_it_form_creates_a_job(self):
        self.browser.open(self.server.url + "/docs")
        self.browser.wait_for("return document.querySelector('#op-post-v1-jobs .send')")
        self.browser.click("#op-post-v1-jobs .send")
        answer = self.browser.wait_for(
            "const a = document.querySelector('#op-post-v1-jobs .answer');"
            "return a.dataset.status && a.textContent;")
        self.assertTrue(answer.startswith("201 "), answer)
        job_id = json.loads(answer.split("\n", 1)[1])["id"]
        self.assertEqual(self.call("GET", "/v1/jobs/" + job_id)[0], 200)
        entry = self.call("GET", "/v1/requests?path=/v1/jobs")[1]["requests"][-1]
        self.assertIn("HeadlessChrome", entry["headers"]["User-Agent"])

    def test_the_docs_are_grouped_by_surface_under_contents(self):
        self.browser.open(self.server.url + "/docs")
        self.browser.wait_for("return document.querySelectorAll('section.surface').length")
        seen = self.browser.script("""
            const sections = [...document.querySelectorAll('section.surface')];
            return {links: [...document.querySelectorAll('#contents a')].map((a) => a.textContent),
                    headings: sections.map((s) => s.querySelector('h2').textContent),
                    operations: sections.map((s) => s.querySelectorAll('.op').length),
                    contents_top: document.getElementById('contents').getBoundingClientRect().top,
                    viewport: innerHeight};""")
        titles = [surface.title for surface in self.server.registry.surfaces if surface.routes]
        self.assertEqual(seen["links"], titles)
        self.assertEqual(seen["headings"], titles)
        self.assertEqual(sum(seen["operations"]), sum(
            len(ops) for ops in self.server.registry.document["paths"].values()))
        self.assertLess(seen["contents_top"], seen["viewport"])  # on the first screen
        self.browser.click("#contents a[href='#surface-6']")  # Anthropic's section comes up
        top = self.browser.wait_for("const top = document.getElementById('surface-6')"
                                    ".getBoundingClientRect().top; return Math.abs(top) < 5 && "
                                    "String(top)")
        self.assertIsNotNone(top)

    def test_the_dashboard_shows_a_job_finish(self):
        self.browser.open(self.server.url + "/")
        job_id = self.create(op="dash.op", simulate={"latency_ms": 900})
        state = f"var c = document.querySelector('#job-{job_id} .state'); return c && c.textContent"
        self.assertEqual(self.browser.wait_for(state), "running")  # it refreshes every 500 ms
        self.clock.advance(900)
        self.browser.script("refresh()")  # and at once, when asked
        self.assertEqual(self.browser.wait_for(state + " === 'ok' && 'ok'"), "ok")
        counts = self.browser.script("return document.getElementById('counts').textContent")
        self.assertIn("ok: 1", counts)
        # The dashboard's own listing of the jobs is not the client's: not journaled.
        self.assertEqual([entry["path"] for entry in self.journal()], ["/", "/v1/jobs"])

    def test_the_dashboard_shows_model_calls_by_surface_and_outcome(self):
        chat = {"model": "m", "messages": HELLO, "simulate": {"latency_ms": 0}}
        self.call("POST", "/v1/chat/completions", chat, headers={"X-Trace-Id": "agent-1"})
        self.call("POST", "/v1/chat/completions", dict(chat, simulate={"mode": "rate_limit"}),
                  headers={"X-Trace-Id": "agent-1", "X-Test-Id": "t1"})
        self.call("POST", "/v1/messages", {"model": "m", "max_tokens": 5, "messages": HELLO[1:],
                                          "simulate": {"latency_ms": 0}})
        self.call("POST", "/v1beta/models/g:generateContent", {**ASK_GEMINI, "simulate": {
            "mode": "fail", "latency_ms": 0}})
        self.browser.open(self.server.url + "/")
        self.browser.wait_for("return document.querySelectorAll('#calls tbody tr').length === 3")
        seen = self.browser.script("""
            const rows = [...document.querySelectorAll('#calls tbody tr')];
            const latest = document.querySelector('#latest tbody tr');
            return {counts: rows.map((row) => [...row.cells].map((cell) => cell.textContent)),
                    visible: document.getElementById('calls').getBoundingClientRect().height > 40,
                    link: latest.querySelector('a').getAttribute('href'),
                    journal: document.querySelector('a[href="/journal"]') !== null};""")
        self.assertEqual(seen["counts"], [["openai.chat", "1", "1", "0", "0", "0"],
                                          ["anthropic", "1", "0", "0", "0", "0"],
                                          ["gemini", "0", "0", "0", "1", "0"]])
        self.assertTrue(seen["visible"])
        self.assertTrue(seen["journal"])
        self.assertEqual(seen["link"], "/journal?")  # the newest, gemini's, has no key
        link = self.browser.script("return [...document.querySelectorAll('#latest a')].map("
                                   "(a) => a.getAttribute('href'))")
        self.assertIn("/journal?key=agent-1&test_id=t1", link)

    def test_the_timeline_draws_a_retry_loop_and_flags_the_early_retry(self):
        limited = {"mode": "rate_limit", "retry_after_ms": 300}
        body = {"model": "m", "messages": HELLO, "simulate": {"script": [limited, limited, "ok"]}}
        for wait_ms in (0, 350, None):  # the first retry at once, 300 ms too early
            status = self.call("POST", "/v1/chat/completions", body,
                               headers={"X-Trace-Id": "loop"})[0]
            if wait_ms is not None:
                self.clock.advance(wait_ms)
        self.assertEqual(status, 200)
        self.browser.open(self.server.url + "/journal")
        row = "document.querySelector('tr.key-row[data-key=\"loop\"]')"
        self.browser.wait_for(f"return {row}")
        drawn = self.browser.script(f"""
            const row = {row};
            return {{marks: [...row.querySelectorAll('circle.mark')].map((m) => m.getAttribute('class')),
                     spans: row.querySelectorAll('rect.retry-after').length,
                     gaps: [...row.querySelectorAll('text.gap')].map((t) => t.textContent),
                     findings: [...row.querySelectorAll('li.finding')].map((f) => f.dataset.code),
                     hover: row.querySelector('circle.mark title').textContent}};""")
        self.assertEqual(drawn["marks"], ["mark s4xx", "mark s4xx flagged", "mark s2xx"])
        self.assertEqual(drawn["spans"], 2)
        self.assertEqual(len(drawn["gaps"]), 2)
        self.assertEqual(drawn["findings"], ["RETRY_AFTER_IGNORED"])
        self.assertEqual(json.loads(drawn["hover"])["status"], 429)
        # The filter by key keeps only that key's row.
        self.call("POST", "/v1/jobs", {"op": "x", "trace_id": "other"})
        self.browser.wait_for("return [...document.querySelectorAll('tr.key-row')].map("
                              "(row) => row.dataset.key).join() === 'loop,other'")
        self.browser.script("const k = document.getElementById('key'); k.value = 'other';"
                            "k.dispatchEvent(new Event('input'));")
        self.browser.wait_for("const rows = document.querySelectorAll('tr.key-row');"
                              "return rows.length === 1 && rows[0].dataset.key === 'other'")


    # What a person sees: each box on the screen, as the browser laid it out.
    SEEN = """
        const boxes = (selector, root = document) => [...root.querySelectorAll(selector)].map(
            (element) => element.getBoundingClientRect());
        const overlap = (found) => found.some((a, i) => found.slice(i + 1).some(
            (b) => a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom));
        const axis = document.querySelector('#axis svg').getBoundingClientRect();
        const marks = (key) => boxes('circle.mark',
            document.querySelector(`tr.key-row[data-key="${key}"]`));
        return {
            legend: [...document.querySelectorAll('.legend b')].map((swatch) => [
                swatch.getBoundingClientRect().width > 0,
                getComputedStyle(swatch).backgroundColor !== 'rgba(0, 0, 0, 0)']),
            ticks_inside: boxes('text.tick').every(
                (tick) => tick.left >= axis.left && tick.right <= axis.right),
            ticks: boxes('text.tick').length, ticks_overlap: overlap(boxes('text.tick')),
            gaps_overlap: [...document.querySelectorAll('tr.key-row')].some(
                (row) => overlap(boxes('text.gap', row))),
            burst_width: (Math.max(...marks('burst').map((m) => m.right)) -
                          Math.min(...marks('burst').map((m) => m.left))) / axis.width,
            key: document.getElementById('key').value};"""

    def test_the_timeline_as_a_person_sees_it(self):
        script = {"latency_ms": 0, "retry_after_ms": 1, "script": ["rate_limit"] * 5 + ["ok"]}
        for _ in range(6):  # five retries a millisecond apart, then a request 0.5 s on
            self.call("POST", "/v1/chat/completions", {"model": "m", "messages": HELLO,
                      "simulate": script}, headers={"X-Trace-Id": "burst"})
            self.clock.advance(1)
        self.clock.advance(500)
        self.call("POST", "/v1/jobs", {"op": "x", "trace_id": "late"})
        self.browser.open(self.server.url + "/journal")
        self.browser.wait_for("return document.querySelectorAll('tr.key-row').length === 2")
        seen = self.browser.script(self.SEEN)
        self.assertEqual(seen["legend"], [[True, True]] * 6)  # every swatch shows its colour
        self.assertTrue(seen["ticks_inside"])
        self.assertGreaterEqual(seen["ticks"], 3)
        self.assertFalse(seen["ticks_overlap"])
        self.assertFalse(seen["gaps_overlap"])
        self.assertLess(seen["burst_width"], 0.2)  # half a second of axis: the burst is a blob
        self.browser.open(self.server.url + "/journal?key=burst")  # the filter in the URL
        self.browser.wait_for("return document.querySelectorAll('tr.key-row').length === 1")
        seen = self.browser.script(self.SEEN)
        self.assertGreater(seen["burst_width"], 0.5)  # the axis refits to what is shown
        self.assertFalse(seen["gaps_overlap"])
        self.assertEqual(seen["key"], "burst")
        self.browser.script("const p = document.getElementById('path');"
                            "p.value = '/v1/chat/completions'; p.dispatchEvent(new Event('input'));")
        self.assertEqual(self.browser.script("return location.search"),
                         "?key=burst&path=%2Fv1%2Fchat%2Fcompletions")

    def test_the_timeline_of_one_test(self):
        for test in ("a", "b"):
            self.call("POST", "/v1/jobs", {"op": "x", "trace_id": "key-" + test},
                      headers={"X-Test-Id": test})
        self.browser.open(self.server.url + "/journal?test_id=b")
        self.browser.wait_for("const rows = document.querySelectorAll('tr.key-row');"
                              "return rows.length === 1 && rows[0].dataset.key === 'key-b'")


# --- Command line -----------------------------------------------------------------

class CommandLineTest(unittest.TestCase):
    """main(argv, environ) in this process where it exits before serving;
    a few real runs of the script where the process is the point."""

    def run_main(self, *args, env=None):
        """(exit status, stdout, stderr) of main() with these arguments."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = dummyllm.main(list(args), {**(env or {})})
            except SystemExit as exit:
                status = exit.code
        return types.SimpleNamespace(returncode=status, stdout=out.getvalue(),
                                     stderr=err.getvalue())

    def run_cli(self, *args, env=None):
        return subprocess.run([sys.executable, compiled_script(), *args], capture_output=True,
                              text=True,
                              timeout=20, env={**os.environ, **(env or {})})

    def start_cli(self, *args, env=None):
        """Run `dummyllm.py --port 0 ARGS`; (process, port) once it listens."""
        proc = subprocess.Popen([sys.executable, compiled_script(), "--port", "0", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **(env or {})})
        self.addCleanup(proc.stderr.close)
        self.addCleanup(proc.stdout.close)
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
        line = proc.stdout.readline()
        match = re.fullmatch(r"dummyLLM listening on http://127\.0\.0\.1:(\d+)\n", line)
        self.assertTrue(match, line + proc.stderr.read() if not line else line)
        return proc, int(match.group(1))

    def test_health_stays_quick_while_rules_search_long_messages(self):
        # A rule's regular expression holds every thread of its process while
        # it searches: the patterns let in, at their worst, leave /health quick.
        rules = [{"match": {"text_matches": pattern}, "simulate": {"ok_text": "matched"}}
                 for pattern in ["(a|b)*c", "(ab?)*c", r"\s*(?:a*)?c", r"\w*? +(?:\s{2}){2}c"]]
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
            json.dump(rules, file)
        self.addCleanup(os.unlink, file.name)
        proc, port = self.start_cli("--rules", file.name, "--latency-ms", "0", "--quiet")
        statuses, done = [], threading.Event()

        def send_long_messages():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            while not done.is_set():
                for text in ("ab" * 32768, " " * 65536):
                    conn.request("POST", "/v1/chat/completions", json.dumps({
                        "model": "m", "messages": [{"role": "user", "content": text}]}))
                    response = conn.getresponse()
                    response.read()
                    statuses.append(response.status)
            conn.close()
        sender = threading.Thread(target=send_long_messages)
        sender.start()
        self.addCleanup(sender.join)
        self.addCleanup(done.set)
        health = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.addCleanup(health.close)
        waits = []
        while len(statuses) < 6:
            started = time.perf_counter()
            health.request("GET", "/health")
            self.assertEqual(health.getresponse().read()[:1], b"{")
            waits.append(time.perf_counter() - started)
        self.assertEqual(set(statuses), {200})
        self.assertLess(max(waits), 0.1)

    def test_bad_values_exit_2_with_one_line(self):
        for args, env, named in [(["--mode", "nope"], {}, "--mode"),
                                 (["--latency-ms", "-1"], {}, "--latency-ms"),
                                 (["--weights", "ok=x"], {}, "--weights"),
                                 (["--chaos", "1.5"], {}, "--chaos"),
                                 (["--chaos-faults", "reset,boom"], {}, "--chaos-faults"),
                                 (["--replica", "3/3"], {}, "--replica"),
                                 ([], {"DUMMYLLM_LATENCY_MS": "abc"}, "DUMMYLLM_LATENCY_MS"),
                                 (["--no-such-flag"], {}, "--no-such-flag")]:
            with self.subTest(args=args, env=env):
                result = self.run_main(*args, env=env)
                self.assertEqual(result.returncode, 2)
                self.assertEqual(result.stdout, "")
                self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
                self.assertIn(named, result.stderr)

    # A good value other than the default for every option but --host and --port.
    GOOD = {"mode": "fail", "latency_ms": "7", "seed": "42", "weights": "ok=1,fail=2",
            "timeout_ms": "9000", "slow_factor": "2.5", "max_jobs": "50",
            "max_body_bytes": "5000", "api_key": "sk-x", "admin_key": "adm-x",
            "time_scale": "0.5",
            "log_format": "json", "cors": "*", "allow_callback_hosts": "a.test,b.test",
            "chaos": "0", "chaos_faults": "reset,status:503,status:429,dribble",
            "journal_size": "10", "max_connections": "100", "rpm": "60", "tpm": "10000",
            "slots": "4", "queue": "8", "load_factor": "2", "served_models": "a,b",
            "replica": "1/2", "embeddings": "similar", "record": "openai=http://127.0.0.1:9",
            "record_max_bytes": "4096", "redact": "sk-[a-z]+", "strict_rules": True,
            "lenient": True, "quiet": True}

    def test_a_list_flag_may_be_repeated(self):
        config = dummyllm._config_from_command_line(
            ["--served-model", "llama", "--served-model", "qwen,mistral"], {})
        self.assertEqual(config.served_models, ("llama", "qwen", "mistral"))

    def test_every_option_by_flag_and_by_variable(self):
        options = {option.name: option for option in dummyllm._OPTIONS}
        rules = self.rules_file([{"match": {"model": "x"}, "simulate": {"mode": "fail"}}])
        tools = self.rules_file([{"name": "get_weather", "content": "Sunny"}])
        recordings = os.path.join(tempfile.mkdtemp(), "recordings.json")
        self.addCleanup(shutil.rmtree, os.path.dirname(recordings))
        good = dict(self.GOOD, rules=rules, mcp_tools=tools, record_to=recordings)
        self.assertEqual(set(good) | {"host", "port"}, set(options))
        flags = []
        for name, value in good.items():
            flags += [options[name].flag] if value is True else [options[name].flag, value]
        env = {options[name].env: value for name, value in good.items() if value is not True}
        for args, environ in [(flags, {}), (["--quiet"], env)]:
            with self.subTest(by="flags" if args is flags else "variables"):
                proc, port = self.start_cli(*args, env=environ)
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                health = json.loads(conn.getresponse().read())
                conn.close()
                proc.terminate()
                self.assertEqual(proc.wait(5), 0)
                self.assertEqual((health["defaults"]["mode"], health["defaults"]["slow_factor"],
                                  health["time_scale"]), ("fail", 2.5, 0.5))

    def rules_file(self, rules):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
            file.write(rules if isinstance(rules, str) else json.dumps(rules))
        self.addCleanup(os.unlink, file.name)
        return file.name

    def test_a_bad_rules_file_exits_2_naming_the_rule_and_field(self):
        for rules, named in [
                ([{"simulate": {"mode": "ok"}}, {"simulate": {"mode": "nope"}}],
                 "rules[1].simulate.mode"),
                ([{"match": {"text_matches": "("}, "simulate": {}}],
                 "rules[0].match.text_matches"),
                ([{"match": {"text_matches": "(a+)+$"}, "simulate": {}}],
                 "rules[0].match.text_matches is a regular expression whose search"),
                ([{"match": {"colour": "red"}, "simulate": {}}], "rules[0].match.colour"),
                ([{"match": {}}], "rules[0].simulate is required"),
                ('[{"match": ', "not valid JSON"), ({"match": {}}, "must be a list")]:
            with self.subTest(named=named):
                result = self.run_main("--rules", self.rules_file(rules))
                self.assertEqual(result.returncode, 2)
                self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
                self.assertIn(named, result.stderr)
        result = self.run_main("--rules", "/nonexistent/rules.json")
        self.assertEqual((result.returncode, len(result.stderr.splitlines())), (2, 1))
        self.assertIn("cannot be read", result.stderr)

    def test_version(self):
        result = self.run_main("--version")
        self.assertEqual((result.returncode, result.stdout.strip()),
                         (0, f"dummyLLM {dummyllm.__version__}"))

    def test_port_in_use_is_one_line_not_a_traceback(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            result = self.run_cli("--port", str(taken.getsockname()[1]))
        self.assertEqual(result.returncode, 1)
        self.assertNotIn("Traceback", result.stderr)
        self.assertIn("cannot listen", result.stderr)

    def stop_quickly(self, sig):
        proc, port = self.start_cli("--latency-ms", "60000")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        for simulate in ({"mode": "hang"}, {"mode": "ok"}, {"mode": "timeout"}):
            conn.request("POST", "/v1/jobs", json.dumps({"op": "x", "simulate": simulate}))
            self.assertEqual(conn.getresponse().read()[:7], b'{"id":"')
        idle = socket.create_connection(("127.0.0.1", port))  # connected, never speaks
        self.addCleanup(idle.close)
        with socket.create_connection(("127.0.0.1", port)) as rude:  # half a request, then RST
            rude.sendall(b"POST /v1/jobs HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
            rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        hung = socket.create_connection(("127.0.0.1", port))  # a chat call that hangs
        self.addCleanup(hung.close)
        hung.sendall(http_bytes("POST", "/v1/chat/completions",
                                {"model": "m", "messages": HELLO, "simulate": {"mode": "hang"}}))
        conn.request("GET", "/health")
        self.assertEqual(conn.getresponse().status, 200)
        started = time.monotonic()
        proc.send_signal(sig)
        returncode = proc.wait(5)
        elapsed = time.monotonic() - started
        conn.close()
        stderr = proc.stderr.read()
        self.assertEqual(returncode, 0)
        self.assertLess(elapsed, 1.0)
        self.assertNotIn("Traceback", stderr)
        self.assertIn("POST /v1/jobs 201", stderr)  # the access log

    def test_sigterm_exits_0_within_a_second(self):
        self.stop_quickly(signal.SIGTERM)

    def test_sigint_exits_0_within_a_second(self):
        self.stop_quickly(signal.SIGINT)

    def test_a_sigterm_the_kernel_gives_another_thread_stops_it_too(self):
        """A process's signal goes to any of its threads; Python runs the
        handler in the main thread, asleep in select() (under load, now and
        then, a server that never exited)."""
        run = ("import signal, sys, threading, time, dummyllm\n"
               "def elsewhere():\n"
               "    time.sleep(0.2)\n"
               "    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)\n"
               "threading.Thread(target=elsewhere, daemon=True).start()\n"
               "sys.exit(dummyllm.main(sys.argv[1:]))\n")
        proc = subprocess.Popen([sys.executable, "-c", run, "--port", "0", "--quiet"],
                                cwd=compiled(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        self.addCleanup(proc.stdout.close)
        self.addCleanup(proc.stderr.close)
        self.assertIn("listening on", proc.stdout.readline())
        self.assertEqual(proc.wait(5), 0)

    def test_environment_sets_defaults_and_flags_win(self):
        proc, port = self.start_cli("--latency-ms", "7", "--quiet",
                                    env={"DUMMYLLM_MODE": "fail", "DUMMYLLM_LATENCY_MS": "5"})
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        defaults = json.loads(conn.getresponse().read())["defaults"]
        conn.close()
        proc.terminate()
        self.assertEqual(proc.wait(5), 0)
        self.assertEqual((defaults["mode"], defaults["latency_ms"]), ("fail", 7))
        self.assertEqual(proc.stderr.read(), "")  # --quiet


class ReadmeTest(AppTestCase):
    """What the README quotes is what the code has."""

    def section(self, heading):
        with open(README, encoding="utf-8") as f:
            text = f.read()
        start = text.index("\n" + heading + "\n")
        end = text.find("\n## ", start + 1)
        return text[start:end if end != -1 else None]

    def test_the_contents_list_every_section_and_every_link_has_its_heading(self):
        with open(README, encoding="utf-8") as f:
            text = re.sub(r"^```.*?^```$", "", f.read(), flags=re.M | re.S)
        headings = re.findall(r"^(#{2,4}) (.+)$", text, re.M)
        slugs = {re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
                 for _, title in headings}
        for anchor in re.findall(r"\]\(#([^)]+)\)", text):
            with self.subTest(anchor=anchor):
                self.assertIn(anchor, slugs)
        contents = set(re.findall(r"\]\(#([^)]+)\)", self.section("## Contents")))
        for level, title in headings:
            slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
            if level == "##" and title not in ("Contents", "License"):
                self.assertIn(slug, contents)

    def test_the_dockerfile_runs_as_written(self):
        # No container here: its commands, with the file where COPY put it.
        with open(README, encoding="utf-8") as f:
            dockerfile = re.search(r"^```dockerfile\n(.*?)^```$", f.read(), re.M | re.S).group(1)
        self.assertIn("FROM python:3-slim\nCOPY dummyllm.py /dummyllm.py\n", dockerfile)
        command = json.loads(re.search(r"^CMD (.+)$", dockerfile, re.M).group(1))
        check = json.loads(re.search(r"^HEALTHCHECK .*?CMD (.+)$", dockerfile, re.M).group(1))
        port = str(free_port())
        command = [sys.executable if word == "python3" else SCRIPT if word == "/dummyllm.py"
                   else port if word == "8787" else word for word in command]
        server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        self.addCleanup(lambda: (server.kill(), server.wait(), server.stdout.close(),
                                 server.stderr.close()))
        self.assertIn(f":{port}", server.stdout.readline())
        check = [sys.executable if word == "python3" else word.replace("8787", port)
                 for word in check]
        self.assertEqual(subprocess.run(check, timeout=10).returncode, 0)

    def test_the_options_table_is_the_options(self):
        rows = re.findall(r"^\| `(--[a-z-]+)` \| *`?([A-Z_]*)`? *\| *`?([^|`]*?)`? *\| ",
                          self.section("## Options"), re.M)
        self.assertEqual(rows, [(option.flag, option.env or "", dummyllm._option_text(
            option.default)) for option in dummyllm._OPTIONS])

    def test_the_error_example_is_a_real_answer(self):
        text = self.section("### Errors")
        request = json.loads(re.search(r"curl -s localhost:8787/v1/jobs -d '(.*)'", text)
                             .group(1))
        example = json.loads(re.search(r"```json\n(.*?)\n```", text, re.S).group(1))
        status, body, _ = self.call("POST", "/v1/jobs", request)
        self.assertEqual((status, body), (422, example))

    def test_the_match_keys_table_is_the_match_keys(self):
        text = self.section("## Reply rules")
        rows = re.findall(r"^\| `([a-z_]+)` \| (.*) \|$", text, re.M)
        self.assertEqual([key for key, _ in rows], list(dummyllm._MATCH_KEYS))
        surfaces = re.findall(r"`([a-z.]+)`", dict(rows)["surface"])
        self.assertEqual(surfaces, dummyllm._surface_names())

    def test_the_rules_file_example_loads(self):
        example = re.search(r"```json\n(.*?)\n```", self.section("## Reply rules"), re.S)
        rules = dummyllm.make_config(rules=json.loads(example.group(1))).rules
        self.assertEqual(len(rules), 3)

    def test_the_request_view_example_is_the_created_jobs(self):
        created = self.section("### `POST /v1/jobs` — create a job")
        body = json.loads(re.search(r"-d '(.*?)'", created, re.S).group(1))
        example = json.loads(re.search(r"```json\n(.*?)\n```", self.section(
            "### `GET /v1/jobs/{id}/request` — what the server received and decided"),
            re.S).group(1))
        job_id = self.create(**body)
        self.clock.advance(0.2)
        answer = self.call("GET", f"/v1/jobs/{job_id}/request")[1]
        self.assertEqual(dict(answer, id=example["id"], created_at_ms=example["created_at_ms"]),
                         example)

    def test_the_reset_example_has_every_key(self):
        example = json.loads(re.search(r"`(\{\"removed\".*?\}\})`", self.section(
            "### Starting clean: `POST /v1/reset`"), re.S).group(1))
        self.assertEqual(set(self.call("POST", "/v1/reset")[1]["removed"]),
                         set(example["removed"]))

    def test_the_health_example_has_every_key(self):
        example = json.loads(re.search(r"```json\n(.*?)\n```", self.section("### `GET /health`"),
                                       re.S).group(1))
        body = self.call("GET", "/health")[1]
        self.assertEqual(set(example), set(body))
        self.assertEqual(set(example["jobs"]), set(body["jobs"]))


def readme_blocks():
    """(line, language, code) of each bash, python and js block of the README."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    for block in re.finditer(r"^```(bash|python|js)\n(.*?)^```$", text, re.M | re.S):
        yield text.count("\n", 0, block.start()) + 1, block.group(1), block.group(2)


class Printed:
    """print() for an example: what each line of its code printed."""

    def __init__(self, name):
        self.name, self.lines = name, collections.defaultdict(str)

    def __call__(self, *values, sep=" ", end="\n", file=None, flush=False):
        line = next(frame.f_lineno for frame in iter_frames(sys._getframe(1))
                    if frame.f_code.co_filename == self.name)
        self.lines[line] += sep.join(map(str, values)) + end


def iter_frames(frame):
    while frame is not None:
        yield frame
        frame = frame.f_back


class ReadmeExamplesTest(unittest.TestCase):
    """Every bash and python block of the README runs as written, against a
    server of its own on a free port (a block that starts one gets the
    port), and prints what its `# → ` comments show; a block whose first
    line says `# fragment:` is not run, and one whose package (or curl) is
    missing is skipped."""

    def test_every_block_runs_as_written(self):
        counts, blocks = collections.Counter(), []
        for line, language, code in readme_blocks():
            if code.startswith("# fragment: "):
                counts["fragments"] += 1
            elif not self.runnable(language, code):
                counts["skipped"] += 1
            else:
                blocks.append((line, language, code))
        # The bash blocks run side by side, each on a port of its own: most of
        # their time is Pythons starting.  One after another they took 2.2 s of
        # this test's 2.6; side by side the test takes 1.2 to 1.4 s.
        running = {line: self.start_bash(code) for line, language, code in blocks
                   if language == "bash"}
        for line, language, code in blocks:
            with self.subTest(line=line, language=language):
                if language == "bash":
                    self.check_bash(line, code, running[line])
                else:
                    {"python": self.run_python, "js": self.run_js}[language](line, code)
                counts["run"] += 1
        print(f"\nREADME blocks: {dict(counts)}", file=sys.stderr)
        if os.environ.get("DUMMYLLM_REQUIRE_OPENAI"):  # CI: every package is there
            self.assertEqual(counts["skipped"], 0)

    def runnable(self, language, code):
        if language == "js":  # the packages it imports, where npm installed them
            return NODE_DIR is not None and all(
                os.path.isdir(os.path.join(NODE_DIR, "node_modules", package)) for package in
                re.findall(r'^import .* from "([^"]+)";$', code, re.M))
        if language == "bash":  # and the packages its python3 runs
            return shutil.which("curl") is not None and all(
                importlib.util.find_spec(module) for module in
                re.findall(r"^(?:import|python3 -m) (\w+)", code, re.M))
        modules = {alias.name.partition(".")[0] for node in ast.walk(ast.parse(code))
                   for alias in getattr(node, "names", ()) if isinstance(node, ast.Import)}
        modules |= {node.module.partition(".")[0] for node in ast.walk(ast.parse(code))
                    if isinstance(node, ast.ImportFrom) and node.module}
        return all(importlib.util.find_spec(module) for module in modules)

    def server_for(self, code):
        """The address the block is to use: a server's of its own, or a free
        port for the one it starts."""
        if "dummyllm.py" in code:
            return f"127.0.0.1:{free_port()}"
        server = dummyllm.DummyLLMServer(port=0, quiet=True, time_scale=0.1).start()
        self.addCleanup(server.stop)
        return server.url.partition("//")[2]

    def with_address(self, code):
        address = self.server_for(code)
        return re.sub(r"(localhost|127\.0\.0\.1):8787|--port 8787",
                      lambda found: ("--port " + address.partition(":")[2]
                                     if found.group(0).startswith("--") else address), code)

    def start_bash(self, code):
        path = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
        run = subprocess.Popen(["bash", "-e", "-c", self.with_address(code)], cwd=HERE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True,
                               env=dict(os.environ, PATH=path, PYTHONFAULTHANDLER="1"))
        self.addCleanup(self.end_bash, run)
        return run

    @staticmethod
    def end_bash(run):
        """A block never checked (the test stopped first) is killed."""
        if run.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGKILL)
            run.communicate()

    def check_bash(self, line, code, run):
        try:
            out, err = run.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # its Pythons print their threads' stacks on SIGABRT
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGABRT)
                time.sleep(1)
                os.killpg(run.pid, signal.SIGKILL)
            out, err = run.communicate()
            self.fail(f"README line {line}: no end in 60 s; it wrote {out!r} and {err!r}")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGKILL)
        self.assertEqual(run.returncode, 0, f"README line {line}: {err}")
        shown = re.findall(r"^# → (.*)$", code, re.M)
        if shown:
            self.assertEqual(out.strip().splitlines(), shown, f"README line {line}")

    def run_js(self, line, code):
        """Run as an ES module beside the packages (Node resolves them from
        the script's directory), and print what its `// → ` comments show."""
        script = os.path.join(NODE_DIR, f"readme-{os.getpid()}-{line}.mjs")
        with open(script, "w", encoding="utf-8") as file:
            file.write(self.with_address(code))
        self.addCleanup(os.unlink, script)
        run = subprocess.run(["node", script], cwd=NODE_DIR, capture_output=True, text=True,
                             timeout=60)
        self.assertEqual(run.returncode, 0, f"README line {line}: {run.stderr}")
        self.assertEqual(run.stdout.strip().splitlines(),
                         re.findall(r"// → (.*)$", code, re.M), f"README line {line}")

    def run_python(self, line, code):
        name = f"README line {line}"
        printed = Printed(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)  # the example's clients, unclosed
            warnings.simplefilter("ignore", DeprecationWarning)  # cohere 7's, of pydantic 2
            exec(compile(self.with_address(code), name, "exec"),
                 {"__name__": "readme", "print": printed})
            gc.collect()
        for number, shown in enumerate(code.splitlines(), 1):
            expected = re.search(r"# → (.*)$", shown)
            if expected:
                self.assertEqual(printed.lines[number].strip(), expected.group(1).strip(),
                                 f"README line {line + number}")


class ModuleMapTest(unittest.TestCase):
    """The module docstring's map is the file: its sections are the banners,
    in order, and every name its life of a request gives exists."""

    def setUp(self):
        with open(SCRIPT, encoding="utf-8") as f:
            self.source = f.read()
        doc = dummyllm.__doc__
        self.map = doc[doc.index("The sections of this file"):doc.index("The life of a request")]
        self.life = doc[doc.index("The life of a request"):]

    def test_the_sections_are_the_banners_in_order(self):
        mapped = [line[4:].split("  ")[0] for line in self.map.splitlines()
                  if line.startswith("    ") and line[4] != " "]
        banners = re.findall(r"^# --- (.+?) -+$", self.source, re.M)
        self.assertEqual(mapped, [banner for banner in banners if ":" not in banner])
        section = None
        for banner in banners:  # a sub-banner belongs to the section above it
            if ":" in banner:
                self.assertEqual(banner.split(":")[0], section, banner)
            else:
                section = banner

    def test_the_life_of_a_request_names_what_is_there(self):
        classes = [value for value in vars(dummyllm).values() if isinstance(value, type)]
        for name in re.findall(r"\b(_?[A-Za-z]\w*(?:\.\w+)?)\(\)|\b(_[A-Za-z]\w*(?:\.\w+)?)",
                               self.life):
            name = name[0] or name[1]
            with self.subTest(name=name):
                owner, _, attribute = name.rpartition(".")
                if owner:
                    self.assertTrue(hasattr(getattr(dummyllm, owner), attribute))
                else:
                    self.assertTrue(hasattr(dummyllm, name) or any(
                        hasattr(cls, name) for cls in classes))


class StandardLibraryOnlyTest(unittest.TestCase):

    def test_dummyllm_imports_only_the_standard_library(self):
        """...and pytest, inside the functions pytest calls as a plugin."""
        tree = script_tree()
        names, pytest_in = set(), []
        for top in tree.body:
            for node in ast.walk(top):
                if isinstance(node, ast.Import):
                    imported = {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom):
                    self.assertEqual(node.level, 0)
                    imported = {node.module.split(".")[0]}
                else:
                    continue
                if "pytest" in imported:
                    pytest_in.append(top.name)
                names |= imported - {"pytest"}
        self.assertEqual(pytest_in, ["pytest_configure", "_pytest_fixtures"])
        stdlib = {os.path.realpath(sysconfig.get_paths()[key]) for key in ("stdlib", "platstdlib")}
        for name in sorted(names):
            with self.subTest(module=name):
                origin = importlib.util.find_spec(name).origin
                self.assertTrue(origin in ("built-in", "frozen") or any(
                    os.path.realpath(origin).startswith(path) for path in stdlib), origin)
                self.assertNotIn("site-packages", origin)


if __name__ == "__main__":
    unittest.main()
