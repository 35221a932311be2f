#!/usr/bin/env python3
"""dummyLLM: a deterministic HTTP simulator of an LLM backend.

Point a task runner, agent system or CI pipeline at it instead of a real
model to test its timeouts, retries, cancellation and polling.  It simulates
execution behaviour (state transitions, latency, failures, hangs,
cancellation), not language: a job API (/v1/jobs), an OpenAI-compatible chat
endpoint (/v1/chat/completions, streaming included), and the faults that
retry logic must survive (scripted attempts, transport faults, idempotency
keys, a request journal).

Run it::

    python3 dummyllm.py --port 8787

Embed it in a test suite::

    with dummyllm.start_server(latency_ms=20, seed=1337) as server:
        ...  # talk to server.url

One file, Python 3.9+ standard library only.  MIT licensed.
"""

import argparse
import bisect
import collections
import email.utils
import functools
import hashlib
import heapq
import hmac
import http.client
import ipaddress
import itertools
import json
import math
import operator
import os
import queue
import random
import re
import secrets
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__version__ = "1.0.0"
__all__ = ["DummyLLMServer", "start_server", "main"]


# --- Configuration and validation ---------------------------------------------

ACTIVE_STATES = ("queued", "running")
TERMINAL_STATES = ("ok", "fail", "timeout", "cancelled")

MAX_LATENCY_MS = 3_600_000
MAX_TIMEOUT_MS = 86_400_000
MAX_TRACE_ID_CHARS = 256

DEFAULT_RANDOM_WEIGHTS = {"ok": 70, "echo": 10, "slow": 10, "fail": 5, "hang": 3, "timeout": 2}
DEFAULT_FLAKY_WEIGHTS = {"ok": 3, "fail": 5, "hang": 2}


class ApiError(Exception):
    """An answer that is not a success: status, machine code, message, field.

    Raised anywhere below the HTTP layer and turned into JSON in one place,
    ``{"error": {"code": ..., "message": ..., "field": ...}}``.
    """

    def __init__(self, status, code, message, field=None, headers=()):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = tuple(headers)

    def to_json(self):
        error = {"code": self.code, "message": self.message}
        if self.field:
            error["field"] = self.field
        return {"error": error}

    def to_openai(self):
        """(status, body) as OpenAI's API would answer this error."""
        kind, code, status = _OPENAI_ERRORS.get(self.code, ("server_error", None, None))
        return status or self.status, {"error": {"message": self.message, "type": kind,
                                                 "param": self.field, "code": code}}


# How each error looks to an OpenAI client: (type, code, status where it differs).
_OPENAI_ERRORS = {
    "INVALID_JSON": ("invalid_request_error", None, None),
    "BAD_REQUEST": ("invalid_request_error", None, None),
    "VALIDATION_ERROR": ("invalid_request_error", None, 400),
    "NOT_FOUND": ("invalid_request_error", "not_found", None),
    "METHOD_NOT_ALLOWED": ("invalid_request_error", None, None),
    "PAYLOAD_TOO_LARGE": ("invalid_request_error", None, None),
    "UNAUTHORIZED": ("invalid_request_error", "invalid_api_key", None),
    "RATE_LIMITED": ("requests", "rate_limit_exceeded", None),
    "OVERLOADED": ("service_unavailable_error", "server_is_overloaded", None),
    "SIM_FAIL": ("server_error", None, None),
    "TIMEOUT": ("server_error", "timeout", None),
    "IDEMPOTENCY_CONFLICT": ("invalid_request_error", "idempotency_conflict", None),
}


class ValidationError(ApiError, ValueError):
    """A value that breaks a rule: 422 for a request, exit status 2 for a flag."""

    def __init__(self, field, reason):
        message = f"{field} {reason}" if field else reason
        super().__init__(422, "VALIDATION_ERROR", message, field)
        self.reason = reason


def _json_bytes(payload):
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _check_int(value, field, lo, hi):
    if not _is_int(value) or not lo <= value <= hi:
        raise ValidationError(field, f"must be an integer from {lo} to {hi}")
    return value


def _check_number(value, field, lo, hi):
    if not _is_number(value) or not lo <= value <= hi:
        raise ValidationError(field, f"must be a number from {lo} to {hi}")
    return value


def _check_seed(value, field):
    if value is not None and not _is_int(value):
        raise ValidationError(field, "must be an integer or null")
    return value


def _check_text(value, field, max_chars=None, empty=True):
    if not isinstance(value, str) or (not empty and not value):
        raise ValidationError(field, "must be a string" if empty else "must be a non-empty string")
    if max_chars is not None and len(value) > max_chars:
        raise ValidationError(field, f"must be at most {max_chars} characters")
    return value


def _check_optional(check, value, field, *args):
    return None if value is None else check(value, field, *args)


def _check_optional_text(value, field):
    return None if value is None else _check_text(value, field)


def _check_mode(value, field):
    if value not in _MODE_NAMES:
        raise ValidationError(field, "must be one of " + ", ".join(_MODE_NAMES))
    return value


def _check_weights(value, field, allowed=None):
    """Weights are {mode: non-negative number}, at least one of them positive."""
    allowed = allowed or _DRAWABLE_MODES
    if not isinstance(value, dict):
        raise ValidationError(field, "must map modes to weights, e.g. ok=3, fail=1")
    for mode, weight in value.items():
        if mode not in allowed:
            raise ValidationError(f"{field}.{mode}", f"names {mode!r}, not a mode that can be "
                                  "drawn here: " + ", ".join(allowed))
        if not _is_number(weight) or weight < 0:
            raise ValidationError(f"{field}.{mode}", f"gives {mode!r} a weight that is not "
                                  "a non-negative number")
    if not any(value.values()):
        raise ValidationError(field, "must give at least one mode a positive weight")
    return dict(value)


def _check_host(value, field):
    return _check_text(value, field, empty=False)


def _check_host_list(value, field):
    hosts = value.split(",") if isinstance(value, str) else value
    if not isinstance(hosts, (list, tuple)):
        raise ValidationError(field, "must list host names, e.g. hooks.test,10.0.0.5")
    return tuple(_check_host(host.strip().lower(), field) for host in hosts if host.strip())


def _check_stream(value, field):
    """A stream failure: exactly one of {"cut_after": N}, {"stall_after": N}, {"error_after": N}."""
    if not isinstance(value, dict) or len(value) != 1:
        raise ValidationError(field, "must be an object with one of " + ", ".join(STREAM_FAILURES)
                              + ', e.g. {"cut_after": 3}')
    (kind, count), = value.items()
    if kind not in STREAM_FAILURES:
        raise ValidationError(f"{field}.{kind}", "is not a stream failure; use "
                              + ", ".join(STREAM_FAILURES))
    _check_int(count, f"{field}.{kind}", 0, 1_000_000)
    return dict(value)


STREAM_FAILURES = ("cut_after", "stall_after", "error_after")
FAULTS = ("reset", "disconnect", "empty", "malformed", "dribble")  # and status:N


class Fault(collections.namedtuple("Fault", "kind status retry_after_ms state")):
    """A transport fault: one of FAULTS, "status" (with status and
    retry_after_ms), or "unknown_state" (a poll answered with `state`)."""

    def to_json(self):
        if self.kind == "status":
            return {"status": self.status, "retry_after_ms": self.retry_after_ms}
        if self.kind == "unknown_state":
            return {"unknown_state": self.state}
        return self.kind


def _plain(value):
    """Settings as JSON values: faults in their request form, tuples as lists."""
    if isinstance(value, Fault):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _check_fault(value, field, poll=False):
    """A fault: "reset", ..., "status:503", {"status": 503, "retry_after_ms": 1000},
    or, for polls only, {"unknown_state": "paused"}."""
    if isinstance(value, str):
        kind, _, status = value.partition(":")
        if value in FAULTS:
            return Fault(value, None, None, None)
        if kind == "status" and status.isascii() and status.isdigit():
            value = {"status": int(status)}
    if poll and isinstance(value, dict) and set(value) == {"unknown_state"}:
        state = _check_text(value["unknown_state"], f"{field}.unknown_state", 64, empty=False)
        return Fault("unknown_state", None, None, state)
    if isinstance(value, dict) and "status" in value and set(value) <= {"status",
                                                                        "retry_after_ms"}:
        status = _check_int(value["status"], f"{field}.status", 400, 599)
        retry_ms = value.get("retry_after_ms")
        if retry_ms is not None:
            _check_int(retry_ms, f"{field}.retry_after_ms", 0, MAX_TIMEOUT_MS)
        return Fault("status", status, retry_ms, None)
    raise ValidationError(field, "must be one of " + ", ".join(FAULTS) + ', "status:N", '
                          '{"status": N, "retry_after_ms": M}'
                          + (', {"unknown_state": "..."}' if poll else "") + " or null")


def _check_fault_list(value, field):
    """Faults as "reset,status:503" or a list of faults."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValidationError(field, "must list faults, e.g. reset,status:503,dribble")
    return tuple(_check_fault(item.strip() if isinstance(item, str) else item, field)
                 for item in items)


def _check_poll_faults(value, field):
    if not isinstance(value, list) or len(value) > 10_000:
        raise ValidationError(field, "must be a list of faults (null for a normal answer)")
    return tuple(None if fault is None else _check_fault(fault, f"{field}[{index}]", poll=True)
                 for index, fault in enumerate(value))


def _check_choice(value, field, choices):
    if value not in choices:
        raise ValidationError(field, "must be one of " + ", ".join(choices))
    return value


def _check_script(value, field):
    """A non-empty list of steps, each a mode name or a partial simulate object."""
    if not isinstance(value, list) or not value:
        raise ValidationError(field, "must be a non-empty list of steps: mode names or "
                              "simulate objects")
    steps = []
    for index, step in enumerate(value):
        step_field = f"{field}[{index}]"
        if isinstance(step, str):
            steps.append({"mode": _check_mode(step, step_field)})
        elif isinstance(step, dict):
            if "script" in step:
                raise ValidationError(f"{step_field}.script", "is not allowed inside a step")
            steps.append(_given_simulate(step, step_field))
        else:
            raise ValidationError(step_field, "must be a mode name or a simulate object")
    return tuple(steps)


_from_config = operator.attrgetter
_MS = {"type": "integer", "minimum": 0}
_FAULT_SCHEMA = {"oneOf": [
    {"type": "string", "enum": list(FAULTS)},
    {"type": "string", "pattern": "^status:[45][0-9][0-9]$"},
    {"type": "object", "required": ["status"], "additionalProperties": False,
     "properties": {"status": {"type": "integer", "minimum": 400, "maximum": 599},
                    "retry_after_ms": _MS}}]}

# Every key allowed inside "simulate": its check, its default (a value, or a
# function of the server's Config) and its schema for /openapi.json.  A new
# setting is one entry here.
_SIMULATE_FIELDS = {
    "mode": (_check_mode, _from_config("mode"),
             {"type": "string", "enum": ["ok", "echo", "slow", "fail", "hang", "timeout",
                                         "rate_limit", "overloaded", "flaky", "random"],
              "description": "How the request behaves (default --mode)."}),
    "latency_ms": (functools.partial(_check_int, lo=0, hi=MAX_LATENCY_MS),
                   _from_config("latency_ms"),
                   dict(_MS, maximum=MAX_LATENCY_MS, description="Time to the answer or the "
                        "job's end, after queue_ms (default --latency-ms).")),
    "queue_ms": (functools.partial(_check_int, lo=0, hi=MAX_TIMEOUT_MS), 0,
                 dict(_MS, description="How long a job stays queued before running.")),
    "seed": (_check_seed, _from_config("seed"),
             {"type": ["integer", "null"], "description": "Seed of every random choice "
              "(default --seed)."}),
    "fail_message": (_check_optional_text, None,
                     {"type": "string", "description": "Message of a simulated failure."}),
    "ok_text": (_check_optional_text, None,
                {"type": "string", "description": "Text of a successful answer."}),
    "weights": (_check_weights, None,
                {"type": "object", "additionalProperties": {"type": "number", "minimum": 0},
                 "description": "Weights of the modes flaky or random draw."}),
    "jitter_ms": (functools.partial(_check_int, lo=0, hi=MAX_LATENCY_MS), 0,
                  dict(_MS, description="The latency varies by up to this much either way, "
                       "seeded.")),
    "retry_after_ms": (functools.partial(_check_int, lo=0, hi=MAX_TIMEOUT_MS), 1000,
                       dict(_MS, description="Retry headers of rate_limit and overloaded.")),
    "status": (functools.partial(_check_int, lo=500, hi=599), None,
               {"type": "integer", "minimum": 500, "maximum": 599,
                "description": "Status of overloaded (default 503; 529 for Anthropic style)."}),
    "ttft_ms": (functools.partial(_check_int, lo=0, hi=MAX_LATENCY_MS), None,
                dict(_MS, description="Chat: time to the first token (replaces latency_ms).")),
    "token_ms": (functools.partial(_check_int, lo=0, hi=60_000), 20,
                 dict(_MS, description="Chat: gap between stream chunks.")),
    "stream": (_check_stream, None,
               {"type": "object", "minProperties": 1, "maxProperties": 1,
                "properties": {kind: _MS for kind in STREAM_FAILURES},
                "additionalProperties": False,
                "description": "Chat: a stream failure after N content chunks."}),
    "script": (_check_script, None,
               {"type": "array", "minItems": 1,
                "items": {"oneOf": [{"type": "string"}, {"$ref": "#/components/schemas/Simulate"}]},
                "description": "Steps taken by successive requests with the same trace key; "
                               "the last repeats."}),
    "fault": (_check_fault, None,
              dict(_FAULT_SCHEMA, description="A transport fault that spoils the answer.")),
    "fault_phase": (functools.partial(_check_choice, choices=("before", "after")), "before",
                    {"type": "string", "enum": ["before", "after"],
                     "description": "Job create: lose the answer before or after the job "
                                    "is created."}),
    "dribble_ms": (functools.partial(_check_int, lo=0, hi=60_000), 50,
                   dict(_MS, description="Gap between the pieces of a dribble fault.")),
    "poll_faults": (_check_poll_faults, None,
                    {"type": "array", "items": {"oneOf": [
                        {"type": "null"}, _FAULT_SCHEMA,
                        {"type": "object", "required": ["unknown_state"],
                         "properties": {"unknown_state": {"type": "string"}}}]},
                     "description": "Faults of the job's 1st, 2nd... poll."}),
}


def _simulate_defaults(config):
    return {key: default(config) if callable(default) else default
            for key, (_, default, _) in _SIMULATE_FIELDS.items()}


# A request's settings, after the server's defaults are filled in.
JobSpec = collections.namedtuple("JobSpec", ["op", "args", "timeout_ms", "trace_id",
                                             "callback_url", *_SIMULATE_FIELDS])


def _given_simulate(simulate, field):
    """The checked settings a simulate object gives (null means "not given")."""
    given = {}
    for key, value in simulate.items():
        check = _SIMULATE_FIELDS.get(key, (None,))[0]
        if check is None:
            raise ValidationError(f"{field}.{key}", "is not a simulate setting; use "
                                  + ", ".join(_SIMULATE_FIELDS))
        if value is not None:
            given[key] = check(value, f"{field}.{key}")
    return given


def _check_combination(settings, field):
    weights, mode = settings["weights"], settings["mode"]
    if weights is not None and mode in _DRAWN_MODES:
        _check_weights(weights, f"{field}.weights", _DRAWN_MODES[mode][0])


def parse_simulate(simulate, config, field="simulate"):
    """Check a "simulate" object (or None) and fill in the server's defaults."""
    if simulate is None:
        simulate = {}
    elif not isinstance(simulate, dict):
        raise ValidationError(field, "must be an object or null")
    settings = {**_simulate_defaults(config), **_given_simulate(simulate, field)}
    _check_combination(settings, field)
    for step in settings["script"] or ():
        _check_combination({**settings, **step}, field + ".script")
    return settings


def _check_callback_url(value, field, allowed_hosts):
    """An http(s) URL on loopback, or on a host --allow-callback-host names:
    a simulator must not be a way to make requests to anywhere else."""
    _check_text(value, field, 2048, empty=False)
    try:
        parts = urllib.parse.urlsplit(value)
        host, _ = (parts.hostname or "").lower(), parts.port
    except ValueError:
        host, parts = "", None
    if parts is None or parts.scheme not in ("http", "https") or not host:
        raise ValidationError(field, "must be an http:// or https:// URL")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and host not in allowed_hosts:
        raise ValidationError(field, f"names host {host!r}, which is not loopback; "
                              "allow it with --allow-callback-host")
    return value


def _check_timeout_ms(value, config):
    return config.timeout_ms if value is None else _check_int(
        value, "timeout_ms", 1, MAX_TIMEOUT_MS)


def parse_job_request(body, config):
    """Check a decoded create body and fill in the server's defaults."""
    if not isinstance(body, dict):
        raise ValidationError(None, "request body must be a JSON object")
    op = _check_text(body.get("op"), "op", empty=False)
    args = body.get("args")
    if args is None:
        args = {}
    elif not isinstance(args, dict):
        raise ValidationError("args", "must be an object")
    trace_id = body.get("trace_id")
    if trace_id is not None:
        _check_text(trace_id, "trace_id", MAX_TRACE_ID_CHARS)
    callback_url = _check_optional(_check_callback_url, body.get("callback_url"), "callback_url",
                                   config.allow_callback_hosts)
    return JobSpec(op=op, args=args, timeout_ms=_check_timeout_ms(body.get("timeout_ms"), config),
                   trace_id=trace_id, callback_url=callback_url,
                   **parse_simulate(body.get("simulate"), config))


ChatRequest = collections.namedtuple("ChatRequest", "spec model stream include_usage max_tokens")


def _check_bool(value, field):
    if not isinstance(value, bool):
        raise ValidationError(field, "must be true or false")
    return value


def parse_chat_request(body, header_simulate, header_trace_id, config):
    """Check an OpenAI chat completion request.

    The simulate settings come from the body's "simulate", else from the
    X-DummyLLM-Simulate header, else the server's defaults.  The key of seeded
    sequences is the X-Trace-Id header, else "user", else "".
    """
    if not isinstance(body, dict):
        raise ValidationError(None, "request body must be a JSON object")
    model = _check_text(body.get("model"), "model", empty=False)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValidationError("messages", "must be a non-empty array of messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValidationError(f"messages[{index}]", "must be an object with a string role")
    stream = bool(_check_optional(_check_bool, body.get("stream"), "stream"))
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ValidationError("stream_options", "must be an object or null")
    include_usage = bool(_check_optional(_check_bool, (options or {}).get("include_usage"),
                                         "stream_options.include_usage"))
    max_tokens = None
    for name in ("max_tokens", "max_completion_tokens"):
        max_tokens = _check_optional(_check_int, body.get(name), name, 1, 10_000_000) or max_tokens
    if body.get("n") not in (None, 1):
        raise ValidationError("n", "must be 1: dummyLLM answers with one choice")
    user = _check_optional(_check_text, body.get("user"), "user", MAX_TRACE_ID_CHARS)
    trace_id = _check_optional(_check_text, header_trace_id, "X-Trace-Id", MAX_TRACE_ID_CHARS)

    if body.get("simulate") is not None:
        settings = parse_simulate(body["simulate"], config)
    else:
        settings = parse_simulate(header_simulate, config, "X-DummyLLM-Simulate")
    if settings["ttft_ms"] is not None:
        settings["latency_ms"] = settings["ttft_ms"]
    if settings["stream"] is not None and not stream:
        raise ValidationError("simulate.stream", 'applies only with "stream": true')
    spec = JobSpec(op="llm.chat", args={"model": model, "messages": messages},
                   timeout_ms=_check_timeout_ms(body.get("timeout_ms"), config),
                   trace_id=trace_id or user, callback_url=None, **settings)
    return ChatRequest(spec, model, stream, include_usage, max_tokens)


# Server options: one row each for the command line, the environment and
# start_server().  `text` turns a command-line string into a value, `check`
# validates a value whatever its source.
_Option = collections.namedtuple("_Option", "name flag env default text check help")


def _int_text(text):
    return int(text) if re.fullmatch(r"-?[0-9]+", text.strip()) else text


def _float_text(text):
    try:
        return float(text)
    except ValueError:
        return text


def _seed_text(text):
    return None if text.strip().lower() in ("", "none", "null") else _int_text(text)


def _weights_text(text):
    """'ok=70,fail=30' -> {"ok": 70.0, "fail": 30.0}; anything else stays text."""
    weights = {}
    for item in text.split(","):
        mode, sep, weight = item.partition("=")
        weight = _float_text(weight.strip())
        if not sep or not isinstance(weight, float):
            return text
        weights[mode.strip()] = int(weight) if weight.is_integer() else weight
    return weights


_OPTIONS = (
    _Option("host", "--host", "DUMMYLLM_HOST", "127.0.0.1", str, _check_host,
            "address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)"),
    _Option("port", "--port", "DUMMYLLM_PORT", 8787, _int_text,
            functools.partial(_check_int, lo=0, hi=65535), "TCP port, 0 for any free one (8787)"),
    _Option("mode", "--mode", "DUMMYLLM_MODE", "ok", str, _check_mode,
            "mode for jobs that name none (ok)"),
    _Option("latency_ms", "--latency-ms", "DUMMYLLM_LATENCY_MS", 250, _int_text,
            functools.partial(_check_int, lo=0, hi=MAX_LATENCY_MS),
            "latency for jobs that give none (250)"),
    _Option("seed", "--seed", "DUMMYLLM_SEED", None, _seed_text, _check_seed,
            "seed for jobs that give none (none: random)"),
    _Option("weights", "--weights", "DUMMYLLM_RANDOM_WEIGHTS", DEFAULT_RANDOM_WEIGHTS,
            _weights_text, _check_weights,
            "weights of mode random (ok=70,echo=10,slow=10,fail=5,hang=3,timeout=2)"),
    _Option("timeout_ms", "--timeout-ms", "DUMMYLLM_TIMEOUT_MS", 8000, _int_text,
            functools.partial(_check_int, lo=1, hi=MAX_TIMEOUT_MS),
            "deadline for jobs that give no timeout_ms (8000)"),
    _Option("slow_factor", "--slow-factor", "DUMMYLLM_SLOW_FACTOR", 6, _float_text,
            functools.partial(_check_number, lo=1, hi=1000), "latency multiplier of mode slow (6)"),
    _Option("max_jobs", "--max-jobs", "DUMMYLLM_MAX_JOBS", 10000, _int_text,
            functools.partial(_check_int, lo=1, hi=10_000_000), "jobs kept in memory (10000)"),
    _Option("max_body_bytes", "--max-body-bytes", "DUMMYLLM_MAX_BODY_BYTES", 1 << 20, _int_text,
            functools.partial(_check_int, lo=1, hi=1 << 30), "largest request body (1048576)"),
    _Option("chaos", "--chaos", "DUMMYLLM_CHAOS", 0, _float_text,
            functools.partial(_check_number, lo=0, hi=1),
            "fraction of requests that meet a random --chaos-faults fault (0)"),
    _Option("chaos_faults", "--chaos-faults", "DUMMYLLM_CHAOS_FAULTS",
            "reset,status:503,status:429,dribble", str, _check_fault_list,
            "faults chaos chooses from (reset,status:503,status:429,dribble)"),
    _Option("journal_size", "--journal-size", "DUMMYLLM_JOURNAL_SIZE", 1000, _int_text,
            functools.partial(_check_int, lo=0, hi=1_000_000), "requests the journal keeps (1000)"),
    _Option("time_scale", "--time-scale", "DUMMYLLM_TIME_SCALE", 1, _float_text,
            functools.partial(_check_number, lo=0.001, hi=1000),
            "multiply every simulated duration by this (1); 0.1 runs ten times faster"),
    _Option("log_format", "--log-format", "DUMMYLLM_LOG_FORMAT", "text", str,
            functools.partial(_check_choice, choices=("text", "json")),
            "access log as text lines or JSON lines (text)"),
    _Option("cors", "--cors", "DUMMYLLM_CORS", None, str, _check_optional_text,
            "allow browser calls from this origin, or * (none)"),
    _Option("allow_callback_hosts", "--allow-callback-host", "DUMMYLLM_ALLOW_CALLBACK_HOSTS",
            (), str, _check_host_list,
            "hosts besides loopback that callback_url may name, comma-separated (none)"),
    _Option("api_key", "--api-key", "DUMMYLLM_API_KEY", None, str, _check_optional_text,
            "require 'Authorization: Bearer KEY' on the OpenAI endpoints (none)"),
    _Option("quiet", "--quiet", None, False, None, None, "no access log on stderr"),
)

Config = collections.namedtuple("Config", [option.name for option in _OPTIONS])


def make_config(**options):
    """A Config from keyword options; missing ones take their defaults.

    Raises ValidationError (a ValueError) naming the option at fault.
    """
    known = {option.name: option for option in _OPTIONS}
    unknown = set(options) - set(known)
    if unknown:
        raise TypeError("unknown option(s): " + ", ".join(sorted(unknown)))
    values = {}
    for option in _OPTIONS:
        value = options.get(option.name, option.default)
        values[option.name] = option.check(value, option.name) if option.check else bool(value)
    return Config(**values)


# --- Simulation -----------------------------------------------------------------
# Pure functions: given a job's settings and its place in a seeded sequence,
# what happens to it and when.  No I/O, no clock.

Plan = collections.namedtuple("Plan", [
    "mode",          # the mode that runs, after flaky or random made their draw
    "weights",       # the weights that draw used, or None
    "latency_ms",    # the latency that mode used (slow multiplies it)
    "running_at_ms", # when the job leaves "queued", or None if it never does
    "ends_at_ms",    # when it reaches `state`, or None: it never ends by itself
    "state", "result", "error",
])

_TIMEOUT_ERROR = {"code": "TIMEOUT", "message": "job passed its timeout_ms deadline"}
_CANCELLED_ERROR = {"code": "CANCELLED", "message": "job was cancelled by the client"}
_RESET_ERROR = {"code": "CANCELLED", "message": "job was cancelled by a server reset"}


def tokens(text):
    """The usage estimate: one token per started group of four characters."""
    return math.ceil(len(text) / 4)


def _messages(spec):
    messages = spec.args.get("messages")
    return messages if isinstance(messages, list) else []


def _content_text(content):
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return " ".join(part["text"] for part in content
                        if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def _reply_text(spec):
    if spec.ok_text is not None:
        return spec.ok_text
    if spec.op == "llm.chat":
        for message in reversed(_messages(spec)):
            if isinstance(message, dict) and message.get("role") == "user":
                return "Simulated reply to: " + _content_text(message.get("content"))[:200]
    return f"ok :: op={spec.op}"


def _echo_text(spec):
    return json.dumps(spec.args.get("messages", []), separators=(",", ":"), ensure_ascii=False)


def _result(spec, text):
    prompt = sum(tokens(message["content"]) for message in _messages(spec)
                 if isinstance(message, dict) and isinstance(message.get("content"), str))
    return {"text": text, "usage": {"prompt_tokens": prompt, "completion_tokens": tokens(text)}}


# How each mode ends: (state, latency_ms it used, ends_at_ms or None, result, error).
def _end_ok(spec, slow_factor):
    return "ok", spec.latency_ms, spec.queue_ms + spec.latency_ms, _result(spec, _reply_text(spec)), None


def _end_echo(spec, slow_factor):
    return "ok", spec.latency_ms, spec.queue_ms + spec.latency_ms, _result(spec, _echo_text(spec)), None


def _end_slow(spec, slow_factor):
    latency_ms = round(spec.latency_ms * slow_factor)
    return "ok", latency_ms, spec.queue_ms + latency_ms, _result(spec, _reply_text(spec)), None


def _end_fail(spec, slow_factor):
    error = {"code": "SIM_FAIL", "message": spec.fail_message or "simulated error"}
    return "fail", spec.latency_ms, spec.queue_ms + spec.latency_ms, None, error


def _end_hang(spec, slow_factor):
    return "running", spec.latency_ms, None, None, None


def _end_timeout(spec, slow_factor):
    return "timeout", spec.latency_ms, spec.timeout_ms, None, _TIMEOUT_ERROR


def _end_rate_limit(spec, slow_factor):
    error = {"code": "RATE_LIMITED", "message": "simulated rate limit: too many requests"}
    return "rate_limited", 0, 0, None, error


def _end_overloaded(spec, slow_factor):
    error = {"code": "OVERLOADED", "message": "simulated overload: the server is too busy"}
    return "overloaded", 0, 0, None, error


# The modes that end a job directly.  A new mode is one entry here.
_ENDINGS = {
    "ok": _end_ok,
    "echo": _end_echo,
    "slow": _end_slow,
    "fail": _end_fail,
    "hang": _end_hang,
    "timeout": _end_timeout,
    "rate_limit": _end_rate_limit,
    "overloaded": _end_overloaded,
}
# The states of requests refused at once: no job is created, the answer is an error.
REFUSED_STATES = ("rate_limited", "overloaded")
_DRAWABLE_MODES = tuple(_ENDINGS)

# The modes that draw one of the above: (modes they may draw, default weights;
# None means the server's --weights).
_DRAWN_MODES = {
    "flaky": (("ok", "fail", "hang"), DEFAULT_FLAKY_WEIGHTS),
    "random": (_DRAWABLE_MODES, None),
}
_MODE_NAMES = _DRAWABLE_MODES + tuple(_DRAWN_MODES)


def unit_draw(seed, trace_id, n, purpose):
    """A number in [0, 1) that depends only on its arguments.

    The first 8 bytes of SHA-256 of the JSON text ``[seed, trace_id, n,
    purpose]``, read big-endian, divided by 2**64: stable across Python
    versions and machines, unlike random.Random methods or hash().
    """
    text = json.dumps([seed, trace_id, n, purpose])
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def weighted_choice(weights, u):
    """The mode whose share of the cumulative weights, in table order, holds u."""
    modes = [mode for mode in _MODE_NAMES if weights.get(mode, 0) > 0]
    total = sum(weights[mode] for mode in modes)
    point = u * total
    for mode in modes:
        point -= weights[mode]
        if point < 0:
            return mode
    return modes[-1]


def plan_job(spec, n, seed, server_weights, slow_factor):
    """What happens to a job, and when (in ms after its creation).

    `seed` and `n` feed every draw: the job's seed and its index among jobs
    with that seed and trace_id, or any fresh number for an unseeded job.
    """
    key = spec.trace_id or ""
    if spec.jitter_ms:
        shift = round((2 * unit_draw(seed, key, n, "jitter") - 1) * spec.jitter_ms)
        spec = spec._replace(latency_ms=max(0, spec.latency_ms + shift))
    mode, weights = spec.mode, None
    if mode in _DRAWN_MODES:
        weights = spec.weights or _DRAWN_MODES[mode][1] or server_weights
        mode = weighted_choice(weights, unit_draw(seed, key, n, spec.mode))
    state, latency_ms, ends_at_ms, result, error = _ENDINGS[mode](spec, slow_factor)
    if ends_at_ms is not None and ends_at_ms > spec.timeout_ms:
        state, ends_at_ms, result, error = "timeout", spec.timeout_ms, None, _TIMEOUT_ERROR
    running_at_ms = spec.queue_ms if ends_at_ms is None or spec.queue_ms < ends_at_ms else None
    return Plan(mode, weights, latency_ms, running_at_ms, ends_at_ms, state, result, error)


def script_step(spec, n):
    """The settings of the n-th request carrying spec's script: that step's
    settings over the others (past the end, the last step repeats)."""
    return spec._replace(**spec.script[min(n, len(spec.script) - 1)])


def chaos_fault(seed, i, rate, faults):
    """The fault server-wide chaos gives the i-th request it sees, or None."""
    if unit_draw(seed, "", i, "chaos") >= rate:
        return None
    return faults[int(unit_draw(seed, "", i, "chaos-fault") * len(faults))]


def _duration_text(ms):
    """OpenAI's style for x-ratelimit-reset-*: "20ms", "1s", "1.5s"."""
    return f"{ms}ms" if ms < 1000 else f"{ms / 1000:g}s"


def _retry_headers(retry_ms):
    return [("retry-after", str(math.ceil(retry_ms / 1000))), ("retry-after-ms", str(retry_ms))]


def refusal(spec, plan, time_scale=1):
    """The error that answers a refused request, with its retry headers."""
    retry_ms = round(spec.retry_after_ms * time_scale)
    headers = _retry_headers(retry_ms)
    if plan.state == "rate_limited":
        status = 429
        headers += [("x-ratelimit-limit-requests", "60"), ("x-ratelimit-remaining-requests", "0"),
                    ("x-ratelimit-reset-requests", _duration_text(retry_ms))]
    else:
        status = spec.status or 503
    return ApiError(status, plan.error["code"], plan.error["message"], headers=headers)


def fault_error(fault, time_scale=1):
    """The error that answers a "status" fault."""
    code = {429: "RATE_LIMITED", 503: "OVERLOADED", 529: "OVERLOADED"}.get(
        fault.status, "INJECTED_FAULT")
    headers = () if fault.retry_after_ms is None else _retry_headers(
        round(fault.retry_after_ms * time_scale))
    return ApiError(fault.status, code, f"simulated HTTP {fault.status} fault", headers=headers)


def chat_answer(chat, plan):
    """The text, finish reason and usage of a chat completion that succeeds."""
    text, finish_reason = plan.result["text"], "stop"
    if chat.max_tokens is not None and tokens(text) > chat.max_tokens:
        text, finish_reason = text[:chat.max_tokens * 4], "length"
    usage = dict(_result(chat.spec, text)["usage"])
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return text, finish_reason, usage


def chat_completion(chat, plan, completion_id, created):
    """The body of a non-streamed chat completion."""
    text, finish_reason, usage = chat_answer(chat, plan)
    return {
        "id": completion_id, "object": "chat.completion", "created": created,
        "model": chat.model, "system_fingerprint": "dummyllm",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text,
                                             "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage,
    }


def _event(payload):
    """One server-sent event carrying JSON (or the text [DONE])."""
    data = b"[DONE]" if payload == "[DONE]" else _json_bytes(payload)
    return b"data: " + data + b"\n\n"


def chat_stream(chat, plan, completion_id, created):
    """A streamed chat completion: ([(ms after the first token, event bytes)], ending).

    The text goes out four characters (one token) per chunk, token_ms apart.
    ending is "done", or for a simulate.stream failure: "cut" (close without
    [DONE]), "stall" (hold the connection, silent) or "close" (after an
    error event).
    """
    text, finish_reason, usage = chat_answer(chat, plan)
    token_ms = chat.spec.token_ms

    def chunk(delta, finish_reason=None):
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": chat.model, "system_fingerprint": "dummyllm",
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish_reason}]}
        if chat.include_usage:
            body["usage"] = None
        return body

    # Content chunks differ only in their text: encode one around a marker and
    # fill in each piece (a tenth of the cost of encoding every chunk).
    before, after = _event(chunk({"content": "\0"})).rsplit(b'"\\u0000"', 1)
    pieces = [text[i:i + 4] for i in range(0, len(text), 4)]
    failure, count = next(iter((chat.spec.stream or {"": len(pieces)}).items()))
    events = [(0, _event(chunk({"role": "assistant", "content": ""})))]
    events += [(i * token_ms, before + _json_bytes(piece) + after)
               for i, piece in enumerate(pieces[:count])]
    last_ms = events[-1][0]
    if failure == "cut_after":
        return events, "cut"
    if failure == "stall_after":
        return events, "stall"
    if failure == "error_after":
        error = ApiError(500, "SIM_FAIL", chat.spec.fail_message or "simulated stream error")
        return events + [(last_ms + token_ms, _event(error.to_openai()[1]))], "close"
    events.append((last_ms, _event(chunk({}, finish_reason))))
    if chat.include_usage:
        final = chunk({})
        final["choices"], final["usage"] = [], usage
        events.append((last_ms, _event(final)))
    return events + [(last_ms, _event("[DONE]"))], "done"


# --- Job store --------------------------------------------------------------------
# One dict behind one lock.  Pending transitions wait in a schedule (a heap of
# due times) that one timer thread serves, so a pending job costs a heap
# entry, not a thread, and a hanging job costs nothing.  Every operation first
# applies what is already due, so no answer depends on when that thread ran.

class _Schedule:
    """Items by due time: the heap of sched, without the running.  Not locked."""

    def __init__(self):
        self._heap = []                 # [time, seq, item or None once popped or cancelled]
        self._seq = itertools.count()
        self._cancelled = 0             # cancelled entries still in the heap

    def push(self, when, item):
        """Add an item; returns its entry, for cancel() and is_first()."""
        entry = [when, next(self._seq), item]
        heapq.heappush(self._heap, entry)
        return entry

    def is_first(self, entry):
        return self._heap[0] is entry

    def cancel(self, entry):
        if entry[2] is None:
            return
        entry[2] = None
        self._cancelled += 1
        # Cancelled entries wait in the heap for their time; purge them when they
        # are the majority, so cancelled day-long timeouts cannot pile up.
        if self._cancelled > 64 and self._cancelled * 2 > len(self._heap):
            self._heap = [entry for entry in self._heap if entry[2] is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def next_time(self):
        """The time of the earliest item, or None."""
        while self._heap and self._heap[0][2] is None:
            heapq.heappop(self._heap)
            self._cancelled -= 1
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now):
        """The earliest item if its time is not after `now`, else None."""
        when = self.next_time()
        if when is None or when > now:
            return None
        entry = heapq.heappop(self._heap)
        item, entry[2] = entry[2], None
        return item

    def clear(self):
        self._heap.clear()
        self._cancelled = 0


class _Job:
    __slots__ = ("id", "seq", "spec", "plan", "n", "step", "state", "created_ms", "updated_ms",
                 "created_mono", "result", "error", "timer", "polls", "idempotency",
                 "version", "changed", "callbacks")

    def created_json(self):
        return {"id": self.id, "state": self.state, "created_at": self.created_ms // 1000}

    def to_json(self):
        return {
            "id": self.id, "state": self.state, "op": self.spec.op, "trace_id": self.spec.trace_id,
            "created_at": self.created_ms // 1000, "updated_at": self.updated_ms // 1000,
            "created_at_ms": self.created_ms, "updated_at_ms": self.updated_ms,
            "result": self.result, "error": self.error,
        }


def _now_ms():
    return time.time_ns() // 1_000_000


class JobStore:
    """Jobs by id, their transitions, eviction and the seeded sequences."""

    MAX_SEQUENCES = 100_000  # (seed, trace_id) counters kept; least recently used go first
    DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

    def __init__(self, config):
        self.config = config
        self._lock = threading.Lock()
        self._timer_wakeup = threading.Condition(self._lock)
        self._jobs = {}                                 # id -> _Job, oldest first
        self._finished = collections.OrderedDict()      # ids of ended jobs, first ended first
        self._sequences = collections.OrderedDict()     # (seed, trace_id) -> requests seen
        self._scripts = collections.OrderedDict()       # script key -> attempts seen
        self._idempotency = {}                          # Idempotency-Key -> job id
        self._due = _Schedule()                         # jobs by their next transition
        self._closed = False
        self._ids = random.Random()
        self._seq = itertools.count(1)
        self.on_finish = None   # called with (job id, callback_url, job JSON) as a job ends
        self._by_state = collections.Counter()          # stored jobs by state
        self.created_by_mode = collections.Counter()    # for /metrics
        self.finished_by_state = collections.Counter()
        self.durations = [0] * (len(self.DURATION_BUCKETS) + 1), [0.0]  # bucket counts, sum
        self._timer = threading.Thread(target=self._run_timer, name="dummyllm-timer", daemon=True)
        self._timer.start()

    def take_script_step(self, spec):
        """(the spec of this attempt, its step number): a script's next step
        applied, counted per trace_id; (spec, None) without a script."""
        if spec.script is None:
            return spec, None
        with self._lock:
            n = self._count(self._scripts, spec.trace_id or "")
        return script_step(spec, n), n

    def create(self, spec, idempotency=None, step=None):
        """Store a new job and schedule its transitions: (its JSON, replayed).

        `idempotency` is (key, fingerprint of the request) or None.  A key
        seen before with the same fingerprint answers that job again, with
        replayed True; with another, IDEMPOTENCY_CONFLICT.  Raises CAPACITY
        when full of active jobs, or the refusal the job's mode draws.
        """
        with self._lock:
            self._apply_due()
            if idempotency is not None and idempotency[0] in self._idempotency:
                job = self._jobs[self._idempotency[idempotency[0]]]
                if job.idempotency != idempotency:
                    raise ApiError(409, "IDEMPOTENCY_CONFLICT", "this Idempotency-Key was used "
                                   "with a different request", "Idempotency-Key")
                return job.created_json(), True
            full = len(self._jobs) >= self.config.max_jobs
            if full and not self._finished:
                raise ApiError(503, "CAPACITY", f"all {self.config.max_jobs} stored jobs are "
                               "still active; retry later", headers=[("Retry-After", "1")])
            plan, n = self._plan(spec)
            if plan.state in REFUSED_STATES:
                raise refusal(spec, plan, self.config.time_scale)
            if full:
                self._forget(self._finished.popitem(last=False)[0])
            job = _Job()
            job.id, job.seq = self._new_id(), next(self._seq)
            job.spec, job.plan, job.n, job.step, job.idempotency = spec, plan, n, step, idempotency
            job.state, job.result, job.error, job.timer, job.polls = "queued", None, None, None, 0
            job.version, job.changed, job.callbacks = 0, None, []
            self._by_state["queued"] += 1
            self.created_by_mode[plan.mode] += 1
            job.created_ms = job.updated_ms = _now_ms()
            job.created_mono = time.monotonic()
            self._jobs[job.id] = job
            if idempotency is not None:
                self._idempotency[idempotency[0]] = job.id
            self._schedule_next(job)
            return job.created_json(), False

    def plan(self, spec):
        """The plan of a request that is answered at once, not stored (chat)."""
        with self._lock:
            return self._plan(spec)[0]

    def poll(self, job_id, wait_ms=0):
        """(a job's JSON, the fault simulate.poll_faults gives this poll of it).

        With wait_ms, an active job is answered as soon as it ends, or after
        wait_ms as it is then; the wait blocks on the job's own condition.
        """
        with self._lock:
            self._apply_due()
            job = self._job(job_id)
            deadline = time.monotonic() + wait_ms / 1000
            while job.state in ACTIVE_STATES and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wait_for_change(job, remaining)
            faults, job.polls = job.spec.poll_faults or (), job.polls + 1
            return job.to_json(), faults[job.polls - 1] if job.polls <= len(faults) else None

    def watch(self, job_id, heartbeat_s):
        """The job's JSON now and after each change, None when heartbeat_s
        pass without one; it ends after the final state.  (A generator: NOT_FOUND
        is raised here, before the first item.)"""
        with self._lock:
            self._apply_due()
            job = self._job(job_id)
        return self._watch(job, heartbeat_s)

    def _watch(self, job, heartbeat_s):
        seen = None
        while True:
            with self._lock:
                if seen == job.version and not self._closed:
                    self._wait_for_change(job, heartbeat_s)
                if self._closed:
                    return
                changed, seen = seen != job.version, job.version
                snapshot = job.to_json() if changed else None
            yield snapshot
            if snapshot is not None and snapshot["state"] in TERMINAL_STATES:
                return

    def list_jobs(self, state=None, trace_id=None, op=None, limit=100, after=None):
        """Jobs newest first, filtered; (page, cursor of the next page or None)."""
        with self._lock:
            self._apply_due()
            page = []
            for job in reversed(self._jobs.values()):
                if after is not None and job.seq >= after:
                    continue
                if ((state is None or job.state == state)
                        and (trace_id is None or job.spec.trace_id == trace_id)
                        and (op is None or job.spec.op == op)):
                    if len(page) == limit:
                        return page, page[-1]["seq"]
                    page.append(dict(job.to_json(), seq=job.seq, mode=job.plan.mode))
            return page, None

    def delete(self, job_id):
        """Cancel the job if it is active, and forget it."""
        with self._lock:
            self._forget(self._cancel(job_id).id)

    def cancel(self, job_id):
        """End an active job as cancelled; an ended job is left as it is."""
        with self._lock:
            job = self._cancel(job_id)
            return {"id": job.id, "state": job.state}

    def request_view(self, job_id):
        """What the server received for a job and what it decided."""
        with self._lock:
            job = self._job(job_id)
        spec, plan = job.spec, job.plan
        settings = {key: _plain(value) for key, value in spec._asdict().items()
                    if key in _SIMULATE_FIELDS}
        settings.update(mode=plan.mode, requested_mode=spec.mode, latency_ms=plan.latency_ms,
                        weights=plan.weights, n=job.n, script_step=job.step)
        return {
            "id": job.id, "op": spec.op, "args": spec.args, "timeout_ms": spec.timeout_ms,
            "trace_id": spec.trace_id, "created_at_ms": job.created_ms,
            "idempotency_key": job.idempotency and job.idempotency[0], "polls": job.polls,
            "callback": spec.callback_url and {"url": spec.callback_url,
                                               "attempts": list(job.callbacks)},
            "simulate": settings,
            "outcome": {"state": plan.state, "at_ms": plan.ends_at_ms},
        }

    def reset(self):
        """Cancel every active job and forget every job, timer, seeded sequence,
        script counter and idempotency key; answers how many of each went."""
        with self._lock:
            self._apply_due()
            removed = {"jobs": len(self._jobs),
                       "active_jobs_cancelled": len(self._jobs) - len(self._finished),
                       "script_counters": len(self._scripts),
                       "sequences": len(self._sequences),
                       "idempotency_keys": len(self._idempotency)}
            for job in list(self._jobs.values()):
                if job.state in ACTIVE_STATES:
                    self._finish(job, "cancelled", None, _RESET_ERROR)
            for table in (self._jobs, self._finished, self._scripts, self._sequences,
                          self._idempotency, self._by_state):
                table.clear()
            self._due.clear()
            return removed

    def metrics(self):
        """(jobs created by mode, finished by state, active, duration histogram)."""
        with self._lock:
            self._apply_due()
            return (dict(self.created_by_mode), dict(self.finished_by_state),
                    len(self._jobs) - len(self._finished),
                    (list(self.durations[0]), self.durations[1][0]))

    def record_callback(self, job_id, attempt):
        """Add a webhook attempt to the job's record, if it is still stored."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None:
                job.callbacks.append(attempt)

    def scripts(self):
        with self._lock:
            return [{"key": key, "attempts": n} for key, n in self._scripts.items()]

    def counts(self):
        with self._lock:
            self._apply_due()
            return {"stored": len(self._jobs), "active": len(self._jobs) - len(self._finished),
                    "by_state": {state: n for state, n in self._by_state.items() if n}}

    def close(self):
        """Stop the timer thread and wake every waiter; pending transitions are dropped."""
        with self._lock:
            self._closed = True
            self._due.clear()
            self._timer_wakeup.notify()
            for job in self._jobs.values():
                self._changed(job)
        self._timer.join(1)

    def _run_timer(self):
        with self._lock:
            while not self._closed:
                self._apply_due()
                when = self._due.next_time()
                self._timer_wakeup.wait(None if when is None else when - time.monotonic())

    # Everything below runs with self._lock held.

    def _cancel(self, job_id):
        self._apply_due()
        job = self._job(job_id)
        if job.state in ACTIVE_STATES:
            self._finish(job, "cancelled", None, _CANCELLED_ERROR)
        return job

    def _job(self, job_id):
        job = self._jobs.get(job_id)
        if job is None:
            raise ApiError(404, "NOT_FOUND", f"no job with id {job_id!r}", "id")
        return job

    def _new_id(self):
        while True:
            job_id = f"job_{self._ids.getrandbits(48):012x}"
            if job_id not in self._jobs:
                return job_id

    def _count(self, counters, key):
        """Count one more for key; returns the count before.  Bounded: the
        least recently used keys are forgotten first."""
        n = counters.pop(key, 0)
        counters[key] = n + 1
        if len(counters) > self.MAX_SEQUENCES:
            counters.popitem(last=False)
        return n

    def _forget(self, job_id):
        job = self._jobs.pop(job_id)
        self._by_state[job.state] -= 1
        self._finished.pop(job_id, None)
        if job.idempotency is not None:
            del self._idempotency[job.idempotency[0]]

    def _plan(self, spec):
        """Draw the request's plan; n is its place in its seeded sequence, or None."""
        if spec.seed is None:
            seed, n = self._ids.getrandbits(64), None
        else:
            seed, n = spec.seed, self._count(self._sequences, (spec.seed, spec.trace_id or ""))
        plan = plan_job(spec, n or 0, seed, self.config.weights, self.config.slow_factor)
        return plan, n

    def _schedule_next(self, job):
        plan = job.plan
        if job.state == "queued" and plan.running_at_ms is not None:
            at_ms = plan.running_at_ms
        elif plan.ends_at_ms is not None:
            at_ms = plan.ends_at_ms
        else:
            return  # a hanging job: nothing will ever happen to it by itself
        job.timer = self._due.push(job.created_mono + at_ms * self.config.time_scale / 1000, job)
        if self._due.is_first(job.timer):
            self._timer_wakeup.notify()

    def _apply_due(self):
        """Make every transition whose time has come."""
        now = time.monotonic()
        while True:
            job = self._due.pop_due(now)
            if job is None:
                return
            job.timer = None
            if job.state == "queued" and job.plan.running_at_ms is not None:
                self._set_state(job, "running")
                job.updated_ms = max(job.updated_ms, _now_ms())
                self._changed(job)
                self._schedule_next(job)
            else:
                self._finish(job, job.plan.state, job.plan.result, job.plan.error)

    def _finish(self, job, state, result, error):
        if job.timer is not None:
            self._due.cancel(job.timer)
            job.timer = None
        self._set_state(job, state)
        job.result, job.error = result, error
        job.updated_ms = max(job.updated_ms, _now_ms())
        self._finished[job.id] = None
        self.finished_by_state[state] += 1
        seconds = time.monotonic() - job.created_mono
        self.durations[0][bisect.bisect_left(self.DURATION_BUCKETS, seconds)] += 1
        self.durations[1][0] += seconds
        self._changed(job)
        if job.spec.callback_url and self.on_finish is not None:
            self.on_finish(job.id, job.spec.callback_url, job.to_json())

    def _set_state(self, job, state):
        self._by_state[job.state] -= 1
        self._by_state[state] += 1
        job.state = state

    def _changed(self, job):
        job.version += 1
        if job.changed is not None:
            job.changed.notify_all()

    def _wait_for_change(self, job, timeout):
        # A condition per watched job, on the store's lock: a transition wakes
        # only the waiters of that job.
        if job.changed is None:
            job.changed = threading.Condition(self._lock)
        job.changed.wait(timeout)


class RequestJournal:
    """The last `size` requests the server answered, oldest first."""

    def __init__(self, size):
        self._entries = collections.deque(maxlen=size)
        self._lock = threading.Lock()
        self._seq = itertools.count()

    def record(self, entry):
        with self._lock:
            entry["seq"] = next(self._seq)
            self._entries.append(entry)

    def find(self, trace_id=None, path=None, limit=None):
        """The newest `limit` entries that match, oldest first."""
        with self._lock:
            found = [entry for entry in self._entries
                     if (trace_id is None or entry["trace_id"] == trace_id)
                     and (path is None or entry["path"] == path)]
        return found[-limit:] if limit else found

    def clear(self):
        with self._lock:
            removed = len(self._entries)
            self._entries.clear()
            return removed


# --- HTTP layer ---------------------------------------------------------------------

# `note` is where handlers tell the journal what they learnt: job_id, trace_id.
Request = collections.namedtuple("Request", "method path query headers body params received note")


class Answer:
    """What a handler answers, and when.

    `payload` is a JSON value or an ApiError (drawn in the style of the path);
    `at` is the monotonic time to answer (None: now); `events` makes it a
    text/event-stream of (ms after `at`, data) that ends as `ending` says
    (see chat_stream).  A status of None sends nothing: the connection is
    held until the client or the server closes it.  A `fault` spoils the
    answer as it goes out (see FAULTS).
    """

    __slots__ = ("status", "payload", "headers", "at", "events", "ending", "fault", "dribble_ms",
                 "live", "content_type")

    def __init__(self, status=200, payload=None, headers=(), at=None, events=None, ending="done",
                 fault=None, dribble_ms=50, live=None, content_type="application/json"):
        self.status, self.payload, self.headers = status, payload, tuple(headers)
        self.at, self.events, self.ending = at, events, ending
        self.fault, self.dribble_ms = fault, dribble_ms
        self.live = live                  # an iterator of event bytes, sent as they come
        self.content_type = content_type  # of a payload given as bytes


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _json_value(data, what, field=None):
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "INVALID_JSON", f"{what} nests too deeply", field) from None
    except ValueError as exc:
        raise ApiError(400, "INVALID_JSON", f"{what} is not valid JSON: {exc}", field) from None


def _json_body(request):
    """The request body as a JSON object, or the error that says why not."""
    if not request.body.strip():
        raise ApiError(400, "INVALID_JSON", "request body is empty; send a JSON object")
    value = _json_value(request.body, "request body")
    if not isinstance(value, dict):
        raise ValidationError(None, "request body must be a JSON object")
    return value


def _api(summary, request=None, answers=None, query=None, headers=None):
    """Describe a handler for /openapi.json: its summary, request body schema,
    answers ({status: schema name, media type, or None}) and query parameters."""
    def describe(handler):
        handler.api = {"summary": summary, "request": request, "answers": answers or {200: None},
                       "query": query or {}, "headers": headers or {}}
        return handler
    return describe


_INT = {"type": "integer"}
_STR = {"type": "string"}

# Handlers: (server, request) -> Answer.  Errors are raised as ApiError.

@_api("Health, version, defaults and job counts", answers={200: "Health"})
def _health(server, request):
    config = server.config
    return Answer(200, {
        "ok": True, "name": "dummyLLM", "time": int(time.time()), "version": __version__,
        "defaults": {"mode": config.mode, "latency_ms": config.latency_ms, "seed": config.seed,
                     "weights": config.weights, "timeout_ms": config.timeout_ms,
                     "slow_factor": config.slow_factor},
        "jobs": server.store.counts(),
        "chaos": {"rate": config.chaos, "faults": _plain(config.chaos_faults)},
        "time_scale": config.time_scale,
    })


# Faults that lose the answer honour fault_phase "before" (nothing is created);
# the others are answers about a job, so the job is created first.
_PHASED_FAULTS = ("reset", "disconnect", "status")


@_api("Create a simulated job", request="CreateJob",
      answers={201: "JobCreated", 200: "JobCreated", 409: "Error", 429: "Error", 503: "Error"},
      headers={"Idempotency-Key": "Repeat-safe key: the same key and body answer the same job"})
def _create_job(server, request):
    body = _json_body(request)
    spec, step = server.store.take_script_step(parse_job_request(body, server.config))
    request.note["trace_id"] = spec.trace_id
    fault = spec.fault
    if fault is not None and fault.kind in _PHASED_FAULTS and spec.fault_phase == "before":
        return Answer(fault=fault)
    key = request.headers.get("idempotency-key")
    fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    job, replayed = server.store.create(spec, None if key is None else (key, fingerprint), step)
    request.note["job_id"] = job["id"]
    headers = [("Location", "/v1/jobs/" + job["id"])]
    if replayed:  # the answer that was lost the first time, without its fault
        return Answer(200, job, headers + [("Idempotent-Replayed", "true")])
    return Answer(201, job, headers, fault=fault, dribble_ms=spec.dribble_ms)


@_api("Poll a job; wait_ms waits until it ends", answers={200: "Job"},
      query={"wait_ms": dict(_INT, minimum=0, maximum=60000,
                             description="Answer as soon as the job ends, or after this long")})
def _get_job(server, request):
    wait_ms = _query(request, "wait_ms", functools.partial(_number_query, lo=0, hi=60_000)) or 0
    job, fault = server.store.poll(request.params["id"], wait_ms)
    request.note["job_id"] = job["id"]
    if fault is not None and fault.kind == "unknown_state":
        request.note["fault"] = fault
        return Answer(200, {**job, "state": fault.state})
    return Answer(200, job, fault=fault)


@_api("List jobs, newest first", answers={200: "JobList"},
      query={"state": dict(_STR, enum=list(ACTIVE_STATES + TERMINAL_STATES)),
             "trace_id": _STR, "op": _STR,
             "limit": dict(_INT, minimum=1, maximum=1000, description="Page size (100)"),
             "after": dict(_INT, minimum=1, description="The `next` of the previous page")})
def _list_jobs(server, request):
    state = _query(request, "state")
    if state is not None:
        _check_choice(state, "state", ACTIVE_STATES + TERMINAL_STATES)
    jobs, cursor = server.store.list_jobs(
        state=state, trace_id=_query(request, "trace_id"), op=_query(request, "op"),
        limit=_query(request, "limit", functools.partial(_number_query, lo=1, hi=1000)) or 100,
        after=_query(request, "after", functools.partial(_number_query, lo=1, hi=2 ** 63)))
    return Answer(200, {"jobs": jobs, "next": cursor})


@_api("Cancel a job if active, and forget it", answers={204: None})
def _delete_job(server, request):
    server.store.delete(request.params["id"])
    return Answer(204)


HEARTBEAT_S = 15


@_api("Server-sent events: the job now and at each change", answers={200: "text/event-stream"})
def _job_events(server, request):
    def events(snapshots):
        for snapshot in snapshots:
            if snapshot is None:
                yield b": heartbeat\n\n"
            else:
                yield b"event: state\ndata: " + _json_bytes(snapshot) + b"\n\n"
    return Answer(200, live=events(server.store.watch(request.params["id"], HEARTBEAT_S)))


@_api("Cancel a job (idempotent, best effort)", answers={200: "Cancelled"})
def _cancel_job(server, request):
    return Answer(200, server.store.cancel(request.params["id"]))


@_api("What the server received for a job and decided", answers={200: "JobRequest"})
def _job_request(server, request):
    return Answer(200, server.store.request_view(request.params["id"]))


@_api("OpenAI-compatible chat completion, streamed or not", request="ChatRequest",
      answers={200: "ChatCompletion", 429: "OpenAIError", 500: "OpenAIError",
               503: "OpenAIError", 504: "OpenAIError"},
      headers={"X-DummyLLM-Simulate": "A simulate object as JSON, when the body has none",
               "X-Trace-Id": "The key of seeded sequences and scripts"})
def _chat_completions(server, request):
    header = request.headers.get("x-dummyllm-simulate")
    chat = parse_chat_request(
        _json_body(request),
        None if header is None else _json_value(header, "X-DummyLLM-Simulate",
                                                "X-DummyLLM-Simulate"),
        request.headers.get("x-trace-id"), server.config)
    spec, _ = server.store.take_script_step(chat.spec)
    chat = chat._replace(spec=spec)
    request.note["trace_id"] = spec.trace_id
    if chat.stream and spec.fault is not None and spec.fault.kind == "dribble":
        raise ValidationError("simulate.fault", "dribble applies to JSON answers; a stream "
                              "is paced by token_ms")
    plan = server.store.plan(spec)
    if plan.state in REFUSED_STATES:
        raise refusal(spec, plan, server.config.time_scale)
    if plan.ends_at_ms is None:
        return Answer(status=None)  # hang
    at = request.received + server.seconds(plan.ends_at_ms)
    if plan.state != "ok":
        status = 504 if plan.state == "timeout" else 500
        payload = ApiError(status, plan.error["code"], plan.error["message"])
        return Answer(payload=payload, at=at, fault=spec.fault, dribble_ms=spec.dribble_ms)
    completion_id, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
    if chat.stream and spec.fault is None:
        events, ending = chat_stream(chat, plan, completion_id, created)
        return Answer(200, at=at, events=events, ending=ending)
    return Answer(200, chat_completion(chat, plan, completion_id, created), at=at,
                  fault=spec.fault, dribble_ms=spec.dribble_ms)


@_api("Attempt counters of scripted requests", answers={200: "Scripts"})
def _list_scripts(server, request):
    return Answer(200, {"scripts": server.store.scripts()})


@_api("Forget every job, counter, key and journal entry", answers={200: "Removed"})
def _reset_server(server, request):
    return Answer(200, {"removed": server.reset()})


def _query(request, name, check=None):
    """One query parameter (None if absent), checked."""
    values = urllib.parse.parse_qs(request.query).get(name)
    if values is None:
        return None
    return check(values[-1], name) if check else values[-1]


def _number_query(text, field, lo, hi):
    if not (text.isascii() and text.isdigit()):
        raise ValidationError(field, f"must be an integer from {lo} to {hi}")
    return _check_int(int(text), field, lo, hi)


@_api("The request journal, oldest first", answers={200: "Journal"},
      query={"trace_id": _STR, "path": _STR,
             "limit": dict(_INT, minimum=1, description="Only the newest this many")})
def _list_requests(server, request):
    entries = server.journal.find(trace_id=_query(request, "trace_id"),
                                  path=_query(request, "path"),
                                  limit=_query(request, "limit", functools.partial(
                                      _number_query, lo=1, hi=1_000_000)))
    return Answer(200, {"requests": entries})


@_api("Clear the request journal", answers={200: "Removed"})
def _clear_requests(server, request):
    return Answer(200, {"removed": {"journal_entries": server.journal.clear()}})


@_api("Prometheus metrics", answers={200: "text/plain"})
def _metrics(server, request):
    created, finished, active, (buckets, seconds) = server.store.metrics()
    requests, faults = server.counted()
    text = _Exposition()
    text.family("dummyllm_jobs_created_total", "counter", "Jobs created, by the mode that ran.",
                [({"mode": mode}, n) for mode, n in sorted(created.items())])
    text.family("dummyllm_jobs_finished_total", "counter",
                "Jobs that reached a final state, by state.",
                [({"state": state}, n) for state, n in sorted(finished.items())])
    text.family("dummyllm_jobs_active", "gauge", "Jobs queued or running.", [({}, active)])
    text.family("dummyllm_http_requests_total", "counter",
                "HTTP requests answered, by method, route and status.",
                [({"method": method, "route": route, "status": status}, n)
                 for (method, route, status), n in sorted(requests.items(), key=str)])
    cumulative = list(itertools.accumulate(buckets))
    bounds = [str(bound) for bound in JobStore.DURATION_BUCKETS] + ["+Inf"]
    text.family("dummyllm_job_duration_seconds", "histogram",
                "Time from a job's creation to its final state.",
                [({"le": le}, n) for le, n in zip(bounds, cumulative)], suffix="_bucket")
    text.samples("dummyllm_job_duration_seconds_sum", [({}, round(seconds, 6))])
    text.samples("dummyllm_job_duration_seconds_count", [({}, cumulative[-1])])
    text.family("dummyllm_faults_injected_total", "counter", "Transport faults injected, by kind.",
                [({"kind": kind}, n) for kind, n in sorted(faults.items())])
    return Answer(200, str(text).encode(), content_type="text/plain; version=0.0.4; charset=utf-8")


class _Exposition:
    """Prometheus text exposition format, version 0.0.4."""

    def __init__(self):
        self._lines = []

    def family(self, name, kind, help_text, samples, suffix=""):
        self._lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        self.samples(name + suffix, samples)

    def samples(self, name, samples):
        for labels, value in samples:
            text = ",".join(f'{key}="{_label_value(value)}"' for key, value in labels.items())
            self._lines.append(f"{name}{{{text}}} {value}" if text else f"{name} {value}")

    def __str__(self):
        return "\n".join(self._lines) + "\n"


def _label_value(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _model(model_id):
    return {"id": model_id, "object": "model", "created": 1700000000, "owned_by": "dummyllm"}


@_api("OpenAI-compatible model list", answers={200: "ModelList"})
def _list_models(server, request):
    return Answer(200, {"object": "list", "data": [_model("dummyllm")]})


@_api("A model (every name is served)", answers={200: "Model"})
def _get_model(server, request):
    return Answer(200, _model(request.params["id"]))  # every model name is served


@_api("This API as an OpenAPI 3.1 document", answers={200: "OpenAPI"})
def _openapi(server, request):
    return Answer(200, openapi_document())


@_api("Interactive API documentation (one self-contained page)", answers={200: "text/html"})
def _docs(server, request):
    return Answer(200, DOCS_PAGE.encode(), content_type="text/html; charset=utf-8")


@_api("Live dashboard of the newest jobs", answers={200: "text/html"})
def _dashboard(server, request):
    return Answer(200, DASHBOARD_PAGE.encode(), content_type="text/html; charset=utf-8")


# The routing table.  A new endpoint is one entry here and one handler above.
# {name} matches one path segment, {name+} the rest of the path.
ROUTES = (
    ("GET", "/health", _health),
    ("GET", "/metrics", _metrics),
    ("POST", "/v1/jobs", _create_job),
    ("GET", "/v1/jobs", _list_jobs),
    ("GET", "/v1/jobs/{id}", _get_job),
    ("DELETE", "/v1/jobs/{id}", _delete_job),
    ("GET", "/v1/jobs/{id}/events", _job_events),
    ("POST", "/v1/jobs/{id}/cancel", _cancel_job),
    ("GET", "/v1/jobs/{id}/request", _job_request),
    ("POST", "/v1/chat/completions", _chat_completions),
    ("GET", "/v1/models", _list_models),
    ("GET", "/v1/models/{id+}", _get_model),
    ("GET", "/v1/scripts", _list_scripts),
    ("POST", "/v1/reset", _reset_server),
    ("GET", "/v1/requests", _list_requests),
    ("DELETE", "/v1/requests", _clear_requests),
    ("GET", "/", _dashboard),
    ("GET", "/docs", _docs),
    ("GET", "/openapi.json", _openapi),
)

CORS_EXPOSED_HEADERS = ("Location, Retry-After, retry-after-ms, Idempotent-Replayed, "
                        "x-ratelimit-limit-requests, x-ratelimit-remaining-requests, "
                        "x-ratelimit-reset-requests")
CORS_ALLOWED_HEADERS = ("Content-Type, Authorization, Idempotency-Key, X-Trace-Id, "
                        "X-DummyLLM-Simulate")

# Paths under these answer errors in OpenAI's shape, and need --api-key if set.
OPENAI_PATHS = ("/v1/chat/", "/v1/models")
# Requests to these are not journaled; chaos spares them and the control endpoints.
UNJOURNALED_PATHS = ("/health", "/v1/requests")
CHAOS_FREE_PATHS = UNJOURNALED_PATHS + ("/v1/scripts", "/v1/reset", "/metrics", "/",
                                         "/docs", "/openapi.json")


# --- The API document and pages --------------------------------------------------------

def _ref(name):
    return {"$ref": "#/components/schemas/" + name}


def _object(required=(), example=None, **properties):
    schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if example is not None:
        schema["example"] = example
    return schema


_NULLABLE_STR = {"type": ["string", "null"]}
_JOB_FIELDS = dict(
    id=dict(_STR, pattern="^job_[0-9a-f]{12}$"),
    state=dict(_STR, enum=list(ACTIVE_STATES + TERMINAL_STATES)),
    op=_STR, trace_id=_NULLABLE_STR, created_at=_INT, updated_at=_INT,
    created_at_ms=_INT, updated_at_ms=_INT,
    result={"oneOf": [{"type": "null"}, _object(
        text=_STR, usage=_object(prompt_tokens=_INT, completion_tokens=_INT))]},
    error={"oneOf": [{"type": "null"}, _object(code=dict(_STR, enum=[
        "SIM_FAIL", "TIMEOUT", "CANCELLED"]), message=_STR)]})
_SCHEMAS = {
    "Error": _object(["error"], error=_object(["code", "message"], code=_STR, message=_STR,
                                              field=_STR)),
    "OpenAIError": _object(["error"], error=_object(
        ["message", "type", "param", "code"], message=_STR, type=_STR,
        param=_NULLABLE_STR, code=_NULLABLE_STR)),
    "Simulate": dict(_object(**{key: schema for key, (_, _, schema) in _SIMULATE_FIELDS.items()}),
                     additionalProperties=False),
    "CreateJob": _object(
        ["op"], op=dict(_STR, minLength=1), args={"type": "object"},
        timeout_ms=dict(_INT, minimum=1, maximum=MAX_TIMEOUT_MS),
        trace_id=dict(_NULLABLE_STR, maxLength=MAX_TRACE_ID_CHARS),
        callback_url=dict(_STR, format="uri", description="Loopback URL the final job is "
                          "POSTed to"),
        simulate={"oneOf": [{"type": "null"}, _ref("Simulate")]},
        example={"op": "llm.chat", "trace_id": "try-1",
                 "args": {"model": "llama3.1:8b", "messages": [{"role": "user",
                                                                "content": "Hello"}]},
                 "simulate": {"mode": "ok", "latency_ms": 500}}),
    "JobCreated": _object(["id", "state", "created_at"], id=_JOB_FIELDS["id"],
                          state=_JOB_FIELDS["state"], created_at=_INT),
    "Job": _object(list(_JOB_FIELDS), **_JOB_FIELDS),
    "JobList": _object(["jobs", "next"], jobs={"type": "array", "items": _ref("Job")},
                       next={"type": ["integer", "null"]}),
    "Cancelled": _object(["id", "state"], id=_STR, state=_STR),
    "JobRequest": _object(id=_STR, op=_STR, args={"type": "object"}, timeout_ms=_INT,
                          trace_id=_NULLABLE_STR, created_at_ms=_INT, polls=_INT,
                          idempotency_key=_NULLABLE_STR, callback={"type": ["object", "null"]},
                          simulate={"type": "object"}, outcome=_object(state=_STR, at_ms=_INT)),
    "Health": _object(["ok", "name", "time", "version"], ok={"type": "boolean"}, name=_STR,
                      time=_INT, version=_STR, defaults={"type": "object"},
                      jobs=_object(stored=_INT, active=_INT, by_state={"type": "object"}),
                      chaos={"type": "object"}, time_scale={"type": "number"}),
    "ChatRequest": _object(
        ["model", "messages"], model=_STR,
        messages={"type": "array", "minItems": 1, "items": _object(["role"], role=_STR)},
        stream={"type": "boolean"}, stream_options=_object(include_usage={"type": "boolean"}),
        max_tokens=dict(_INT, minimum=1), max_completion_tokens=dict(_INT, minimum=1),
        n={"const": 1}, user=_STR, timeout_ms=dict(_INT, minimum=1),
        simulate=_ref("Simulate"),
        example={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}],
                 "simulate": {"latency_ms": 300}}),
    "ChatCompletion": _object(["id", "object", "created", "model", "choices", "usage"],
                              id=_STR, object=dict(_STR, const="chat.completion"),
                              created=_INT, model=_STR, choices={"type": "array"},
                              usage=_object(prompt_tokens=_INT, completion_tokens=_INT,
                                            total_tokens=_INT)),
    "Model": _object(["id", "object"], id=_STR, object=dict(_STR, const="model"),
                     created=_INT, owned_by=_STR),
    "ModelList": _object(["object", "data"], object=dict(_STR, const="list"),
                         data={"type": "array", "items": _ref("Model")}),
    "Scripts": _object(scripts={"type": "array", "items": _object(key=_STR, attempts=_INT)}),
    "Removed": _object(removed={"type": "object", "additionalProperties": _INT}),
    "Journal": _object(requests={"type": "array", "items": _object(
        seq=_INT, at_ms=_INT, monotonic_ms={"type": "number"}, method=_STR, path=_STR,
        query=_STR, headers={"type": "object"}, body=_STR, body_truncated={"type": "boolean"},
        status={"type": ["integer", "null"]}, fault={}, job_id=_NULLABLE_STR,
        trace_id=_NULLABLE_STR)}),
    "OpenAPI": {"type": "object"},
}


def openapi_document():
    """The OpenAPI 3.1 document of every route in ROUTES, from their @_api."""
    paths = {}
    for method, path, handler in ROUTES:
        api = handler.api
        error = "OpenAIError" if path.startswith(OPENAI_PATHS) else "Error"
        parameters = [{"name": name, "in": "path", "required": True, "schema": _STR}
                      for name in re.findall(r"\{(\w+)\+?\}", path)]
        parameters += [{"name": name, "in": "query", "required": False,
                        "description": schema.get("description", ""), "schema": schema}
                       for name, schema in api["query"].items()]
        parameters += [{"name": name, "in": "header", "required": False,
                        "description": text, "schema": _STR}
                       for name, text in api["headers"].items()]
        responses = {}
        for status, what in api["answers"].items():
            answer = {"description": HTTPStatus(status).phrase}
            if what is not None:
                media, schema = ((what, _STR) if "/" in what else
                                 ("application/json", _ref(what)))
                answer["content"] = {media: {"schema": schema}}
            responses[str(status)] = answer
        responses["default"] = {"description": "An error",
                                "content": {"application/json": {"schema": _ref(error)}}}
        operation = {"summary": api["summary"], "operationId": handler.__name__.strip("_"),
                     "parameters": parameters, "responses": responses}
        if api["request"]:
            operation["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": _ref(api["request"])}}}
        paths.setdefault(path.replace("+}", "}"), {})[method.lower()] = operation
    return {"openapi": "3.1.0",
            "info": {"title": "dummyLLM", "version": __version__,
                     "description": __doc__.split("\n\n")[1].replace("\n", " ")},
            "paths": paths, "components": {"schemas": _SCHEMAS}}


_PAGE_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 70em; padding: 1em 2em;
       color: #1d232a; }
h1 { margin-bottom: 0.2em; } nav a { margin-right: 1.2em; }
code, pre, textarea, input { font: 13px/1.4 ui-monospace, monospace; }
pre { background: #f3f5f7; padding: 0.7em; overflow-x: auto; max-height: 22em; }
table { border-collapse: collapse; width: 100%; margin: 0.4em 0; }
td, th { border-bottom: 1px solid #dde2e7; padding: 0.25em 0.6em; text-align: left; }
.op { border: 1px solid #d3d9df; border-radius: 6px; margin: 1em 0; padding: 0.3em 1em 1em; }
.method { display: inline-block; min-width: 4.5em; font-weight: bold; }
.get { color: #1a7f37; } .post { color: #0a58ca; } .delete { color: #b42318; }
textarea { width: 100%; height: 9em; } input { width: 22em; }
button { padding: 0.3em 1.2em; } .status { font-weight: bold; }
.ok { color: #1a7f37; } .fail, .timeout, .cancelled { color: #b42318; }
.queued, .running { color: #9a6700; } .counts span { margin-right: 1.5em; }
"""

DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dummyLLM API</title>
<style>""" + _PAGE_STYLE + """</style></head>
<body>
<h1>dummyLLM API</h1>
<nav><a href="/">dashboard</a><a href="/openapi.json">openapi.json</a><a href="/metrics">metrics</a></nav>
<p id="about"></p>
<div id="operations">Loading the API document...</div>
<script>
"use strict";
const el = (tag, attrs, ...children) => {
  const node = document.createElement(tag);
  Object.assign(node, attrs || {});
  for (const child of children) node.append(child);
  return node;
};
let spec;
const resolve = (schema) => {
  while (schema && schema.$ref) schema = spec.components.schemas[schema.$ref.split("/").pop()];
  return schema || {};
};
const typeOf = (schema) => {
  schema = resolve(schema);
  if (schema.enum) return schema.enum.join(" | ");
  if (schema.oneOf) return schema.oneOf.map(typeOf).join(" or ");
  return [].concat(schema.type || "any").join(" or ");
};
function fieldsTable(schema) {
  schema = resolve(schema);
  const table = el("table", {}, el("tr", {}, el("th", {}, "field"), el("th", {}, "type"),
                                   el("th", {}, "about")));
  for (const [name, field] of Object.entries(schema.properties || {})) {
    const required = (schema.required || []).includes(name) ? " (required)" : "";
    table.append(el("tr", {}, el("td", {}, el("code", {}, name + required)),
                    el("td", {}, typeOf(field)), el("td", {}, resolve(field).description || "")));
  }
  return table;
}
function operation(path, method, op) {
  const id = "op-" + method + path.replace(/[^a-z0-9]+/gi, "-");
  const box = el("div", {className: "op", id});
  box.append(el("h3", {}, el("span", {className: "method " + method}, method.toUpperCase()),
                el("code", {}, path)), el("p", {}, op.summary));
  const inputs = {};
  const params = op.parameters || [];
  if (params.length) {
    const table = el("table", {}, el("tr", {}, el("th", {}, "parameter"), el("th", {}, "in"),
                                     el("th", {}, "value")));
    for (const p of params) {
      inputs[p.in + ":" + p.name] = el("input", {name: p.name, placeholder: p.description || typeOf(p.schema)});
      table.append(el("tr", {}, el("td", {}, el("code", {}, p.name)), el("td", {}, p.in),
                      el("td", {}, inputs[p.in + ":" + p.name])));
    }
    box.append(table);
  }
  let body = null;
  if (op.requestBody) {
    const schema = op.requestBody.content["application/json"].schema;
    box.append(el("p", {}, "Request body:"), fieldsTable(schema));
    if (resolve(schema).properties.simulate) {
      box.append(el("details", {}, el("summary", {}, "simulate fields"),
                    fieldsTable(spec.components.schemas.Simulate)));
    }
    body = el("textarea", {name: "body"});
    body.value = JSON.stringify(resolve(schema).example || {}, null, 2);
    box.append(el("p", {}, "Example request (edit and send):"), body);
  }
  const answer = el("pre", {className: "answer"}, "");
  const send = el("button", {className: "send", type: "button"}, "Send");
  send.onclick = async () => {
    let url = path;
    const query = new URLSearchParams();
    const headers = {};
    for (const p of params) {
      const value = inputs[p.in + ":" + p.name].value;
      if (p.in === "path") url = url.replace("{" + p.name + "}", encodeURIComponent(value));
      else if (value && p.in === "query") query.set(p.name, value);
      else if (value && p.in === "header") headers[p.name] = value;
    }
    if (String(query)) url += "?" + query;
    const init = {method: method.toUpperCase(), headers};
    if (body) { init.body = body.value; headers["Content-Type"] = "application/json"; }
    answer.textContent = "...";
    try {
      const response = await fetch(url, init);
      const text = await response.text();
      let shown = text;
      try { shown = JSON.stringify(JSON.parse(text), null, 2); } catch (e) {}
      answer.textContent = response.status + " " + response.statusText + "\\n" + shown;
      answer.dataset.status = response.status;
    } catch (error) {
      answer.textContent = "request failed: " + error;
    }
  };
  box.append(el("p", {}, send), answer);
  return box;
}
fetch("/openapi.json").then((r) => r.json()).then((document_) => {
  spec = document_;
  document.getElementById("about").textContent = spec.info.description + " Version " + spec.info.version + ".";
  const list = document.getElementById("operations");
  list.textContent = "";
  for (const [path, ops] of Object.entries(spec.paths))
    for (const [method, op] of Object.entries(ops)) list.append(operation(path, method, op));
});
</script>
</body></html>
"""

DASHBOARD_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dummyLLM</title>
<style>""" + _PAGE_STYLE + """</style></head>
<body>
<h1>dummyLLM</h1>
<nav><a href="/docs">API docs</a><a href="/metrics">metrics</a><a href="/v1/requests">request journal</a></nav>
<p class="counts" id="counts">...</p>
<table id="jobs"><thead><tr><th>id</th><th>op</th><th>mode</th><th>state</th><th>age</th></tr></thead>
<tbody></tbody></table>
<script>
"use strict";
const STATES = ["queued", "running", "ok", "fail", "timeout", "cancelled"];
async function refresh() {
  try {
    const [health, list] = await Promise.all([fetch("/health").then((r) => r.json()),
                                              fetch("/v1/jobs?limit=25").then((r) => r.json())]);
    const counts = document.getElementById("counts");
    counts.textContent = "";
    for (const state of STATES) {
      const span = document.createElement("span");
      span.className = state;
      span.textContent = state + ": " + (health.jobs.by_state[state] || 0);
      counts.append(span);
    }
    const rows = document.querySelector("#jobs tbody");
    rows.textContent = "";
    const now = Date.now();
    for (const job of list.jobs) {
      const row = rows.insertRow();
      row.id = "job-" + job.id;
      const age = ((now - job.created_at_ms) / 1000).toFixed(1) + " s";
      for (const [text, cls] of [[job.id], [job.op], [job.mode], [job.state, "state " + job.state], [age]]) {
        const cell = row.insertCell();
        cell.textContent = text;
        if (cls) cell.className = cls;
      }
    }
  } catch (error) {
    document.getElementById("counts").textContent = "server unreachable: " + error;
  }
}
refresh();
setInterval(refresh, 500);
</script>
</body></html>
"""


class Router:
    """Match a method and path to a handler; 404 and 405 come from here."""

    def __init__(self, routes):
        self._routes = [(method, re.compile(self._pattern(path)), handler, path)
                        for method, path, handler in routes]

    @staticmethod
    def _pattern(path):
        path = re.sub(r"\{(\w+)\+\}", r"(?P<\1>.+)", path)
        return re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + r"\Z"

    def match(self, method, path):
        """(handler, path parameters, the route's path) or the 404 or 405."""
        for route_method, pattern, handler, route in self._routes:
            found = pattern.match(path)
            if found and (route_method == method or (method == "HEAD" and route_method == "GET")):
                return handler, found.groupdict(), route
        allowed = self.methods(path)
        if not allowed:
            raise ApiError(404, "NOT_FOUND", f"no endpoint at {path}")
        raise ApiError(405, "METHOD_NOT_ALLOWED", f"{path} does not answer {method}",
                       headers=[("Allow", ", ".join(allowed))])

    def methods(self, path):
        """The methods the path answers (HEAD wherever GET)."""
        methods = [method for method, pattern, _, _ in self._routes if pattern.match(path)]
        return methods + ["HEAD"] if "GET" in methods else methods


_ERROR_CODES = {400: "BAD_REQUEST", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED",
                408: "REQUEST_TIMEOUT", 413: "PAYLOAD_TOO_LARGE", 414: "URI_TOO_LONG",
                431: "HEADERS_TOO_LARGE", 500: "INTERNAL", 501: "NOT_IMPLEMENTED",
                505: "HTTP_VERSION_NOT_SUPPORTED"}


def _too_large(limit):
    return ApiError(413, "PAYLOAD_TOO_LARGE", f"request body is larger than {limit} bytes")


def _bad_request(message):
    return ApiError(400, "BAD_REQUEST", message)


class _Stream:
    __slots__ = ("sock", "frames", "index", "pending", "done", "ok")

    def __init__(self, sock, frames):
        self.sock, self.frames, self.index = sock, frames, 0
        self.pending = frames[0][1]
        self.done, self.ok = threading.Event(), False

    def finish(self, ok):
        self.ok = ok
        self.done.set()


class _StreamWriter:
    """Sends the chunks of every open stream when they are due, from one thread.

    A thread per stream waking every token_ms fights the others for the GIL:
    with 200 streams at token_ms 10 chunks came 47 ms late at the median.  One
    thread sending chunks encoded beforehand keeps them on time.
    """

    RETRY_S = 0.005  # a client that reads slowly is tried again this soon

    def __init__(self):
        self._cond = threading.Condition()
        self._due = _Schedule()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="dummyllm-streams", daemon=True)
        self._thread.start()

    def write(self, sock, frames):
        """Send each (monotonic time, bytes) at its time; block until all are sent.

        False if the client went away or the server stopped first.
        """
        if not frames:
            return True
        stream = _Stream(sock, frames)
        timeout = sock.gettimeout()
        sock.setblocking(False)
        try:
            with self._cond:
                if self._closed:
                    return False
                self._schedule(stream, frames[0][0])
            stream.done.wait()
        finally:
            sock.settimeout(timeout)
        return stream.ok

    def close(self):
        with self._cond:
            self._closed = True
            while True:
                stream = self._due.pop_due(math.inf)
                if stream is None:
                    break
                stream.finish(False)
            self._cond.notify()

    def _schedule(self, stream, when):
        if self._due.is_first(self._due.push(when, stream)):
            self._cond.notify()

    def _run(self):
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                stream = self._due.pop_due(now)
                if stream is not None:
                    self._send(stream, now)
                else:
                    when = self._due.next_time()
                    self._cond.wait(None if when is None else when - now)

    def _send(self, stream, now):
        try:
            sent = stream.sock.send(stream.pending)
        except BlockingIOError:
            sent = 0
        except OSError:
            stream.finish(False)
            return
        stream.pending = stream.pending[sent:]
        if stream.pending:
            self._schedule(stream, now + self.RETRY_S)
            return
        stream.index += 1
        if stream.index == len(stream.frames):
            stream.finish(True)
            return
        when, stream.pending = stream.frames[stream.index]
        self._schedule(stream, when)


class _Webhooks:
    """POST each ended job's JSON to its callback_url, from a few threads
    started on first use: up to 3 attempts, 5 s timeout each, backing off."""

    WORKERS, TIMEOUT_S, BACKOFF_S = 4, 5, (0.5, 1.0)

    def __init__(self, store, stopping):
        self._store, self._stopping = store, stopping
        self._queue = queue.Queue()
        self._workers = []
        self._lock = threading.Lock()

    def send(self, job_id, url, payload):
        with self._lock:
            if len(self._workers) < self.WORKERS:
                worker = threading.Thread(target=self._run, name="dummyllm-webhook", daemon=True)
                self._workers.append(worker)
                worker.start()
        self._queue.put((job_id, url, _json_bytes(payload)))

    def close(self):
        for _ in self._workers:
            self._queue.put(None)

    def _run(self):
        for delivery in iter(self._queue.get, None):
            self._deliver(*delivery)

    def _deliver(self, job_id, url, body):
        for attempt, backoff_s in enumerate(self.BACKOFF_S + (None,), start=1):
            record = {"attempt": attempt, "at_ms": _now_ms()}
            try:
                record["status"] = self._post(url, body)
            except (OSError, http.client.HTTPException) as error:
                record["error"] = str(error) or type(error).__name__
            self._store.record_callback(job_id, record)
            if 200 <= record.get("status", 0) < 300 or backoff_s is None:
                return
            if self._stopping.wait(backoff_s):
                return

    def _post(self, url, body):
        # http.client, not urllib: proxy variables must not send callbacks elsewhere.
        parts = urllib.parse.urlsplit(url)
        connection_class = (http.client.HTTPSConnection if parts.scheme == "https"
                            else http.client.HTTPConnection)
        connection = connection_class(parts.hostname, parts.port, timeout=self.TIMEOUT_S)
        try:
            target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
            connection.request("POST", target, body, {"Content-Type": "application/json",
                                                      "User-Agent": "dummyLLM/" + __version__})
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()


class _Headers(dict):
    """Request header fields by lower-case name; repeated fields joined by ", "."""

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)


DRIBBLE_PIECES = 8
JOURNAL_BODY_BYTES = 4096
JOURNAL_HEADERS = ("Idempotency-Key", "X-Trace-Id", "User-Agent")
_REQUEST_LINE = re.compile(r"(\S+) (\S+) HTTP/([0-9])\.([0-9])\Z")
MAX_HEADER_FIELDS = 100
MAX_LINE_BYTES = 65536


class _Handler(BaseHTTPRequestHandler):
    """One connection: parse, read the body, route, answer in one send."""

    protocol_version = "HTTP/1.1"
    server_version = "dummyLLM/" + __version__
    timeout = 30  # idle keep-alive connections let go of their thread after this
    _request = _fault = _route = None  # the request being answered, its fault and route

    def parse_request(self):
        # Replaces http.server's, which parses headers with the email package:
        # half the CPU time of a small request.  Sets what it sets.
        self.command, self.request_version, self.close_connection = None, "HTTP/1.0", True
        self._request = self._fault = self._route = None
        self.requestline = self.raw_requestline.decode("latin-1").rstrip("\r\n")
        line = _REQUEST_LINE.match(self.requestline)
        if not line:
            if self.requestline.strip():
                self.send_error(400, f"malformed request line {self.requestline[:200]!r}")
            return False
        if line.group(3) != "1":
            self.send_error(505, "only HTTP/1.0 and HTTP/1.1 are served")
            return False
        self.command, self.path = line.group(1), line.group(2)
        self.request_version = f"HTTP/1.{line.group(4)}"
        self.headers = headers = _Headers()
        for _ in range(MAX_HEADER_FIELDS + 1):
            raw = self.rfile.readline(MAX_LINE_BYTES + 1)
            if raw in (b"\r\n", b"\n", b""):
                break
            if len(raw) > MAX_LINE_BYTES:
                self.send_error(431, f"a header line is longer than {MAX_LINE_BYTES} bytes")
                return False
            name, colon, value = raw.decode("latin-1").partition(":")
            if not colon or not name or name != name.strip():  # also obsolete line folding
                self.send_error(400, f"malformed header line {raw[:200]!r}")
                return False
            name, value = name.lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        else:
            self.send_error(431, f"more than {MAX_HEADER_FIELDS} header fields")
            return False
        connection = headers.get("connection", "").lower()
        self.close_connection = connection == "close" or (
            self.request_version == "HTTP/1.0" and connection != "keep-alive")
        if headers.get("expect", "").lower() == "100-continue" and self.request_version != "HTTP/1.0":
            return self.handle_expect_100()
        return True

    def setup(self):
        super().setup()
        self._started = time.perf_counter()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def __getattr__(self, name):
        # http.server looks up do_<METHOD>; every method goes through the router,
        # so an unsupported one is a 405 with Allow, not a 501.
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def _dispatch(self):
        self._started = time.perf_counter()
        path, _, query = self.path.partition("?")
        self._openai = path.startswith(OPENAI_PATHS)
        self._request = Request(self.command, path, query, self.headers, b"", {},
                                time.monotonic(), {})
        try:
            answer = self._answer(self._request)
        except ApiError as error:
            answer = Answer(payload=error)
        except (ConnectionError, socket.timeout):
            self.close_connection = True
            return
        except Exception as exc:  # the answer is a 500, never a traceback
            self.server.log(f"dummyLLM: internal error on {self.command} {self.path}: {exc!r}")
            answer = Answer(payload=ApiError(500, "INTERNAL", "internal error"))
        try:
            self._deliver(answer)
        except (ConnectionError, socket.timeout):
            self.close_connection = True  # the client left mid-answer

    def _answer(self, request):
        """The Answer to a request: its body, route, API key, chaos, handler."""
        body = self._read_body()
        if request.method == "OPTIONS" and self.server.config.cors:
            return self._preflight(request.path)
        handler, params, self._route = self.server.router.match(request.method, request.path)
        self._request = request = request._replace(body=body, params=params)
        if self._openai:
            self._check_api_key()
        chaos = None if request.path in CHAOS_FREE_PATHS else self.server.chaos_fault()
        if chaos is not None and chaos.kind != "dribble":
            return Answer(fault=chaos)  # the request is lost before it is served
        answer = handler(self.server, request)
        answer.fault = answer.fault or chaos
        return answer

    def _preflight(self, path):
        """The answer to a browser's CORS preflight (OPTIONS) for a known path."""
        methods = self.server.router.methods(path)
        if not methods:
            raise ApiError(404, "NOT_FOUND", f"no endpoint at {path}")
        requested = self.headers.get("access-control-request-headers")
        return Answer(204, headers=[("Access-Control-Allow-Methods", ", ".join(methods)),
                                    ("Access-Control-Allow-Headers",
                                     requested or CORS_ALLOWED_HEADERS),
                                    ("Access-Control-Max-Age", "600")])

    def _check_api_key(self):
        key = self.server.config.api_key
        given = self.headers.get("authorization", "")
        if key is not None and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "UNAUTHORIZED", "incorrect or missing API key; send "
                           "'Authorization: Bearer <key>' with the key given to --api-key")

    def _deliver(self, answer):
        if answer.events is not None:
            self._deliver_stream(answer)
            return
        if answer.live is not None:
            self._deliver_live(answer)
            return
        if answer.at is not None and not self._wait_until(answer.at):
            return
        if answer.status is None:
            self._answered(None)
            self._hold()
            return
        status, payload, headers = answer.status, answer.payload, answer.headers
        if isinstance(payload, ApiError):
            status, payload, headers = self._render(payload)
        if isinstance(payload, bytes):
            self._send_bytes(status, headers, payload, answer.content_type)
        elif answer.fault is None:
            self._send(status, payload, headers)
        else:
            self._send_faulty(answer, status, payload, headers)

    def _deliver_live(self, answer):
        """An event stream whose events come as they happen (job events)."""
        self._answered(answer.status)
        self.wfile.write(self._head(answer.status, answer.headers, "text/event-stream", None))
        for data in answer.live:
            if self.server.stopping.is_set():
                self.close_connection = True
                return
            self.wfile.write(self._chunk(data))
        if self.request_version != "HTTP/1.0":
            self.wfile.write(self._chunk(b""))

    def _chunk(self, data):
        """Data framed as one chunk of a chunked body (as it is, for HTTP/1.0)."""
        if self.request_version == "HTTP/1.0":
            return data
        return b"%x\r\n%s\r\n" % (len(data), data)

    def _render(self, error):
        """(status, body, headers) of an error, in the style of the path."""
        status, body = error.to_openai() if self._openai else (error.status, error.to_json())
        return status, body, error.headers

    def _send_faulty(self, answer, status, payload, headers):
        """Answer through a transport fault (see FAULTS)."""
        fault = answer.fault
        self._fault = fault
        if fault.kind == "reset":
            self._answered(None)
            self._send_rst()
        elif fault.kind == "disconnect":
            self._answered(None)
            self.close_connection = True  # closed cleanly, nothing said
        elif fault.kind == "status":
            self._send(*self._render(fault_error(fault, self.server.config.time_scale)))
        elif fault.kind == "empty":
            self._send_bytes(200, headers, b"")
        elif fault.kind == "malformed":
            body = _json_bytes(payload)
            self._send_bytes(200, headers, body[:len(body) // 2])
        else:  # dribble: the right answer, in DRIBBLE_PIECES pieces dribble_ms apart
            body = _json_bytes(payload)
            data = self._head(status, headers, "application/json", len(body)) + body
            self._answered(status)
            start, size = time.monotonic(), -(-len(data) // DRIBBLE_PIECES)
            for index in range(DRIBBLE_PIECES):
                if not self._wait_until(start + self.server.seconds(index * answer.dribble_ms)):
                    return
                self.wfile.write(data[index * size:(index + 1) * size])

    def _send_rst(self):
        """Close the connection with a TCP RST: SO_LINGER 0, then close at once."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # it holds a reference that would put the close off
        self.connection.close()

    def _deliver_stream(self, answer):
        # Every chunk is encoded now, before the first is due; the stream writer
        # then sends each at its time, the head with the first.
        head = self._head(answer.status, answer.headers, "text/event-stream", None)
        start = time.monotonic() if answer.at is None else answer.at
        frames = [(start + self.server.seconds(due_ms),
                   self._chunk(b"".join(event for _, event in group)))
                  for due_ms, group in itertools.groupby(answer.events, key=lambda e: e[0])]
        frames[0] = (frames[0][0], head + frames[0][1])
        self._answered(answer.status)
        if not self.server.streams.write(self.connection, frames):
            self.close_connection = True
            return
        if answer.ending == "stall":
            self._hold()
        elif answer.ending == "cut":
            self.close_connection = True  # the chunked body never ends: a broken stream
        elif self.request_version != "HTTP/1.0":
            self.wfile.write(self._chunk(b""))
            self.close_connection = self.close_connection or answer.ending == "close"

    def _wait_until(self, due):
        """Sleep until a monotonic time; False if the server stops meanwhile."""
        delay = due - time.monotonic()
        if delay > 0 and self.server.stopping.wait(delay):
            self.close_connection = True
            return False
        return True

    def _hold(self):
        """Send nothing more; keep the connection until the client closes it
        or the server stops.  Blocked in recv, the thread costs no CPU."""
        self.close_connection = True
        sock = self.connection
        self.server.held.add(sock)
        try:
            if not self.server.stopping.is_set():
                sock.settimeout(None)
                while sock.recv(65536):
                    pass  # whatever the client still sends is read and dropped
        except OSError:
            pass
        finally:
            self.server.held.discard(sock)

    def _read_body(self):
        limit = self.server.config.max_body_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(limit)
        length = self._content_length()
        if length is None:
            return b""
        if length > limit:
            self.close_connection = True  # the rest of the body is never read
            raise _too_large(limit)
        body = self.rfile.read(length)
        if len(body) < length:
            raise ConnectionError("client closed the connection mid-body")
        return body

    def _content_length(self):
        text = self.headers.get("Content-Length")
        if text is None:
            return None
        if not (text.isascii() and text.isdigit()):
            self.close_connection = True
            raise _bad_request("Content-Length must be a decimal number of bytes")
        return int(text)

    def _read_chunked(self, limit):
        parts, size_so_far = [], 0
        while True:
            line = self.rfile.readline(1026)
            if not line:
                raise ConnectionError("client closed the connection mid-body")
            size_text = line.split(b";", 1)[0].strip()
            if not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", size_text):
                self.close_connection = True
                raise _bad_request("malformed chunk size in chunked request body")
            size = int(size_text, 16)
            if size == 0:
                break
            size_so_far += size
            if size_so_far > limit:
                self.close_connection = True
                raise _too_large(limit)
            parts.append(self.rfile.read(size))
            self.rfile.readline(3)  # the CRLF that ends the chunk
        while self.rfile.readline(1026) not in (b"\r\n", b"\n", b""):
            pass  # trailer fields, ignored
        return b"".join(parts)

    def handle_expect_100(self):
        # Refuse an oversized body before the client sends it.
        text = self.headers.get("Content-Length", "")
        limit = self.server.config.max_body_bytes
        if text.isascii() and text.isdigit() and int(text) > limit:
            self.close_connection = True
            error = _too_large(limit)
            self._send(error.status, error.to_json(), ())
            return False
        return super().handle_expect_100()

    def send_error(self, code, message=None, explain=None):
        # Malformed request lines and headers, reported by http.server itself.
        self.close_connection = True
        reason = message or self.responses.get(code, ("error",))[0]
        self._send(code, ApiError(code, _ERROR_CODES.get(code, "BAD_REQUEST"), reason).to_json(), ())

    def _head(self, status, headers, content_type, length):
        """The status line and header fields; length None: a chunked stream."""
        lines = [
            f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}",
            "Server: " + self.server_version,
            "Date: " + _http_date(),
        ]
        if status == 204:
            pass  # No Content: neither a type nor a length
        elif length is not None:
            lines += ["Content-Type: " + content_type, f"Content-Length: {length}"]
        elif self.request_version == "HTTP/1.0":
            lines.append("Content-Type: " + content_type)
            self.close_connection = True  # no chunked encoding: the end of the body is the close
        else:
            lines += ["Content-Type: " + content_type, "Transfer-Encoding: chunked",
                      "Cache-Control: no-cache"]
        lines.extend(f"{name}: {value}" for name, value in headers)
        if self.server.config.cors:
            lines += [f"Access-Control-Allow-Origin: {self.server.config.cors}", "Vary: Origin",
                      "Access-Control-Expose-Headers: " + CORS_EXPOSED_HEADERS]
        if self.close_connection:
            lines.append("Connection: close")
        elif self.request_version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send(self, status, payload, headers):
        self._send_bytes(status, headers, b"" if payload is None else _json_bytes(payload))

    def _send_bytes(self, status, headers, body, content_type="application/json"):
        head = self._head(status, headers, content_type, len(body))
        self._answered(status)
        # One send: headers and body written apart stall on Nagle plus delayed ACK.
        self.wfile.write(head if self.command == "HEAD" else head + body)

    def _answered(self, status):
        """Count, log and journal the answer now going out (status None: none at all)."""
        request = self._request
        fault = self._fault or (request and request.note.get("fault"))
        self.server.count(self.command, self._route, status, fault)
        if not self.server.config.quiet:
            self._log_access(status, fault)
        if request is None or request.path in UNJOURNALED_PATHS:
            return
        text = request.body[:JOURNAL_BODY_BYTES].decode("utf-8", "replace")
        self.server.journal.record({
            "at_ms": _now_ms() - round((time.monotonic() - request.received) * 1000),
            "monotonic_ms": round(request.received * 1000, 3),
            "method": request.method, "path": request.path, "query": request.query,
            "headers": {name: request.headers.get(name) for name in JOURNAL_HEADERS
                        if request.headers.get(name) is not None},
            "body": text, "body_truncated": len(request.body) > JOURNAL_BODY_BYTES,
            "status": status, "fault": fault and fault.to_json(),
            "job_id": request.note.get("job_id"),
            "trace_id": request.note.get("trace_id") or request.headers.get("x-trace-id"),
        })

    def _log_access(self, status, fault):
        elapsed_ms = round((time.perf_counter() - self._started) * 1000, 1)
        request = self._request  # None when http.server itself refused the request
        path = request.path if request else getattr(self, "path", "")
        method = self.command or "-"
        if self.server.config.log_format == "json":
            note = request.note if request else {}
            self.server.log(json.dumps({
                "time": _now_ms() / 1000, "method": method, "path": path,
                "status": status, "ms": elapsed_ms, "job_id": note.get("job_id"),
                "trace_id": note.get("trace_id") or (request and request.headers.get("x-trace-id")),
                "fault": fault and fault.to_json()}))
        else:
            self.server.log(f"{method} {path or '-'} {status or '-'} {elapsed_ms}ms"
                            + (f" fault={json.dumps(fault.to_json())}" if fault else ""))

    def log_message(self, format, *args):
        if not self.server.config.quiet:
            self.server.log(f"{self.address_string()} {format % args}")


_date_cache = (0, "")


def _http_date():
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True))
    return _date_cache[1]


class _LogWriter:
    """Write log lines from one thread, so a parent that never reads our
    stderr blocks only this thread; lines beyond the backlog are dropped."""

    def __init__(self, backlog=10_000):
        self._lines = queue.Queue(backlog)
        self._thread = threading.Thread(target=self._run, name="dummyllm-log", daemon=True)
        self._thread.start()

    def write(self, line):
        try:
            self._lines.put_nowait(line)
        except queue.Full:
            pass

    def flush(self, timeout=0.5):
        deadline = time.monotonic() + timeout
        while not self._lines.empty() and time.monotonic() < deadline:
            time.sleep(0.005)

    def _run(self):
        while True:
            line = self._lines.get()
            try:
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass  # stderr closed: the log is lost, the server goes on


class DummyLLMServer(ThreadingHTTPServer):
    """The dummyLLM HTTP server: ``DummyLLMServer(port=0, mode="fail", ...)``.

    Takes the options of the command line as keywords (or a ready Config).
    ``start()`` serves from a background thread, ``stop()`` ends it; the
    server is also a context manager that stops on exit.
    """

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128   # the default 5 makes bursts of connections wait seconds
    allow_reuse_address = True

    def __init__(self, config=None, **options):
        self.config = config if config is not None else make_config(**options)
        if ":" in self.config.host:
            self.address_family = socket.AF_INET6
        self.router = Router(ROUTES)
        self._log_writer = None if self.config.quiet else _LogWriter()
        self._thread = None
        self.stopping = threading.Event()   # wakes handlers that wait to answer
        self.journal = RequestJournal(self.config.journal_size)
        self._counts_lock = threading.Lock()
        self.requests_counted = collections.Counter()  # (method, route, status) -> answers
        self.faults_counted = collections.Counter()    # fault kind -> times injected
        self._chaos_count = itertools.count()
        self.streams = _StreamWriter()
        self.held = set()                   # sockets of connections held open (hang, stall)
        super().__init__((self.config.host, self.config.port), _Handler)
        self.store = JobStore(self.config)
        self.webhooks = _Webhooks(self.store, self.stopping)
        self.store.on_finish = self.webhooks.send

    def server_bind(self):
        # HTTPServer.server_bind also calls socket.getfqdn(), a reverse DNS
        # lookup that has taken 30 s on CI machines; the name is never used.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self):
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def reset(self):
        """Start clean: cancel and forget every job, forget every counter,
        idempotency key and journal entry.  Returns how many of each went."""
        removed = self.store.reset()
        removed["journal_entries"] = self.journal.clear()
        self._chaos_count = itertools.count()
        return removed

    def count(self, method, route, status, fault):
        """Count an answer for /metrics."""
        with self._counts_lock:
            self.requests_counted[(method, route or "unmatched", status or "none")] += 1
            if fault is not None:
                self.faults_counted[fault.kind] += 1

    def seconds(self, ms):
        """Real seconds of a simulated duration: ms times --time-scale."""
        return ms * self.config.time_scale / 1000

    def counted(self):
        """(answers by (method, route, status), faults by kind), for /metrics."""
        with self._counts_lock:
            return dict(self.requests_counted), dict(self.faults_counted)

    def chaos_fault(self):
        """The fault --chaos gives the next request, or None."""
        if not self.config.chaos:
            return None
        seed = self.config.seed if self.config.seed is not None else random.getrandbits(64)
        return chaos_fault(seed, next(self._chaos_count), self.config.chaos,
                           self.config.chaos_faults)

    def log(self, line):
        if self._log_writer is not None:
            self._log_writer.write(line)

    def serve_forever(self, poll_interval=0.05):
        super().serve_forever(poll_interval)

    def start(self):
        """Serve from a daemon thread; returns self."""
        self._thread = threading.Thread(target=self.serve_forever, name="dummyllm-server",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop serving (if started) and release the port and the timers."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def server_close(self):
        self.stopping.set()
        for sock in list(self.held):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in its recv
            except OSError:
                pass
        self.streams.close()
        super().server_close()
        if hasattr(self, "store"):
            self.store.close()
            self.webhooks.close()
        if self._log_writer is not None:
            self._log_writer.flush()

    def __exit__(self, *exc_info):
        self.stop()

    def handle_error(self, request, client_address):
        # Clients that vanish mid-answer are normal; anything else is one line.
        exc = sys.exc_info()[1]
        if not isinstance(exc, (ConnectionError, socket.timeout)):
            self.log(f"dummyLLM: error serving {client_address[0]}: {exc!r}")


def start_server(**options):
    """Start a server on a free loopback port in a background thread.

    Options are those of the command line (``mode``, ``latency_ms``,
    ``seed``...); ``port`` defaults to 0 and ``quiet`` to True.  Use it as a
    context manager, or call ``stop()``::

        with start_server(latency_ms=10) as server:
            urllib.request.urlopen(server.url + "/health")
    """
    options.setdefault("port", 0)
    options.setdefault("quiet", True)
    return DummyLLMServer(**options).start()


# --- Command line ---------------------------------------------------------------------

class _UsageError(Exception):
    pass


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(message)


def _argument_parser():
    parser = _ArgumentParser(
        prog="dummyllm.py",
        description="dummyLLM: a deterministic HTTP simulator of an LLM backend.",
        epilog="Each option can also be set by the environment variable shown; the flag wins.")
    for option in _OPTIONS:
        if option.text is None:
            parser.add_argument(option.flag, action="store_true", default=None, help=option.help,
                                dest=option.name)
        else:
            parser.add_argument(option.flag, metavar=option.name.upper(), dest=option.name,
                                help=f"{option.help}; ${option.env}")
    parser.add_argument("--version", action="version", version=f"dummyLLM {__version__}")
    return parser


def config_from_command_line(argv, environ):
    """A Config from flags, then environment variables, then defaults."""
    flags = vars(_argument_parser().parse_args(argv))
    values = {}
    for option in _OPTIONS:
        given, source = flags[option.name], option.flag
        if given is None and option.env and option.env in environ:
            given, source = environ[option.env], option.env
        if given is None:
            continue
        value = option.text(given) if option.text else given
        try:
            values[option.name] = option.check(value, source) if option.check else value
        except ValidationError as error:
            raise _UsageError(f"{source} {error.reason} (got {given!r})") from None
    return make_config(**values)


def main(argv=None, environ=None):
    """Run the server until SIGINT or SIGTERM; returns the exit status."""
    try:
        config = config_from_command_line(argv, os.environ if environ is None else environ)
    except _UsageError as error:
        print(f"dummyllm.py: error: {error}", file=sys.stderr)
        return 2
    try:
        server = DummyLLMServer(config)
    except OSError as error:
        print(f"dummyllm.py: error: cannot listen on {config.host}:{config.port}: "
              f"{error.strerror or error}", file=sys.stderr)
        return 1
    def stop(signum, frame):
        # shutdown() waits for serve_forever() to return, so it cannot run in
        # the thread that serves; raising here instead could land anywhere.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        print(f"dummyLLM listening on {server.url}", flush=True)
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
