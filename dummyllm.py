#!/usr/bin/env python3
"""dummyLLM: a deterministic HTTP simulator of LLM backends.

Point a task runner, agent system or CI pipeline at it instead of a real
model to test its timeouts, retries, cancellation, polling, streaming and
agent loops.  It simulates execution behaviour (state transitions, latency,
failures, hangs, broken streams, tool calls), not language.

It speaks a job API (/v1/jobs), the wire formats of OpenAI (chat
completions, the Responses API, embeddings, legacy completions, and Azure
OpenAI's and OpenRouter's paths for those; files and batches), Anthropic's
Messages and message batches, Google's Gemini, Ollama, Cohere, Amazon
Bedrock (Converse, and InvokeModel with Anthropic's bodies) and Google
Vertex AI (Gemini, Anthropic) (streaming included), an MCP tool server
(/mcp) whose tools fail, hang and answer late on cue, scripted or forced
tool calls, a reasoning model's thinking (signed blocks, reasoning tokens)
and the conversations the real APIs refuse (a tool result without its
call, a thinking block dropped from a tool loop), JSON drawn from a
request's schema for structured output, reply rules matched on the
request (and recorded from a real provider, to replay its answers
offline), the faults that retry logic must survive (scripted attempts,
transport faults, idempotency keys, quotas per key, a request journal), a
verdict on the client's retries, back-off, polling and idempotency, and a
load target (latency distributions, exact output lengths, slots and a
queue, vLLM's metrics, replicas behind a balancer).

Run it::

    python3 dummyllm.py --port 8787

Embed it in a test suite::

    with dummyllm.start_server(latency_ms=20, seed=1337) as server:
        ...  # talk to server.url

or run pytest with it as a plugin (``pytest -p dummyllm``) and ask for the
``dummyllm`` fixture: each test gets a scope of its own on one server.

One file, Python 3.9+ standard library only.  MIT licensed.

The sections of this file, in dependency order: each builds on those above
it (a name looked up only when a request runs may come later).

    Vocabulary                    job states, limits, the modes table, faults,
                                  the error codes, stream failures, findings;
                                  ApiError and _Fault
    Validation and configuration  rules that check one value and describe it
                                  as JSON Schema; the simulate settings; reply
                                  rules; MCP tools; the verdict's questions;
                                  the options
    Simulation                    pure functions in simulated milliseconds:
                                  what a request does and when, its reply
                                  (text, tool calls, JSON drawn from a schema),
                                  its stream's timeline (no clock, no I/O); a
                                  value checked against a JSON Schema
    Surfaces                      the protocol of a provider's unit, then a
                                  unit each (the job API; the server's own
                                  endpoints; OpenAI chat, Responses,
                                  embeddings, completions; Azure OpenAI;
                                  OpenRouter; Anthropic Messages; Gemini;
                                  Ollama; Cohere; Amazon Bedrock; Google
                                  Vertex AI; the vendors' batches; an MCP
                                  tool server) and their registration
    Job store                     the dict behind one lock, its Timer, the
                                  injected clock; uploaded files; MCP
                                  sessions; the quotas; the slots and what
                                  vLLM's metrics count; the journal
    Verdict                       findings on a client's requests and an
                                  agent's tool calls, from the journal (pure)
    Server                        the log, webhooks, recording, streams, the
                                  application (everything but the socket),
                                  connections; DummyLLMServer, start_server,
                                  and the ServerScope of one test on a
                                  shared server
    API document and pages        /openapi.json from the registered surfaces,
                                  the /docs page, the dashboard, the timeline
    Command line                  main()
    pytest plugin                 `pytest -p dummyllm`: a server per session,
                                  a ServerScope per test (pytest imported
                                  only when pytest loads it)

The life of a request.  A thread of the ThreadingHTTPServer runs a _Handler
for its connection: handle() waits for a request (and parks the connection
without a thread when none comes), handle_one_request() reads its head with
the file's own parser, and _dispatch() reads its body into a _Request and
asks the application: _Application.answer() takes its test id (_test_id:
whose scripts, sequences, rules, quotas and journal it is in), routes it
(_Router.match), checks its key, meets --chaos and calls the route's
handler with the route's surface.  A model call's handler is _model_call:
the surface's parse() makes the common _Call (simulate settings from the
body, the header or a reply rule), _admit() counts it against its key's
quota; with --record the _Recorder forwards it, and a recorded answer is
replayed by _replay; else the surface's respond() takes the call's place in
the seeded sequences and scripts (_JobStore.plan_call, the only work under
the store's lock), draws its plan once, outside it (_plan), then refuses,
fails, hangs or answers: its reply (_reply) books a slot (_Capacity.book,
under a lock of its own: when its first token goes out), then a JSON answer
is written by the surface's answer(), a stream as a _Render of
_stream_timeline.  The handler's _deliver() waits until the answer is due
and writes it in one send (_send_bytes), spoils it with a fault, or gives a
stream to the _StreamWriter, which renders each frame as it falls due and
sends it; _answered() tells _Application.record(), which counts it, logs it
and adds it to the _Journal the verdict reads.  What the request learns on
its way (its job, key, rule, error code...) is written in its _Note.  An
ApiError raised anywhere is written once, by _render_error, in the shape of
the surface that answers.

Job transitions are driven by one threading.Timer, armed for the earliest
transition due and re-armed when it fires or when an earlier one arrives
(see _JobStore).  Every store operation first applies the transitions
already due, so no answer depends on when that Timer ran.  Against one
timer thread waiting on a condition, it measured create 0.93 to 1.05 times
as fast and job lateness p99 3.2 to 3.7 ms against 3.4 to 4.1 ms.
"""

import argparse
import base64
import bisect
import collections
import email.utils
import errno
import fnmatch
import functools
import hashlib
import heapq
import hmac
import http.client
import io
import ipaddress
import itertools
import json
import math
import operator
import os
import queue
import random
import re
import selectors
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
import types
import urllib.parse
import zlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:
    import resource  # the open-file limit (not on Windows)
except ImportError:
    resource = None

__version__ = "1.1.0"
__all__ = ["DummyLLMServer", "ServerScope", "start_server", "make_config", "Config", "ApiError",
           "main", "__version__"]


# --- Vocabulary -------------------------------------------------------------------
# The words the rest of the file is written in.  Each is a table; what other
# sections need (enums, schemas, messages, the dashboard's states) derives
# from these.

_ACTIVE_STATES = ("queued", "running")
_TERMINAL_STATES = ("ok", "fail", "timeout", "cancelled")
_JOB_STATES = _ACTIVE_STATES + _TERMINAL_STATES

_MAX_LATENCY_MS = 3_600_000
_MAX_TIMEOUT_MS = 86_400_000
_MAX_TRACE_ID_CHARS = 256


class _Mode(collections.namedtuple("_Mode", "state at text error draws weights about",
                                   defaults=(None,) * 7)):
    """How a request in this mode ends: in `state`, `at` a time ("latency";
    "slow", the latency times --slow-factor; "deadline", timeout_ms; "never";
    "refused": at once, and no job is created), with a result `text`
    ("reply" or "echo") or an `error` code.  A mode that `draws` picks one of
    those modes by `weights` (None: every mode that does not draw, by
    --weights) from the request's seeded sequence."""


# The modes, in the order weighted draws walk them (part of the determinism
# contract).  A new mode is one entry here.
_MODES = {
    "ok": _Mode("ok", "latency", "reply", about="succeeds after latency_ms"),
    "echo": _Mode("ok", "latency", "echo", about="succeeds, answering the messages as JSON"),
    "slow": _Mode("ok", "slow", "reply", about="succeeds after latency_ms times --slow-factor"),
    "fail": _Mode("fail", "latency", error="SIM_FAIL", about="fails after latency_ms"),
    "hang": _Mode("running", "never", about="never ends; holds no thread"),
    "timeout": _Mode("timeout", "deadline", error="TIMEOUT", about="ends at timeout_ms"),
    "rate_limit": _Mode("rate_limited", "refused", error="RATE_LIMITED",
                        about="refused at once with 429 and retry headers"),
    "overloaded": _Mode("overloaded", "refused", error="OVERLOADED",
                        about="refused at once with 503 (or simulate.status)"),
    "quota_exhausted": _Mode("quota_exhausted", "refused", error="QUOTA_EXHAUSTED",
                             about="refused at once with a 429 that must not be retried"),
    "flaky": _Mode(draws=("ok", "fail", "hang"), weights={"ok": 3, "fail": 5, "hang": 2},
                   about="draws ok, fail or hang"),
    "random": _Mode(about="draws any mode above by --weights"),
}
_DRAWABLE_MODES = tuple(name for name, mode in _MODES.items() if mode.state is not None)
_REFUSED_STATES = tuple(mode.state for mode in _MODES.values() if mode.at == "refused")
_DEFAULT_RANDOM_WEIGHTS = {"ok": 70, "echo": 10, "slow": 10, "fail": 5, "hang": 3, "timeout": 2}
_REFUSAL_RETRY_AFTER_MS = 1000  # of rate_limit and overloaded, when simulate gives none


def _draws(mode_name):
    """The modes a drawing mode may draw."""
    return _MODES[mode_name].draws or _DRAWABLE_MODES


class _ErrorKind(collections.namedtuple("_ErrorKind", "status message")):
    """One error code: its HTTP status (None: chosen where it is raised) and
    its default message.  Each surface says how its shape names it."""


# Every error the server answers, and the codes a job's `error` carries.
_ERRORS = {code: _ErrorKind(*row) for code, row in {
    "BAD_REQUEST": (400, "malformed HTTP request"),
    "INVALID_JSON": (400, "request body is not valid JSON"),
    "UNAUTHORIZED": (401, "incorrect or missing API key"),
    "NOT_FOUND": (404, "not found"),
    "METHOD_NOT_ALLOWED": (405, "method not allowed"),
    "REQUEST_TIMEOUT": (408, "the request did not arrive in time"),
    "IDEMPOTENCY_CONFLICT": (409, "this Idempotency-Key was used with a different request"),
    "PAYLOAD_TOO_LARGE": (413, "request body is too large"),
    "URI_TOO_LONG": (414, "request line is too long"),
    "VALIDATION_ERROR": (422, "a field breaks its rule"),
    "RATE_LIMITED": (429, "simulated rate limit: too many requests"),
    "QUOTA_EXHAUSTED": (429, "simulated quota exhausted: check your plan and billing details"),
    "CONTEXT_LENGTH_EXCEEDED": (400, "the prompt is longer than the context window"),
    # What the real APIs refuse of a conversation (see --lenient); the
    # verdict's findings of the same names.
    "ORPHAN_TOOL_RESULT": (400, "a tool result that answers no tool call before it"),
    "UNANSWERED_TOOL_CALL": (400, "a tool call that the next message does not answer"),
    "DROPPED_THINKING": (400, "a tool loop continued with thinking on, without the thinking "
                              "block of the call it answers"),
    "EDITED_THINKING": (400, "a thinking block whose signature is not its own"),
    "UNKNOWN_PREVIOUS_RESPONSE": (400, "a previous response this server does not hold"),
    "HEADERS_TOO_LARGE": (431, "request header fields are too large"),
    "INTERNAL": (500, "internal error"),
    "BAD_GATEWAY": (502, "the upstream could not be reached"),
    "SIM_FAIL": (500, "simulated error"),
    "NOT_IMPLEMENTED": (501, "not implemented"),
    "OVERLOADED": (503, "simulated overload: the server is too busy"),
    "CAPACITY": (503, "every stored job is still active; retry later"),
    "TOO_MANY_CONNECTIONS": (503, "every connection is busy; retry later"),
    "TIMEOUT": (504, "job passed its timeout_ms deadline"),
    "HTTP_VERSION_NOT_SUPPORTED": (505, "only HTTP/1.0 and HTTP/1.1 are served"),
    "FORBIDDEN": (403, "the request's origin is not allowed"),
    "NOT_ACCEPTABLE": (406, "the Accept header admits no answer this endpoint gives"),
    "UNKNOWN_METHOD": (None, "method not found"),
    "TOOL_ERROR": (None, "the tool answered with a JSON-RPC error"),
    "INJECTED_FAULT": (None, "simulated HTTP fault"),
    "CANCELLED": (None, "job was cancelled by the client"),
}.items()}
_CONVERSATION_ERRORS = ("ORPHAN_TOOL_RESULT", "UNANSWERED_TOOL_CALL", "DROPPED_THINKING",
                        "EDITED_THINKING", "UNKNOWN_PREVIOUS_RESPONSE")
# The reason phrase of each HTTP status (a surface may add its own).
_REASONS = {status.value: status.phrase for status in HTTPStatus}
_JOB_ERROR_CODES = tuple(dict.fromkeys(
    [mode.error for mode in _MODES.values() if mode.error and mode.at != "refused"]
    + ["CANCELLED"]))


class ApiError(Exception):
    """An answer that is not a success: a code of the error table, a message
    and the field at fault.

    Raised anywhere and written in one place, in the shape of the surface
    that answers.  `retry_after_ms` (simulated) becomes the retry headers;
    `status` overrides the table's where the code has none or several;
    `quota` is the quota that refused the request (see _Quotas.admit);
    `detail` what only one surface's shape can say (a JSON-RPC error's own
    code and data).
    """

    def __init__(self, code, message=None, field=None, status=None, retry_after_ms=None,
                 headers=(), quota=None, detail=None):
        kind = _ERRORS[code]
        super().__init__(message or kind.message)
        self.code, self.status = code, status or kind.status
        self.message, self.field = message or kind.message, field
        self.retry_after_ms, self.headers, self.quota = retry_after_ms, tuple(headers), quota
        self.detail = detail


class _ValidationError(ApiError, ValueError):
    """A value that breaks a rule: 422 for a request, exit status 2 for an option."""

    def __init__(self, field, reason):
        super().__init__("VALIDATION_ERROR", f"{field} {reason}" if field else reason, field)
        self.reason = reason


class _FaultKind(collections.namedtuple("_FaultKind", "loses_request about")):
    """A transport fault: whether it loses the request when it comes before
    the work (fault_phase "before"), and what the client sees."""


# The transport faults, by the name simulate.fault gives them ("status" as
# "status:N" or {"status": N}).
_FAULTS = {
    "reset": _FaultKind(True, "the connection closes with a TCP RST and no answer"),
    "disconnect": _FaultKind(True, "the connection closes cleanly with no answer"),
    "empty": _FaultKind(False, "200 with an empty body"),
    "malformed": _FaultKind(False, "200 whose JSON body is cut in half"),
    "dribble": _FaultKind(False, "the right answer in 8 pieces, dribble_ms apart"),
    "status": _FaultKind(True, "that status with the standard error body"),
}
_NAMED_FAULTS = tuple(kind for kind in _FAULTS if kind != "status")

# Ways a stream breaks after N content chunks.
_STREAM_FAILURES = {
    "cut_after": "the connection closes without ending the body",
    "stall_after": "silence on an open connection",
    "error_after": "an error event, then the end",
    "truncate_after": "a clean end, without the finish event",
    "malformed_after": "the next event with its JSON cut in half, then a clean end",
}


# How embeddings are made (simulate.embedding, --embeddings): both are pure
# functions of the model, the text and the dimensions (see _embedding).
_EMBEDDING_KINDS = {
    "hash": "a vector per text; how near two different texts are means nothing",
    "similar": "texts that share words (or parts of words) are near",
}


# The versions of MCP (its streamable HTTP transport) served, oldest first; a
# client that offers another is answered with the newest.  From the last on,
# arguments a tool's input schema refuses are the tool's error result, not a
# JSON-RPC error (SEP-1303), so that the model sees what to correct.
_MCP_VERSIONS = ("2025-03-26", "2025-06-18", "2025-11-25")
_MCP_ARGUMENTS_AS_RESULT = "2025-11-25"

# The stream failures that leave a partial answer a client may take for a whole one.
_BROKEN_STREAM_FAILURES = ("cut_after", "truncate_after", "malformed_after")


class _FindingKind(collections.namedtuple("_FindingKind", "severity about")):
    """What the verdict on a client can find: its severity ("error" makes
    the verdict fail; a query may raise a "warning" to it) and its meaning."""


# The findings of the verdict on a client's requests (see _verdict).
_FINDINGS = {code: _FindingKind(*row) for code, row in {
    "RETRY_AFTER_IGNORED": ("error", "a retry came sooner than the retry-after of the answer "
                            "before it"),
    "NO_BACKOFF": ("warning", "three or more retries in a row, after failures that gave no "
                   "retry-after, with gaps that do not grow"),
    "NO_JITTER": ("warning", "three or more keys retried with the same gaps, to the "
                  "millisecond: a thundering herd"),
    "RETRIED_NON_RETRYABLE": ("error", "a retry after an answer no retry can change: a 4xx "
                              "other than 408 and 429, or an exhausted quota"),
    "GAVE_UP": ("warning", "the last attempt failed in a way worth retrying, and no retry "
                "followed within settle_ms"),
    "RETRY_STORM": ("warning", "more than max_attempts attempts of one request, or more than "
                    "20 in one second"),
    "DUPLICATE_WORK": ("error", "a second job or stored response created for an equal body "
                       "after the first one's answer was lost, without an Idempotency-Key"),
    "POLL_TOO_FAST": ("warning", "polls of one job closer than min_poll_ms on average, or "
                      "going on more than 2 s after one said it had ended"),
    "NO_CANCEL": ("warning", "a job or background response last seen active, then neither "
                  "polled nor cancelled within settle_ms"),
    "TRUNCATED_STREAM_ACCEPTED": ("warning", "a stream broken by cut_after, truncate_after or "
                                  "malformed_after, and no retry"),
    **{code: ("error", f"a model call refused for {_ERRORS[code].message}, as the real API "
                       "refuses it") for code in _CONVERSATION_ERRORS},
    "TOOL_ARGUMENTS_REFUSED": ("warning", "an MCP tool called with arguments its input schema "
                               "refuses"),
    "TOOL_RETRIED_UNCHANGED": ("error", "a failed MCP tool call repeated with the same "
                               "arguments more than twice in a row"),
    "TOOL_ERROR_IGNORED": ("error", "an MCP tool's error result missing from the tool results "
                           "of the next model call of its key"),
    "TOOL_HANG_NOT_CANCELLED": ("warning", "an MCP tool call left without an answer, and not "
                                "cancelled within settle_ms"),
}.items()}


class _Fault(collections.namedtuple("_Fault", "kind status retry_after_ms state")):
    """A fault: a kind of _FAULTS (a "status" fault has a status and maybe
    retry_after_ms), or "unknown_state" (a poll answered with `state`)."""

    def to_json(self):
        if self.kind == "status":
            return {"status": self.status, "retry_after_ms": self.retry_after_ms}
        if self.kind == "unknown_state":
            return {"unknown_state": self.state}
        return self.kind


# --- Validation and configuration -------------------------------------------------
# A rule checks one value and describes it: ``rule(value, field)`` returns
# the value (in its normal form) or raises _ValidationError naming the
# field; `rule.schema` is its JSON Schema; `rule.from_text` reads it from a
# query parameter, a flag or an environment variable.  Request bodies, the
# simulate settings, query parameters and server options are tables of rules,
# so each limit is written once and the checks, the API document and the
# help text follow from it.

_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _json_bytes(payload):
    return _ENCODER.encode(payload).encode("utf-8")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


class _Rule:
    schema = {}

    def from_text(self, text):
        return text


class _Int(_Rule):
    kind, noun, accepts = "integer", "an integer", staticmethod(_is_int)

    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi
        self.schema = {"type": self.kind, "minimum": lo, "maximum": hi}

    def __call__(self, value, field):
        if isinstance(value, float) and value.is_integer() and self.lo <= value <= self.hi:
            return int(value)  # JSON Schema's integers include 2.0
        if not self.accepts(value) or not self.lo <= value <= self.hi:
            raise _ValidationError(field, f"must be {self.noun} from {self.lo} to {self.hi}")
        return value

    def from_text(self, text):
        # Plain digits only: int() also takes "1_000" and "٣", and thousands of
        # digits cost it seconds.
        return int(text) if re.fullmatch(r"-?[0-9]{1,19}", text.strip()) else text


class _Number(_Int):
    kind, noun, accepts = "number", "a number", staticmethod(_is_number)

    def from_text(self, text):
        if re.fullmatch(r"-?([0-9]{1,19}(\.[0-9]*)?|\.[0-9]+)", text.strip()):
            number = float(text)
            return int(number) if number.is_integer() else number
        return text


class _Text(_Rule):
    def __init__(self, max_chars=None, non_empty=False):
        self.max_chars, self.non_empty = max_chars, non_empty
        self.schema = {"type": "string"}
        if non_empty:
            self.schema["minLength"] = 1
        if max_chars is not None:
            self.schema["maxLength"] = max_chars

    def __call__(self, value, field):
        if not isinstance(value, str) or (self.non_empty and not value):
            raise _ValidationError(field, "must be a non-empty string" if self.non_empty
                                   else "must be a string")
        if self.max_chars is not None and len(value) > self.max_chars:
            raise _ValidationError(field, f"must be at most {self.max_chars} characters")
        return value


class _Choice(_Rule):
    def __init__(self, *choices):
        self.choices = choices
        self.schema = {"type": "string", "enum": list(choices)}

    def __call__(self, value, field):
        if value not in self.choices:
            raise _ValidationError(field, "must be one of " + ", ".join(self.choices))
        return value


class _Bool(_Rule):
    schema = {"type": "boolean"}

    def __call__(self, value, field):
        if not isinstance(value, bool):
            raise _ValidationError(field, "must be true or false")
        return value


class _Nullable(_Rule):
    """Another rule, or None ("none" or "null" as text)."""

    def __init__(self, rule):
        self.rule = rule
        self.schema = dict(rule.schema, type=[rule.schema.get("type", "string"), "null"])

    def __call__(self, value, field):
        return None if value is None else self.rule(value, field)

    def from_text(self, text):
        return None if text.strip().lower() in ("", "none", "null") else self.rule.from_text(text)


class _Check(_Rule):
    """A rule written as a function ``check(value, field)``, with its schema."""

    def __init__(self, check, schema, from_text=None):
        self.check, self.schema = check, schema
        if from_text is not None:
            self.from_text = from_text

    def __call__(self, value, field):
        return self.check(value, field)


_MODE_RULE = _Choice(*_MODES)


def _check_object(value, field):
    if not isinstance(value, dict):
        raise _ValidationError(field, "must be an object")
    return value


_OBJECT = _Check(_check_object, {"type": "object"})


def _check_json_schema(value, field):
    if not isinstance(value, (dict, bool)):
        raise _ValidationError(field, "must be a JSON Schema: an object or a boolean")
    return value


_JSON_SCHEMA = _Check(_check_json_schema, {"type": ["object", "boolean"]})


# A weight is a share: a million to one is as lopsided as a draw needs.
_WEIGHT = _Number(0, 1_000_000)


def _check_weights(value, field, allowed=_DRAWABLE_MODES):
    """Weights are {mode: _WEIGHT}, at least one of them positive."""
    if not isinstance(value, dict):
        raise _ValidationError(field, "must map modes to weights, e.g. ok=3, fail=1")
    for mode, weight in value.items():
        if mode not in allowed:
            raise _ValidationError(f"{field}.{mode}", f"names {mode!r}, not a mode that can be "
                                   "drawn here: " + ", ".join(allowed))
        _WEIGHT(weight, f"{field}.{mode}")
    if not any(value.values()):
        raise _ValidationError(field, "must give at least one mode a positive weight")
    return dict(value)


def _weights_from_text(text):
    """'ok=70,fail=30' -> {"ok": 70, "fail": 30}; anything else stays text."""
    weights = {}
    for item in text.split(","):
        mode, sep, weight = item.partition("=")
        weight = _WEIGHT.from_text(weight)
        if not sep or isinstance(weight, str):
            return text
        weights[mode.strip()] = weight
    return weights


_WEIGHTS = _Check(_check_weights, {
    "type": "object", "propertyNames": {"enum": list(_DRAWABLE_MODES)},
    "additionalProperties": _WEIGHT.schema, "not": {"additionalProperties": {"const": 0}}},
    _weights_from_text)


_FAULT_STATUS, _FAULT_RETRY_MS = _Int(400, 599), _Nullable(_Int(0, _MAX_TIMEOUT_MS))
_UNKNOWN_STATE = _Text(64, non_empty=True)


def _check_fault(value, field, poll=False):
    """A fault: "reset", ..., "status:503", {"status": 503, "retry_after_ms": 1000},
    or, for polls only, {"unknown_state": "paused"}."""
    if isinstance(value, _Fault):
        return value
    if isinstance(value, str):
        kind, _, status = value.partition(":")
        if value in _NAMED_FAULTS:
            return _Fault(value, None, None, None)
        if kind == "status" and status.isascii() and status.isdigit() and len(status) < 4:
            value = {"status": int(status)}
    if poll and isinstance(value, dict) and set(value) == {"unknown_state"}:
        state = _UNKNOWN_STATE(value["unknown_state"], f"{field}.unknown_state")
        return _Fault("unknown_state", None, None, state)
    if isinstance(value, dict) and "status" in value and set(value) <= {"status",
                                                                        "retry_after_ms"}:
        status = _FAULT_STATUS(value["status"], f"{field}.status")
        retry_ms = _FAULT_RETRY_MS(value.get("retry_after_ms"), f"{field}.retry_after_ms")
        return _Fault("status", status, retry_ms, None)
    raise _ValidationError(field, "must be one of " + ", ".join(_NAMED_FAULTS)
                           + ', "status:N", {"status": N, "retry_after_ms": M}'
                           + (', {"unknown_state": "..."}' if poll else "") + " or null")


_FAULT_SCHEMA = {"oneOf": [
    {"type": "string", "enum": list(_NAMED_FAULTS)},
    {"type": "string", "pattern": "^status:[45][0-9][0-9]$"},
    {"type": "object", "required": ["status"], "additionalProperties": False,
     "properties": {"status": _FAULT_STATUS.schema, "retry_after_ms": _FAULT_RETRY_MS.schema}}]}


def _check_fault_list(value, field):
    """Faults as "reset,status:503" or a list of faults."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise _ValidationError(field, "must list faults, e.g. reset,status:503,dribble")
    return tuple(_check_fault(item.strip() if isinstance(item, str) else item, field)
                 for item in items)


def _check_poll_faults(value, field):
    if not isinstance(value, (list, tuple)) or len(value) > 10_000:
        raise _ValidationError(field, "must be a list of faults (null for a normal answer)")
    return tuple(None if fault is None else _check_fault(fault, f"{field}[{index}]", poll=True)
                 for index, fault in enumerate(value))


def _check_stream_failure(value, field):
    """Exactly one of {"cut_after": N}, {"stall_after": N}, {"error_after": N}."""
    if not isinstance(value, dict) or len(value) != 1:
        raise _ValidationError(field, "must be an object with one of "
                               + ", ".join(_STREAM_FAILURES) + ', e.g. {"cut_after": 3}')
    (kind, count), = value.items()
    if kind not in _STREAM_FAILURES:
        raise _ValidationError(f"{field}.{kind}", "is not a stream failure; use "
                               + ", ".join(_STREAM_FAILURES))
    return {kind: _Int(0, 1_000_000)(count, f"{field}.{kind}")}


def _check_script(value, field):
    """A non-empty list of steps, each a mode name or a partial simulate object."""
    if not isinstance(value, (list, tuple)) or not value:
        raise _ValidationError(field, "must be a non-empty list of steps: mode names or "
                               "simulate objects")
    steps = []
    for index, step in enumerate(value):
        step_field = f"{field}[{index}]"
        if isinstance(step, str):
            steps.append({"mode": _MODE_RULE(step, step_field)})
        elif isinstance(step, dict):
            if "script" in step:
                raise _ValidationError(f"{step_field}.script", "is not allowed inside a step")
            steps.append(_given(step, _SIMULATE_FIELDS, step_field, strict=True))
        else:
            raise _ValidationError(step_field, "must be a mode name or a simulate object")
    return tuple(steps)


_TOOL_CALL_NAME, _TOOL_CALL_ID = _Text(non_empty=True), _Nullable(_Text(256, non_empty=True))


def _check_tool_calls(value, field):
    """Tool calls: [{"name", "arguments": an object or a JSON string, "id"}]."""
    if not isinstance(value, (list, tuple)) or not value:
        raise _ValidationError(field, "must be a non-empty list of tool calls")
    calls = []
    for index, call in enumerate(value):
        name = f"{field}[{index}]"
        if not isinstance(call, dict) or set(call) - {"name", "arguments", "id"}:
            raise _ValidationError(name, 'must be an object with "name", "arguments" and '
                                         'maybe "id"')
        _TOOL_CALL_NAME(call.get("name"), name + ".name")
        arguments = call.get("arguments", {})
        if not isinstance(arguments, (dict, str)):
            raise _ValidationError(name + ".arguments", "must be an object or a string")
        _TOOL_CALL_ID(call.get("id"), name + ".id")
        calls.append({"name": call["name"], "arguments": arguments, "id": call.get("id")})
    return tuple(calls)


def _check_replica(value, field):
    found = re.fullmatch(r"([0-9]{1,2})/([0-9]{1,2})", value) if isinstance(value, str) else None
    if found is None or not int(found[1]) < int(found[2]) <= 16:
        raise _ValidationError(field, "must be I/N: this replica's index I of N replicas, "
                               "0 <= I < N <= 16, e.g. 0/3")
    return value


class _Names(_Rule):
    """Names, as a list or comma-separated (a flag of them may be repeated)."""

    schema = {"type": "array", "items": {"type": "string"}}

    def __init__(self, example, lower=False):
        self.example, self.lower = example, lower

    def __call__(self, value, field):
        names = value.split(",") if isinstance(value, str) else value
        if not isinstance(names, (list, tuple)):
            raise _ValidationError(field, "must list names, e.g. " + self.example)
        return tuple(_Text(non_empty=True)(name.strip().lower() if self.lower else name.strip(),
                                           field) for name in names if name.strip())


class _Upstream(collections.namedtuple("_Upstream", "surface scheme host port path url")):
    """Where --record forwards: the model calls of the surfaces named
    `surface` (or whose name begins `surface.`; None: every one) go to
    scheme://host:port, the request's path after `path`."""

    def serves(self, name):
        return self.surface is None or name == self.surface or name.startswith(
            self.surface + ".")


class _Upstreams(_Names):
    """Upstream base URLs: URL, or name=URL (see _Upstream)."""

    def __init__(self):
        super().__init__("openai=https://api.openai.com,anthropic=https://api.anthropic.com")

    def __call__(self, value, field):
        if isinstance(value, (list, tuple)) and all(isinstance(item, _Upstream)
                                                    for item in value):
            return tuple(value)
        upstreams = []
        for text in super().__call__(value, field):
            name, equals, url = text.partition("=")
            if not equals or "://" in name:
                name, url = None, text
            parts = urllib.parse.urlsplit(url)
            try:
                port = parts.port
            except ValueError:
                port = -1
            if (parts.scheme not in ("http", "https") or not parts.hostname or parts.query
                    or parts.fragment or port == -1):
                raise _ValidationError(field, f"must be base URLs (http or https, no query), "
                                       f"e.g. {self.example}; got {text!r}")
            upstreams.append(_Upstream(name, parts.scheme, parts.hostname, port or (
                443 if parts.scheme == "https" else 80), parts.path.rstrip("/"), url))
        return tuple(upstreams)


class _Field(collections.namedtuple("_Field", "rule default about")):
    """A field of a JSON object: its rule, its default (a value, a function
    of the server's Config, or _REQUIRED) and what it means."""


_REQUIRED = object()


def _from_config(name):
    return operator.attrgetter(name)


def _given(value, fields, field, strict=False):
    """The checked values an object gives for `fields`; null means "not
    given".  Unknown keys are refused when strict, else ignored."""
    if not isinstance(value, dict):
        raise _ValidationError(field, "must be an object or null" if field
                               else "request body must be a JSON object")
    given = {}
    for key, item in value.items():
        spec = fields.get(key)
        name = f"{field}.{key}" if field else key
        if spec is None:
            if strict:
                raise _ValidationError(name, "is not a known setting; use " + ", ".join(fields))
        elif item is not None:
            given[key] = spec.rule(item, name)
    return given


def _with_defaults(given, fields, config, field=None):
    """Every field of the table: the given value, else its default."""
    defaults, required = _defaults(fields, config)
    values = {**defaults, **given}
    for key in required:
        if values[key] is _REQUIRED:
            raise _ValidationError(f"{field}.{key}" if field else key, "is required")
    return values


_DEFAULTS = {}  # id(fields) -> (fields, config, defaults, required keys)


def _defaults(fields, config):
    """A table's defaults under a config, in its order (_REQUIRED where none),
    and its required keys; kept per table for the last config, as working
    them out took a tenth of a chat request's time."""
    cached = _DEFAULTS.get(id(fields))
    if cached is None or cached[0] is not fields or cached[1] is not config:
        defaults = {key: spec.default(config) if callable(spec.default) else spec.default
                    for key, spec in fields.items()}
        cached = _DEFAULTS[id(fields)] = (fields, config, defaults, tuple(
            key for key, value in defaults.items() if value is _REQUIRED))
    return cached[2], cached[3]


def _pick(fields, *names):
    """Some fields of a table, to describe a request that takes only those."""
    return {name: fields[name] for name in names}


def _object_schema(fields, strict=False, example=None):
    """The JSON Schema of an object made of a table of fields; a field that
    may be left out may be null too (see _given)."""
    required = [key for key, spec in fields.items() if spec.default is _REQUIRED]
    schema = {"type": "object", "properties": {
        key: dict(spec.rule.schema if key in required else
                  {"anyOf": [spec.rule.schema, {"type": "null"}]},
                  **({"description": spec.about} if spec.about else {}))
        for key, spec in fields.items()}}
    if required:
        schema["required"] = required
    if strict:
        schema["additionalProperties"] = False
    if example is not None:
        schema["example"] = example
    return schema


def _ref(name):
    return {"$ref": "#/components/schemas/" + name}


def _object(required, optional=None):
    """An answer object's schema: {name: schema} of the properties it always
    has, and of those it may have."""
    return {"type": "object", "required": list(required),
            "properties": {**required, **(optional or {})}}


_AN_INTEGER, _A_STRING, _AN_OBJECT = {"type": "integer"}, {"type": "string"}, {"type": "object"}


_MS = _Int(0, _MAX_TIMEOUT_MS)
_LATENCY = _Int(0, _MAX_LATENCY_MS)
_MAX_TOKEN_MS = 60_000
_MAX_OUTPUT_TOKENS = 1_000_000


class _Amount(_Rule):
    """An amount up to `most`, or a distribution to draw it from per request
    (see _amount): {"mean": M, "stdev": S, "dist": "normal" | "lognormal"}."""

    def __init__(self, most, integer=True):
        self.number = (_Int if integer else _Number)(0, most)
        self.fields = {"mean": _Field(_Number(0, most), _REQUIRED, "The mean."),
                       "stdev": _Field(_Number(0, most), 0, "The standard deviation."),
                       "dist": _Field(_Choice("normal", "lognormal"), "normal",
                                      "normal (clamped at zero), or lognormal.")}
        self.schema = {"oneOf": [self.number.schema, _object_schema(self.fields, strict=True)]}

    def __call__(self, value, field):
        if isinstance(value, dict):
            return _with_defaults(_given(value, self.fields, field, strict=True), self.fields,
                                  None, field)
        return self.number(value, field)

    def from_text(self, text):
        return self.number.from_text(text)


_REASONING_LENGTH = _Amount(_MAX_OUTPUT_TOKENS)


def _check_reasoning(value, field):
    """The model's thinking: its text, or its length in tokens (a number or
    a distribution; 0: none)."""
    return value if isinstance(value, str) else _REASONING_LENGTH(value, field)


_BASE64 = {"type": "string",
           "pattern": "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"}
# A recorded answer (see _Recorder): its status and headers; a whole body
# and the ms it came after the request, or a stream's frames, each with the
# ms it came (in base64 when they are not text); "end": "cut" when the stream
# broke, "truncated" when the recording stopped at --record-max-bytes.
_RECORDING_SCHEMA = {"type": "object", "required": ["status"], "additionalProperties": False,
                     "properties": {
    "status": {"type": "integer", "minimum": 200, "maximum": 599},
    "headers": {"type": "array", "items": {
        "type": "array", "minItems": 2, "maxItems": 2,
        "prefixItems": [{"type": "string", "pattern": "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"},
                        {"type": "string", "pattern": "^[\\t\\x20-\\x7e\\x80-\\xff]*$"}]}},
    "ms": {"type": "number", "minimum": 0, "maximum": _MAX_LATENCY_MS},
    "body": {"type": "string"},
    "frames": {"type": "array", "items": {
        "type": "array", "minItems": 2, "maxItems": 2,
        "prefixItems": [{"type": "number", "minimum": 0, "maximum": _MAX_LATENCY_MS},
                        {"type": "string"}]}},
    "end": {"enum": ["cut"]}, "truncated": {"type": "boolean"},
    "base64": {"type": "boolean", "description": "Its body or frames are bytes in base64 "
               "(an answer that is not text: Bedrock's event stream)"}},
                     "oneOf": [{"required": ["body"]}, {"required": ["frames"]}],
                     "if": {"required": ["base64"], "properties": {"base64": {"const": True}}},
                     "then": {"properties": {"body": _BASE64, "frames": {"items": {
                         "prefixItems": [{}, _BASE64]}}}}}
# The headers an answer's framing owns: a replay writes its own.
_FRAMING_HEADERS = frozenset(("content-length", "transfer-encoding", "connection", "keep-alive",
                              "date", "server", "content-encoding"))
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*\Z")  # what a head's Latin-1 can hold


def _check_recordings(value, field):
    """Recorded answers, as _RECORDING_SCHEMA has them."""
    if not isinstance(value, list) or not value:
        raise _ValidationError(field, "must be a non-empty array of recorded answers")
    return [_check_recording(item, f"{field}[{index}]") for index, item in enumerate(value)]


def _check_recording(value, field):
    _check_object(value, field)
    unknown = set(value) - set(_RECORDING_SCHEMA["properties"])
    if unknown:
        raise _ValidationError(f"{field}.{min(unknown)}", "is not a part of a recorded answer")
    value = dict(value, status=_Int(200, 599)(value.get("status"), field + ".status"))
    if not isinstance(value.get("headers", []), list):
        raise _ValidationError(field + ".headers", "must be an array of [name, value]")
    for index, pair in enumerate(value.get("headers", ())):
        if not (isinstance(pair, list) and len(pair) == 2 and all(
                isinstance(part, str) for part in pair) and _HEADER_NAME.match(pair[0])
                and _HEADER_VALUE.match(pair[1])):
            raise _ValidationError(f"{field}.headers[{index}]",
                                   "must be [name, value], a header field's")
    if ("body" in value) == ("frames" in value):
        raise _ValidationError(field, "must have a body or frames, not both")
    if "body" in value:
        _Text()(value["body"], field + ".body")
        _Number(0, _MAX_LATENCY_MS)(value.get("ms", 0), field + ".ms")
    else:
        frames = value["frames"]
        if not isinstance(frames, list) or not all(
                isinstance(frame, list) and len(frame) == 2 and _is_number(frame[0])
                and 0 <= frame[0] <= _MAX_LATENCY_MS and isinstance(frame[1], str)
                for frame in frames):
            raise _ValidationError(field + ".frames", "must be an array of [ms, text]")
    if value.get("end", "cut") != "cut":
        raise _ValidationError(field + ".end", 'must be "cut"')
    _Bool()(value.get("truncated", False), field + ".truncated")
    if _Bool()(value.get("base64", False), field + ".base64"):
        texts = [value["body"]] if "body" in value else [text for _, text in value["frames"]]
        try:
            for text in texts:
                base64.b64decode(text, validate=True)
        except ValueError:
            raise _ValidationError(field, "has base64: true, and text that is not base64")
    return value


# Every key allowed inside "simulate".  A new setting is one entry here.
_SIMULATE_FIELDS = {
    "mode": _Field(_MODE_RULE, _from_config("mode"), "How the request behaves (default --mode)."),
    "latency_ms": _Field(_LATENCY, _from_config("latency_ms"), "Time to the answer or the "
                         "job's end, after queue_ms (default --latency-ms)."),
    "queue_ms": _Field(_MS, 0, "How long a job stays queued before running."),
    "seed": _Field(_Nullable(_Int(-2 ** 63, 2 ** 63 - 1)), _from_config("seed"),
                   "Seed of every random choice (default --seed)."),
    "fail_message": _Field(_Text(), None, "Message of a simulated failure."),
    "ok_text": _Field(_Text(), None, "Text of a successful answer."),
    "weights": _Field(_WEIGHTS, None, "Weights of the modes flaky or random draw."),
    "jitter_ms": _Field(_LATENCY, 0, "The latency varies by up to this much either way, seeded."),
    "retry_after_ms": _Field(_MS, None, "Retry headers of rate_limit and overloaded (1000 "
                             "when not given), and of status faults that give none."),
    "status": _Field(_Int(500, 599), None, "Status of mode overloaded (default: the "
                     "surface's own)."),
    "ttft_ms": _Field(_Amount(_MAX_LATENCY_MS), None, "Chat: time to the first token "
                      "(replaces latency_ms), or a distribution to draw it from."),
    "prefill_ms_per_token": _Field(_Number(0, 10_000), 0, "Chat: time to the first token "
                                   "added per prompt token."),
    "token_ms": _Field(_Amount(_MAX_TOKEN_MS, integer=False), 20, "Chat: gap between stream "
                       "chunks, or a distribution to draw each gap from."),
    "output_tokens": _Field(_Amount(_MAX_OUTPUT_TOKENS), None, "Chat: the reply's text is "
                            "exactly this many tokens (cut by the request's maximum), or a "
                            "distribution to draw it from."),
    "reasoning": _Field(_Check(_check_reasoning, {"oneOf": [
        {"type": "string"}, *_REASONING_LENGTH.schema["oneOf"]]}), None,
        "Chat: the model thinks first, this text or this many tokens (a number or a "
        "distribution; 0: not at all), shown as each API shows reasoning and counted in its "
        "usage; without it, a request that asks for reasoning gets a short thought."),
    "stream": _Field(_Check(_check_stream_failure, {
        "type": "object", "minProperties": 1, "maxProperties": 1,
        "properties": {kind: _Int(0, 1_000_000).schema for kind in _STREAM_FAILURES},
        "additionalProperties": False}), None, "Chat: a stream failure after N content chunks."),
    "script": _Field(_Check(_check_script, {
        "type": "array", "minItems": 1,
        "items": {"oneOf": [_MODE_RULE.schema, {"allOf": [
            _ref("Simulate"), {"not": {"required": ["script"]}}]}]}}), None,
        "Steps taken by successive requests with the same key; the last repeats."),
    "tool_calls": _Field(_Check(_check_tool_calls, {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["name"], "additionalProperties": False, "properties": {
            "name": _TOOL_CALL_NAME.schema, "arguments": {"type": ["object", "string"]},
            "id": _TOOL_CALL_ID.schema}}}), None,
        "Answer with these tool calls (arguments an object, or a string sent as given)."),
    "context_window": _Field(_Int(1, 100_000_000), None,
                             "A prompt of more tokens is refused with the context-length error."),
    "rpm": _Field(_Nullable(_Int(1, 1_000_000_000)), _from_config("rpm"),
                  "Requests per minute this request's key may make (default --rpm)."),
    "tpm": _Field(_Nullable(_Int(1, 1_000_000_000)), _from_config("tpm"),
                  "Tokens per minute this request's key may use (default --tpm)."),
    "fault": _Field(_Check(_check_fault, _FAULT_SCHEMA), None,
                    "A transport fault that spoils the answer."),
    "fault_phase": _Field(_Choice("before", "after"), "before", "Job create: lose the answer "
                          "before or after the job is created."),
    "dribble_ms": _Field(_Int(0, 60_000), 50, "Gap between the pieces of a dribble fault."),
    "embedding": _Field(_Choice(*_EMBEDDING_KINDS), _from_config("embeddings"),
                        "Embeddings: " + "; ".join(f"{kind}: {about}" for kind, about in
                                                   _EMBEDDING_KINDS.items())
                        + " (default --embeddings)."),
    "replay": _Field(_Check(_check_recordings, {"type": "array", "minItems": 1,
                                                "items": _RECORDING_SCHEMA}), None,
                     "Model calls: answer with these recorded answers (see --record), the n-th "
                     "call of a key that takes them the n-th (the last repeats)."),
    "replay_timing": _Field(_Choice("recorded", "instant"), "recorded",
                            "A replayed answer comes at its recorded times, or at once."),
    "poll_faults": _Field(_Check(_check_poll_faults, {"type": "array", "items": {"oneOf": [
        {"type": "null"}, _FAULT_SCHEMA, {
            "type": "object", "required": ["unknown_state"], "additionalProperties": False,
            "properties": {"unknown_state": _UNKNOWN_STATE.schema}}]}}),
        None, "Faults of the job's 1st, 2nd... poll."),
}

# A request's settings after the server's defaults are filled in: what it
# asked for (op, args, deadline, key, callback) and how it behaves.
# `rule` is the index of the reply rule that gave settings, or None; a model
# call that forces a tool has `forced_tool` {"name", "schema", "field"}, one
# that asks for structured output `output` {"schema", "field"} (see _result).
_JobSpec = collections.namedtuple("_JobSpec", [
    "op", "args", "timeout_ms", "trace_id", "test_id", "callback_url", "rule", "forced_tool",
    "output",
    *_SIMULATE_FIELDS])

_SIMULATE = _Check(lambda value, field: _given(value, _SIMULATE_FIELDS, field, strict=True),
                   _ref("Simulate"))
# Simulate settings as JSON in a header, for clients that add no fields to a body.
_SIMULATE_HEADER = "X-DummyLLM-Simulate"
# A test's own scope on a shared server (see _test_id): a /test/{test_id}
# prefix on any path, else this header.
_TEST_ID_HEADER = "X-Test-Id"
# The server's own pages send this with the reads they repeat (the dashboard
# lists the jobs twice a second): the journal, a record of the clients' own
# requests, leaves those out.
_PAGE_HEADER = "X-DummyLLM-Page"
_TEST_ID_TEXT = _Text(_MAX_TRACE_ID_CHARS, non_empty=True)
_TEST_PATH = re.compile(r"/test/([^/]*)(/.*)?\Z", re.S)


# Fields model calls share: the model, the user key, and dummyLLM's extensions.
_MODEL = _Field(_Text(non_empty=True), _REQUIRED, "Any model name.")
_USER = _Field(_Text(_MAX_TRACE_ID_CHARS), None,
               "The key of seeded sequences when X-Trace-Id is absent.")
_EXTENSIONS = {
    "timeout_ms": _Field(_Int(1, _MAX_TIMEOUT_MS), _from_config("timeout_ms"),
                         "The deadline, as for jobs (an extension)."),
    "simulate": _Field(_SIMULATE, None, "How the request behaves (an extension)."),
}


def _simulate_settings(given, config, field="simulate"):
    """The simulate settings a request gives, over the server's defaults."""
    settings = _with_defaults(given or {}, _SIMULATE_FIELDS, config)
    _check_drawn_weights(settings, field)
    for step in settings["script"] or ():
        _check_drawn_weights({**settings, **step}, field + ".script")
    return settings


# Reply rules: {"match": {...}, "simulate": {...}}.  A model call takes the
# simulate settings of the first rule whose match keys all hold, under those
# of its own (see _Surface.call).  What a rule can look at: the call's
# surface and path, model, conversation (text messages, see _Surface.call),
# headers (names in lower case), key and test id.
# What reply rules match on; digest() is the request's digest, made at first use.
_Facts = collections.namedtuple("_Facts", "surface path model messages headers trace_id test_id "
                                          "digest", defaults=(None, None))


def _request_digest(path, body):
    """What a recording matches a call by: a digest of its path and its JSON
    body (without simulate; its keys in order), so the same call from the
    same client has the same digest."""
    try:
        value = json.loads(body)
    except ValueError:
        value = body.decode("utf-8", "replace")
    if isinstance(value, dict):
        value.pop("simulate", None)
    return _body_digest(json.dumps([path, value], sort_keys=True, ensure_ascii=False).encode())


class _MatchKey(collections.namedtuple("_MatchKey", "rule holds about")):
    """A match key: the rule its value obeys, and holds(value, facts)."""


def _last_text(messages):
    """The text of the last user message."""
    return next((message["content"] for message in reversed(messages)
                 if message["role"] == "user"), "")


def _check_regex(value, field):
    """A regular expression a search of at most _RULE_TEXT_CHARS characters
    takes no more than quadratic time on: see _regex_trouble."""
    _Text(non_empty=True)(value, field)
    try:
        pattern = re.compile(value)
    except re.error as error:
        raise _ValidationError(field, f"is not a valid regular expression: {error}") from None
    trouble = _regex_trouble(value)
    if trouble is not None:
        raise _ValidationError(field, f"is a regular expression whose search can take minutes: "
                               f"{trouble}; write it without that")
    return pattern


# What a rule's regular expression searches: the first this many characters
# of the text.  A pattern _regex_trouble lets pass is at worst quadratic in
# them, and holds every thread while it runs.  \w*? +(?:\s{2}){2}c, the
# slowest of 3,200 random patterns it let pass, took 7.6 ms on 512 spaces,
# 31 ms on 1,024, 123 ms on 2,048; with 3 busy loops beside the server on 2
# cores, /health took up to 101 ms at 1,024, 43 ms at 512.  Even .*foo took
# 1.7 s on 65,536 characters.
_RULE_TEXT_CHARS = 512
# The characters that stand for every other when two parts of a pattern are
# asked whether they can match the same one: ASCII, and a few beyond it that
# classes tell apart.
_PROBES = "".join(map(chr, range(128))) + "\u00a0\u00b2\u00e9\u00df\u0394\u0661\u2028\u4e2d"


def _regex_trouble(text):
    """Why searching with this pattern can take more than quadratic time in
    the text (None if it cannot), as Python's backtracking engine runs it:
    an unbounded repeat inside another repeat ((a+)+: exponential); an
    alternation, or a part that can match nothing, under an unbounded repeat
    ((a|ab)*: exponential); under a repeat, two parts of varying count in a
    row that can match the same characters ((ab?b?)*) or one that can end
    where the next turn begins ((a{1,3})*): exponential; or two unbounded
    repeats in a row that can match the same characters, with nothing between
    them that the first cannot also match (a*a*c, \\w+\\d+, .*x.*y:
    polynomial; a*a*c took 9 s on 4,096 characters).  Parts are told apart by
    the _PROBES they can match."""
    try:
        from re import _parser as parser, _constants as sre  # Python 3.11 and later
    except ImportError:
        import sre_parse as parser, sre_constants as sre
    flags = re.compile(text).flags
    unbounded, repeats = sre.MAXREPEAT, {sre.MAX_REPEAT, sre.MIN_REPEAT,
                                         getattr(sre, "POSSESSIVE_REPEAT", None)}
    words = {sre.CATEGORY_DIGIT: str.isdecimal, sre.CATEGORY_SPACE: str.isspace,
             sre.CATEGORY_WORD: lambda char: char.isalnum() or char == "_",
             sre.CATEGORY_LINEBREAK: lambda char: char == "\n"}
    for positive, negative in ((sre.CATEGORY_DIGIT, sre.CATEGORY_NOT_DIGIT),
                               (sre.CATEGORY_SPACE, sre.CATEGORY_NOT_SPACE),
                               (sre.CATEGORY_WORD, sre.CATEGORY_NOT_WORD),
                               (sre.CATEGORY_LINEBREAK, sre.CATEGORY_NOT_LINEBREAK)):
        words[negative] = lambda char, test=words[positive]: not test(char)
    everything = set(_PROBES)

    def cased(chars):
        if flags & re.IGNORECASE:
            chars = chars | {char.lower() for char in chars} | {char.upper() for char in chars}
        return chars

    def one(op, av):
        """The characters a one-character part matches."""
        if op is sre.LITERAL:
            return cased({chr(av)})
        if op is sre.NOT_LITERAL:
            return everything - {chr(av)}
        if op is sre.IN:
            chars, negate = set(), False
            for item, value in av:
                if item is sre.NEGATE:
                    negate = True
                elif item is sre.LITERAL:
                    chars.add(chr(value))
                elif item is sre.CATEGORY:
                    chars |= {char for char in _PROBES if words[value](char)}
                elif item in (sre.RANGE, getattr(sre, "RANGE_UNI_IGNORE", None)):
                    low, high = value
                    chars |= {char for char in _PROBES if low <= ord(char) <= high}
                    chars |= {chr(low), chr(high)}
            return everything - cased(chars) if negate else cased(chars)
        return everything  # ANY, a back-reference

    def first(items):
        """(the characters a sequence can begin with, whether it can match nothing)."""
        chars = set()
        for op, av in items:
            if op in (sre.AT, sre.ASSERT, sre.ASSERT_NOT):
                continue  # zero-width
            part, empty = part_first(op, av)
            chars |= part
            if not empty:
                return chars, False
        return chars, True

    def part_first(op, av):
        if op is sre.SUBPATTERN:
            return first(av[-1])
        if op is getattr(sre, "ATOMIC_GROUP", None):
            return first(av)
        if op is sre.BRANCH:
            branches = [first(branch) for branch in av[1]]
            return set().union(*(chars for chars, _ in branches)), any(
                empty for _, empty in branches)
        if op in repeats:
            chars, empty = first(av[2])
            return chars, empty or av[0] == 0
        return one(op, av), op is sre.GROUPREF

    def inner(op, av):
        """The sequences inside a part."""
        if op is sre.SUBPATTERN:
            return [av[-1]]
        if op is sre.BRANCH:
            return av[1]
        if op in repeats:
            return [av[2]]
        if op in (sre.ASSERT, sre.ASSERT_NOT):
            return [av[1]]
        if op is getattr(sre, "ATOMIC_GROUP", None):
            return [av]
        return []

    def every(items):
        """Every character a sequence can match, anywhere."""
        chars = set()
        for op, av in items:
            if op is not sre.AT:
                sequences = inner(op, av)
                chars |= set().union(*map(every, sequences)) if sequences else one(op, av)
        return chars

    def unbounded_in(items):
        return any((op in repeats and av[1] == unbounded) or any(
            map(unbounded_in, inner(op, av))) for op, av in items)

    def ambiguous(items):
        """Whether a repeated sequence can match the same text two ways."""
        if first(items)[1]:
            return "a part that can match nothing, under a repeat"
        for op, av in items:
            if op is sre.BRANCH:
                starts = [first(branch) for branch in av[1]]
                if any(empty for _, empty in starts) or any(
                        a & b for index, (a, _) in enumerate(starts)
                        for b, _ in starts[index + 1:]):
                    return "an alternation whose choices can match the same text, under a repeat"
            if op is sre.SUBPATTERN:
                found = ambiguous(av[-1])
                if found:
                    return found
        return None

    def scan(items, open_sets, repeated=False):
        """The repeats still open after a sequence (their characters): those
        the sequence's parts could all have been matched by: every repeat
        whose count can vary by more than one, and under a repeat every part
        whose count varies at all, since there a second way to match one
        turn's text is a second way for every turn."""
        possessive = getattr(sre, "POSSESSIVE_REPEAT", None)
        for op, av in items:
            if op in (sre.AT, sre.ASSERT, sre.ASSERT_NOT):
                for sequence in inner(op, av):
                    scan(sequence, [])
            elif op is sre.SUBPATTERN or op is getattr(sre, "ATOMIC_GROUP", None):
                open_sets = scan(inner(op, av)[0], open_sets, repeated)
            elif op is sre.BRANCH:
                open_sets = [chars for branch in av[1]
                             for chars in scan(branch, list(open_sets), repeated)]
            elif op in repeats:
                low, high, body = av
                if high > 1 and unbounded_in(body):
                    raise _Trouble("an unbounded repeat inside another repeat")
                if high > 1 and ambiguous(body):
                    raise _Trouble(ambiguous(body))
                chars, starts = every(body), first(body)[0]
                if low < high and any(chars & seen for seen in open_sets):
                    raise _Trouble("two repeats in a row that can match the same characters")
                if high > 1:
                    if any(seen & starts for seen in scan(body, [], repeated=True)):
                        raise _Trouble("a repeat inside another repeat that can end where "
                                       "its next turn begins")
                    after = [seen for seen in open_sets if seen & starts] if low else open_sets
                else:  # once at most: the body goes on with the sequence, or is skipped
                    after = scan(body, list(open_sets), repeated) + (open_sets if not low else [])
                if low < high and (high > 1 or repeated) and op is not possessive:
                    after = after + [chars]
                open_sets = after
            else:
                chars = one(op, av)
                open_sets = [seen for seen in open_sets if seen & chars]
        return open_sets

    try:
        scan(list(parser.parse(text)), [])
    except _Trouble as trouble:
        return str(trouble)
    return None


class _Trouble(Exception):
    """What makes a regular expression slow (see _regex_trouble)."""


def _check_headers(value, field):
    _check_object(value, field)
    for name, item in value.items():
        _Text()(item, f"{field}.{name}")
    return {name.lower(): item for name, item in value.items()}


def _check_surface_name(value, field):
    names = _surface_names()
    if value not in names:
        raise _ValidationError(field, "must be one of " + ", ".join(names))
    return value


_NAME = _Text(non_empty=True)
_MATCH_KEYS = {
    # SurfaceName's enum is the registry's, known when the document is built.
    "surface": _MatchKey(_Check(_check_surface_name, _ref("SurfaceName")),
                         lambda want, facts: facts.surface == want,
                         "The surface that answers (GET /v1/rules lists their names)."),
    "path": _MatchKey(_NAME, lambda want, facts: fnmatch.fnmatchcase(facts.path, want),
                      "The request's path; * matches any characters."),
    "model": _MatchKey(_NAME, lambda want, facts: fnmatch.fnmatchcase(facts.model, want),
                       "The model; * matches any characters."),
    "text_contains": _MatchKey(_NAME, lambda want, facts: want in _last_text(facts.messages),
                               "Text the last user message contains."),
    "text_matches": _MatchKey(
        _Check(_check_regex, {"type": "string", "minLength": 1, "format": "regex"}),
        lambda want, facts: want.search(_last_text(facts.messages)[:_RULE_TEXT_CHARS])
        is not None,
        f"A regular expression (Python's re.search) the last user message's first "
        f"{_RULE_TEXT_CHARS:,} characters match; one whose search can take minutes is refused."),
    "last_role": _MatchKey(_Choice("user", "assistant", "tool", "system"),
                           lambda want, facts: bool(facts.messages)
                           and facts.messages[-1]["role"] == want,
                           "The role of the last message (tool: a tool's result)."),
    "tool_result_for": _MatchKey(_NAME, lambda want, facts: any(
        message.get("tool") == want for message in facts.messages),
        "A tool whose result is in the conversation."),
    "header": _MatchKey(_Check(_check_headers, {"type": "object", "additionalProperties": {
        "type": "string"}}), lambda want, facts: all(
            facts.headers.get(name) == value for name, value in want.items()),
        "Headers the request carries with these values (names in any case)."),
    "trace_id": _MatchKey(_Text(_MAX_TRACE_ID_CHARS), lambda want, facts: facts.trace_id == want,
                          "The request's key: X-Trace-Id, else its user."),
    "test_id": _MatchKey(_TEST_ID_TEXT, lambda want, facts: facts.test_id == want,
                         "The test whose scope the request is in."),
    "request": _MatchKey(_Text(64), lambda want, facts: facts.digest() == want,
                         "A digest of the request: its path and its JSON body, without "
                         "simulate (what a recording matches; see --record)."),
}
_MATCH_FIELDS = {name: _Field(key.rule, None, key.about) for name, key in _MATCH_KEYS.items()}
_REPLY_RULE_FIELDS = {
    "match": _Field(_Check(lambda value, field: _given(value, _MATCH_FIELDS, field, strict=True),
                           _object_schema(_MATCH_FIELDS, strict=True)), {},
                    "All of these must hold (none: every model call)."),
    "simulate": _Field(_SIMULATE, _REQUIRED, "The settings a matching call takes."),
    "about": _Field(_Nullable(_Text()), None, "What the rule is for, for people (a recording "
                    "says where and when it was made, and what was asked)."),
}


# What GET /v1/rules adds to each rule it lists.
_LISTED_RULE_FIELDS = {
    "index": _Field(_Int(0, 2 ** 31), _REQUIRED, "Its place in the order rules are tried."),
    "source": _Field(_Choice("file", "runtime"), _REQUIRED, "--rules, or POST /v1/rules."),
    "test_id": _Field(_Nullable(_Text()), _REQUIRED, "The test it was added for, which alone "
                      "it applies to (null: every request)."),
}


class _ReplyRule(collections.namedtuple("_ReplyRule", "match simulate source given test_id",
                                         defaults=(None,))):
    """A reply rule: its checked match keys and simulate settings, where it
    came from ("file" or "runtime"), the JSON it was given as, and the test
    it was added for (None: it applies to every request)."""

    def holds(self, facts):
        return (self.test_id in (None, facts.test_id)
                and all(_MATCH_KEYS[name].holds(value, facts)
                        for name, value in self.match.items()))

    def to_json(self, index):
        return {"index": index, "source": self.source, "test_id": self.test_id, **self.given}


def _reply_rule(value, field, source, test_id=None):
    """A _ReplyRule from its JSON (a ValidationError names the bad field)."""
    values = _with_defaults(_given(value, _REPLY_RULE_FIELDS, field, strict=True),
                            _REPLY_RULE_FIELDS, None, field)
    return _ReplyRule(values["match"], values["simulate"], source, value, test_id)


def _list_or_file(value, field, what, read):
    """An option that is a list of `what`, or the path of a JSON file holding
    one: each item made by read(item, its field) unless it is made already
    (a Config's own pass as they are: make_config(**config._asdict()))."""
    if isinstance(value, str):
        try:
            with open(value, "rb") as file:
                value = _json_value(file.read(), f"the {what} file")
        except OSError as error:
            raise _ValidationError(field, f"cannot be read: {error.strerror}") from None
        except ApiError as error:
            raise _ValidationError(field, error.message) from None
    if not isinstance(value, (list, tuple)):
        raise _ValidationError(field, f"must be a list of {what}, or a JSON file holding one")
    try:
        return tuple(read(item, f"{what}[{index}]") for index, item in enumerate(value))
    except _ValidationError as error:
        raise _ValidationError(field, error.message) from None


def _check_rules(value, field):
    """Reply rules: a list, or the path of a JSON file holding one."""
    return _list_or_file(value, field, "rules", lambda rule, item_field: (
        rule if isinstance(rule, _ReplyRule) else _reply_rule(rule, item_field, "file")))


# MCP tools (see _Mcp): what /mcp lists, and what each call of one answers.
# An answer is fixed content, content by the call's arguments (cases), or
# the step of a script its calls take in turn, per key; each may carry
# simulate settings over the tool's own.

def _check_content_blocks(value, field):
    """A tool's content: a text, or MCP content blocks (each an object with a
    type; a text block's text a string)."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if not isinstance(value, list) or not value:
        raise _ValidationError(field, "must be a text or a non-empty array of content blocks")
    for index, block in enumerate(value):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _ValidationError(f"{field}[{index}]", "must be a content block: an object "
                                   "with a type")
        if (block["type"] == "text" or "text" in block) and not isinstance(
                block.get("text"), str):
            raise _ValidationError(f"{field}[{index}].text", "must be a string")
    return value


def _check_rpc_error(value, field):
    _check_object(value, field)
    code = value.get("code")
    if isinstance(code, float) and code.is_integer():
        code = int(code)
    if not _is_int(code) or not -2 ** 31 <= code < 2 ** 31:
        raise _ValidationError(field + ".code", "must be an integer (a JSON-RPC error code)")
    if not isinstance(value.get("message"), str):
        raise _ValidationError(field + ".message", "must be a string")
    unknown = set(value) - {"code", "message", "data"}
    if unknown:
        raise _ValidationError(f"{field}.{min(unknown)}", "is not a field of a JSON-RPC error")
    return dict(value, code=code)


_MCP_ANSWER_FIELDS = {
    "content": _Field(_Check(_check_content_blocks, {"oneOf": [{"type": "string"}, {
        "type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["type"],
            "properties": {"type": {"type": "string"}, "text": {"type": "string"}}}}]}),
        None, "What the tool answers: a text, or MCP content blocks."),
    "structured": _Field(_Check(_check_object, {"type": "object"}), None,
                         "Its structuredContent (also sent as text when content gives none)."),
    "rpc_error": _Field(_Check(_check_rpc_error, {
        "type": "object", "required": ["code", "message"], "additionalProperties": False,
        "properties": {"code": {"type": "integer", "minimum": -2 ** 31,
                                "maximum": 2 ** 31 - 1},
                       "message": {"type": "string"},
                       "data": {}}}), None,
        "Answer with this JSON-RPC error instead of a result."),
    "simulate": _Field(_SIMULATE, None, "How the call behaves, over the tool's own settings."),
}
_MCP_CASE_FIELDS = {
    "arguments": _Field(_Check(_check_object, {"type": "object"}), _REQUIRED,
                        "The arguments a call must have (these names, these values)."),
    **_MCP_ANSWER_FIELDS,
}
_MCP_TOOL_NAME_PATTERN = "^[A-Za-z0-9_.-]{1,128}$"  # as MCP advises (SEP-986)


def _check_tool_name(value, field):
    if not isinstance(value, str) or not re.match(_MCP_TOOL_NAME_PATTERN, value):
        raise _ValidationError(field, "must be 1 to 128 letters, digits, _, - or .")
    return value


# A JSON Schema of objects, as MCP wants a tool's input and output schemas.
_OBJECT_SCHEMA_SCHEMA = {"type": "object", "required": ["type"],
                         "properties": {"type": {"const": "object"}}}


def _check_input_schema(value, field):
    _check_json_schema(value, field)
    if not isinstance(value, dict) or value.get("type") != "object":
        raise _ValidationError(field, 'must be a JSON Schema of "type": "object"')
    return value


def _items_of(fields):
    """A rule for a non-empty list of objects, each checked by `fields`."""
    def check(value, field):
        if not isinstance(value, list) or not value:
            raise _ValidationError(field, "must be a non-empty array")
        return [_with_defaults(_given(item, fields, f"{field}[{index}]", strict=True), fields,
                               None, f"{field}[{index}]") for index, item in enumerate(value)]
    return _Check(check, {"type": "array", "minItems": 1,
                          "items": _object_schema(fields, strict=True)})


_MCP_TOOL_FIELDS = {
    "name": _Field(_Check(_check_tool_name, {"type": "string", "pattern": _MCP_TOOL_NAME_PATTERN}),
                   _REQUIRED, "Its name, which calls give."),
    "title": _Field(_Nullable(_Text()), None, "A name for people."),
    "description": _Field(_Text(), "", "What it does, for the model."),
    "inputSchema": _Field(_Check(_check_input_schema, _OBJECT_SCHEMA_SCHEMA), {"type": "object"},
                          "JSON Schema of its arguments; each call's are checked against it."),
    "outputSchema": _Field(_Nullable(_Check(_check_input_schema, _OBJECT_SCHEMA_SCHEMA)), None,
                           "JSON Schema of its structuredContent; where no content is given, "
                           "a value drawn from it answers."),
    "annotations": _Field(_Nullable(_Check(_check_object, {"type": "object"})), None,
                          "Hints for clients (readOnlyHint, ...), listed as given."),
    **_MCP_ANSWER_FIELDS,
    "cases": _Field(_Nullable(_items_of(_MCP_CASE_FIELDS)), None,
                    "Answers by argument: a call takes the first case whose arguments it has."),
    "script": _Field(_Nullable(_items_of(_MCP_ANSWER_FIELDS)), None,
                     "Answers of its successive calls with one key; the last repeats."),
    "progress": _Field(_Int(0, 1000), 0, "Progress notifications sent during a call that asks "
                       "for them (a progressToken), evenly spaced; its answer is then an event "
                       "stream."),
}
# The keys of a tool that tools/list shows, as they are given.
_MCP_LISTED = ("name", "title", "description", "inputSchema", "outputSchema", "annotations")


class _McpTool(collections.namedtuple("_McpTool", "spec source given test_id")):
    """A tool /mcp serves: its checked fields (spec), where it came from
    ("file" or "runtime"), the JSON it was given as, and the test it was
    added for (None: every test's)."""

    @property
    def name(self):
        return self.spec["name"]

    def listing(self):
        """The tool as tools/list lists it."""
        return {key: self.spec[key] for key in _MCP_LISTED if self.spec[key] is not None}

    def answer(self, arguments, step):
        """The answer a call with these arguments takes, the step-th of its
        key (a dict of _MCP_ANSWER_FIELDS): its script's step-th step (the
        last repeats), else its first case whose arguments the call has,
        else the tool's own."""
        script = self.spec["script"]
        if script:
            return script[min(step, len(script) - 1)]
        return next((case for case in self.spec["cases"] or () if all(
            name in arguments and arguments[name] == value
            for name, value in case["arguments"].items())), self.spec)

    def to_json(self):
        return {"source": self.source, "test_id": self.test_id, **self.given}


def _mcp_tool(value, field, source, test_id=None):
    """An _McpTool from its JSON (a ValidationError names the bad field)."""
    spec = _with_defaults(_given(value, _MCP_TOOL_FIELDS, field, strict=True),
                          _MCP_TOOL_FIELDS, None, field)
    return _McpTool(spec, source, value, test_id)


def _check_mcp_tools(value, field):
    """MCP tools: a list, or the path of a JSON file holding one; no name twice."""
    tools = _list_or_file(value, field, "tools", lambda tool, item_field: (
        tool if isinstance(tool, _McpTool) else _mcp_tool(tool, item_field, "file")))
    names = [tool.name for tool in tools]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:
        raise _ValidationError(field, f"declares the tool {twice!r} twice")
    return tools


def _check_drawn_weights(settings, field):
    """Weights given for flaky may name only the modes flaky draws."""
    if settings["weights"] is not None and settings["mode"] not in _DRAWABLE_MODES:
        _check_weights(settings["weights"], f"{field}.weights", _draws(settings["mode"]))


def _is_loopback(host):
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_CALLBACK_URL = _Check(_Text(2048, non_empty=True), {
    "type": "string", "maxLength": 2048, "pattern": "^https?://[^/?#]"})
# A callback URL that its schema allows and the server refuses.
_CALLBACK_REFUSED = {"callback_url": "naming a host that is neither loopback nor allowed by "
                                     "--allow-callback-host"}


def _check_callback_url(value, field, allowed_hosts):
    """An http(s) URL on loopback, or on a host --allow-callback-host names:
    a simulator must not be a way to make requests to anywhere else."""
    try:
        parts = urllib.parse.urlsplit(value)
        host, _ = (parts.hostname or "").lower(), parts.port
    except ValueError:
        host, parts = "", None
    if parts is None or parts.scheme not in ("http", "https") or not host:
        raise _ValidationError(field, "must be an http:// or https:// URL")
    if not _is_loopback(host) and host not in allowed_hosts:
        raise _ValidationError(field, f"names host {host!r}, which is not loopback; "
                               "allow it with --allow-callback-host")
    return value


def _check_findings(value, field):
    """Codes of findings: a list, or text with commas between."""
    if isinstance(value, str):
        value = [code for code in value.split(",") if code]
    if not isinstance(value, (list, tuple)) or not all(code in _FINDINGS for code in value):
        raise _ValidationError(field, "must list codes of findings: " + ", ".join(_FINDINGS))
    return tuple(value)


# The questions a verdict takes, as query parameters and as keywords of
# DummyLLMServer.verdict.
_VERDICT_QUERY = {
    "trace_id": _Field(_Text(_MAX_TRACE_ID_CHARS), None,
                       "Judge this sequence key only; without it, every key and the herd"),
    "key": _Field(_Text(_MAX_TRACE_ID_CHARS), None, "The same, by the name model calls give "
                  "it (X-Trace-Id, else the body's user)"),
    "path": _Field(_Text(), None, "Only requests to this path"),
    "test_id": _Field(_TEST_ID_TEXT, None, "Only this test's requests (else those of the "
                      "asking request's test id, if it has one)"),
    "since_seq": _Field(_Int(0, 2 ** 63), 0, "Only requests from this journal seq on"),
    "settle_ms": _Field(_Int(0, 3_600_000), 2000, "How long after a failure a retry may "
                        "still come (GAVE_UP, NO_CANCEL, TRUNCATED_STREAM_ACCEPTED)"),
    "max_attempts": _Field(_Int(1, 1_000_000), 10, "Attempts of one request beyond which it "
                           "is a RETRY_STORM"),
    "min_poll_ms": _Field(_Int(0, 3_600_000), 50, "The mean gap between polls below which it "
                          "is POLL_TOO_FAST"),
    "errors": _Field(_Check(_check_findings, {"type": "array", "items": {"enum": list(_FINDINGS)}}),
                     (), "Findings to count as errors, comma-separated"),
}


# Server options: one row each for the command line, the environment and
# start_server().  The help text and the README's table derive from these.
_Option = collections.namedtuple("_Option", "name flag env default rule about")

_OPTIONS = (
    _Option("host", "--host", "DUMMYLLM_HOST", "127.0.0.1", _Text(non_empty=True),
            "address to listen on (0.0.0.0 for every interface)"),
    _Option("port", "--port", "DUMMYLLM_PORT", 8787, _Int(0, 65535),
            "TCP port, 0 for any free one"),
    _Option("mode", "--mode", "DUMMYLLM_MODE", "ok", _MODE_RULE, "mode of requests that name none"),
    _Option("latency_ms", "--latency-ms", "DUMMYLLM_LATENCY_MS", 250, _LATENCY,
            "latency of requests that give none"),
    _Option("seed", "--seed", "DUMMYLLM_SEED", None, _Nullable(_Int(-2 ** 63, 2 ** 63 - 1)),
            "seed of requests that give none (none: random draws)"),
    _Option("weights", "--weights", "DUMMYLLM_RANDOM_WEIGHTS", _DEFAULT_RANDOM_WEIGHTS,
            _WEIGHTS, "weights of mode random"),
    _Option("timeout_ms", "--timeout-ms", "DUMMYLLM_TIMEOUT_MS", 8000, _Int(1, _MAX_TIMEOUT_MS),
            "deadline of requests that give no timeout_ms"),
    _Option("slow_factor", "--slow-factor", "DUMMYLLM_SLOW_FACTOR", 6, _Number(1, 1000),
            "latency multiplier of mode slow"),
    _Option("max_jobs", "--max-jobs", "DUMMYLLM_MAX_JOBS", 10000, _Int(1, 10_000_000),
            "jobs kept in memory"),
    _Option("max_body_bytes", "--max-body-bytes", "DUMMYLLM_MAX_BODY_BYTES", 1 << 20,
            _Int(1, 1 << 30), "largest request body"),
    _Option("api_key", "--api-key", "DUMMYLLM_API_KEY", None, _Nullable(_Text()),
            "require this key on the providers' endpoints, sent as each one's clients send it"),
    _Option("admin_key", "--admin-key", "DUMMYLLM_ADMIN_KEY", None, _Nullable(_Text()),
            "require 'Authorization: Bearer KEY' on POST /v1/reset, DELETE /v1/requests and "
            "DELETE /v1/jobs/{id}"),
    _Option("time_scale", "--time-scale", "DUMMYLLM_TIME_SCALE", 1, _Number(0.001, 1000),
            "multiply every simulated duration by this; 0.1 runs ten times faster"),
    _Option("log_format", "--log-format", "DUMMYLLM_LOG_FORMAT", "text", _Choice("text", "json"),
            "access log as text lines or JSON lines"),
    _Option("cors", "--cors", "DUMMYLLM_CORS", None, _Nullable(_Text()),
            "allow browser calls from this origin, or *"),
    _Option("allow_callback_hosts", "--allow-callback-host", "DUMMYLLM_ALLOW_CALLBACK_HOSTS",
            (), _Names("hooks.test,10.0.0.5", lower=True),
            "hosts besides loopback that callback_url may name, comma-separated"),
    _Option("chaos", "--chaos", "DUMMYLLM_CHAOS", 0, _Number(0, 1),
            "fraction of requests that meet a random --chaos-faults fault"),
    _Option("chaos_faults", "--chaos-faults", "DUMMYLLM_CHAOS_FAULTS",
            "reset,status:503,status:429,dribble", _Check(_check_fault_list, {"type": "array"}),
            "the faults chaos draws from"),
    _Option("journal_size", "--journal-size", "DUMMYLLM_JOURNAL_SIZE", 1000, _Int(0, 1_000_000),
            "requests the journal keeps"),
    _Option("max_connections", "--max-connections", "DUMMYLLM_MAX_CONNECTIONS", None,
            _Nullable(_Int(1, 10_000_000)),
            "connections open at once (none: seven eighths of the open-file limit); at the "
            "limit the longest idle one is closed to make room"),
    _Option("rpm", "--rpm", "DUMMYLLM_RPM", None, _Nullable(_Int(1, 1_000_000_000)),
            "requests per minute each API key (else each sequence key) may make; beyond, a "
            "429 that says the true wait"),
    _Option("tpm", "--tpm", "DUMMYLLM_TPM", None, _Nullable(_Int(1, 1_000_000_000)),
            "tokens per minute each key may use: a request's prompt tokens plus its max_tokens"),
    _Option("rules", "--rules", "DUMMYLLM_RULES", (), _Check(_check_rules, {"type": "array"}),
            "a JSON file of reply rules: settings chosen by what a model call asks"),
    _Option("mcp_tools", "--mcp-tools", "DUMMYLLM_MCP_TOOLS", (),
            _Check(_check_mcp_tools, {"type": "array"}),
            "a JSON file of the tools /mcp serves, and what each call of one answers"),
    _Option("record", "--record", "DUMMYLLM_RECORD", (), _Upstreams(),
            "forward model calls to this upstream (a base URL; name=URL for the surfaces of "
            "that name, e.g. openai=https://api.openai.com), answer with what it answers and "
            "write that as reply rules to --record-to; with --rules, only the calls no rule "
            "matches"),
    _Option("record_to", "--record-to", "DUMMYLLM_RECORD_TO", "recordings.json",
            _Text(non_empty=True), "the JSON file --record writes its reply rules to (its "
                                   "rules are kept, and the new ones added)"),
    _Option("record_max_bytes", "--record-max-bytes", "DUMMYLLM_RECORD_MAX_BYTES", 8 << 20,
            _Int(1024, 1 << 30), "the largest answer --record keeps whole; a longer one is "
                                 "kept cut, and marked so"),
    _Option("redact", "--redact", "DUMMYLLM_REDACT", None, _Nullable(_Check(
        lambda value, field: value if isinstance(value, re.Pattern) else _check_regex(
            value, field), {"type": "string", "format": "regex"})),
            "a regular expression whose matches --record writes as [redacted]"),
    _Option("strict_rules", "--strict-rules", "DUMMYLLM_STRICT_RULES", False, _Bool(),
            "a model call that no reply rule matches is a 404 naming the nearest rule and "
            "what it missed, not a simulated answer"),
    _Option("lenient", "--lenient", "DUMMYLLM_LENIENT", False, _Bool(),
            "take conversations the real APIs refuse (a tool result that answers no call, a "
            "call left unanswered, a thinking block dropped or edited, an unknown previous "
            "response) instead of answering their 400"),
    _Option("slots", "--slots", "DUMMYLLM_SLOTS", None, _Nullable(_Int(1, 1_000_000)),
            "model calls that generate at once (none: no limit); a call holds a slot from its "
            "first token to its last, and a plain answer is sent at its last token"),
    _Option("queue", "--queue", "DUMMYLLM_QUEUE", None, _Nullable(_Int(0, 1_000_000)),
            "with --slots, calls that may wait for one (none: no limit); beyond, the "
            "surface's overloaded answer with the wait until a place frees"),
    _Option("load_factor", "--load-factor", "DUMMYLLM_LOAD_FACTOR", 1, _Number(1, 1000),
            "with --slots, the token gap is this many times longer with every slot held "
            "(x1 with one; in a line between)"),
    _Option("replica", "--replica", "DUMMYLLM_REPLICA", None,
            _Nullable(_Check(_check_replica, {"type": "string", "pattern": "^[0-9]+/[0-9]+$"})),
            "I/N: replica I of N behind a balancer; every id it makes begins its hex part with "
            "the digit I, so the balancer can route by id"),
    _Option("served_models", "--served-model", "DUMMYLLM_SERVED_MODELS", (),
            _Names("llama-3-8b,qwen-2"),
            "the model names /v1/models lists, comma-separated or repeated (none: dummyllm)"),
    _Option("embeddings", "--embeddings", "DUMMYLLM_EMBEDDINGS", "hash",
            _Choice(*_EMBEDDING_KINDS), "how embeddings are made: " + "; ".join(
                f"{kind}, {about}" for kind, about in _EMBEDDING_KINDS.items())),
    _Option("quiet", "--quiet", None, False, _Bool(), "no access log"),
)

Config = collections.namedtuple("Config", [option.name for option in _OPTIONS])
Config.__doc__ = "The server's settings, one field per command-line option (see make_config)."


def _option_text(value):
    """A value as the command line writes it."""
    if value is None or value == ():
        return "none"
    if value is False:
        return "off"
    if isinstance(value, dict):
        return ",".join(f"{key}={item}" for key, item in value.items())
    return str(value)


def make_config(**options):
    """A Config from keyword options; missing ones take their defaults.

    Raises a ValueError (with `field` naming the option) for a bad value.
    """
    known = {option.name for option in _OPTIONS}
    unknown = set(options) - known
    if unknown:
        raise TypeError("unknown option(s): " + ", ".join(sorted(unknown)))
    return Config(**{option.name: option.rule(options.get(option.name, option.default),
                                              option.name)
                     for option in _OPTIONS})


def _plain(value):
    """Settings as JSON values: faults in their request form, tuples as lists."""
    if isinstance(value, _Fault):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


# --- Simulation -------------------------------------------------------------------
# Pure functions: given a request's settings and its place in a seeded
# sequence, what happens to it and when, in simulated milliseconds after it
# arrived.  No clock, no I/O, no --time-scale: the store's clock turns
# simulated milliseconds into real time.

_Plan = collections.namedtuple("_Plan", [
    "mode",          # the mode that runs, after flaky or random made their draw
    "weights",       # the weights that draw used, or None
    "latency_ms",    # the latency that mode used (slow multiplies it)
    "running_at_ms", # when the job leaves "queued", or None if it never does
    "ends_at_ms",    # when it reaches `state`, or None: it never ends by itself
    "state", "result", "error",
    "draws",         # (seed, key, n): where its draws come from, for those made later
])

# A successful reply: its text or its tool calls, why it ended ("end";
# "tool_calls"; "max_tokens", cut to them; "stop_sequence", cut before
# `stop_sequence`), its usage (the completion's tokens include the
# reasoning's), the simulated ms from the request to its first token, and
# the model's reasoning before it (text, or None).
# `gap(i)` is the ms between the (i-1)-th and the i-th piece of its stream.
_Reply = collections.namedtuple("_Reply", "text tool_calls end stop_sequence prompt_tokens "
                                          "completion_tokens elapsed_ms gap reasoning",
                                defaults=(None,))


def _tokens(text):
    """The usage estimate: one token per started group of four characters."""
    return math.ceil(len(text) / 4)


def _messages(spec):
    messages = spec.args.get("messages")
    return messages if isinstance(messages, list) else []


def _content_text(content):
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(part["text"] for part in content
                        if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def _reasoning_tokens(reply):
    return _tokens(reply.reasoning or "")


def _last_user_text(messages):
    """The text of the last user message, or None."""
    return next((_content_text(message.get("content")) for message in reversed(messages)
                 if isinstance(message, dict) and message.get("role") == "user"), None)


def _prompt_tokens(spec):
    return sum(_tokens(message["content"]) for message in _messages(spec)
               if isinstance(message, dict) and isinstance(message.get("content"), str))


def _result_text(spec, kind):
    if kind == "echo":
        return json.dumps(spec.args.get("messages", []), separators=(",", ":"),
                          ensure_ascii=False)
    if spec.ok_text is not None:
        return spec.ok_text
    asked = _last_user_text(_messages(spec)) if spec.op == "llm.chat" else None
    if asked is not None:
        return "Simulated reply to: " + asked[:200]
    return f"ok :: op={spec.op}"


def _result(spec, kind, seed, n):
    """What a request that succeeds answers: text, or tool calls, and usage.

    An explicit simulate setting wins (tool_calls, then ok_text); else a
    request that forces a tool gets a call to it, with arguments drawn from
    its JSON Schema; else one that asks for structured output gets JSON
    valid against its schema; else the reply text.  Values are drawn from
    `seed`; tool calls' ids come from the request's own seed (or none)."""
    key = spec.trace_id or ""
    if kind == "echo":
        text = _result_text(spec, kind)
    elif spec.tool_calls is not None:
        return _tool_result(spec, [dict(call, id=call.get("id") or _call_id(
            spec.seed, key, n, index)) for index, call in enumerate(spec.tool_calls)])
    elif spec.ok_text is not None:
        text = spec.ok_text
    elif spec.forced_tool is not None:
        tool = spec.forced_tool
        return _tool_result(spec, [{"id": _call_id(spec.seed, key, n, 0), "name": tool["name"],
                                    "arguments": _drawn(tool["schema"], _series(
                                        seed, key, n, "json"), tool["field"])}])
    elif spec.output is not None:
        schema, field = spec.output["schema"], spec.output["field"]
        value = ({"text": _result_text(spec, kind)} if schema is True
                 else _drawn(schema, _series(seed, key, n, "json"), field))
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = _result_text(spec, kind)
    return {"text": text, "usage": {"prompt_tokens": _prompt_tokens(spec),
                                    "completion_tokens": _tokens(text)}}


def _tool_result(spec, calls):
    return {"text": "", "tool_calls": calls, "usage": {
        "prompt_tokens": _prompt_tokens(spec),
        "completion_tokens": sum(_tokens(call["name"] + _arguments_text(call))
                                 for call in calls)}}


def _series(seed, key, n, purpose):
    """A function giving the next number in [0, 1) of a seeded series."""
    counter = itertools.count()
    return lambda: _unit_draw(seed, key, n, f"{purpose} {next(counter)}")


def _call_id(seed, key, n, index):
    """The id of the index-th tool call of the n-th request with this seed
    (or none) and key: the same on every run and every fresh server."""
    return "call_" + hashlib.sha256(json.dumps([seed, key, n, index, "tool call"]).encode(
        "utf-8")).hexdigest()[:24]


def _response_id(seed, key, n):
    """The id of the response to the n-th request with this seed (or none)
    and key: the same on every run and every fresh server."""
    return "resp_" + hashlib.sha256(json.dumps([seed, key, n, "response"]).encode(
        "utf-8")).hexdigest()[:12]


def _arguments_text(call):
    """A tool call's arguments as JSON text (a string given is sent as given)."""
    arguments = call["arguments"]
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _arguments_object(call):
    """A tool call's arguments as an object, where the JSON allows; else as given."""
    arguments = call["arguments"]
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments  # invalid JSON, sent as given: the agent's error path
    return arguments


class _SchemaError(Exception):
    """A part of a JSON Schema no value can be drawn for; `path` points at it."""

    def __init__(self, path, reason):
        super().__init__(f"{path or '/'} {reason}")
        self.path, self.reason = path, reason


def _uuid(draw):
    digits = "".join("0123456789abcdef"[int(draw() * 16)] for _ in range(32))
    return (f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-{'89ab'[int(draw() * 4)]}"
            f"{digits[17:20]}-{digits[20:]}")


# Values for the string formats the sampler knows.
_FORMATS = {
    "date-time": lambda draw: "2024-05-17T09:30:00Z", "date": lambda draw: "2024-05-17",
    "time": lambda draw: "09:30:00", "email": lambda draw: "user@example.com",
    "uri": lambda draw: "https://example.com/", "url": lambda draw: "https://example.com/",
    "uuid": _uuid, "hostname": lambda draw: "example.com", "ipv4": lambda draw: "192.0.2.1",
    "ipv6": lambda draw: "2001:db8::1", "duration": lambda draw: "P1D",
}
_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
_DEEP = 6  # below this depth, optional parts are left out: recursive schemas end


def _sample(schema, draw, root=None, path="", depth=0):
    """A JSON value valid against a JSON Schema (with OpenAPI's nullable and
    upper-case types, as Gemini writes them), chosen by draw().  A default
    or a first example is taken as it is.  Raises _SchemaError naming the
    part of the schema that no value can be drawn for (a pattern without a
    known format, bounds that cross, false)."""
    root = schema if root is None else root
    if schema is True:
        return _WORDS[int(draw() * len(_WORDS))]
    if not isinstance(schema, dict):
        raise _SchemaError(path, "is false: no value is valid" if schema is False
                           else "is not a schema")
    if "$ref" in schema:
        if depth > 32:
            raise _SchemaError(path, "refers to itself without end")
        return _sample(_resolve_ref(root, schema["$ref"], path), draw, root, path, depth + 1)
    for key in ("const", "default"):
        if key in schema:
            return schema[key]
    if isinstance(schema.get("examples"), list) and schema["examples"]:
        return schema["examples"][0]
    if "enum" in schema:
        if not schema["enum"]:
            raise _SchemaError(path + "/enum", "is empty")
        return schema["enum"][int(draw() * len(schema["enum"]))]
    if "allOf" in schema:
        return _sample(_all_of(schema, root, path), draw, root, path, depth + 1)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return _sample_option(schema, key, draw, root, path, depth)
    kind = _schema_type(schema, path)
    if kind == "null":
        return None
    if kind == "boolean":
        return draw() < 0.5
    if kind in ("integer", "number"):
        return _sample_number(schema, kind, draw, path)
    if kind == "string":
        return _sample_string(schema, draw, path)
    if kind == "array":
        return _sample_array(schema, draw, root, path, depth)
    return _sample_object(schema, draw, root, path, depth)


def _resolve_ref(root, ref, path):
    if not ref.startswith("#"):
        raise _SchemaError(path + "/$ref", f"is {ref!r}, not a reference within the schema")
    target = root
    for part in filter(None, ref[1:].split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(target, dict) or part not in target:
            raise _SchemaError(path + "/$ref", f"is {ref!r}, which the schema does not have")
        target = target[part]
    return target


def _all_of(schema, root, path):
    """The parts of an allOf merged into one schema."""
    merged = {key: value for key, value in schema.items() if key != "allOf"}
    for index, part in enumerate(schema["allOf"]):
        while isinstance(part, dict) and "$ref" in part:
            part = _resolve_ref(root, part["$ref"], f"{path}/allOf/{index}")
        if part is True:
            continue
        if not isinstance(part, dict):
            raise _SchemaError(f"{path}/allOf/{index}", "is false: no value is valid")
        if "allOf" in part:
            part = _all_of(part, root, f"{path}/allOf/{index}")
        for key, value in part.items():
            if key == "properties":
                merged["properties"] = {**merged.get("properties", {}), **value}
            elif key == "required":
                merged["required"] = list(dict.fromkeys(merged.get("required", []) + value))
            else:
                merged.setdefault(key, value)
    return merged


def _sample_option(schema, key, draw, root, path, depth):
    """A value of the first option of anyOf or oneOf that can give one (null
    last, or first once deep, so that recursive schemas end)."""
    options = list(enumerate(schema[key]))
    nulls = [item for item in options if item[1] == {"type": "null"}]
    others = [item for item in options if item[1] != {"type": "null"}]
    siblings = {name: value for name, value in schema.items() if name not in (key, "nullable")}
    first_error = None
    for index, option in (nulls + others if depth > _DEEP else others + nulls):
        merged = ({**siblings, **option} if isinstance(option, dict) else option)
        try:
            return _sample(merged, draw, root, f"{path}/{key}/{index}", depth + 1)
        except _SchemaError as error:
            first_error = first_error or error
    raise first_error or _SchemaError(f"{path}/{key}", "has no option")


def _schema_type(schema, path):
    """The type to draw a value of: the first given but null (null if alone),
    else the one the keywords imply."""
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or ())
    kinds = [kind.lower() for kind in kinds if isinstance(kind, str)]
    known = ("object", "array", "string", "integer", "number", "boolean", "null")
    for kind in kinds:
        if kind not in known:
            raise _SchemaError(path + "/type", f"names {kind!r}, not a JSON type")
    if kinds:
        return next((kind for kind in kinds if kind != "null"), "null")
    if {"properties", "required", "additionalProperties"} & set(schema):
        return "object"
    if {"items", "prefixItems", "minItems", "maxItems"} & set(schema):
        return "array"
    if {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"} & set(schema):
        return "number"
    return "string"


def _sample_number(schema, kind, draw, path):
    low, high = schema.get("minimum"), schema.get("maximum")
    low_open = high_open = False
    for key, is_low in (("exclusiveMinimum", True), ("exclusiveMaximum", False)):
        bound = schema.get(key)
        if isinstance(bound, bool):  # draft 4: a flag on minimum or maximum
            low_open, high_open = (bound, high_open) if is_low else (low_open, bound)
        elif _is_number(bound):
            if is_low and (low is None or bound >= low):
                low, low_open = bound, True
            elif not is_low and (high is None or bound <= high):
                high, high_open = bound, True
    if low is None and high is None:
        low, high = 0, 100
    elif low is None:
        low = high - 100
    elif high is None:
        high = low + 100
    step = schema.get("multipleOf") or (1 if kind == "integer" else 0.01)
    if kind == "integer" and step != int(step):
        raise _SchemaError(path + "/multipleOf", "allows no integer")
    first = math.ceil(low / step) if not low_open else math.floor(low / step) + 1
    last = math.floor(high / step) if not high_open else math.ceil(high / step) - 1
    if first > last:
        raise _SchemaError(path, f"allows no {kind} between {low} and {high}")
    chosen = first + int(draw() * (last - first + 1))
    if kind == "integer":
        return int(round(chosen * step))
    # A multiple whose quotient is whole in floating point too (80.43 / 0.01
    # is 8042.999...), as validators check it.
    for multiple in itertools.chain(range(chosen, last + 1), range(first, chosen)):
        value = round(multiple * step, 10)
        if (value / step).is_integer():
            return value
        if multiple - chosen > 100:
            break
    return round(chosen * step, 10)


def _sample_string(schema, draw, path):
    """A string: the value of its format; else, with a pattern, the first
    value of a known format or the first word that matches it; else words."""
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    known, pattern = _FORMATS.get(schema.get("format")), schema.get("pattern")
    if pattern is not None:
        candidates = [known(draw)] if known is not None else [
            value(draw) for value in _FORMATS.values()] + list(_WORDS)
        try:
            text = next((text for text in candidates if re.search(pattern, text)), None)
        except (re.error, TypeError):
            raise _SchemaError(path + "/pattern", f"is {pattern!r}, not a regular expression "
                                                  "Python reads") from None
        if text is None:
            raise _SchemaError(path + "/pattern", f"is {pattern!r}, which no value dummyLLM "
                                                  "draws matches" + (
                                                      f" (format {schema['format']!r})"
                                                      if known is not None else ""))
    elif known is not None:
        text = known(draw)
    else:
        words = []
        while len(" ".join(words)) < max(low, 1):
            words.append(_WORDS[int(draw() * len(_WORDS))])
        text = " ".join(words)
        if high is not None:
            text = text[:high]
    if len(text) < low or (high is not None and len(text) > high):
        raise _SchemaError(path, f"allows no string of {low} to {high} characters here")
    return text


def _sample_array(schema, draw, root, path, depth):
    prefix = schema.get("prefixItems")
    items = schema.get("items", True)
    if isinstance(items, list):  # draft 4 tuples
        prefix, items = items, schema.get("additionalItems", True)
    prefix = prefix or []
    low, high = schema.get("minItems", 0), schema.get("maxItems")
    count = max(low, len(prefix), 0 if depth > _DEEP else 1)
    if items is False:
        count = min(count, len(prefix))
    if high is not None:
        count = min(count, high)
    if count < low:
        raise _SchemaError(path, f"allows no array of at least {low} items")
    values = []
    for index in range(count):
        part, part_path = ((prefix[index], f"{path}/prefixItems/{index}") if index < len(prefix)
                           else (items, path + "/items"))
        value = _sample(part, draw, root, part_path, depth + 1)
        for _ in range(32):
            if not schema.get("uniqueItems") or value not in values:
                break
            value = _sample(part, draw, root, part_path, depth + 1)
        else:
            raise _SchemaError(path + "/uniqueItems", f"allows no {count} different items here")
        values.append(value)
    return values


def _sample_object(schema, draw, root, path, depth):
    properties = schema.get("properties") or {}
    required = schema.get("required") or []
    extra = schema.get("additionalProperties", True)
    value = {}
    for name, part in properties.items():
        if depth <= _DEEP or name in required:
            value[name] = _sample(part, draw, root, f"{path}/properties/{name}", depth + 1)
    for name in required:
        if name not in value:
            if extra is False:
                raise _SchemaError(path + "/required", f"names {name!r}, which no property allows")
            value[name] = _sample(extra, draw, root, path + "/additionalProperties", depth + 1)
    while len(value) < schema.get("minProperties", 0):
        if extra is False:
            raise _SchemaError(path + "/minProperties", "asks for more properties than allowed")
        value[f"key{len(value)}"] = _sample(extra, draw, root, path + "/additionalProperties",
                                            depth + 1)
    return value


def _drawn(schema, draw, field):
    """A value drawn for a request's JSON Schema, or a 400 naming the part
    of the schema (under `field`) that no value can be drawn for."""
    try:
        return _sample(schema, draw)
    except _SchemaError as error:
        raise _ValidationError(field + error.path.replace("/", "."), error.reason) from None
    except RecursionError:
        raise _ValidationError(field, "nests too deeply") from None
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError, ZeroDivisionError):
        # A keyword of the wrong type ({"minLength": "3"}): not a schema to draw from.
        raise _ValidationError(field, "is not a JSON Schema dummyLLM can read") from None


# How a value is told to be of each JSON Schema type (Gemini writes them in
# upper case); an integer may be written 2.0.
_JSON_TYPES = {
    "null": lambda value: value is None,
    "boolean": lambda value: isinstance(value, bool),
    "integer": lambda value: _is_int(value) or (
        isinstance(value, float) and value.is_integer()),
    "number": _is_number,
    "string": lambda value: isinstance(value, str),
    "array": lambda value: isinstance(value, list),
    "object": lambda value: isinstance(value, dict),
}


def _schema_violation(value, schema, path, root=None, depth=0):
    """Where a JSON value first breaks a JSON Schema, and how: (path,
    reason), or None.  It reads what tools' schemas say: type, enum, const,
    required, properties, additionalProperties, items, the bounds of numbers,
    strings and arrays, allOf, anyOf, oneOf, not, and $ref within the
    schema.  Patterns and formats are not checked (a pattern given at run
    time could hold the server), nor is a part of the schema it cannot read."""
    root = schema if root is None else root
    if schema is False:
        return path, "is not allowed here"
    if not isinstance(schema, dict) or depth > 32:
        return None
    if isinstance(schema.get("$ref"), str):
        try:
            target = _resolve_ref(root, schema["$ref"], path)
        except _SchemaError:
            return None
        found = _schema_violation(value, target, path, root, depth + 1)
        if found:
            return found
    types = schema.get("type")
    names = [types] if isinstance(types, str) else types if isinstance(types, list) else ()
    known = [name.lower() for name in names if isinstance(name, str)
             and name.lower() in _JSON_TYPES]
    if known and not any(_JSON_TYPES[name](value) for name in known):
        return path, "must be of type " + " or ".join(known)
    if isinstance(schema.get("enum"), list) and value not in schema["enum"]:
        return path, "must be one of " + ", ".join(map(json.dumps, schema["enum"][:10]))
    if "const" in schema and value != schema["const"]:
        return path, f"must be {json.dumps(schema['const'])}"
    found = (_number_violation(value, schema, path) or _string_violation(value, schema, path)
             or (isinstance(value, list) and _array_violation(value, schema, path, root, depth))
             or (isinstance(value, dict) and _object_violation(value, schema, path, root, depth)))
    return found or _options_violation(value, schema, path, root, depth)


def _bound(schema, key):
    value = schema.get(key)
    return value if _is_number(value) else None


def _number_violation(value, schema, path):
    if not _is_number(value):
        return None
    for key, broken, words in (("minimum", operator.lt, "at least"),
                               ("maximum", operator.gt, "at most"),
                               ("exclusiveMinimum", operator.le, "more than"),
                               ("exclusiveMaximum", operator.ge, "less than")):
        bound = _bound(schema, key)
        if bound is not None and broken(value, bound):
            return path, f"must be {words} {bound}"
    return None


def _string_violation(value, schema, path):
    if not isinstance(value, str):
        return None
    least, most = _bound(schema, "minLength"), _bound(schema, "maxLength")
    if least is not None and len(value) < least:
        return path, f"must be at least {least} characters long"
    if most is not None and len(value) > most:
        return path, f"must be at most {most} characters long"
    return None


def _array_violation(value, schema, path, root, depth):
    least, most = _bound(schema, "minItems"), _bound(schema, "maxItems")
    if least is not None and len(value) < least:
        return path, f"must have at least {least} items"
    if most is not None and len(value) > most:
        return path, f"must have at most {most} items"
    items = schema.get("items")
    if isinstance(items, (dict, bool)):
        for index, item in enumerate(value):
            found = _schema_violation(item, items, f"{path}[{index}]", root, depth + 1)
            if found:
                return found
    return None


def _object_violation(value, schema, path, root, depth):
    for name in schema.get("required") or ():
        if isinstance(name, str) and name not in value:
            return f"{path}.{name}", "is required"
    properties = schema.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        part = properties.get(name, extra)
        if part is False:
            return f"{path}.{name}", "is not a property the schema allows"
        found = _schema_violation(item, part, f"{path}.{name}", root, depth + 1)
        if found:
            return found
    return None


def _options_violation(value, schema, path, root, depth):
    """allOf, anyOf, oneOf and not."""
    def holds(part):
        return _schema_violation(value, part, path, root, depth + 1) is None
    for part in schema.get("allOf") or ():
        found = _schema_violation(value, part, path, root, depth + 1)
        if found:
            return found
    options = schema.get("anyOf")
    if isinstance(options, list) and options and not any(map(holds, options)):
        return path, "matches none of the schemas anyOf allows"
    options = schema.get("oneOf")
    if isinstance(options, list) and options and sum(map(holds, options)) != 1:
        return path, "must match exactly one of the schemas oneOf allows"
    if "not" in schema and holds(schema["not"]):
        return path, "matches the schema it must not"
    return None


def _unit_draw(seed, key, n, purpose):
    """A number in [0, 1) that depends only on its arguments.

    The first 8 bytes of SHA-256 of the JSON text ``[seed, key, n,
    purpose]``, read big-endian, divided by 2**64: stable across Python
    versions and machines, unlike random.Random methods or hash().
    """
    return _unit_draws(seed, key, n, purpose)[0]


def _unit_draws(seed, key, n, purpose):
    """Two numbers in [0, 1): those of the first and the next 8 bytes (see _unit_draw)."""
    digest = hashlib.sha256(json.dumps([seed, key, n, purpose]).encode("utf-8")).digest()
    return tuple(int.from_bytes(digest[at:at + 8], "big") / 2 ** 64 for at in (0, 8))


def _amount(value, draws, purpose, most):
    """An amount: a number as it is, or a draw for `purpose` from the seeded
    sequence `draws` (seed, key, n) of its distribution {"mean", "stdev",
    "dist"}: normal clamped at zero, or lognormal with that mean and stdev;
    never past `most`."""
    if not isinstance(value, dict):
        return value
    mean, stdev = value["mean"], value["stdev"]
    u, v = _unit_draws(*draws, purpose)
    normal = math.sqrt(-2 * math.log(1 - u)) * math.cos(2 * math.pi * v)  # Box-Muller
    if value["dist"] == "lognormal" and mean > 0:
        ratio = stdev / mean  # ** 2 raises past a float's range (a mean of 1e-215)
        sigma = math.sqrt(math.log1p(ratio * ratio))
        # As sigma grows the draws gather at 0: an infinite one is 0.
        amount = mean * math.exp(sigma * normal - sigma * sigma / 2) if math.isfinite(
            sigma) else 0.0
    else:
        amount = mean + stdev * normal
    return min(max(0.0, amount), most)


def _weighted_choice(weights, u):
    """The mode whose share of the cumulative weights, in table order, holds u."""
    modes = [mode for mode in _MODES if weights.get(mode, 0) > 0]
    point = u * sum(weights[mode] for mode in modes)
    for mode in modes:
        point -= weights[mode]
        if point < 0:
            return mode
    return modes[-1]


def _plan(spec, n, seed, server_weights, slow_factor):
    """What happens to a request, and when (in ms after it arrived).

    `seed` and `n` feed every draw: the request's seed and its index among
    requests with that seed and key, or any fresh number when unseeded.
    """
    key = spec.trace_id or ""
    if spec.context_window is not None and _prompt_tokens(spec) > spec.context_window:
        raise ApiError("CONTEXT_LENGTH_EXCEEDED", f"prompt is too long: {_prompt_tokens(spec)} "
                       f"tokens > {spec.context_window} maximum", "messages")
    draws = seed, key, n
    latency_ms = spec.latency_ms if spec.ttft_ms is None else round(
        _amount(spec.ttft_ms, draws, "ttft", _MAX_LATENCY_MS))
    if spec.prefill_ms_per_token:
        latency_ms += round(spec.prefill_ms_per_token * _prompt_tokens(spec))
    if spec.jitter_ms:
        shift = round((2 * _unit_draw(seed, key, n, "jitter") - 1) * spec.jitter_ms)
        latency_ms = max(0, latency_ms + shift)
    name, weights = spec.mode, None
    if _MODES[name].state is None:
        weights = spec.weights or _MODES[name].weights or server_weights
        name = _weighted_choice(weights, _unit_draw(seed, key, n, spec.mode))
    mode = _MODES[name]
    if mode.at == "slow":
        latency_ms = round(latency_ms * slow_factor)
    ends_at_ms = {"latency": spec.queue_ms + latency_ms, "slow": spec.queue_ms + latency_ms,
                  "deadline": spec.timeout_ms, "never": None, "refused": 0}[mode.at]
    state, result, error = mode.state, None, None
    if mode.text:
        result = _result(spec, mode.text, seed, n)
    if mode.text != "reply" and (spec.forced_tool is not None or spec.output is not None):
        _result(spec, "reply", seed, n)  # its schema is checked by its draw, whatever the mode
    if mode.error:
        message = spec.fail_message if mode.error == "SIM_FAIL" else None
        error = {"code": mode.error, "message": message or _ERRORS[mode.error].message}
    if mode.at == "refused":
        latency_ms = 0
    elif ends_at_ms is not None and ends_at_ms > spec.timeout_ms:
        state, ends_at_ms, result = "timeout", spec.timeout_ms, None
        error = {"code": "TIMEOUT", "message": _ERRORS["TIMEOUT"].message}
    running_at_ms = spec.queue_ms if ends_at_ms is None or spec.queue_ms < ends_at_ms else None
    return _Plan(name, weights, latency_ms, running_at_ms, ends_at_ms, state, result, error,
                 draws)


def _attempt_settings(spec, step):
    """The settings of one attempt: its script's step-th step over the
    others (past the end, the last step repeats; None: no script), and a
    status fault without retry_after_ms taking the request's."""
    if step is not None:
        spec = spec._replace(**spec.script[min(step, len(spec.script) - 1)])
    fault = _with_retry_after(spec.fault, spec)
    return spec if fault is spec.fault else spec._replace(fault=fault)


def _with_retry_after(fault, spec):
    """A fault; a status one without retry_after_ms takes the request's."""
    if fault is not None and fault.kind == "status" and fault.retry_after_ms is None:
        return fault._replace(retry_after_ms=spec.retry_after_ms)
    return fault


def _lost_before_work(spec):
    """Whether the request's fault loses it before any work is done."""
    return (spec.fault is not None and _FAULTS[spec.fault.kind].loses_request
            and spec.fault_phase == "before")


def _chaos_fault(seed, i, rate, faults):
    """The fault server-wide chaos gives the i-th request it sees, or None."""
    if _unit_draw(seed, "", i, "chaos") >= rate:
        return None
    return faults[int(_unit_draw(seed, "", i, "chaos-fault") * len(faults))]


def _refusal(spec, plan, overloaded_status=503):
    """The error that answers a request its mode refuses (overloaded answers
    simulate.status, else the surface's own status for it)."""
    code = plan.error["code"]
    retry_after_ms = _REFUSAL_RETRY_AFTER_MS if spec.retry_after_ms is None else spec.retry_after_ms
    return ApiError(code, plan.error["message"],
                    status=(spec.status or overloaded_status) if code == "OVERLOADED" else None,
                    retry_after_ms=None if code == "QUOTA_EXHAUSTED" else retry_after_ms)


def _fault_error(fault):
    """The error that answers a "status" fault."""
    code = {429: "RATE_LIMITED", 503: "OVERLOADED", 529: "OVERLOADED"}.get(
        fault.status, "INJECTED_FAULT")
    return ApiError(code, f"simulated HTTP {fault.status} fault", status=fault.status,
                    retry_after_ms=fault.retry_after_ms)


def _reply(spec, plan, max_tokens, stop_sequences=(), min_tokens=None):
    """The reply of a model call that succeeds: its text made exactly
    simulate.output_tokens long (else at least min_tokens), cut before the
    first stop sequence it meets, then to max_tokens (a text made long
    enough to reach them ends there, as vLLM's ignore_eos does); JSON output
    and tool calls keep their length.  Its stream's gaps are drawn from
    token_ms."""
    text, end, met = plan.result["text"], "end", None
    calls = plan.result.get("tool_calls")
    usage = plan.result["usage"]
    gap = _Gaps(spec.token_ms, plan.draws)
    thought = None if spec.reasoning is None else _thought(spec, plan)
    thinking_tokens = _tokens(thought) if thought else 0
    if calls is not None:
        return _Reply("", calls, "tool_calls", None, usage["prompt_tokens"],
                      usage["completion_tokens"] + thinking_tokens, plan.ends_at_ms, gap,
                      thought)
    length = _amount(spec.output_tokens, plan.draws, "output tokens", _MAX_OUTPUT_TOKENS)
    if length is None and min_tokens is not None and _tokens(text) <= min_tokens:
        length = min_tokens
    sized = length is not None and spec.output is None
    if sized:
        text = _sized(text, round(length))
    found = [(text.find(sequence), sequence) for sequence in stop_sequences
             if sequence and sequence in text]
    if found:
        at, met = min(found)
        text, end, sized = text[:at], "stop_sequence", False
    if max_tokens is not None and _tokens(text) >= max_tokens + (not sized):
        text, end, met = text[:max_tokens * 4], "max_tokens", None
    return _Reply(text, None, end, met, usage["prompt_tokens"], _tokens(text) + thinking_tokens,
                  plan.ends_at_ms, gap, thought)


def _thought(spec, plan):
    """The reasoning before a reply: simulate.reasoning's text, or a text of
    its length (drawn, when a distribution); None for none."""
    if isinstance(spec.reasoning, str):
        return spec.reasoning or None
    length = round(_amount(spec.reasoning, plan.draws, "reasoning tokens", _MAX_OUTPUT_TOKENS))
    return _sized("Simulated reasoning", length) if length else None


def _signature(seed, text):
    """A thinking block's signature: an HMAC of its text under a key made
    from the seed, so the server can tell its own block from an edited or a
    forged one, and a fresh server with the same seed signs the same."""
    key = f"dummyllm thinking {seed}".encode()
    return base64.b64encode(hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()).decode()


def _sized(text, tokens):
    """A text of exactly `tokens` tokens: this one (or a default), repeated or cut."""
    unit = (text or "Simulated reply") + " "
    return (unit * (4 * tokens // len(unit) + 1))[:4 * tokens]


class _Gaps:
    """gap(i), the ms before the i-th piece of a stream (i from 1): token_ms,
    or a draw from its distribution for that piece (made once, when first
    asked for); times `factor`.  `constant` is the one gap of them all, or
    None when they are drawn."""

    def __init__(self, token_ms, draws, factor=1, drawn=None):
        self.token_ms, self.draws, self.factor = token_ms, draws, factor
        self.constant = None if isinstance(token_ms, dict) else token_ms * factor
        self._drawn = [] if drawn is None else drawn

    def __call__(self, index):
        if self.constant is not None:
            return self.constant
        while len(self._drawn) < index:
            self._drawn.append(_amount(self.token_ms, self.draws,
                                       f"token {len(self._drawn) + 1}", _MAX_TOKEN_MS))
        return self._drawn[index - 1] * self.factor

    def stretched(self, factor):
        """These gaps, each `factor` times longer (the draws shared)."""
        return _Gaps(self.token_ms, self.draws, self.factor * factor, self._drawn)

    def total(self, pieces):
        """The ms from the first of a stream's pieces to the last of `pieces`."""
        if self.constant is not None:
            return max(0, pieces - 1) * self.constant
        return sum(self(index) for index in range(1, pieces))


def _piece_count(reply):
    """How many pieces its stream has (see _stream_pieces)."""
    thinking = -(-len(reply.reasoning) // 4) + 1 if reply.reasoning else 0
    if reply.tool_calls is None:
        return thinking + -(-len(reply.text) // 4)
    return sum(1 for _ in _stream_pieces(reply))


def _hashed_embedding(model, text, dimensions):
    """A unit vector that is a pure function of its arguments: each block of
    SHA-256 of the JSON text [model, text, block] gives 16 numbers from -1 to
    1.  Equal texts give equal vectors on every run and machine; how near two
    different texts are means nothing."""
    values = []
    for block in range(-(-dimensions // 16)):
        digest = hashlib.sha256(json.dumps([model, text, block]).encode("utf-8")).digest()
        values.extend(number / 32768 for number in struct.unpack(">16h", digest))
    return values[:dimensions]


_WORD = re.compile(r"\w+")


def _similar_embedding(model, text, dimensions):
    """A vector in which texts that share words are near: each word of the
    text (in lower case) adds its weight, 1 (a quarter for words of one to
    three letters, which say little: "how", "the"), and each character
    trigram of the word between "<" and ">" half that, so "retry" and
    "retries" are near too; the sign and the place of each come from SHA-256
    of the JSON text [model, feature].  A text without a word is given its
    hashed vector."""
    values = [0.0] * dimensions
    for word in _WORD.findall(text.lower()):
        weight, marked = 1.0 if len(word) > 3 else 0.25, f"<{word}>"
        features = [(word, weight)] + [(marked[at:at + 3], weight / 2)
                                       for at in range(len(marked) - 2)]
        for feature, share in features:
            digest = hashlib.sha256(json.dumps([model, feature]).encode("utf-8")).digest()
            number = int.from_bytes(digest[:8], "big")
            values[number % dimensions] += -share if number >> 63 else share
    return values if any(values) else _hashed_embedding(model, text, dimensions)


def _embedding(model, text, dimensions, kind="hash"):
    """The unit vector `kind` makes of a text, rounded to float32: a pure
    function of its arguments."""
    maker = _similar_embedding if kind == "similar" else _hashed_embedding
    values = maker(model, text, dimensions)
    length = math.sqrt(math.fsum(value * value for value in values)) or 1.0
    # As float32, the precision every encoding (JSON or base64) carries.
    return list(struct.unpack(f"<{dimensions}f", struct.pack(
        f"<{dimensions}f", *(value / length for value in values))))


def _stream_timeline(reply, failure):
    """A streamed reply as (ms after the first token, event, data), lazily.

    Events: "open" at 0; the reasoning first, if any, as "thought" pieces
    of four characters, then "thought_done"; a "piece" of text, four
    characters (one token), each reply.gap(i) after the one before; for each tool call, "call" (its
    index), then its arguments as "arguments" pieces (index, text: two at
    least), then "call_done"; "close" with the last piece.  A failure
    ({"cut_after": N}, ...: see _STREAM_FAILURES) stops after N pieces:
    error_after adds an "error" event a gap later, malformed_after the next
    piece as "malformed" (event, data), to be sent cut in half.
    """
    kind, count = next(iter(failure.items())) if failure else (None, None)
    yield 0, "open", None
    pieces = itertools.islice(_stream_pieces(reply), count)
    at_ms, index = 0, -1
    for index, (event, data) in enumerate(pieces):
        if index:
            at_ms += reply.gap(index)
        yield at_ms, event, data
    if kind is None:
        yield at_ms, "close", None
    elif kind == "error_after":
        yield at_ms + reply.gap(index + 1), "error", None
    elif kind == "malformed_after":
        following = next(itertools.islice(_stream_pieces(reply), count, None), None)
        if following is not None:
            yield at_ms + reply.gap(index + 1), "malformed", following


def _stream_pieces(reply):
    """The content of a reply as stream events: its reasoning, then text
    pieces or tool calls."""
    if reply.reasoning:
        for start in range(0, len(reply.reasoning), 4):
            yield "thought", reply.reasoning[start:start + 4]
        yield "thought_done", None
    if reply.tool_calls is None:
        for start in range(0, len(reply.text), 4):
            yield "piece", reply.text[start:start + 4]
        return
    for index, call in enumerate(reply.tool_calls):
        yield "call", index
        text = _arguments_text(call)
        size = min(4, max(1, -(-len(text) // 2)))
        for start in range(0, len(text), size):
            yield "arguments", (index, text[start:start + size])
        yield "call_done", index


def _cut_in_half(data):
    """An event's bytes with its JSON cut in half (the SSE framing, or the line end, kept)."""
    body = data.rstrip(b"\r\n")
    head, mark, payload = body.rpartition(b"data: ")
    if not mark:
        head, payload = b"", body
    return head + mark + payload[:len(payload) // 2] + data[len(body):]
# --- Surfaces ---------------------------------------------------------------------
# A surface is one provider's API, declared as one unit: its routes and their
# descriptions, how a request in its format becomes the common call, how an
# answer, an error and a stream are written in its format (a stream as a
# table of events), the headers it reads and sends, and the schemas it adds
# to the API document.  The shared code (simulation, faults, scripts, rules,
# quotas, the journal, the verdict, stream timing) knows the surfaces only
# through the protocol below.  A new provider is its unit and one entry in
# _SURFACES.

# --- Surfaces: the protocol -------------------------------------------------------

def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text):
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is too large for a number")
    return number


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def _json_value(data, what, field=None):
    """A JSON text (bytes must be UTF-8) decoded, or INVALID_JSON naming the
    field.  Everything the server keeps must be writable as UTF-8 again, so
    a lone surrogate (an escape like \\ud800 with no pair) is refused too."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = _DECODER.decode(text)
    except RecursionError:
        raise ApiError("INVALID_JSON", f"{what} nests too deeply", field) from None
    except ValueError as exc:  # UnicodeDecodeError is one too
        raise ApiError("INVALID_JSON", f"{what} is not valid JSON in UTF-8: {exc}",
                       field) from None
    if _SURROGATE_ESCAPE.search(text):
        path = _lone_surrogate(value, field or "")
        if path is not None:
            raise ApiError("INVALID_JSON", f"{what} has a lone surrogate at {path or 'the top'}",
                           path or field)
    return value


def _lone_surrogate(value, path):
    """The path of the first string (or key) in value that is not valid
    Unicode, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(
        value, list) else ()
    for key, item in items:
        if isinstance(key, int):
            name = f"{path}[{key}]"
        else:
            shown = key.encode("utf-8", "backslashreplace").decode("utf-8")
            name = f"{path}.{shown}" if path else shown
            if shown != key:
                return name
        found = _lone_surrogate(item, name)
        if found is not None:
            return found
    return None


def _json_body(request):
    """The request body as a JSON object, or the error that says why not."""
    if not request.body.strip():
        raise ApiError("INVALID_JSON", "request body is empty; send a JSON object")
    value = _json_value(request.body, "request body")
    if not isinstance(value, dict):
        raise _ValidationError(None, "request body must be a JSON object")
    return value


def _random_hex(digits):
    """A random id of hex digits: unique enough for an answer's id, and
    without the system call of secrets (6% of a chat answer's time)."""
    return f"{random.getrandbits(4 * digits):0{digits}x}"


def _duration_text(ms):
    """OpenAI's style for x-ratelimit-reset-*: "20ms", "1s", "1.5s"."""
    return f"{ms}ms" if ms < 1000 else f"{ms / 1000:g}s"


_TOOL_RESULT_CHARS = 1000
# How an MCP tool call ended (see _Mcp.call_tool).
_MCP_OUTCOMES = {
    "ok": "a result",
    "error": "an error result (isError): the tool failed or timed out",
    "refused": "its arguments broke the tool's input schema",
    "rpc_error": "a JSON-RPC error the tool declares",
    "hang": "no answer",
}

# What a request learns on its way and tells the journal, the access log and
# the verdict: each field, with its schema in a journal entry.
_NOTE_FIELDS = {
    "job_id": ({"type": ["string", "null"]}, "The job or stored response it created or named"),
    "trace_id": ({"type": ["string", "null"]}, "Its sequence key: X-Trace-Id, the body's "
                 "trace_id or user, or that of the job it names"),
    "rule": ({"type": ["integer", "null"]}, "The reply rule that matched"),
    "code": ({"type": ["string", "null"]}, "The error code answered"),
    "field": ({"type": ["string", "null"]}, "The field at fault, of the error answered"),
    "retry_after_ms": ({"type": ["integer", "null"]},
                       "The wait the retry headers advertised (real ms)"),
    "stream_failure": ({"type": ["string", "null"]}, "The stream failure it was given"),
    "job_ended": ({"type": ["boolean", "null"]},
                  "Whether the job the answer showed had ended"),
    "recording": ({"enum": [None, "replayed", "recorded"]}, "Whether a recording answered it "
                  "(simulate.replay), or --record forwarded it and recorded the answer"),
    "tool_results": ({"type": ["array", "null"], "items": {"type": "string"}},
                     "Of a model call: the tool results it carries, the first "
                     f"{_TOOL_RESULT_CHARS} characters of each"),
    "mcp": ({"type": ["object", "null"], "properties": {
        "session": {"type": ["string", "null"]}, "method": {"type": ["string", "null"]},
        "id": {"type": ["string", "integer", "null"]}, "tool": {"type": ["string", "null"]},
        "arguments": {"type": ["string", "null"], "description": "A digest of them"},
        "outcome": {"enum": [None, *_MCP_OUTCOMES]},
        "text": {"type": ["string", "null"], "description": "Of an error result"},
        "cancels": {"type": ["string", "integer", "null"]}}},
            "Of an MCP message: its session, method and id; the tool it called, how the "
            "call ended and its error's text; the request it cancels"),
}


class _Note:
    """What a request learns on its way: the fields of _NOTE_FIELDS (None
    until learnt), and two more that stay in the server:

    fault   the fault a poll's answer was given in place of the job's state
            (the journal records it with the faults that spoil answers)
    quota   the quota its key has left, {"requests" and/or "tokens": (limit,
            remaining, real ms until the window frees room)}, for the headers

    Each is None on the class, and set on a request's note once learnt (a
    note that set each in __init__ cost 2 us a request)."""

    fault = quota = None


for _name in _NOTE_FIELDS:
    setattr(_Note, _name, None)
del _name


class _Request:
    """One request as the application sees it.

    method, path, query    as the request line gave them (path without the query)
    headers                by lower-case name
    body                   bytes
    received_ms            when it arrived, on the store's clock (simulated ms)
    received_wall_ms       when it arrived, epoch milliseconds
    route                  the _Route that answers it, once routed
    params, args           its path parameters and checked query parameters
    test_id                the test whose scope it is in, once routed (see _test_id)
    note                   what it learns on its way (a _Note)
    """

    __slots__ = ("method", "path", "query", "headers", "body", "received_ms",
                 "received_wall_ms", "route", "params", "args", "test_id", "note")

    def __init__(self, method, path, query, headers, received_ms, received_wall_ms, body=b""):
        self.method, self.path, self.query, self.headers = method, path, query, headers
        self.received_ms, self.received_wall_ms, self.body = received_ms, received_wall_ms, body
        self.route, self.params, self.args, self.note = None, {}, {}, _Note()
        self.test_id = None


class _Answer:
    """What a handler answers, and when.

    `payload` is a JSON value, bytes of `content_type`, or an ApiError
    (written in the route's surface's format); `at` is the clock time to
    answer (None: now).  `stream` makes it a stream of (ms after `at`,
    bytes) that ends as its `failure` says (see _STREAM_FAILURES), and
    `stream_error()` the bytes that end it early when a frame fails to
    render; `live` one of bytes sent as they come.  A status of None sends
    nothing: the connection is held until the client or the server closes
    it.  A `fault` spoils the answer as it goes out (see _FAULTS).
    """

    __slots__ = ("status", "payload", "headers", "at", "stream", "stream_error", "failure",
                 "fault", "dribble_ms", "live", "content_type")

    def __init__(self, status=200, payload=None, headers=(), at=None, stream=None,
                 stream_error=None, failure=None, fault=None, dribble_ms=50, live=None,
                 content_type="application/json"):
        self.status, self.payload, self.headers, self.at = status, payload, tuple(headers), at
        self.stream, self.stream_error, self.failure, self.live = (stream, stream_error, failure,
                                                                    live)
        self.fault, self.dribble_ms, self.content_type = fault, dribble_ms, content_type


class _Route(collections.namedtuple("_Route", "method path handler surface auth admin chaos "
                                              "journal api")):
    """An endpoint: ``handler(surface, app, request)`` gives its _Answer (or
    raises ApiError); `surface` is the unit that declares it (set when it is
    registered) and writes its answers; whether it needs --api-key or
    --admin-key, may meet chaos and is journaled; its description (see
    _describe)."""


def _route(method, path, handler, auth=None, admin=False, chaos=True, journal=True, api=None):
    """A route as a surface declares it; `auth` None takes the surface's own
    (its `keyed`).  {name} in the path matches one segment, {name+} the rest."""
    return _Route(method, path, handler, None, auth, admin, chaos, journal,
                  api or handler.api)


def _describe(summary, request=None, answers=None, query=None, headers=None, streams=False,
              refuses=None, request_type="application/json"):
    """An endpoint's description: its summary, request body schema (of
    request_type), answers
    ({status: schema name, media type, _EventStream, or None}), query
    parameters and request headers (tables of _Field, which also check
    them), whether its 200 may be its surface's stream instead (see
    _Surface.event_streams), and the rules a schema cannot tell ({field:
    when a value its schema allows is refused}, mostly for another field)."""
    return {"summary": summary, "request": request, "answers": answers or {200: None},
            "query": query or {}, "headers": headers or {}, "streams": streams,
            "refuses": refuses or {}, "request_type": request_type}


def _api(*args, **kwargs):
    """Describe a handler (see _describe); a route may describe itself instead."""
    def describe(handler):
        handler.api = _describe(*args, **kwargs)
        return handler
    return describe


def _simulate_header(request):
    """The simulate settings of the request's X-DummyLLM-Simulate header ({} without one)."""
    header = request.headers.get(_SIMULATE_HEADER.lower())
    return {} if header is None else _SIMULATE(
        _json_value(header, _SIMULATE_HEADER, _SIMULATE_HEADER), _SIMULATE_HEADER)


def _query_args(request, fields):
    """The request's query parameters, checked by the handler's rules."""
    values = urllib.parse.parse_qs(request.query, keep_blank_values=True) if request.query else {}
    args = {}
    for name, spec in fields.items():
        if name in values:
            args[name] = spec.rule(spec.rule.from_text(values[name][-1]), name)
        else:
            args[name] = spec.default
    return args


# The common call: what every model-call surface's request comes down to.
# `spec` holds the operation, the messages, the simulate settings and the
# sequence key; `options` what only that surface needs back.
_Call = collections.namedtuple("_Call", "spec model stream max_tokens stop min_tokens options")

_TRACE_ID_TEXT = _Text(_MAX_TRACE_ID_CHARS)
_TRACE_ID_HEADER = _Nullable(_TRACE_ID_TEXT)
# The request headers every surface reads (a surface adds its own for CORS).
_COMMON_REQUEST_HEADERS = ("Content-Type", "Authorization", "Idempotency-Key", "X-Trace-Id",
                           _TEST_ID_HEADER, _SIMULATE_HEADER)
# The answer headers every surface may send.
_COMMON_ANSWER_HEADERS = ("Location", "Retry-After", "retry-after-ms", "Idempotent-Replayed")
_SIMULATE_HEADERS = {
    _SIMULATE_HEADER: _Field(_SIMULATE, None,
                             "Simulate settings as JSON; the body's win, field by field"),
    "X-Trace-Id": _Field(_TRACE_ID_TEXT, None, "The key of seeded sequences and scripts"),
    _TEST_ID_HEADER: _Field(_TEST_ID_TEXT, None, "The test whose own scripts, sequences, "
                            "rules, quotas and journal this call is in")}


class _Surface:
    """A provider's API, declared as one unit.  This base is dummyLLM's own:
    its error shape, the common path of a model call, and the defaults.

    What a surface declares:

    name              the name reply rules know its model calls by (None:
                      it answers no model calls)
    title             the heading of its routes in the API document (their
                      OpenAPI tag) and on the docs page; its name by default
    routes            its endpoints (see _route), tried in this order
    keyed             whether its routes need --api-key (see credential)
    error_schema      the API document's schema of its errors
    error_types       what its errors call each error: by code, else by
                      status, else by "4xx" or "5xx" (see error_type)
    validation_status the status of a field that breaks its rule
    overloaded_status of mode overloaded when simulate.status gives none
    stream_error      (code, default message) of the event error_after sends
    finish            its reason for each way a reply ends (_Reply.end)
    framing           how its streams are written (see _Framing)
    stream_events     what it writes for each event of a stream's timeline,
                      in order: {kind: ((name, build, schema), ...)},
                      build(surface, render, piece) giving an event's JSON,
                      bytes, or None for no event (see _Render); schema, the
                      API document's for its JSON (a name), or the bytes
    framings          the framings its streams may take (its framing, for most)
    request_headers   the headers it reads, besides the common ones
    answer_headers    the headers it sends, besides the common ones and its
                      quota's (CORS lets a browser read them)
    sdk_environ       the environment variables its SDKs read: {name: the
                      path after the server's URL}, for a base URL, or None
                      for an API key (a placeholder is set where none is)
    quota_header      the pattern of its quota headers' names ({part} is
                      limit, remaining or reset; {kind} requests or tokens),
                      or None where the API tells no quota
    reasons           reason phrases of statuses HTTP has none for

    What it does: parse(request, config) reads a model call into a _Call;
    respond(app, request, call) answers it (the common path is here);
    answer(call, reply, created) writes a reply; error(...) an error; and
    schemas() gives what it adds to the API document.
    """

    name = title = None
    routes = ()
    sdk_environ = {}
    keyed = False
    error_schema = "Error"
    error_types = {}
    validation_status = 422
    overloaded_status = 503
    stream_error = ("SIM_FAIL", "simulated stream error")
    finish = {}
    framing = None
    stream_events = {}
    request_headers = ()
    answer_headers = ()
    quota_header = "x-ratelimit-{part}-{kind}"
    reasons = {}

    def schemas(self):
        """The schemas it adds to the API document, by name (made at first use)."""
        return {}

    @property
    def framings(self):
        return (self.framing,)

    def event_streams(self):
        """Its streams as the API document declares them: an _EventStream
        for each framing, each with every event its stream_events may send."""
        events = tuple(dict.fromkeys((name, schema) for entries in self.stream_events.values()
                                     for name, _, schema in entries))
        return [_EventStream(framing, events) for framing in self.framings]

    def credential(self, request):
        """The API key a request carries, for --api-key."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return token if scheme.lower() == "bearer" else None

    def error_type(self, error, status):
        """What its errors call this one: by code, by status, by class."""
        types = self.error_types
        return types.get(error.code) or types.get(status) or types.get(
            "4xx" if status < 500 else "5xx")

    def error(self, error, retry_ms, now_ms, note=None):
        """(status, body, headers) of an error; retry_ms is the real delay
        its retry headers advertise, or None; now_ms the wall clock; note
        what the request learnt on its way, if it got that far."""
        status = self.validation_status if error.status == 422 else error.status
        return status, self.error_body(error, status, retry_ms), error.headers + (
            self.retry_headers(error, retry_ms, now_ms))

    def error_body(self, error, status, retry_ms):
        body = {"code": error.code, "message": error.message}
        if error.field:
            body["field"] = error.field
        return {"error": body}

    def retry_headers(self, error, retry_ms, now_ms):
        """retry-after and retry-after-ms; with a 429, the quota's headers too
        (a simulated rate limit: 60 requests, none left)."""
        if retry_ms is None:
            return ()
        headers = (("retry-after", str(math.ceil(retry_ms / 1000))),
                   ("retry-after-ms", str(retry_ms)))
        if error.status == 429:
            headers += self.quota_headers(error.quota or {"requests": (60, 0, retry_ms)}, now_ms)
        return headers

    def quota_headers(self, quota, now_ms):
        """The headers that tell a client its quota: quota is {"requests" or
        "tokens": (limit, remaining, ms until the window frees room)}; now_ms
        the wall clock."""
        if self.quota_header is None:
            return ()
        return tuple(header for kind, (limit, remaining, reset_ms) in quota.items() for header in (
            (self.quota_header.format(part="limit", kind=kind), str(limit)),
            (self.quota_header.format(part="remaining", kind=kind), str(remaining)),
            (self.quota_header.format(part="reset", kind=kind),
             self.reset_text(reset_ms, now_ms))))

    @staticmethod
    def reset_text(reset_ms, now_ms):
        """How its quota headers say when the window frees room."""
        return _duration_text(reset_ms)

    def stream_framing(self, call):
        """The framing of a call's stream (most surfaces have one)."""
        return self.framing

    def begin_stream(self, render):
        """Set on a stream's render what its events share (its id...)."""

    def error_event(self, render, piece):
        """The JSON of the event error_after sends: its error, in its shape."""
        error = render.simulated_error()
        return self.error_body(error, error.status, None)

    def call(self, request, config, *, model, messages, stream, max_tokens, user, timeout_ms,
             simulate, stop=(), min_tokens=None, args=None, callback_url=None, tools=None,
             forced=None, output=None, reasoning=False, **options):
        """The _Call of a model request.

        Its simulate settings, field by field: the body's, else those of the
        X-DummyLLM-Simulate header, else those of the first reply rule that
        matches, else the server's defaults.  The key of seeded sequences is
        X-Trace-Id, else `user`, else "".  `messages` is the conversation as
        text, {"role", "content"}, a tool's result with role "tool" and
        "tool" naming the tool.  `tools` maps the names of the request's
        tools to (JSON Schema of their arguments, field), None where the API
        has no tools; `forced` is (a tool's name or "any", field) when the
        request forces a tool call; `output` is (JSON Schema, field) when it
        asks for structured output (the schema True: any JSON object).  The
        schemas are checked where a value is drawn from them, once, by the
        plan (see _result).  `reasoning`: the request asks the model to
        reason, in its API's way (without simulate.reasoning, a short thought
        on the last user message)."""
        header = _simulate_header(request)
        trace_id = _TRACE_ID_HEADER(request.headers.get("x-trace-id"), "X-Trace-Id") or user
        request.note.tool_results = [message["content"][:_TOOL_RESULT_CHARS]
                                     for message in messages if message["role"] == "tool"] or None
        rule, ruled = None, ("", {})
        if config.rules:
            facts = _Facts(self.name, request.path, model, messages, request.headers, trace_id,
                           request.test_id, functools.lru_cache(maxsize=None)(
                               lambda: _request_digest(request.path, request.body)))
            rule = next((index for index, rule in enumerate(config.rules) if rule.holds(facts)),
                        None)
            if rule is not None:
                ruled = f"rules[{rule}].simulate", config.rules[rule].simulate
        sources = (("simulate", simulate or {}), (_SIMULATE_HEADER, header), ruled)
        settings = _simulate_settings({**ruled[1], **sources[1][1], **sources[0][1]}, config)
        if reasoning and settings["reasoning"] is None:
            settings["reasoning"] = "Simulated reasoning about: " + (
                _last_user_text(messages) or "")[:200]
        if settings["stream"] is not None and not stream:
            settings["stream"] = _left_out(sources, "stream", 'applies only with "stream": true')
        if tools is None and settings["tool_calls"] is not None:
            settings["tool_calls"] = _left_out(sources, "tool_calls",
                                               "applies only where the API has tools")
        if tools is None and any("tool_calls" in step for step in settings["script"] or ()):
            settings["script"] = _left_out(sources, "script",
                                           "has tool calls, which this API has not")
        forced_tool = asked_output = None
        if forced is not None:
            choice, field = forced
            if not isinstance(choice, str):
                raise _ValidationError(field, "must name a tool")
            name = next(iter(tools or {}), None) if choice == "any" else choice
            if name not in (tools or {}):
                raise _ValidationError(field, "asks for a tool call, but the request offers no "
                                       "tools" if name is None else
                                       f"names {name!r}, which is not among the request's tools")
            schema, schema_field = tools[name]
            forced_tool = {"name": name, "field": schema_field, "schema": schema}
        if output is not None:
            schema, field = output
            asked_output = {"field": field, "schema": schema}
        spec = _JobSpec(op="llm.chat", args={"model": model, "messages": messages, **(args or {})},
                        timeout_ms=timeout_ms, trace_id=trace_id, test_id=request.test_id,
                        callback_url=callback_url, rule=rule, forced_tool=forced_tool,
                        output=asked_output, **settings)
        return _Call(spec, model, stream, max_tokens, tuple(stop), min_tokens, options)

    def planned(self, app, request, call):
        """Take a model call's place in the store's sequences and draw its
        plan: (the call with this attempt's settings, its plan, and the
        answer of a plan that does not succeed, else None: a hang, or a
        failure at its time; a refusal is raised)."""
        spec, plan, _ = app.store.plan_call(call.spec)
        call = call._replace(spec=spec)
        request.note.rule = spec.rule
        _no_dribbled_stream(call)
        if plan.state in _REFUSED_STATES:
            raise _refusal(spec, plan, self.overloaded_status)
        if plan.ends_at_ms is None:
            return call, plan, _Answer(status=None)  # hang
        if plan.state != "ok":
            return call, plan, _Answer(
                payload=ApiError(plan.error["code"], plan.error["message"]),
                at=request.received_ms + plan.ends_at_ms, fault=spec.fault,
                dribble_ms=spec.dribble_ms)
        return call, plan, None

    def respond(self, app, request, call):
        """The common path of a model call, once parsed and admitted: take
        its place in the store's sequences, then refuse, fail, hang, answer
        or stream as its plan says."""
        call, plan, failed = self.planned(app, request, call)
        if failed is not None:
            return failed
        spec = call.spec
        at_ms = request.received_ms + plan.ends_at_ms
        reply = _reply(spec, plan, call.max_tokens, call.stop, call.min_tokens)
        at_ms, reply = app.capacity.book(call.model, request.received_ms, at_ms, reply,
                                         self.overloaded_status,
                                         call.stream or app.config.slots is not None)
        created = app.clock.wall_ms() // 1000
        if call.stream and spec.fault is None:
            render = _Render(self, call, reply, created)
            return render.answer(render.frames(_stream_timeline(reply, spec.stream)), at=at_ms,
                                 failure=next(iter(spec.stream)) if spec.stream else None)
        if app.config.slots is not None:  # a plain answer is sent at its last token
            at_ms += reply.gap.total(_piece_count(reply))
        return _Answer(200, self.answer(call, reply, created), at=at_ms, fault=spec.fault,
                       dribble_ms=spec.dribble_ms)


def _left_out(sources, key, reason):
    """None, for a setting a model call cannot take that a reply rule or the
    header gave (a rule may match calls of every kind, and a client sends its
    header with each); from the body, a 400 naming it.  sources: (name,
    settings) in the order they win."""
    field = next(f"{name}.{key}" for name, given in sources if key in given)
    if field.startswith("simulate."):
        raise _ValidationError(field, reason)
    return None


def _no_dribbled_stream(call):
    if call.stream and call.spec.fault is not None and call.spec.fault.kind == "dribble":
        raise _ValidationError("simulate.fault", "dribble applies to JSON answers; a stream "
                               "is paced by token_ms")


def _admit(app, request, spec, max_tokens=None):
    """Count a model call or a job against its key's quota, if it has one:
    the API key, else the sequence key.  Over it, the surface's 429."""
    request.note.trace_id = spec.trace_id  # a refused call is journaled under its key
    if spec.rpm is None and spec.tpm is None:
        return
    key = request.test_id, request.route.surface.credential(request) or spec.trace_id or ""
    request.note.quota = app.quotas.admit(key, spec.rpm, spec.tpm,
                                          _prompt_tokens(spec) + (max_tokens or 0))


def _model_call(surface, app, request):
    """Answer a model call in its route's surface: parse it, count it
    against its key's quota, then forward it to --record's upstream, replay
    the recording its reply rule gives, or let the surface respond."""
    call = surface.parse(request, app.config)
    _admit(app, request, call.spec, call.max_tokens)
    if app.recorder is not None and app.recorder.forwards(surface, call):
        return app.recorder.forward(app, surface, request, call)
    if call.spec.rule is None and app.config.strict_rules:
        raise _unmatched(surface, request, call, app.config.rules)
    if call.spec.replay is not None:
        return _replay(surface, app, request, call)
    return surface.respond(app, request, call)


def _unmatched(surface, request, call, rules):
    """The 404 of --strict-rules: no reply rule matches the call; it names
    the rule that came nearest (the most of its match keys hold) and what
    of it missed."""
    facts = _Facts(surface.name, request.path, call.model, _messages(call.spec), request.headers,
                   call.spec.trace_id, request.test_id, functools.lru_cache(maxsize=None)(
                       lambda: _request_digest(request.path, request.body)))
    missed = [(index, [name for name, value in rule.match.items()
                       if not _MATCH_KEYS[name].holds(value, facts)])
              for index, rule in enumerate(rules) if rule.test_id in (None, request.test_id)]
    message = "no reply rule matches this call (--strict-rules)"
    if missed:
        index, keys = min(missed, key=lambda found: len(found[1]))
        about = rules[index].given.get("about")
        message += (f"; the nearest, rules[{index}]" + (f" ({about})" if about else "")
                    + ", misses on " + ", ".join(keys))
    return ApiError("NOT_FOUND", message)


def _replay(surface, app, request, call):
    """A model call a recording answers (simulate.replay).  Its plan still
    says whether it is refused, fails or hangs; when it succeeds, the next
    recorded answer of its key goes out as it came: its status, headers and
    body at its time, or its stream's frames at theirs (at once, with
    replay_timing "instant"), spoiled by the call's fault or stream failure."""
    call, _, failed = surface.planned(app, request, call)
    if failed is not None:
        return failed
    spec = call.spec
    recorded = spec.replay[min(app.store.replay_step(spec), len(spec.replay) - 1)]
    request.note.recording = "replayed"
    timed = spec.replay_timing == "recorded"
    headers = [(name, value) for name, value in recorded.get("headers", ())
               if name.lower() not in _FRAMING_HEADERS and name.lower() != "content-type"]
    content_type = next((value for name, value in recorded.get("headers", ())
                         if name.lower() == "content-type"), "application/json")
    if "body" in recorded:
        return _Answer(recorded["status"], _recorded_bytes(recorded, recorded["body"]), headers,
                       at=request.received_ms + (recorded.get("ms", 0) if timed else 0),
                       fault=spec.fault, dribble_ms=spec.dribble_ms, content_type=content_type)
    frames = [(ms if timed else 0, _recorded_bytes(recorded, text))
              for ms, text in recorded["frames"]]
    if spec.fault is not None:
        return _Answer(recorded["status"], b"".join(data for _, data in frames), headers,
                       at=request.received_ms + (frames[-1][0] if frames else 0),
                       fault=spec.fault, content_type=content_type)
    render = _Render(surface, call, None, app.clock.wall_ms() // 1000)
    failure = spec.stream or ({"cut_after": len(frames)} if recorded.get("end") else None)
    frames, kind = _broken(frames, failure, render.error_event)
    return _Answer(recorded["status"], headers=headers, at=request.received_ms, stream=frames,
                   stream_error=render.error_event, failure=kind, content_type=content_type)


def _recorded_bytes(recorded, text):
    """The bytes a recording's body or frame stands for."""
    return base64.b64decode(text) if recorded.get("base64") else text.encode()


def _broken(frames, failure, error_event):
    """A stream's (ms, bytes) frames as a stream failure leaves them, and
    the failure's kind (None for none): cut after N frames; then, for
    error_after, error_event() a frame later; for malformed_after, the next
    frame cut in half."""
    if not failure:
        return frames, None
    (kind, count), = failure.items()
    sent = frames[:count]
    if kind == "error_after":
        sent.append((frames[min(count, len(frames) - 1)][0] if frames else 0, error_event()))
    elif kind == "malformed_after" and count < len(frames):
        sent.append((frames[count][0], _cut_in_half(frames[count][1])))
    return sent, kind


# What every model call refuses that its schema allows (see _Surface.call).
_MODEL_CALL_REFUSES = {
    "simulate.stream": 'without "stream": true',
    "simulate.tool_calls": "where the API has no tools",
    "simulate.script": "with tool calls, where the API has no tools",
    "simulate.fault": "dribble, on a stream (token_ms paces a stream)",
}
_FORCES_AN_UNOFFERED_TOOL = "forcing a call of a tool the request does not offer"
_REFUSED_CONVERSATION = ("a conversation the real API refuses (see --lenient): a tool result "
                         "that answers no call before it, a call the next message leaves "
                         "unanswered, a thinking block dropped from a tool loop or edited")
_UNDRAWABLE_SCHEMA = ("a schema that is not a JSON Schema (an object or a boolean), or one no "
                      "value can be drawn from when one must be (false, bounds that cross, a "
                      "pattern beyond the known formats)")


def _model_api(summary, request, answers, query=None, streams=True, refuses=None):
    """The description of a model call's route."""
    return _describe(summary, request, answers, query, _SIMULATE_HEADERS, streams,
                     {**_MODEL_CALL_REFUSES, **(refuses or {})})


class _Framing(collections.namedtuple("_Framing", "content_type event start end")):
    """How a stream is written: its content type; event(render, name, data)
    the bytes of one event (data its JSON, encoded); the bytes before its
    first event and after its last (a JSON array's brackets)."""


def _data_event(render, name, data):
    return b"data: " + data + b"\n\n"


def _named_event(render, name, data):
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


def _json_line(render, name, data):
    return data + b"\n"


def _array_item(render, name, data):
    return data if render.written == 0 else b",\r\n" + data


class _EventStream(collections.namedtuple("_EventStream", "framing events")):
    """A stream as the API document declares it: its _Framing, and (name or
    None, schema) for each event it may send: the schema of its JSON by
    name, or the bytes it sends as they are (OpenAI's [DONE])."""


_SSE = _Framing("text/event-stream", _data_event, b"", b"")
_NAMED_SSE = _Framing("text/event-stream", _named_event, b"", b"")
_NDJSON = _Framing("application/x-ndjson", _json_line, b"", b"")
_JSON_ARRAY = _Framing("application/json", _array_item, b"[", b"]")


class _Render:
    """One stream written out: for each event of its timeline, the
    surface's stream_events, each built from the call and the reply and
    written in the surface's framing.  `written` counts the events written
    (sequence numbers; a JSON array's commas), those up to `skip` included
    are counted but not written (a stream resumed after one of them).

    A text piece is most of a stream, and its event differs from the last
    only in the text: it is encoded once around a marker and filled in (a
    tenth of the cost of encoding each)."""

    _MARKER = "\0"
    _ENCODED_MARKER = b'"\\u0000"'

    def __init__(self, surface, call, reply, created, skip=-1, **fields):
        self.surface, self.call, self.reply, self.created = surface, call, reply, created
        self.framing, self.skip = surface.stream_framing(call), skip
        self.written = 0
        self._pieces = {}  # a text piece's events, encoded around the marker
        self.__dict__.update(fields)
        surface.begin_stream(self)

    def __call__(self, kind, piece=None):
        """The bytes of one event of the timeline."""
        framing, surface = self.framing, self.surface
        out = [framing.start] if kind == "open" and framing.start else []
        for position, (name, build, _) in enumerate(surface.stream_events.get(kind, ())):
            if kind == "piece" and isinstance(piece, str):
                data = self._text_piece(position, name, build, piece)
            else:
                payload = build(surface, self, piece)
                if payload is None:
                    continue
                data = payload if isinstance(payload, bytes) else _json_bytes(payload)
            if self.written > self.skip:
                out.append(framing.event(self, name, data))
            self.written += 1
        if kind in ("close", "error") and framing.end:
            out.append(framing.end)
        return b"".join(out)

    def _text_piece(self, position, name, build, text):
        around = self._pieces.get(position)
        if around is None:
            encoded = _json_bytes(build(self.surface, self, self._MARKER))
            # Only where the marker is the text alone (a model's name may hold it).
            around = self._pieces[position] = (encoded.split(self._ENCODED_MARKER)
                                               if encoded.count(self._ENCODED_MARKER) == 1
                                               else False)
        if around is False:
            return _json_bytes(build(self.surface, self, text))
        return around[0] + _json_bytes(text) + around[1]

    def frames(self, timeline):
        """(ms, bytes) of each event of a timeline (see _stream_timeline),
        lazily; a "malformed" one is cut in half."""
        for ms, kind, piece in timeline:
            if kind == "malformed":
                yield ms, _cut_in_half(self(*piece))
            else:
                yield ms, self(kind, piece)

    def error_event(self):
        """The bytes that end the stream early: the surface's error event."""
        return self("error")

    def answer(self, frames, at, failure=None):
        """The _Answer that streams these frames (see frames())."""
        return _Answer(200, at=at, stream=frames, stream_error=self.error_event,
                       failure=failure, content_type=self.framing.content_type)

    def simulated_error(self):
        """The error error_after sends: the surface's own, with the request's
        fail_message."""
        code, message = self.surface.stream_error
        return ApiError(code, self.call.spec.fail_message or message)


def _after_reasoning(render):
    """The index of a stream's first block (or output item) after its
    reasoning's, which comes first."""
    return 1 if render.reply.reasoning else 0


# What the requests of several surfaces share.

def _check_messages(value, field, allow_empty=False):
    if not isinstance(value, list) or not (value or allow_empty):
        raise _ValidationError(field, "must be a non-empty array of messages" if not allow_empty
                               else "must be an array of messages")
    for index, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _ValidationError(f"{field}[{index}]", "must be an object with a string role")
    return value


_MESSAGES_SCHEMA = {"type": "array", "items": {
    "type": "object", "required": ["role"], "properties": {"role": {"type": "string"}}}}


def _check_strings(value, field, most=None):
    """A list of strings (at most `most`)."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise _ValidationError(field, "must be a list of strings")
    if most is not None and len(value) > most:
        raise _ValidationError(field, f"must list at most {most} strings")
    return tuple(value)


_STRINGS_SCHEMA = {"type": "array", "items": {"type": "string"}}


def _string_or_strings(most=None):
    """The schema of a string, or a list of strings (at most `most`)."""
    strings = dict(_STRINGS_SCHEMA, **({} if most is None else {"maxItems": most}))
    return {"anyOf": [{"type": "string"}, strings]}


def _text_messages(messages):
    """OpenAI's (or Ollama's) messages as text messages (see _Surface.call):
    a tool's result names the tool its tool_call_id called."""
    names, texts = {}, []
    for message in messages:
        for call in message.get("tool_calls") or ():
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                names[call.get("id")] = call["function"].get("name")
        text = {"role": message["role"], "content": _content_text(message.get("content"))}
        if message["role"] == "tool":
            text["tool"] = (message.get("tool_name") or message.get("name")
                            or names.get(message.get("tool_call_id")))
        texts.append(text)
    return texts


def _objects(what):
    """A rule for an array of objects (tools, system blocks...)."""
    def check(value, field):
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise _ValidationError(field, f"must be an array of {what} objects")
        return value
    return _Check(check, {"type": "array", "items": {"type": "object"}})


_TOOLS = _objects("tool")


def _tool_table(tools, field, inner=None, schema_keys=("parameters",)):
    """{name: (JSON Schema of its arguments, field)} of a request's tools,
    each an object with a name and a schema under the first of schema_keys
    it has (inside tool[inner] when given); a vendor's built-in tools,
    which have neither, are left out."""
    table = {}
    for index, tool in enumerate(tools or ()):
        where = f"{field}[{index}]"
        if inner is not None:
            tool, where = tool.get(inner), f"{where}.{inner}"
            if tool is None:
                continue
            if not isinstance(tool, dict):
                raise _ValidationError(where, "must be an object")
        if "name" not in tool:
            continue
        _NAME(tool["name"], where + ".name")
        key = next((key for key in schema_keys if tool.get(key) is not None), schema_keys[0])
        where = f"{where}.{key}"
        table[tool["name"]] = _JSON_SCHEMA(tool.get(key, {"type": "object"}), where), where
    return table


_BLOCKS_SCHEMA = {"oneOf": [{"type": "string"}, {"type": "array", "items": {
    "type": "object", "required": ["type"], "properties": {"type": {"type": "string"}}}}]}


def _check_blocks(value, field):
    """Content: a string, or content blocks (objects with a string type)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _ValidationError(field, "must be a string or an array of content blocks")
    for index, block in enumerate(value):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _ValidationError(f"{field}[{index}]", "must be a content block with a type")
    return value


def _check_list(value, field):
    if not isinstance(value, list):
        raise _ValidationError(field, "must be an array")
    return value


_LIST = _Check(_check_list, {"type": "array"})


# --- Surfaces: the job API --------------------------------------------------------

# The keys of a job's JSON, each also the name of a _Job attribute.
_JOB_JSON = {
    "id": {"type": "string", "pattern": "^[a-z]+_[0-9a-f]{12}$",
           "description": "job_..., or resp_... for a stored response"},
    "state": {"type": "string", "enum": list(_JOB_STATES)},
    "op": {"type": "string"},
    "trace_id": {"type": ["string", "null"]},
    "created_at": {"type": "integer", "description": "Epoch seconds"},
    "updated_at": {"type": "integer", "description": "Epoch seconds"},
    "created_at_ms": {"type": "integer", "description": "Epoch milliseconds"},
    "updated_at_ms": {"type": "integer", "description": "Epoch milliseconds"},
    "result": {"oneOf": [{"type": "null"}, {"type": "object", "properties": {
        "text": {"type": "string"}, "usage": {"type": "object", "properties": {
            "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"}}},
        "tool_calls": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "string"}, "name": {"type": "string"}, "arguments": {}}}}}}]},
    "error": {"oneOf": [{"type": "null"}, {"type": "object", "properties": {
        "code": {"type": "string", "enum": list(_JOB_ERROR_CODES)},
        "message": {"type": "string"}}}]},
}

_JOB_REQUEST = {
    "op": _Field(_Text(non_empty=True), _REQUIRED, "The operation; llm.chat gets a chat-like reply."),
    "args": _Field(_OBJECT, {}, "Free-form; args.messages feeds replies, echo and usage."),
    "timeout_ms": _Field(_Int(1, _MAX_TIMEOUT_MS), _from_config("timeout_ms"),
                         "The server-side deadline (default --timeout-ms)."),
    "trace_id": _Field(_Text(_MAX_TRACE_ID_CHARS), None,
                       "Your correlation id; the key of seeded sequences and scripts."),
    "callback_url": _Field(_CALLBACK_URL, None, "Loopback URL the final job is POSTed to."),
    "simulate": _Field(_SIMULATE, None, "How the job behaves."),
}


class _JobApi(_Surface):
    """dummyLLM's own job API: a job is created, polled, listed, watched,
    cancelled and deleted; its JSON always has every key of _JOB_JSON."""

    title = "Jobs"

    def schemas(self):
        return {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message"], "properties": {
                    "code": {"type": "string", "enum": list(_ERRORS)},
                    "message": {"type": "string"}, "field": {"type": "string"}}}}},
            "Simulate": _object_schema(_SIMULATE_FIELDS, strict=True),
            "CreateJob": _object_schema(_JOB_REQUEST, example={
                "op": "llm.chat", "trace_id": "try-1",
                "args": {"model": "llama3.1:8b",
                         "messages": [{"role": "user", "content": "Hello"}]},
                "simulate": {"mode": "ok", "latency_ms": 500}}),
            "JobCreated": {"type": "object", "required": ["id", "state", "created_at"],
                           "properties": {key: _JOB_JSON[key]
                                          for key in ("id", "state", "created_at")}},
            "Job": {"type": "object", "required": list(_JOB_JSON), "properties": _JOB_JSON},
            "JobList": {"type": "object", "required": ["jobs", "next"], "properties": {
                "jobs": {"type": "array", "items": _ref("Job")},
                "next": {"type": ["integer", "null"]}}},
            "Cancelled": {"type": "object", "properties": {"id": {"type": "string"},
                                                           "state": {"type": "string"}}},
            "JobRequest": {"type": "object", "properties": {
                "id": {"type": "string"}, "op": {"type": "string"}, "args": {"type": "object"},
                "timeout_ms": {"type": "integer"}, "trace_id": {"type": ["string", "null"]},
                "rule": {"type": ["integer", "null"]},
                "created_at_ms": {"type": "integer"}, "polls": {"type": "integer"},
                "idempotency_key": {"type": ["string", "null"]},
                "callback": {"type": ["object", "null"]}, "simulate": {"type": "object"},
                "outcome": {"type": "object"}}},
        }

    def parse_create(self, body, config, test_id=None):
        """The _JobSpec of a create request's body, in a test's scope."""
        values = _with_defaults(_given(body, _JOB_REQUEST, None), _JOB_REQUEST, config)
        if values["callback_url"] is not None:
            _check_callback_url(values["callback_url"], "callback_url",
                                config.allow_callback_hosts)
        settings = _simulate_settings(values.pop("simulate"), config)
        settings.update(ttft_ms=None, prefill_ms_per_token=0)  # a job has no first token
        return _JobSpec(**values, test_id=test_id, rule=None, forced_tool=None, output=None,
                        **settings)

    @_api("Create a simulated job", request="CreateJob",
          answers={201: "JobCreated", 200: "JobCreated", 409: "Error", 429: "Error", 503: "Error"},
          headers={"Idempotency-Key": _Field(_Text(), None, "Repeat-safe key: the same key "
                                             "and body answer the same job"),
                   _TEST_ID_HEADER: _SIMULATE_HEADERS[_TEST_ID_HEADER]},
          refuses=_CALLBACK_REFUSED)
    def create(self, app, request):
        body = _json_body(request)
        spec = self.parse_create(body, app.config, request.test_id)
        _admit(app, request, spec)
        key = request.headers.get("idempotency-key")
        idempotency = None if key is None else (
            key, hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest())
        spec, job, replayed, _ = app.store.create(spec, idempotency)
        if job is None:
            return _Answer(fault=spec.fault)  # lost before the job was created
        request.note.job_id = job["id"]
        if spec.fault is None or replayed:
            request.note.job_ended = job["state"] in _TERMINAL_STATES
        headers = [("Location", "/v1/jobs/" + job["id"])]
        if replayed:  # the answer that was lost the first time, without its fault
            return _Answer(200, job, headers + [("Idempotent-Replayed", "true")])
        return _Answer(201, job, headers, fault=spec.fault, dribble_ms=spec.dribble_ms)

    @_api("Poll a job; wait_ms waits until it ends", answers={200: "Job"}, query={
        "wait_ms": _Field(_Int(0, 60_000), 0, "Answer as soon as the job ends, or after this "
                                              "long")})
    def poll(self, app, request):
        job, fault = app.store.poll(request.params["id"], request.args["wait_ms"])
        request.note.job_id = job["id"]
        return _polled(request, job, fault, "state", job["state"] in _TERMINAL_STATES)

    @_api("List jobs, newest first", answers={200: "JobList"}, query={
        "state": _Field(_Choice(*_JOB_STATES), None, "Only jobs in this state"),
        "trace_id": _Field(_Text(), None, "Only jobs with this trace_id"),
        "op": _Field(_Text(), None, "Only jobs with this op"),
        "limit": _Field(_Int(1, 1000), 100, "Page size"),
        "after": _Field(_Int(1, 2 ** 63), None, "The `next` of the previous page")})
    def list_jobs(self, app, request):
        jobs, cursor = app.store.list_jobs(**request.args)
        return _Answer(200, {"jobs": jobs, "next": cursor})

    @_api("Cancel a job if active, and forget it", answers={204: None})
    def delete(self, app, request):
        request.note.job_id = request.params["id"]
        app.store.delete(request.params["id"])
        return _Answer(204)

    @_api("Server-sent events: the job now and at each change",
          answers={200: _EventStream(_NAMED_SSE, (("state", "Job"),))})
    def events(self, app, request):
        def events(snapshots):
            for snapshot in snapshots:
                yield (b": heartbeat\n\n" if snapshot is None
                       else _named_event(None, "state", _json_bytes(snapshot)))
        return _Answer(200, live=events(app.store.watch(request.params["id"], app.heartbeat_s)),
                       content_type="text/event-stream")

    @_api("Cancel a job (idempotent, best effort)", answers={200: "Cancelled"})
    def cancel(self, app, request):
        request.note.job_id = request.params["id"]
        return _Answer(200, app.store.cancel(request.params["id"]))

    @_api("What the server received for a job and decided", answers={200: "JobRequest"})
    def request_view(self, app, request):
        return _Answer(200, app.store.request_view(request.params["id"]))

    routes = (
        _route("POST", "/v1/jobs", create),
        _route("GET", "/v1/jobs", list_jobs),
        _route("GET", "/v1/jobs/{id}", poll),
        _route("DELETE", "/v1/jobs/{id}", delete, admin=True),
        _route("GET", "/v1/jobs/{id}/events", events),
        _route("POST", "/v1/jobs/{id}/cancel", cancel),
        _route("GET", "/v1/jobs/{id}/request", request_view),
    )


def _polled(request, view, fault, state_key, ended):
    """The answer to a poll of a job (or a stored response): its view, or
    the fault its poll_faults give this poll (an unknown state in place of
    its own, or a fault that spoils the answer)."""
    if fault is None:
        request.note.job_ended = ended
    elif fault.kind == "unknown_state":
        request.note.fault = fault
        return _Answer(200, {**view, state_key: fault.state})
    return _Answer(200, view, fault=fault)


_JOB_API = _JobApi()


# --- Surfaces: the server's own endpoints -----------------------------------------
# What dummyLLM says about itself and takes as commands: health, metrics,
# the scripts' counters, reset, the reply rules, the journal and the verdict,
# the pages and the API document.  They answer in dummyLLM's error shape;
# --chaos spares them, and the journal skips the ones that read it.

class _Exposition:
    """Prometheus text exposition format, version 0.0.4."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self):
        self._lines = []

    def family(self, name, kind, help_text, samples):
        self._lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        self.samples(name, samples)

    def histogram(self, name, help_text, histograms):
        """A histogram family: [(labels, _Histogram)]."""
        self.family(name, "histogram", help_text, ())
        for labels, histogram in histograms:
            bounds = [str(bound) for bound in histogram.bounds] + ["+Inf"]
            self.samples(name + "_bucket", [
                ({**labels, "le": le}, n)
                for le, n in zip(bounds, itertools.accumulate(histogram.counts))])
            self.samples(name + "_sum", [(labels, round(histogram.sum, 6))])
            self.samples(name + "_count", [(labels, sum(histogram.counts))])

    def samples(self, name, samples):
        for labels, value in samples:
            text = ",".join(f'{key}="{self._label_value(value)}"'
                            for key, value in labels.items())
            self._lines.append(f"{name}{{{text}}} {value}" if text else f"{name} {value}")

    @staticmethod
    def _label_value(value):
        return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    def __str__(self):
        return "\n".join(self._lines) + "\n"


def _html(page):
    return _Answer(200, page.encode(), content_type="text/html; charset=utf-8")


class _Control(_Surface):
    """The server's own endpoints (see the banner above)."""

    title = "The server: health, journal, verdict, rules, pages"

    def schemas(self):
        return {
            "SurfaceName": {"enum": _surface_names()},
            "Health": {"type": "object", "required": ["ok", "name", "time", "version"],
                       "properties": {
                "ok": {"type": "boolean"}, "name": {"type": "string"},
                "time": {"type": "integer"}, "version": {"type": "string"},
                "defaults": {"type": "object"},
                "jobs": {"type": "object", "properties": {
                    "stored": {"type": "integer"}, "active": {"type": "integer"},
                    "by_state": {"type": "object"}}},
                "chaos": {"type": "object"}, "time_scale": {"type": "number"},
                "quotas": {"type": "object", "properties": {
                    "rpm": {"type": ["integer", "null"]}, "tpm": {"type": ["integer", "null"]},
                    "keys": {"type": "integer"}, "refused": {"type": "object"}}}}},
            "Scripts": {"type": "object", "properties": {"scripts": {"type": "array", "items": {
                "type": "object", "properties": {"key": {"type": "string"},
                                                 "test_id": {"type": ["string", "null"]},
                                                 "attempts": {"type": "integer"}}}}}},
            "Removed": {"type": "object", "properties": {"removed": {
                "type": "object", "additionalProperties": {"type": "integer"}}}},
            "Journal": {"type": "object", "properties": {"requests": {
                "type": "array", "items": _Journal.ENTRY_SCHEMA}}},
            "Verdict": _VERDICT_SCHEMA,
            "ReplyRule": _object_schema(_REPLY_RULE_FIELDS, strict=True, example={
                "match": {"surface": "openai.chat", "text_contains": "weather"},
                "simulate": {"tool_calls": [{"name": "get_weather",
                                             "arguments": {"city": "Paris"}}]}}),
            "ListedRule": _object_schema({**_REPLY_RULE_FIELDS, **_LISTED_RULE_FIELDS},
                                         strict=True),
            "ReplyRules": {"type": "object", "properties": {
                "rules": {"type": "array", "items": _ref("ListedRule")},
                "surfaces": {"type": "array", "items": {"type": "string"}}}},
            "OpenAPI": {"type": "object"},
        }

    @_api("Health, version, defaults and job counts", answers={200: "Health"})
    def health(self, app, request):
        config = app.config
        return _Answer(200, {
            "ok": True, "name": "dummyLLM", "time": app.clock.wall_ms() // 1000,
            "version": __version__,
            "defaults": {"mode": config.mode, "latency_ms": config.latency_ms,
                         "seed": config.seed, "weights": config.weights,
                         "timeout_ms": config.timeout_ms, "slow_factor": config.slow_factor},
            "jobs": app.store.counts(),
            "chaos": {"rate": config.chaos, "faults": _plain(config.chaos_faults)},
            "quotas": dict(zip(("rpm", "tpm", "keys", "refused"), (
                config.rpm, config.tpm, *app.quotas.counts()))),
            "time_scale": config.time_scale,
        })

    @_api("Prometheus metrics", answers={200: "text/plain"})
    def metrics(self, app, request):
        created, finished, active, durations = app.store.metrics()
        requests, faults, stream_errors = app.counted()
        text = _Exposition()
        text.family("dummyllm_jobs_created_total", "counter",
                    "Jobs created, by the mode that ran.",
                    [({"mode": mode}, n) for mode, n in sorted(created.items())])
        text.family("dummyllm_jobs_finished_total", "counter",
                    "Jobs that reached a final state, by state.",
                    [({"state": state}, n) for state, n in sorted(finished.items())])
        text.family("dummyllm_jobs_active", "gauge", "Jobs queued or running.", [({}, active)])
        text.family("dummyllm_http_requests_total", "counter",
                    "HTTP requests answered, by method, route and status.",
                    [({"method": method, "route": route, "status": status}, n)
                     for (method, route, status), n in sorted(requests.items(), key=str)])
        text.histogram("dummyllm_job_duration_seconds",
                       "Time from a job's creation to its final state.", [({}, durations)])
        text.family("dummyllm_faults_injected_total", "counter",
                    "Transport faults injected, by kind.",
                    [({"kind": kind}, n) for kind, n in sorted(faults.items())])
        text.family("dummyllm_stream_errors_total", "counter",
                    "Streams ended early because a frame failed to render (a bug; the log "
                    "has the traceback).", [({}, stream_errors)])
        keys, refused = app.quotas.counts()
        text.family("dummyllm_quota_keys", "gauge",
                    "Keys with requests in their quota's window.", [({}, keys)])
        text.family("dummyllm_quota_refused_total", "counter",
                    "Requests refused by --rpm or --tpm, by the limit reached.",
                    [({"limit": limit}, refused.get(limit, 0)) for limit in ("requests",
                                                                             "tokens")])
        self.vllm_metrics(text, app.capacity.snapshot())
        return _Answer(200, str(text).encode(), content_type=_Exposition.content_type)

    @staticmethod
    def vllm_metrics(text, models):
        """vLLM's metrics of the model calls (see _Capacity), by model_name."""
        def each(value):
            return [({"model_name": model}, value(*counted)) for model, counted in models.items()]
        text.family("vllm:num_requests_running", "gauge", "Number of requests in model "
                    "execution batches.", each(lambda running, waiting, counts: running))
        text.family("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be "
                    "processed.", each(lambda running, waiting, counts: waiting))
        for name, about, histogram in [
                ("time_to_first_token_seconds", "time to first token", "ttft"),
                ("inter_token_latency_seconds", "inter-token latency", "itl"),
                ("e2e_request_latency_seconds", "e2e request latency", "e2e")]:
            text.histogram("vllm:" + name, f"Histogram of {about} in seconds.", [
                ({"model_name": model}, getattr(counts, histogram))
                for model, (_, _, counts) in models.items()])
        text.family("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
                    each(lambda running, waiting, counts: counts.prompt_tokens))
        text.family("vllm:generation_tokens_total", "counter",
                    "Number of generation tokens processed.",
                    each(lambda running, waiting, counts: counts.generation_tokens))
        text.family("vllm:request_success_total", "counter",
                    "Count of successfully processed requests.",
                    [({"model_name": model, "finished_reason": reason}, counts.finished[reason])
                     for model, (_, _, counts) in models.items() for reason in ("stop", "length")])

    # Each endpoint that reads or forgets state keeps to one test's scope:
    # that of ?test_id=, else the request's own (see _test_id).
    TEST_QUERY = {"test_id": _VERDICT_QUERY["test_id"]._replace(
        about="Only this test's (else the request's own test id, if it has one)")}

    @staticmethod
    def test_id(request):
        return request.args["test_id"] or request.test_id

    @_api("Attempt counters of scripted requests", answers={200: "Scripts"}, query=TEST_QUERY)
    def scripts(self, app, request):
        return _Answer(200, {"scripts": app.store.scripts(self.test_id(request))})

    @_api("Forget every job, counter, key, journal entry and rule added at run time (or one "
          "test's)", answers={200: "Removed"}, query=TEST_QUERY)
    def reset(self, app, request):
        return _Answer(200, {"removed": app.reset(self.test_id(request))})

    @_api("The reply rules, in the order they are tried, and the surfaces they may name",
          answers={200: "ReplyRules"}, query=TEST_QUERY)
    def rules(self, app, request):
        return _Answer(200, {"rules": app.rules(self.test_id(request)),
                             "surfaces": _surface_names()})

    @_api("Add a reply rule after the others (with a test id, for that test alone)",
          request="ReplyRule", answers={201: "ListedRule"}, query=TEST_QUERY,
          refuses={"match.text_matches": "a pattern whose search could hold the server for "
                                         "seconds: a repeat inside a repeat, choices or "
                                         "repeats in a row that overlap"})
    def add_rule(self, app, request):
        return _Answer(201, app.add_rule(_json_body(request), self.test_id(request)))

    @_api("Remove the reply rules added at run time (those of --rules stay; with a test id, "
          "those added for it)", answers={200: "Removed"}, query=TEST_QUERY)
    def clear_rules(self, app, request):
        return _Answer(200, {"removed": {"rules": app.clear_rules(self.test_id(request))}})

    @_api("The request journal, oldest first", answers={200: "Journal"}, query={
        "trace_id": _Field(_Text(), None, "Only requests with this key"),
        "path": _Field(_Text(), None, "Only requests to this path"),
        "limit": _Field(_Int(1, 1_000_000), None, "Only the newest this many"), **TEST_QUERY})
    def requests(self, app, request):
        return _Answer(200, {"requests": app.journal.find(**dict(
            request.args, test_id=self.test_id(request)))})

    @_api("Clear the request journal (or one test's entries)", answers={200: "Removed"},
          query=TEST_QUERY)
    def clear_requests(self, app, request):
        return _Answer(200, {"removed": {"journal_entries": app.journal.clear(
            self.test_id(request))}})

    @_api("The verdict on the client: its retries, back-off, polling and idempotency, judged "
          "from the journal", answers={200: "Verdict"}, query=_VERDICT_QUERY)
    def verdict(self, app, request):
        return _Answer(200, app.verdict(**dict(request.args, test_id=self.test_id(request))))

    @_api("Live dashboard of the newest jobs", answers={200: "text/html"})
    def dashboard(self, app, request):
        return _html(_DASHBOARD_PAGE)

    @_api("The request timeline: each key's requests on one time axis, with the verdict",
          answers={200: "text/html"})
    def timeline(self, app, request):
        return _html(_JOURNAL_PAGE)

    @_api("Interactive API documentation (one self-contained page)", answers={200: "text/html"})
    def docs(self, app, request):
        return _html(_DOCS_PAGE)

    @_api("This API as an OpenAPI 3.2 document", answers={200: "OpenAPI"})
    def openapi(self, app, request):
        return _Answer(200, app.registry.document)

    routes = (
        _route("GET", "/health", health, chaos=False, journal=False),
        _route("GET", "/metrics", metrics, chaos=False),
        _route("GET", "/v1/scripts", scripts, chaos=False),
        _route("POST", "/v1/reset", reset, admin=True, chaos=False),
        _route("GET", "/v1/rules", rules, chaos=False),
        _route("POST", "/v1/rules", add_rule, admin=True, chaos=False),
        _route("DELETE", "/v1/rules", clear_rules, admin=True, chaos=False),
        _route("GET", "/v1/requests", requests, chaos=False, journal=False),
        _route("DELETE", "/v1/requests", clear_requests, admin=True, chaos=False,
               journal=False),
        _route("GET", "/v1/verdict", verdict, chaos=False, journal=False),
        _route("GET", "/", dashboard, chaos=False),
        _route("GET", "/journal", timeline, chaos=False, journal=False),
        _route("GET", "/docs", docs, chaos=False),
        _route("GET", "/openapi.json", openapi, chaos=False),
    )


_CONTROL = _Control()


# --- Surfaces: OpenAI -------------------------------------------------------------
# Chat completions, the Responses API, embeddings and legacy completions share
# the error shape, the finish reasons and the usage of _OpenAI.


def _check_one(value, field):
    if value != 1:
        raise _ValidationError(field, "must be 1: dummyLLM answers with one choice")
    return value


def _check_tool_choice(value, field):
    if value not in ("none", "auto", "required") and not isinstance(value, dict):
        raise _ValidationError(field, 'must be "none", "auto", "required" or a tool')
    return value


def _openai_forced(choice, field):
    """(tool name or "any", field) of an OpenAI tool_choice that forces a
    call ("required", or a function named as chat or Responses names it)."""
    if choice == "required" or isinstance(choice, dict) and choice.get("mode") == "required":
        return "any", field
    if isinstance(choice, dict) and choice.get("type") == "function":
        inner, field = ((choice["function"], f"{field}.function") if "function" in choice
                        else (choice, field))
        name = inner.get("name") if isinstance(inner, dict) else None
        if not isinstance(name, str):
            raise _ValidationError(field + ".name", "must name a function")
        return name, field + ".name"
    return None


def _openai_output(response_format, field):
    """(JSON Schema, field) of an OpenAI response format that asks for JSON:
    json_schema (its schema: in json_schema for chat, beside the type for
    Responses), or json_object (True)."""
    if not isinstance(response_format, dict):
        raise _ValidationError(field, "must be an object")
    kind = response_format.get("type")
    if "json_schema" in response_format:
        response_format, field = response_format["json_schema"], field + ".json_schema"
        if not isinstance(response_format, dict):
            raise _ValidationError(field, "must be an object")
    if "schema" in response_format:  # checked whatever the type
        _JSON_SCHEMA(response_format["schema"], field + ".schema")
    if kind == "json_object":
        return True, field
    if kind == "json_schema":
        return _JSON_SCHEMA(response_format.get("schema", True), field + ".schema"), (
            field + ".schema")
    if kind != "text":
        raise _ValidationError(field + ".type", "must be one of text, json_object, json_schema")
    return None


def _response_format_schema(inner):
    """The schema of a response format: its schema in `inner` (chat's
    json_schema), or beside its type (Responses)."""
    schema = _JSON_SCHEMA.schema
    return {"type": "object", "required": ["type"], "properties": {
        "type": {"enum": ["text", "json_object", "json_schema"]},
        **({inner: {"type": "object", "properties": {"schema": schema}}} if inner
           else {"schema": schema})}}


class _OpenAI(_Surface):
    """What OpenAI's endpoints share: the error shape, the finish reasons,
    the usage and the key."""

    keyed = True
    sdk_environ = {"OPENAI_BASE_URL": "/v1", "OPENAI_API_KEY": None}
    error_schema = "OpenAIError"
    validation_status = 400  # OpenAI has no 422
    error_types = {  # (type, code)
        "UNAUTHORIZED": ("invalid_request_error", "invalid_api_key"),
        "NOT_FOUND": ("invalid_request_error", "not_found"),
        "IDEMPOTENCY_CONFLICT": ("invalid_request_error", "idempotency_conflict"),
        "RATE_LIMITED": ("requests", "rate_limit_exceeded"),
        "QUOTA_EXHAUSTED": ("insufficient_quota", "insufficient_quota"),
        "CONTEXT_LENGTH_EXCEEDED": ("invalid_request_error", "context_length_exceeded"),
        "UNKNOWN_PREVIOUS_RESPONSE": ("invalid_request_error", "previous_response_not_found"),
        "OVERLOADED": ("service_unavailable_error", "server_is_overloaded"),
        "TIMEOUT": ("server_error", "timeout"),
        "INJECTED_FAULT": ("server_error", None),
        "4xx": ("invalid_request_error", None), "5xx": ("server_error", None),
    }
    finish = {"end": "stop", "max_tokens": "length", "stop_sequence": "stop",
              "tool_calls": "tool_calls"}
    framing = _SSE

    def schemas(self):
        return {"OpenAIError": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"], "properties": {
                "message": {"type": "string"}, "type": {"type": "string"},
                "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}}

    def error_body(self, error, status, retry_ms):
        kind, code = self.error_type(error, status)
        return {"error": {"message": error.message, "type": kind, "param": error.field,
                          "code": code}}

    # vLLM's fields that fix a reply's length, which benchmark clients send.
    LENGTH = {
        "ignore_eos": _Field(_Bool(), False, "vLLM's: the reply runs to max_tokens."),
        "min_tokens": _Field(_Int(0, _MAX_OUTPUT_TOKENS), None,
                             "vLLM's: the reply has at least this many tokens."),
    }

    def model_of(self, request, values):
        """The model a request names (Azure's deployment names it instead)."""
        return values["model"]

    @staticmethod
    def min_tokens(values, max_tokens):
        """The least length vLLM's fields ask of a reply (ignore_eos: the maximum)."""
        return max_tokens if values["ignore_eos"] and max_tokens else values["min_tokens"]

    @staticmethod
    def usage(reply):
        usage = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                 "total_tokens": reply.prompt_tokens + reply.completion_tokens}
        if reply.reasoning:
            usage["completion_tokens_details"] = {"reasoning_tokens": _reasoning_tokens(reply)}
        return usage

    def done(self, render, piece):
        return b"[DONE]"


# --- Surfaces: OpenAI chat --------------------------------------------------------

_STREAM_OPTIONS = {"include_usage": _Field(_Bool(), False, "End with a usage chunk.")}
_STREAM_OPTIONS_FIELD = _Field(_Check(lambda value, field: _given(value, _STREAM_OPTIONS, field),
                                      _object_schema(_STREAM_OPTIONS)), {}, None)
_ONE_CHOICE = _Field(_Check(_check_one, {"const": 1}), 1, "Only 1.")
_OPENAI_STOP = _Field(_Check(lambda value, field: _check_strings(
    [value] if isinstance(value, str) else value, field, 4), _string_or_strings(4)), (),
    "The reply ends before the first of these it meets.")
_MODEL_ERRORS = {429: None, 500: None, 503: None, 504: None}  # the model calls' failures
_REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


class _OpenAIChat(_OpenAI):
    """OpenAI's chat completions (plain and streamed, with tool calls and
    structured output) and models."""

    name = "openai.chat"
    title = "OpenAI chat completions"
    REQUEST = {
        "model": _MODEL,
        "messages": _Field(_Check(_check_messages, dict(_MESSAGES_SCHEMA, minItems=1)),
                           _REQUIRED, "The conversation; the last user message feeds the reply."),
        "stream": _Field(_Bool(), False, "Answer as server-sent events."),
        "stream_options": _STREAM_OPTIONS_FIELD,
        "max_tokens": _Field(_Int(1, 10_000_000), None,
                             "Cut the reply to this many tokens (finish_reason length)."),
        "max_completion_tokens": _Field(_Int(1, 10_000_000), None, "As max_tokens."),
        **_OpenAI.LENGTH,
        "n": _ONE_CHOICE,
        "stop": _OPENAI_STOP,
        "tools": _Field(_TOOLS, (), "Functions the reply may call."),
        "tool_choice": _Field(_Check(_check_tool_choice, {"oneOf": [
            {"enum": ["none", "auto", "required"]}, {"type": "object"}]}), "auto",
            "required or a named function: the reply calls it, with arguments drawn from its "
            "parameters."),
        "response_format": _Field(_Check(_check_object, _response_format_schema("json_schema")),
                                  {"type": "text"}, "json_schema or json_object: the reply is "
                                  "JSON valid against it."),
        "reasoning_effort": _Field(_Choice(*_REASONING_EFFORTS), None,
                                   "A reasoning model's effort: other than none, the model "
                                   "reasons first (simulate.reasoning sets how long), counted "
                                   "in usage as reasoning_tokens."),
        "user": _USER,
        **_EXTENSIONS,
    }

    def schemas(self):
        return {
            **super().schemas(),
            "ChatRequest": _object_schema(self.REQUEST, example={
                "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}],
                "simulate": {"latency_ms": 300}}),
            "ChatCompletion": {"type": "object", "required": [
                "id", "object", "created", "model", "choices", "usage"], "properties": {
                "id": {"type": "string"}, "object": {"const": "chat.completion"},
                "created": {"type": "integer"}, "model": {"type": "string"},
                "choices": {"type": "array"}, "usage": {"type": "object", "properties": {
                    "prompt_tokens": {"type": "integer"},
                    "completion_tokens": {"type": "integer"},
                    "total_tokens": {"type": "integer"}}}}},
            "ChatCompletionChunk": _object({
                "id": _A_STRING, "object": {"const": "chat.completion.chunk"},
                "created": _AN_INTEGER, "model": _A_STRING, "choices": {"type": "array", "items": _object(
                    {"index": _AN_INTEGER, "delta": _AN_OBJECT,
                     "finish_reason": {"type": ["string", "null"]}})}},
                {"usage": {"type": ["object", "null"]}}),
            "Model": {"type": "object", "required": ["id", "object"], "properties": {
                "id": {"type": "string"}, "object": {"const": "model"},
                "created": {"type": "integer"}, "owned_by": {"type": "string"}}},
            "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
                "object": {"const": "list"}, "data": {"type": "array",
                                                      "items": _ref("Model")}}},
        }

    def parse(self, request, config):
        body = _json_body(request)
        values = _with_defaults(_given(body, self.REQUEST, None), self.REQUEST, config)
        max_tokens = values["max_completion_tokens"] or values["max_tokens"]
        if not config.lenient:
            self.check_conversation(values["messages"])
        return self.call(request, config, model=self.model_of(request, values),
                         messages=_text_messages(values["messages"]),
                         stream=values["stream"], user=values["user"],
                         max_tokens=max_tokens, stop=values["stop"],
                         min_tokens=self.min_tokens(values, max_tokens),
                         timeout_ms=values["timeout_ms"], simulate=values["simulate"],
                         tools=_tool_table(values["tools"], "tools", "function"),
                         forced=_openai_forced(values["tool_choice"], "tool_choice"),
                         output=_openai_output(values["response_format"], "response_format"),
                         reasoning=self.asks_reasoning(values),
                         show_reasoning=self.shows_reasoning(values),
                         include_usage=values["stream_options"].get("include_usage", False))

    @staticmethod
    def asks_reasoning(values):
        return values["reasoning_effort"] not in (None, "none")

    @staticmethod
    def shows_reasoning(values):
        """Whether the answer holds the reasoning's text (OpenAI's never does)."""
        return False

    @staticmethod
    def check_conversation(messages):
        """Refuse what OpenAI refuses of a conversation (see --lenient): a
        tool message that answers no call of the assistant message before
        its run of tool messages, and a call that run leaves unanswered."""
        if all(message["role"] in ("user", "system") for message in messages):
            return  # no tool loop: most calls
        asker, asked, unanswered = None, (), set()  # the last assistant message's calls
        for index, message in enumerate(messages):
            if message["role"] == "tool":
                if asker is None:
                    raise ApiError("ORPHAN_TOOL_RESULT", "Invalid parameter: messages with role "
                                   "'tool' must be a response to a preceeding message with "
                                   "'tool_calls'.", f"messages.[{index}].role")
                if message.get("tool_call_id") not in asked:
                    raise ApiError("ORPHAN_TOOL_RESULT", "Invalid parameter: 'tool_call_id' of "
                                   f"'{message.get('tool_call_id')}' not found in 'tool_calls' of "
                                   "previous message.", f"messages.[{index}].tool_call_id")
                unanswered.discard(message["tool_call_id"])
                continue
            if unanswered:
                raise _OpenAIChat.left_unanswered(asker, unanswered)
            calls = message.get("tool_calls") if message["role"] == "assistant" else None
            asked = [call.get("id") for call in calls if isinstance(call, dict)
                     ] if isinstance(calls, list) else []
            asker, unanswered = index if asked else None, set(asked)
        if unanswered and asker < len(messages) - 1:  # its run of answers stopped short
            raise _OpenAIChat.left_unanswered(asker, unanswered)

    @staticmethod
    def left_unanswered(asker, unanswered):
        return ApiError("UNANSWERED_TOOL_CALL", "An assistant message with 'tool_calls' must be "
                        "followed by tool messages responding to each 'tool_call_id'. The "
                        "following tool_call_ids did not have response messages: "
                        + ", ".join(sorted(map(str, unanswered))), f"messages.[{asker}].role")

    @staticmethod
    def tool_call(call, **fields):
        return {**fields, "id": call["id"], "type": "function",
                "function": {"name": call["name"], "arguments": _arguments_text(call)}}

    def answer(self, call, reply, created):
        message = {"role": "assistant", "content": reply.text, "refusal": None}
        if reply.tool_calls is not None:
            message.update(content=None, tool_calls=[self.tool_call(tool_call)
                                                     for tool_call in reply.tool_calls])
        return {
            "id": "chatcmpl-" + _random_hex(24), "object": "chat.completion",
            "created": created, "model": call.model, "system_fingerprint": "dummyllm",
            "choices": [{"index": 0, "message": message,
                         "logprobs": None, "finish_reason": self.finish[reply.end]}],
            "usage": self.usage(reply),
        }

    def begin_stream(self, render):
        render.id = "chatcmpl-" + _random_hex(24)

    def chunk(self, render, delta, finish_reason=None):
        body = {"id": render.id, "object": "chat.completion.chunk", "created": render.created,
                "model": render.call.model, "system_fingerprint": "dummyllm",
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish_reason}]}
        if render.call.options["include_usage"]:
            body["usage"] = None
        return body

    def role_chunk(self, render, piece):
        return self.chunk(render, {"role": "assistant",
                                   "content": None if render.reply.tool_calls else ""})

    def text_chunk(self, render, text):
        return self.chunk(render, {"content": text})

    def call_chunk(self, render, index):
        """A tool call's id and name; its arguments follow in pieces."""
        tool_call = self.tool_call(render.reply.tool_calls[index], index=index)
        tool_call["function"]["arguments"] = ""
        return self.chunk(render, {"tool_calls": [tool_call]})

    def arguments_chunk(self, render, piece):
        index, text = piece
        return self.chunk(render, {"tool_calls": [{"index": index,
                                                   "function": {"arguments": text}}]})

    def finish_chunk(self, render, piece):
        return self.chunk(render, {}, self.finish[render.reply.end])

    def usage_chunk(self, render, piece):
        if render.call.options["include_usage"]:
            return dict(self.chunk(render, {}), choices=[], usage=self.usage(render.reply))
        return None

    stream_events = {
        "open": ((None, role_chunk, "ChatCompletionChunk"),),
        "piece": ((None, text_chunk, "ChatCompletionChunk"),),
        "call": ((None, call_chunk, "ChatCompletionChunk"),),
        "arguments": ((None, arguments_chunk, "ChatCompletionChunk"),),
        "call_done": (),
        "close": ((None, finish_chunk, "ChatCompletionChunk"),
                  (None, usage_chunk, "ChatCompletionChunk"), (None, _OpenAI.done, b"[DONE]")),
        "error": ((None, _Surface.error_event, "OpenAIError"),),
    }

    def model(self, model_id):
        return {"id": model_id, "object": "model", "created": 1700000000, "owned_by": "dummyllm"}

    @_api("OpenAI-compatible model list: --served-model's names", answers={200: "ModelList"})
    def list_models(self, app, request):
        return _Answer(200, {"object": "list", "data": [
            self.model(name) for name in app.config.served_models or ("dummyllm",)]})

    @_api("A model (every name is served)", answers={200: "Model"})
    def get_model(self, app, request):
        return _Answer(200, self.model(request.params["id"]))

    routes = (
        _route("POST", "/v1/chat/completions", _model_call, api=_model_api(
            "OpenAI-compatible chat completion, streamed or not", "ChatRequest",
            {200: "ChatCompletion", **_MODEL_ERRORS},
            refuses={"tool_choice": _FORCES_AN_UNOFFERED_TOOL, "tools": _UNDRAWABLE_SCHEMA,
                     "response_format": _UNDRAWABLE_SCHEMA, "messages": _REFUSED_CONVERSATION})),
        _route("GET", "/v1/models", list_models),
        _route("GET", "/v1/models/{id+}", get_model),
    )


_OPENAI_CHAT = _OpenAIChat()


# --- Surfaces: OpenAI Responses ---------------------------------------------------

_OUTPUT = {"const": "function_call_output"}
_INPUT_ITEM_SCHEMA = {"type": "object", "anyOf": [
    {"required": ["type", "output"],
     "properties": {"type": _OUTPUT, "output": {"type": ["string", "array"]}}},
    {"required": ["role", "content"], "properties": {
        "role": {"type": "string"}, "content": _BLOCKS_SCHEMA, "type": {"not": _OUTPUT}}},
    {"required": ["type"], "properties": {"type": {"type": "string", "not": _OUTPUT},
                                          "role": {"not": {"type": "string"}}}}]}


def _check_responses_input(value, field):
    """A string, or items: messages (a role, content as text or parts) and
    function_call_output items."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise _ValidationError(field, "must be a string or a non-empty array of input items")
    for index, item in enumerate(value):
        name = f"{field}[{index}]"
        if not isinstance(item, dict):
            raise _ValidationError(name, "must be an input item")
        if item.get("type") == "function_call_output":
            if not isinstance(item.get("output"), (str, list)):
                raise _ValidationError(f"{name}.output", "must be a string or an array")
        elif isinstance(item.get("role"), str):
            _check_blocks(item.get("content"), f"{name}.content")
        elif not isinstance(item.get("type"), str):
            raise _ValidationError(name, "must be a message (with a role) or an item with a type")
    return value


_RESPONSES_REASONING = {
    "effort": _Field(_Choice(*_REASONING_EFFORTS), None,
                     "Other than none, the model reasons first: a reasoning item before the "
                     "reply (simulate.reasoning sets how long)."),
    "summary": _Field(_Choice("auto", "concise", "detailed"), None,
                      "The reasoning item's summary holds its text (streamed as "
                      "reasoning_summary_text deltas)."),
}


def _numbered_event(render, name, data):
    """A Responses event: named, its type and sequence number first."""
    head = b'event: %s\ndata: {"type":"%s","sequence_number":%d' % (
        name.encode(), name.encode(), render.written)
    return head + (b"," + data[1:] if len(data) > 2 else b"}") + b"\n\n"


class _OpenAIResponses(_OpenAI):
    """OpenAI's Responses API.  A stored response is a job in the store (id
    resp_...): a background one answers at once, queued, then is polled,
    cancelled and deleted as a job is, and its events can be streamed again
    from any point; a stored one can be retrieved while the store keeps it."""

    name = "openai.responses"
    title = "OpenAI Responses"
    STATUS = {"queued": "queued", "running": "in_progress", "fail": "failed",
              "timeout": "failed", "cancelled": "cancelled"}  # ok: completed or incomplete
    ACTIVE = operator.itemgetter(*_ACTIVE_STATES)(STATUS)
    REQUEST = {
        "model": _MODEL,
        "input": _Field(_Check(_check_responses_input, {"oneOf": [
            {"type": "string"}, {"type": "array", "minItems": 1, "items": _INPUT_ITEM_SCHEMA}]}),
            _REQUIRED, "Text, or message and function_call_output items."),
        "instructions": _Field(_Text(), None, "A system message."),
        "stream": _Field(_Bool(), False, "Answer as server-sent events."),
        "max_output_tokens": _Field(_Int(1, 10_000_000), None,
                                    "Cut the reply to this many tokens (status incomplete)."),
        "tools": _Field(_TOOLS, None, "Functions the reply may call."),
        "tool_choice": _Field(_Check(lambda value, field: value, {}), None,
                              "required or a named function: the reply calls it, with "
                              "arguments drawn from its parameters."),
        "text": _Field(_Check(_check_object, {"type": "object", "properties": {
            "format": _response_format_schema(None)}}), None,
                       "text.format json_schema or json_object: the reply is "
                       "JSON valid against it."),
        "store": _Field(_Bool(), True, "Keep the response, to retrieve it later."),
        "background": _Field(_Bool(), False, "Answer at once, queued; poll, cancel or stream it."),
        "reasoning": _Field(_Check(lambda value, field: _given(value, _RESPONSES_REASONING, field),
                                   _object_schema(_RESPONSES_REASONING)), None,
                            "A reasoning model's settings."),
        "include": _Field(_Check(_check_strings, _STRINGS_SCHEMA), (),
                          "Accepted (reasoning items always carry their encrypted_content)."),
        "previous_response_id": _Field(_Text(), None, "A stored response this one continues: "
                                       "its function calls must be answered in input."),
        "metadata": _Field(_OBJECT, None, "Accepted."),
        "user": _USER,
        "temperature": _Field(_Number(0, 2), None, "Accepted."),
        "top_p": _Field(_Number(0, 1), None, "Accepted."),
        "callback_url": _Field(_CALLBACK_URL, None,
                               "Loopback URL the final job is POSTed to (an extension)."),
        **_EXTENSIONS,
    }
    # Request fields a response object repeats back.
    ECHOED = ("background", "instructions", "max_output_tokens", "metadata",
              "previous_response_id", "reasoning", "store", "temperature", "text", "tool_choice",
              "tools", "top_p", "user")
    QUERY = {"stream": _Field(_Choice("true", "false"), "false", "Stream its events again"),
             "starting_after": _Field(_Int(-1, 10_000_000), -1,
                                      "Only the events after this sequence number")}
    framing = _Framing("text/event-stream", _numbered_event, b"", b"")

    def schemas(self):
        return {
            **super().schemas(),
            "ResponseRequest": _object_schema(self.REQUEST, example={
                "model": "gpt-4.1-mini", "input": "Hello", "simulate": {"latency_ms": 300}}),
            "Response": {"type": "object", "required": [
                "id", "object", "created_at", "status", "model", "output"], "properties": {
                "id": {"type": "string", "pattern": "^resp_"}, "object": {"const": "response"},
                "created_at": {"type": "integer"}, "model": {"type": "string"},
                "status": {"enum": ["queued", "in_progress", "completed", "incomplete", "failed",
                                    "cancelled"]},
                "output": {"type": "array"}, "usage": {"type": ["object", "null"]},
                "error": {"type": ["object", "null"]},
                "incomplete_details": {"type": ["object", "null"]}}},
            **self.event_schemas(),
            "ResponseDeleted": {"type": "object", "properties": {
                "id": {"type": "string"}, "object": {"const": "response"},
                "deleted": {"type": "boolean"}}},
        }

    @staticmethod
    def event_schemas():
        """Its stream's events: each has its type and number, and these."""
        def event(**fields):
            return _object({"type": _A_STRING, "sequence_number": _AN_INTEGER, **fields})
        item, part = {"item_id": _A_STRING, "output_index": _AN_INTEGER}, {"content_index": _AN_INTEGER}
        summary = dict(item, summary_index=_AN_INTEGER)
        return {
            "ResponseLifecycleEvent": event(response=_ref("Response")),
            "ResponseItemEvent": event(output_index=_AN_INTEGER, item=_AN_OBJECT),
            "ResponsePartEvent": event(**item, **part, part=_AN_OBJECT),
            "ResponseTextDeltaEvent": event(**item, **part, delta=_A_STRING),
            "ResponseTextDoneEvent": event(**item, **part, text=_A_STRING),
            "ResponseSummaryPartEvent": event(**summary, part=_AN_OBJECT),
            "ResponseSummaryDeltaEvent": event(**summary, delta=_A_STRING),
            "ResponseSummaryDoneEvent": event(**summary, text=_A_STRING),
            "ResponseArgumentsDeltaEvent": event(**item, delta=_A_STRING),
            "ResponseArgumentsDoneEvent": event(**item, arguments=_A_STRING),
            "ResponseErrorEvent": event(code=_A_STRING, message=_A_STRING,
                                        param={"type": ["string", "null"]}),
        }

    def parse(self, request, config):
        values = _with_defaults(_given(_json_body(request), self.REQUEST, None), self.REQUEST,
                                config)
        if values["background"] and not values["store"]:
            raise _ValidationError("store", "must be true for a background response")
        if values["callback_url"] is not None:
            _check_callback_url(values["callback_url"], "callback_url",
                                config.allow_callback_hosts)
        messages = self.messages(values["input"])
        if values["instructions"] is not None:
            messages.insert(0, {"role": "system", "content": values["instructions"]})
        text_format = (values["text"] or {}).get("format", {"type": "text"})
        reasoning = values["reasoning"] or {}
        return self.call(request, config, model=values["model"], messages=messages,
                         stream=values["stream"], max_tokens=values["max_output_tokens"],
                         user=values["user"], timeout_ms=values["timeout_ms"],
                         simulate=values["simulate"], callback_url=values["callback_url"],
                         tools=_tool_table(values["tools"], "tools"),
                         forced=_openai_forced(values["tool_choice"], "tool_choice"),
                         output=_openai_output(text_format, "text.format"),
                         reasoning=reasoning.get("effort") not in (None, "none"),
                         tool_loop=self.tool_loop(values["input"]),
                         args={"max_output_tokens": values["max_output_tokens"],
                               "echo": {key: values[key] for key in self.ECHOED}})

    @staticmethod
    def tool_loop(given):
        """(the call ids of the input's function calls, those its
        function_call_outputs answer), for check_conversation."""
        items = given if isinstance(given, list) else ()
        return tuple([item.get("call_id") for item in items if item.get("type") == kind]
                     for kind in ("function_call", "function_call_output"))

    def check_conversation(self, app, call):
        """Refuse what OpenAI refuses of a conversation (see --lenient): a
        previous_response_id it does not hold, a function_call_output that
        answers no function call of the input or of the previous response,
        and a function call that none answers."""
        previous = call.spec.args["echo"]["previous_response_id"]
        calls, outputs = call.options["tool_loop"]
        if previous is not None:
            try:
                earlier = app.store.snapshot(previous, self.view)
            except ApiError:
                raise ApiError("UNKNOWN_PREVIOUS_RESPONSE", f"Previous response with id "
                               f"'{previous}' not found.", "previous_response_id") from None
            calls = calls + [item["call_id"] for item in earlier["output"]
                             if item["type"] == "function_call"]
        orphan = next((call_id for call_id in outputs if call_id not in calls), None)
        if orphan is not None:
            raise ApiError("ORPHAN_TOOL_RESULT", "No tool call found for function call output "
                           f"with call_id {orphan}.", "input")
        unanswered = next((call_id for call_id in calls if call_id not in outputs), None)
        if unanswered is not None:
            raise ApiError("UNANSWERED_TOOL_CALL",
                           f"No tool output found for function call {unanswered}.", "input")

    @staticmethod
    def messages(given):
        """The input as text messages (see _Surface.call)."""
        if isinstance(given, str):
            return [{"role": "user", "content": given}]
        names, messages = {}, []
        for item in given:
            if item.get("type") == "function_call":
                names[item.get("call_id")] = item.get("name")
            elif item.get("type") == "function_call_output":
                messages.append({"role": "tool", "content": _content_text(item["output"]),
                                 "tool": names.get(item.get("call_id"))})
            elif item.get("role"):
                messages.append({"role": item["role"],
                                 "content": _content_text(item.get("content"))})
        return messages

    def respond(self, app, request, call):
        """A response: stored (a job, which background answers at once,
        queued) or not; streamed, with its lifecycle's events, or not."""
        echo = call.spec.args["echo"]
        if not app.config.lenient:
            self.check_conversation(app, call)
        if echo["store"]:
            spec, response, _, plan = app.store.create(
                call.spec, prefix="resp", view=self.view,
                id_of=lambda spec, n: _response_id(spec.seed, spec.trace_id or "", n))
            if response is None:
                return _Answer(fault=spec.fault)  # lost before the response was created
            response_id, created_at = response["id"], response["created_at"]
            request.note.job_id = response_id
        else:
            spec, plan, n = app.store.plan_call(call.spec)
            if plan.state in _REFUSED_STATES:
                raise _refusal(spec, plan, self.overloaded_status)
            response_id = app.store.own_id(_response_id(spec.seed, spec.trace_id or "", n))
            created_at = request.received_wall_ms // 1000
        request.note.rule = spec.rule
        _no_dribbled_stream(call._replace(spec=spec))
        if call.stream and spec.fault is None and (echo["background"]
                                                   or plan.ends_at_ms is not None):
            return self.streamed(app, response_id, created_at, spec, plan, request.received_ms)
        if echo["background"]:
            if spec.fault is None:
                request.note.job_ended = response["status"] not in self.ACTIVE
            return _Answer(200, response, fault=spec.fault, dribble_ms=spec.dribble_ms)
        if plan.ends_at_ms is None:
            return _Answer(status=None)  # hang
        at_ms = request.received_ms + plan.ends_at_ms
        status, reply, _ = self.outcome(spec, plan)
        if reply is None:
            return _Answer(payload=ApiError(plan.error["code"], plan.error["message"]), at=at_ms,
                           fault=spec.fault, dribble_ms=spec.dribble_ms)
        return _Answer(200, self.response(response_id, created_at, spec.args, status, reply),
                       at=at_ms, fault=spec.fault, dribble_ms=spec.dribble_ms)

    @staticmethod
    def function_call_item(response_id, index, call, status):
        return {"id": f"fc_{response_id[5:]}{index}", "type": "function_call",
                "status": status, "call_id": call["id"], "name": call["name"],
                "arguments": "" if status == "in_progress" else _arguments_text(call)}

    def output(self, response_id, status, reply, args):
        """The output items of a reply: its reasoning, then its message or
        its function calls."""
        thought = [self.reasoning_item(response_id, status, reply, args)] if reply.reasoning else []
        if reply.tool_calls is None:
            return thought + [self.message_item(response_id, status, reply.text)]
        return thought + [self.function_call_item(response_id, index, call, status)
                          for index, call in enumerate(reply.tool_calls)]

    @staticmethod
    def reasoning_item(response_id, status, reply, args, summary=None):
        """Its reasoning: the text in its summary (this far, when streamed)
        when asked, and always in its encrypted_content (base64 of the text)."""
        asked = (args["echo"]["reasoning"] or {}).get("summary") is not None
        text = reply.reasoning if summary is None else summary
        return {"id": "rs_" + response_id[5:], "type": "reasoning",
                "summary": [{"type": "summary_text", "text": text}] if asked else [],
                "encrypted_content": base64.b64encode(reply.reasoning.encode()).decode(),
                "status": status}

    def response(self, response_id, created_at, args, status, reply=None, error=None):
        """A response object."""
        echo = args["echo"]
        output, usage = [], None
        if reply is not None:
            output = self.output(response_id, status, reply, args)
            usage = {"input_tokens": reply.prompt_tokens, "input_tokens_details": {
                "cached_tokens": 0}, "output_tokens": reply.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": _reasoning_tokens(reply)},
                "total_tokens": reply.prompt_tokens + reply.completion_tokens}
        return {
            "id": response_id, "object": "response", "created_at": created_at,
            "status": status, "background": echo["background"], "error": error,
            "incomplete_details": ({"reason": "max_output_tokens"} if status == "incomplete"
                                   else None),
            "instructions": echo["instructions"], "max_output_tokens": echo["max_output_tokens"],
            "metadata": echo["metadata"] or {}, "model": args["model"], "output": output,
            "parallel_tool_calls": True, "previous_response_id": echo["previous_response_id"],
            "prompt_cache_diagnostics": None, "service_tier": "default",
            "reasoning": echo["reasoning"] and {"effort": None, "summary": None,
                                                **echo["reasoning"]},
            "store": echo["store"], "temperature": echo["temperature"],
            "text": echo["text"] or {"format": {"type": "text"}},
            "tool_choice": echo["tool_choice"] or "auto", "tools": echo["tools"] or [],
            "top_p": echo["top_p"], "truncation": "disabled", "usage": usage,
            "user": echo["user"],
        }

    @staticmethod
    def message_item(response_id, status, text):
        return {"id": "msg_" + response_id[5:], "type": "message", "role": "assistant",
                "status": "in_progress" if status == "in_progress" else status,
                "content": [] if text is None else [
                    {"type": "output_text", "text": text, "annotations": []}]}

    def outcome(self, spec, plan):
        """(status, reply, error) of a response whose plan came true."""
        if plan.state != "ok":
            return "failed", None, {"code": "server_error", "message": plan.error["message"]}
        reply = _reply(spec, plan, spec.args["max_output_tokens"])
        return "incomplete" if reply.end == "max_tokens" else "completed", reply, None

    def view(self, job):
        """A stored response as it is now (a view for _JobStore)."""
        if job.state == "ok":
            status, reply, error = self.outcome(job.spec, job.plan)
        else:
            status, reply, error = self.STATUS[job.state], None, job.error and {
                "code": "server_error", "message": job.error["message"]}
        return self.response(job.id, job.created_at, job.spec.args, status, reply, error)

    # A response's stream: its lifecycle, then its content as chat streams it.

    def streamed(self, app, response_id, created_at, spec, plan, start_ms, skip=-1):
        """The _Answer that streams a response's events from start_ms (its
        request's arrival), those after sequence number `skip`; a background
        one's end once it is cancelled or deleted."""
        status, reply, error = self.outcome(spec, plan)
        call = _Call(spec, spec.args["model"], True, spec.args["max_output_tokens"], (), None, {})
        render = _Render(self, call, reply, created_at, skip, id=response_id, status=status,
                         error=error)
        background = spec.args["echo"]["background"]
        frames = render.frames(self.timeline(spec, plan, status, reply, background))
        if background:
            frames = self.until_cancelled(app, response_id, frames)
        failure = "stall_after" if plan.ends_at_ms is None else (
            next(iter(spec.stream)) if spec.stream else None)
        return render.answer(frames, start_ms, failure)

    @staticmethod
    def timeline(spec, plan, status, reply, background):
        """A response's events as (ms after its creation, kind, piece),
        lazily.  A background one is created queued and runs as its plan
        says; the reply streams from when the plan ends, every token_ms."""
        start = plan.ends_at_ms
        if background:
            yield 0, "created", "queued"
            yield 0, "queued", "queued"
            if plan.running_at_ms is not None:
                yield plan.running_at_ms, "in_progress", "in_progress"
        elif start is not None:
            yield start, "created", "in_progress"
            yield start, "in_progress", "in_progress"
        if start is None:
            return  # hang
        if reply is None:
            yield start, "failed", None
            return
        for ms, kind, piece in _stream_timeline(reply, spec.stream):
            yield start + ms, kind, piece
            if kind == "close":
                yield start + ms, status, None

    @staticmethod
    def until_cancelled(app, response_id, frames):
        """A background response's frames until it is cancelled or deleted
        (as each renders, a moment before its time)."""
        for index, (ms, data) in enumerate(frames):
            if index and app.store.cancelled(response_id):
                return
            yield ms, data

    def lifecycle(self, render, status):
        return {"response": self.response(render.id, render.created, render.call.spec.args,
                                          status)}

    # Its content: a reasoning item first if the model reasons (its summary
    # streamed when asked), then its message or function calls, each one
    # output index further on.

    def where(self, render):
        return {"item_id": "msg_" + render.id[5:], "output_index": _after_reasoning(render),
                "content_index": 0}

    def thought_where(self, render):
        return {"item_id": "rs_" + render.id[5:], "output_index": 0, "summary_index": 0}

    def summarized(self, render):
        return (render.call.spec.args["echo"]["reasoning"] or {}).get("summary") is not None

    def first_added(self, render, piece):
        if render.reply.reasoning:
            return {"output_index": 0, "item": self.reasoning_item(
                render.id, "in_progress", render.reply, render.call.spec.args, "")}
        return self.message_added(render, piece)

    def summary_part_added(self, render, piece):
        if render.reply.reasoning and self.summarized(render):
            return dict(self.thought_where(render), part={"type": "summary_text", "text": ""})
        return None

    def summary_delta(self, render, text):
        return dict(self.thought_where(render), delta=text) if self.summarized(render) else None

    def summary_done(self, render, piece):
        if self.summarized(render):
            return dict(self.thought_where(render), text=render.reply.reasoning)
        return None

    def summary_part_done(self, render, piece):
        if self.summarized(render):
            return dict(self.thought_where(render),
                        part={"type": "summary_text", "text": render.reply.reasoning})
        return None

    def reasoning_done(self, render, piece):
        return {"output_index": 0, "item": self.reasoning_item(
            render.id, "completed", render.reply, render.call.spec.args)}

    def message_added(self, render, piece):
        if render.reply.tool_calls is None:
            return {"output_index": _after_reasoning(render),
                    "item": self.message_item(render.id, "in_progress", None)}
        return None

    def first_part_added(self, render, piece):
        return None if render.reply.reasoning else self.part_added(render, piece)

    def part_added(self, render, piece):
        if render.reply.tool_calls is None:
            return dict(self.where(render),
                        part={"type": "output_text", "text": "", "annotations": []})
        return None

    def text_delta(self, render, text):
        return dict(self.where(render), delta=text, logprobs=[])

    def call_added(self, render, index):
        return {"output_index": _after_reasoning(render) + index,
                "item": self.function_call_item(render.id, index, render.reply.tool_calls[index],
                                                "in_progress")}

    def call_item(self, render, index):
        return self.function_call_item(render.id, index, render.reply.tool_calls[index],
                                       "completed")

    def arguments_delta(self, render, piece):
        index, text = piece
        return {"item_id": self.call_item(render, index)["id"],
                "output_index": _after_reasoning(render) + index, "delta": text}

    def arguments_done(self, render, index):
        item = self.call_item(render, index)
        return {"item_id": item["id"], "output_index": _after_reasoning(render) + index,
                "arguments": item["arguments"]}

    def call_done(self, render, index):
        return {"output_index": _after_reasoning(render) + index,
                "item": self.call_item(render, index)}

    def text_done(self, render, piece):
        if render.reply.tool_calls is None:
            return dict(self.where(render), text=render.reply.text, logprobs=[])
        return None

    def part_done(self, render, piece):
        if render.reply.tool_calls is None:
            return dict(self.where(render), part={
                "type": "output_text", "text": render.reply.text, "annotations": []})
        return None

    def message_done(self, render, piece):
        if render.reply.tool_calls is None:
            return {"output_index": _after_reasoning(render),
                    "item": self.message_item(render.id, render.status, render.reply.text)}
        return None

    def final(self, render, piece):
        return {"response": self.response(render.id, render.created, render.call.spec.args,
                                          render.status, render.reply)}

    def failed(self, render, piece):
        return {"response": self.response(render.id, render.created, render.call.spec.args,
                                          render.status, error=render.error)}

    def error_event(self, render, piece):
        return {"code": "server_error", "param": None, "message": render.simulated_error().message}

    stream_events = {
        "created": (("response.created", lifecycle, "ResponseLifecycleEvent"),),
        "queued": (("response.queued", lifecycle, "ResponseLifecycleEvent"),),
        "in_progress": (("response.in_progress", lifecycle, "ResponseLifecycleEvent"),),
        "open": (("response.output_item.added", first_added, "ResponseItemEvent"),
                 ("response.reasoning_summary_part.added", summary_part_added,
                  "ResponseSummaryPartEvent"),
                 ("response.content_part.added", first_part_added, "ResponsePartEvent")),
        "thought": (("response.reasoning_summary_text.delta", summary_delta,
                     "ResponseSummaryDeltaEvent"),),
        "thought_done": (("response.reasoning_summary_text.done", summary_done,
                          "ResponseSummaryDoneEvent"),
                         ("response.reasoning_summary_part.done", summary_part_done,
                          "ResponseSummaryPartEvent"),
                         ("response.output_item.done", reasoning_done, "ResponseItemEvent"),
                         ("response.output_item.added", message_added, "ResponseItemEvent"),
                         ("response.content_part.added", part_added, "ResponsePartEvent")),
        "piece": (("response.output_text.delta", text_delta, "ResponseTextDeltaEvent"),),
        "call": (("response.output_item.added", call_added, "ResponseItemEvent"),),
        "arguments": (("response.function_call_arguments.delta", arguments_delta,
                       "ResponseArgumentsDeltaEvent"),),
        "call_done": (("response.function_call_arguments.done", arguments_done,
                       "ResponseArgumentsDoneEvent"),
                      ("response.output_item.done", call_done, "ResponseItemEvent")),
        "close": (("response.output_text.done", text_done, "ResponseTextDoneEvent"),
                  ("response.content_part.done", part_done, "ResponsePartEvent"),
                  ("response.output_item.done", message_done, "ResponseItemEvent")),
        "completed": (("response.completed", final, "ResponseLifecycleEvent"),),
        "incomplete": (("response.incomplete", final, "ResponseLifecycleEvent"),),
        "failed": (("response.failed", failed, "ResponseLifecycleEvent"),),
        "error": (("error", error_event, "ResponseErrorEvent"),),
    }

    @staticmethod
    def response_id(request):
        response_id = request.params["id"]
        if not response_id.startswith("resp_"):
            raise ApiError("NOT_FOUND", f"no response with id {response_id!r}", "id")
        return response_id

    @_api("OpenAI Responses: a stored response; stream=true streams its events again",
          answers={200: "Response"}, query=QUERY, streams=True)
    def retrieve(self, app, request):
        response_id = self.response_id(request)
        request.note.job_id = response_id
        if request.args["stream"] == "true":
            job = app.store.snapshot(response_id, lambda job: job)
            return self.streamed(app, response_id, job.created_at, job.spec, job.plan,
                                 job.start_ms, request.args["starting_after"])
        response, fault = app.store.poll(response_id, view=self.view)
        return _polled(request, response, fault, "status", response["status"] not in self.ACTIVE
                       if response["background"] else None)

    @_api("OpenAI Responses: cancel a background response", answers={200: "Response"})
    def cancel(self, app, request):
        request.note.job_id = request.params["id"]
        return _Answer(200, app.store.cancel(self.response_id(request), view=self.view))

    @_api("OpenAI Responses: forget a stored response", answers={200: "ResponseDeleted"})
    def delete(self, app, request):
        response_id = request.note.job_id = self.response_id(request)
        app.store.delete(response_id)
        return _Answer(200, {"id": response_id, "object": "response", "deleted": True})

    routes = (
        _route("POST", "/v1/responses", _model_call, api=_model_api(
            "OpenAI Responses: create a response; background: a job to poll",
            "ResponseRequest", {200: "Response", **_MODEL_ERRORS},
            refuses={**_CALLBACK_REFUSED, "store": "false, with background true",
                     "tool_choice": _FORCES_AN_UNOFFERED_TOOL, "tools": _UNDRAWABLE_SCHEMA,
                     "text.format": _UNDRAWABLE_SCHEMA, "input": _REFUSED_CONVERSATION,
                     "previous_response_id": "one this server does not hold"})),
        _route("GET", "/v1/responses/{id}", retrieve),
        _route("POST", "/v1/responses/{id}/cancel", cancel),
        _route("DELETE", "/v1/responses/{id}", delete),
    )


_OPENAI_RESPONSES = _OpenAIResponses()


# --- Surfaces: OpenAI embeddings and completions ----------------------------------

def _check_embedding_input(value, field):
    """A string, strings, a token list or token lists: 1 to 2,048 non-empty items."""
    def tokens(item):
        return isinstance(item, list) and all(_is_int(token) or isinstance(token, float)
                                              and token.is_integer() for token in item)
    items = [value] if isinstance(value, str) or (value and tokens(value)) else value
    if not isinstance(items, list) or not 1 <= len(items) <= 2048:
        raise _ValidationError(field, "must be a string, or 1 to 2048 strings or token lists")
    for index, item in enumerate(items):
        if not item or not (isinstance(item, str) or tokens(item)):
            raise _ValidationError(field if items is not value else f"{field}[{index}]",
                                   "must be a non-empty string or token list")
    return [item if isinstance(item, str) else [int(token) for token in item]
            for item in items]


_TOKENS_SCHEMA = {"type": "array", "minItems": 1, "items": {"type": "integer"}}
_EMBEDDING_INPUT = _Check(_check_embedding_input, {"anyOf": [
    {"type": "string", "minLength": 1}, _TOKENS_SCHEMA,
    {"type": "array", "minItems": 1, "maxItems": 2048, "items": {"anyOf": [
        {"type": "string", "minLength": 1}, _TOKENS_SCHEMA]}}]})
_DIMENSIONS = _Int(1, 8192)


class _OpenAIEmbeddings(_OpenAI):
    """OpenAI's embeddings: vectors that are a pure function of the model,
    the text and the dimensions (see _embedding)."""

    name = "openai.embeddings"
    title = "OpenAI embeddings"
    REQUEST = {
        "model": _MODEL,
        "input": _Field(_EMBEDDING_INPUT, _REQUIRED,
                        "A string, or up to 2048 strings or token lists."),
        "dimensions": _Field(_DIMENSIONS, 1536, "Length of each vector."),
        "encoding_format": _Field(_Choice("float", "base64"), "float",
                                  "base64: little-endian float32, as the openai SDK asks."),
        "user": _USER,
        **_EXTENSIONS,
    }

    def schemas(self):
        return {
            **super().schemas(),
            "EmbeddingRequest": _object_schema(self.REQUEST, example={
                "model": "text-embedding-3-small", "input": "Hello"}),
            "EmbeddingList": {"type": "object", "required": ["object", "data", "model", "usage"],
                              "properties": {"object": {"const": "list"},
                                             "data": {"type": "array"},
                                             "model": {"type": "string"},
                                             "usage": {"type": "object"}}},
        }

    @staticmethod
    def texts(items):
        """Each input as text, and the tokens it counts for."""
        return [(item, _tokens(item)) if isinstance(item, str) else (json.dumps(item), len(item))
                for item in items]

    def parse(self, request, config):
        values = _with_defaults(_given(_json_body(request), self.REQUEST, None), self.REQUEST,
                                config)
        texts = self.texts(values["input"])
        return self.call(request, config, model=self.model_of(request, values), stream=False,
                         max_tokens=None,
                         messages=[{"role": "user", "content": text} for text, _ in texts],
                         user=values["user"], timeout_ms=values["timeout_ms"],
                         simulate=values["simulate"], texts=texts,
                         dimensions=values["dimensions"],
                         base64=values["encoding_format"] == "base64")

    def answer(self, call, reply, created):
        texts, dimensions = call.options["texts"], call.options["dimensions"]
        data = []
        for index, (text, _) in enumerate(texts):
            vector = _embedding(call.model, text, dimensions, call.spec.embedding)
            if call.options["base64"]:
                vector = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": vector})
        tokens = sum(count for _, count in texts)
        return {"object": "list", "data": data, "model": call.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    routes = (_route("POST", "/v1/embeddings", _model_call, api=_model_api(
        "OpenAI embeddings: vectors that are a pure function of model and text",
        "EmbeddingRequest", {200: "EmbeddingList", 429: None}, streams=False)),)


_OPENAI_EMBEDDINGS = _OpenAIEmbeddings()


def _check_false(value, field):
    if value is not False:
        raise _ValidationError(field, "must be false: dummyLLM does not echo the prompt")
    return value


def _check_prompt(value, field):
    """A string, or a list of strings (one prompt, its lines)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return "\n".join(value)
    raise _ValidationError(field, "must be a string or a non-empty array of strings")


class _OpenAICompletions(_OpenAI):
    """OpenAI's legacy completions, plain and streamed."""

    name = "openai.completions"
    title = "OpenAI legacy completions"
    REQUEST = {
        "model": _MODEL,
        "prompt": _Field(_Check(_check_prompt, {"oneOf": [
            {"type": "string"}, dict(_STRINGS_SCHEMA, minItems=1)]}), _REQUIRED,
            "The prompt; its text feeds the reply."),
        "max_tokens": _Field(_Int(1, 10_000_000), None,
                             "Cut the reply to this many tokens (finish_reason length)."),
        **_OpenAI.LENGTH,
        "stream": _Field(_Bool(), False, "Answer as server-sent events."),
        "stream_options": _STREAM_OPTIONS_FIELD,
        "n": _ONE_CHOICE,
        "echo": _Field(_Check(_check_false, {"const": False}), False, "Only false."),
        "stop": _OPENAI_STOP,
        "user": _USER,
        **_EXTENSIONS,
    }

    def schemas(self):
        return {
            **super().schemas(),
            "CompletionRequest": _object_schema(self.REQUEST, example={
                "model": "gpt-3.5-turbo-instruct", "prompt": "Hello"}),
            "Completion": {"type": "object", "required": ["id", "object", "choices"],
                           "properties": {"id": {"type": "string"},
                                          "object": {"const": "text_completion"},
                                          "choices": {"type": "array"},
                                          "usage": {"type": "object"}}},
        }

    def parse(self, request, config):
        values = _with_defaults(_given(_json_body(request), self.REQUEST, None), self.REQUEST,
                                config)
        return self.call(request, config, model=self.model_of(request, values),
                         messages=[{"role": "user", "content": values["prompt"]}],
                         stream=values["stream"], max_tokens=values["max_tokens"],
                         min_tokens=self.min_tokens(values, values["max_tokens"]),
                         stop=values["stop"], user=values["user"],
                         timeout_ms=values["timeout_ms"], simulate=values["simulate"],
                         include_usage=values["stream_options"].get("include_usage", False))

    @staticmethod
    def completion(completion_id, created, call, text, finish_reason):
        return {"id": completion_id, "object": "text_completion", "created": created,
                "model": call.model, "choices": [{"text": text, "index": 0, "logprobs": None,
                                                  "finish_reason": finish_reason}]}

    def answer(self, call, reply, created):
        return dict(self.completion("cmpl-" + _random_hex(24), created, call, reply.text,
                                    self.finish[reply.end]), usage=self.usage(reply))

    def begin_stream(self, render):
        render.id = "cmpl-" + _random_hex(24)

    def text_chunk(self, render, text):
        return self.completion(render.id, render.created, render.call, text, None)

    def finish_chunk(self, render, piece):
        return self.completion(render.id, render.created, render.call, "",
                               self.finish[render.reply.end])

    def usage_chunk(self, render, piece):
        if render.call.options["include_usage"]:
            return dict(self.text_chunk(render, ""), choices=[], usage=self.usage(render.reply))
        return None

    stream_events = {
        "open": (), "call": (), "arguments": (), "call_done": (),
        "piece": ((None, text_chunk, "Completion"),),
        "close": ((None, finish_chunk, "Completion"), (None, usage_chunk, "Completion"),
                  (None, _OpenAI.done, b"[DONE]")),
        "error": ((None, _Surface.error_event, "OpenAIError"),),
    }

    routes = (_route("POST", "/v1/completions", _model_call, api=_model_api(
        "OpenAI legacy completions, streamed or not", "CompletionRequest",
        {200: "Completion", 429: None})),)


_OPENAI_COMPLETIONS = _OpenAICompletions()


# --- Surfaces: Azure OpenAI -------------------------------------------------------
# Chat completions, embeddings, legacy completions and the Responses API as
# Azure serves them: each OpenAI surface with Azure's paths, key, errors and
# content filter.

class _Azure:
    """Azure OpenAI, mixed into an OpenAI surface: a deployment's paths
    (/openai/deployments/{deployment}/...?api-version=, the deployment
    naming the model; the Responses API's are /openai/responses...?api-version=,
    its body naming the deployment) and the v1 paths (/openai/v1/..., the
    body naming it), the api-key header, Azure's errors for what its gateway
    refuses (the status as the code), and the content filter's verdict in
    every plain answer of chat and completions (nothing filtered)."""

    QUERY = {"api-version": _Field(_Text(non_empty=True), _REQUIRED,
                                   "The API version, e.g. 2024-10-21 (any is accepted).")}
    GATEWAY = (401, 404, 429, 500, 503, 504)  # what Azure's gateway answers, code = status
    error_schema = "AzureError"
    FILTERED = {kind: {"filtered": False, "severity": "safe"}
                for kind in ("hate", "self_harm", "sexual", "violence")}

    @classmethod
    def unit(cls, base, name, title, deployments=True):
        """The Azure surface of an OpenAI surface: its model calls' routes
        under Azure's paths, a deployment's (its request with the model left
        to the deployment), or with deployments False all its routes under
        /openai (the body naming the deployment, as for Responses)."""
        routes, request = [], None
        for route in base.routes:
            if not route.path.startswith("/v1/") or deployments and route.method != "POST":
                continue
            request = route.api["request"] or request
            versioned = "/openai/deployments/{deployment}" if deployments else "/openai"
            for path, query, refuses in (
                    (versioned + route.path[3:], cls.QUERY, {}),
                    ("/openai/v1" + route.path[3:], {}, {"model": "left out (only a "
                                                         "deployment's path names it)"}
                     if deployments else {})):
                handler = route.handler
                if query and handler is not _model_call:  # parse() checks a model call's
                    handler = cls.versioned(handler)
                routes.append(route._replace(path=path, handler=handler, api=dict(
                    route.api, summary="Azure: " + route.api["summary"],
                    query={**(route.api["query"] or {}), **query},
                    request=route.api["request"] and "Azure" + route.api["request"],
                    refuses={**(route.api["refuses"] or {}), **refuses})))
        fields = {**base.REQUEST, "model": _Field(_Text(non_empty=True), None,
                                                  "The model; a deployment's path names it.")
                  } if deployments else base.REQUEST
        return type("_Azure" + type(base).__name__[len("_OpenAI"):], (cls, type(base)), {
            "name": name, "title": title, "routes": tuple(routes), "REQUEST": fields,
            "request_schema": "Azure" + request, "sdk_environ": {}})()

    @staticmethod
    def versioned(handler):
        """A handler that first checks the api-version, as parse() does."""
        def answer(surface, app, request):
            surface.check_version(request)
            return handler(surface, app, request)
        return functools.update_wrapper(answer, handler)

    def schemas(self):
        return {self.request_schema: _object_schema(self.REQUEST), "AzureError": _object({
            "error": _object({"code": {"type": ["string", "null"]}, "message": _A_STRING}, {
                "type": {"type": ["string", "null"]}, "param": {"type": ["string", "null"]}})})}

    def credential(self, request):
        return request.headers.get("api-key") or super().credential(request)

    @staticmethod
    def check_version(request):
        # Azure answers a deployment's path without its api-version as a
        # path it does not know, before it reads the body.
        if request.args.get("api-version") is _REQUIRED:
            raise ApiError("NOT_FOUND", "Resource not found")

    def parse(self, request, config):
        self.check_version(request)
        return super().parse(request, config)

    def model_of(self, request, values):
        model = values["model"] or request.params.get("deployment")
        if model is None:
            raise _ValidationError("model", "is required")
        return model

    def error_body(self, error, status, retry_ms):
        if status not in self.GATEWAY:
            return super().error_body(error, status, retry_ms)
        return {"error": {"code": str(status), "message": error.message}}

    def answer(self, call, reply, created):
        body = super().answer(call, reply, created)
        if "choices" in body:
            body["prompt_filter_results"] = [
                {"prompt_index": 0, "content_filter_results": self.FILTERED}]
            for choice in body["choices"]:
                choice["content_filter_results"] = self.FILTERED
        return body


_AZURE_CHAT = _Azure.unit(_OPENAI_CHAT, "azure.chat", "Azure OpenAI chat completions")
_AZURE_EMBEDDINGS = _Azure.unit(_OPENAI_EMBEDDINGS, "azure.embeddings", "Azure OpenAI embeddings")
_AZURE_COMPLETIONS = _Azure.unit(_OPENAI_COMPLETIONS, "azure.completions",
                                 "Azure OpenAI legacy completions")
_AZURE_RESPONSES = _Azure.unit(_OPENAI_RESPONSES, "azure.responses", "Azure OpenAI Responses",
                               deployments=False)


# --- Surfaces: OpenRouter ---------------------------------------------------------
# OpenAI's chat completions under OpenRouter's /api/v1, with its errors and
# the reasoning it shows.  (Groq's SDK posts to /openai/v1/chat/completions,
# which are Azure's v1 paths: the same chat, in Azure's gateway errors.)

_OPENROUTER_REASONING = {
    "effort": _Field(_Choice(*_REASONING_EFFORTS), None, "Other than none, the model reasons "
                     "first (simulate.reasoning sets how long)."),
    "max_tokens": _Field(_Int(0, 10_000_000), None, "More than 0: as effort."),
    "enabled": _Field(_Bool(), None, "true: as effort."),
    "exclude": _Field(_Bool(), False, "The reasoning is left out of the answer."),
}


class _OpenRouter(_OpenAIChat):
    """OpenRouter's chat completions and models: OpenAI's, under /api/v1;
    errors {"error": {"code": status, "message"}}; a reasoning model's
    thinking in message.reasoning (streamed as delta.reasoning) when the
    request asks for it with `reasoning` or `include_reasoning`."""

    name = "openrouter"
    title = "OpenRouter chat completions"
    sdk_environ = {}
    error_schema = "OpenRouterError"
    REQUEST = {**_OpenAIChat.REQUEST,
               "reasoning": _Field(_Check(lambda value, field: _given(
                   value, _OPENROUTER_REASONING, field), _object_schema(_OPENROUTER_REASONING)),
                   None, "A reasoning model's settings."),
               "include_reasoning": _Field(_Bool(), None, "true: the model reasons first.")}

    def schemas(self):
        return {"OpenRouterError": _object({"error": _object(
            {"code": _AN_INTEGER, "message": _A_STRING}, {"metadata": _AN_OBJECT})}),
            "OpenRouterRequest": _object_schema(self.REQUEST)}

    def error_body(self, error, status, retry_ms):
        return {"error": {"code": status, "message": error.message}}

    @staticmethod
    def asks_reasoning(values):
        reasoning = values["reasoning"] or {}
        return bool(values["include_reasoning"] or reasoning.get("enabled")
                    or reasoning.get("effort") not in (None, "none")
                    or (reasoning.get("max_tokens") or 0) > 0)

    def shows_reasoning(self, values):
        return self.asks_reasoning(values) and not (values["reasoning"] or {}).get("exclude")

    def answer(self, call, reply, created):
        body = super().answer(call, reply, created)
        if reply.reasoning and call.options["show_reasoning"]:
            body["choices"][0]["message"]["reasoning"] = reply.reasoning
        return body

    def reasoning_chunk(self, render, text):
        if render.call.options["show_reasoning"]:
            return self.chunk(render, {"reasoning": text})
        return None

    stream_events = {**_OpenAIChat.stream_events,
                     "thought": ((None, reasoning_chunk, "ChatCompletionChunk"),)}
    routes = tuple(route._replace(path="/api" + route.path, api=route.api and dict(
        route.api, summary="OpenRouter: " + route.api["summary"],
        request=route.api["request"] and "OpenRouterRequest"))
        for route in _OpenAIChat.routes if route.path != "/v1/models/{id+}")


_OPENROUTER = _OpenRouter()


# --- Surfaces: Anthropic Messages -------------------------------------------------

def _check_anthropic_messages(value, field):
    if not isinstance(value, list) or not value:
        raise _ValidationError(field, "must be a non-empty array of messages")
    for index, message in enumerate(value):
        name = f"{field}[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise _ValidationError(name, 'must be an object with role "user" or "assistant"')
        _check_blocks(message.get("content"), name + ".content")
    return value


_ANTHROPIC_METADATA = {"user_id": _Field(_Text(_MAX_TRACE_ID_CHARS), None,
                                         "The key of seeded sequences when X-Trace-Id is absent.")}
_ANTHROPIC_THINKING = {
    "type": _Field(_Choice("enabled", "adaptive", "disabled"), _REQUIRED,
                   "enabled (with budget_tokens) or adaptive: the reply begins with a "
                   "signed thinking block."),
    "budget_tokens": _Field(_Int(1024, 10_000_000), None,
                            "The most tokens thinking may take: less than max_tokens."),
}
_EXTENDED_THINKING_DOCS = "https://docs.claude.com/en/docs/build-with-claude/extended-thinking"


class _AnthropicMessages(_Surface):
    """Anthropic's Messages API: a message, streamed or not, and token counting.

    Mode overloaded answers 529 here; mode timeout and the deadline answer
    504 timeout_error; error_after sends an overloaded_error event.
    """

    name = "anthropic"
    title = "Anthropic Messages"
    keyed = True
    error_schema = "AnthropicError"
    validation_status = 400
    overloaded_status = 529
    error_types = {
        401: "authentication_error", 403: "permission_error", 404: "not_found_error",
        413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
        503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error",
        "OVERLOADED": "overloaded_error", "INJECTED_FAULT": "api_error",
        "4xx": "invalid_request_error", "5xx": "api_error",
    }
    stream_error = ("OVERLOADED", "Overloaded")
    finish = {"end": "end_turn", "max_tokens": "max_tokens", "stop_sequence": "stop_sequence",
              "tool_calls": "tool_use"}
    framing = _NAMED_SSE
    request_headers = ("x-api-key", "anthropic-version")
    sdk_environ = {"ANTHROPIC_BASE_URL": "", "ANTHROPIC_API_KEY": None}
    answer_headers = ("request-id",)
    quota_header = "anthropic-ratelimit-{kind}-{part}"
    reasons = {529: "Overloaded"}
    # What Anthropic adds to an error's body, by code.
    DETAILS = {"QUOTA_EXHAUSTED": {"error_code": "enforced_spend_limit_reached"}}
    REQUEST = {
        "model": _MODEL,
        "max_tokens": _Field(_Int(1, 10_000_000), _REQUIRED,
                             "Cut the reply to this many tokens (stop_reason max_tokens)."),
        "messages": _Field(_Check(_check_anthropic_messages, {
            "type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["role", "content"], "properties": {
                    "role": {"enum": ["user", "assistant"]}, "content": _BLOCKS_SCHEMA}}}),
            _REQUIRED, "The conversation; the last user message feeds the reply."),
        "system": _Field(_Check(_check_blocks, _BLOCKS_SCHEMA), None,
                         "A system prompt: text or text blocks."),
        "stream": _Field(_Bool(), False, "Answer as server-sent events."),
        "stop_sequences": _Field(_Check(_check_strings, _STRINGS_SCHEMA), (),
                                 "The reply ends before the first of these it meets."),
        "temperature": _Field(_Number(0, 1), None, "Accepted."),
        "tools": _Field(_TOOLS, (), "Tools the reply may use."),
        "tool_choice": _Field(_OBJECT, {"type": "auto"}, "any or a named tool: the reply "
                              "uses it, with input drawn from its input_schema."),
        "metadata": _Field(_Check(lambda value, field: _given(value, _ANTHROPIC_METADATA, field),
                                  _object_schema(_ANTHROPIC_METADATA)), {}, None),
        "thinking": _Field(_Check(lambda value, field: _with_defaults(
            _given(value, _ANTHROPIC_THINKING, field), _ANTHROPIC_THINKING, None, field),
            _object_schema(_ANTHROPIC_THINKING)), {"type": "disabled"},
            "Extended thinking: the reply's thinking block (simulate.reasoning sets it), "
            "which a tool loop must send back unchanged."),
        **_EXTENSIONS,
    }
    COUNT_REQUEST = _pick(REQUEST, "model", "messages", "system", "tools")
    # What it refuses that its request's schema allows (see _model_api).
    REFUSES = {"tool_choice": _FORCES_AN_UNOFFERED_TOOL, "tools": _UNDRAWABLE_SCHEMA,
               "messages": _REFUSED_CONVERSATION,
               "max_tokens": "not more than thinking.budget_tokens",
               "thinking": "enabled without budget_tokens"}

    def schemas(self):
        return {
            "AnthropicError": {"type": "object", "required": ["type", "error"], "properties": {
                "type": {"const": "error"}, "request_id": {"type": "string"},
                "error": {"type": "object", "required": ["type", "message"], "properties": {
                    "type": {"type": "string"}, "message": {"type": "string"}}}}},
            "AnthropicRequest": _object_schema(self.REQUEST, example={
                "model": "claude-sonnet-4-5", "max_tokens": 256,
                "messages": [{"role": "user", "content": "Hello"}],
                "simulate": {"latency_ms": 300}}),
            "AnthropicCountRequest": _object_schema(self.COUNT_REQUEST, example={
                "model": "claude-sonnet-4-5",
                "messages": [{"role": "user", "content": "Hello"}]}),
            "AnthropicMessage": {"type": "object", "required": [
                "id", "type", "role", "model", "content", "stop_reason", "usage"],
                "properties": {
                "id": {"type": "string"}, "type": {"const": "message"},
                "role": {"const": "assistant"}, "model": {"type": "string"},
                "content": {"type": "array"}, "stop_reason": {"type": "string"},
                "stop_sequence": {"type": ["string", "null"]}, "usage": {"type": "object"}}},
            "AnthropicTokens": {"type": "object",
                                "properties": {"input_tokens": {"type": "integer"}}},
            "AnthropicMessageStart": _object({"type": _A_STRING, "message": _AN_OBJECT}),
            "AnthropicBlockStart": _object({"type": _A_STRING, "index": _AN_INTEGER,
                                            "content_block": _AN_OBJECT}),
            "AnthropicBlockDelta": _object({"type": _A_STRING, "index": _AN_INTEGER,
                                            "delta": _AN_OBJECT}),
            "AnthropicBlockStop": _object({"type": _A_STRING, "index": _AN_INTEGER}),
            "AnthropicMessageDelta": _object({"type": _A_STRING, "delta": _AN_OBJECT,
                                              "usage": _AN_OBJECT}),
            "AnthropicPing": _object({"type": _A_STRING}),
            "AnthropicMessageStop": _object({"type": _A_STRING}),
        }

    def credential(self, request):
        return request.headers.get("x-api-key") or super().credential(request)

    def error(self, error, retry_ms, now_ms, note=None):
        """Its shape, with the request id in the body and a header."""
        status, body, headers = super().error(error, retry_ms, now_ms)
        request_id = "req_" + _random_hex(24)
        return status, dict(body, request_id=request_id), headers + (("request-id", request_id),)

    def error_body(self, error, status, retry_ms):
        body = {"type": self.error_type(error, status), "message": error.message}
        if error.code in self.DETAILS:
            body["details"] = self.DETAILS[error.code]
        return {"type": "error", "error": body}

    @staticmethod
    def reset_text(reset_ms, now_ms):
        """An RFC 3339 time."""
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((now_ms + reset_ms) / 1000))

    def messages(self, values):
        """The conversation as text messages (see _Surface.call), the system
        prompt first; a user message of tool_result blocks is the results."""
        messages, names = [], {}
        if values.get("system") is not None:
            messages.append({"role": "system", "content": _content_text(values["system"])})
        for message in values["messages"]:
            blocks = message["content"] if isinstance(message["content"], list) else []
            names.update((block.get("id"), block.get("name")) for block in blocks
                         if block["type"] == "tool_use")
            results = [block for block in blocks if block["type"] == "tool_result"]
            messages.extend({"role": "tool", "content": _content_text(block.get("content")),
                             "tool": names.get(block.get("tool_use_id"))} for block in results)
            if not results:
                messages.append({"role": message["role"],
                                 "content": _content_text(message["content"])})
        return messages

    def parse(self, request, config):
        values = _with_defaults(_given(_json_body(request), self.REQUEST, None), self.REQUEST,
                                config)
        return self.called(request, config, values, values["model"], values["stream"])

    def called(self, request, config, values, model, stream):
        """The _Call of a request's checked values (its model and whether it
        streams given apart: Bedrock has them in its path)."""
        choice = values["tool_choice"]
        forced = {"any": ("any", "tool_choice"), "tool": (choice.get("name"), "tool_choice.name")
                  }.get(choice.get("type"))
        thinking = values["thinking"]
        if thinking["type"] == "enabled":
            if thinking["budget_tokens"] is None:
                raise _ValidationError("thinking.budget_tokens", "is required when thinking "
                                       "is enabled")
            if thinking["budget_tokens"] >= values["max_tokens"]:
                raise _ValidationError("max_tokens", "must be greater than "
                                       "thinking.budget_tokens")
        call = self.call(request, config, model=model, messages=self.messages(values),
                         stream=stream, max_tokens=values["max_tokens"],
                         stop=values["stop_sequences"], user=values["metadata"].get("user_id"),
                         timeout_ms=values["timeout_ms"], simulate=values["simulate"],
                         tools=_tool_table(values["tools"], "tools",
                                           schema_keys=("input_schema",)),
                         forced=forced, reasoning=thinking["type"] != "disabled")
        if not config.lenient:
            self.check_conversation(values["messages"], thinking["type"] != "disabled",
                                    call.spec.seed)
        return call

    @staticmethod
    def check_conversation(messages, thinking, seed):
        """Refuse what Anthropic refuses of a conversation (see --lenient): a
        tool_result that answers no tool_use of the message before, a
        tool_use the next message leaves unanswered; with thinking on, a
        thinking block not signed by this server (seed), and a tool loop
        whose last call lost its thinking block."""
        contents = [message["content"] if isinstance(message["content"], list) else []
                    for message in messages]
        for index, content in enumerate(contents):
            asked = {block.get("id") for block in (contents[index - 1] if index else ())
                     if block["type"] == "tool_use"}
            for position, block in enumerate(content):
                at = f"messages.{index}.content.{position}"
                if block["type"] == "tool_result" and block.get("tool_use_id") not in asked:
                    raise ApiError("ORPHAN_TOOL_RESULT", f"{at}: unexpected `tool_use_id` found "
                                   f"in `tool_result` blocks: {block.get('tool_use_id')}. Each "
                                   "`tool_result` block must have a corresponding `tool_use` "
                                   "block in the previous message.", at)
                if thinking and block["type"] == "thinking" and not (
                        isinstance(block.get("thinking"), str)
                        and block.get("signature") == _signature(seed, block["thinking"])):
                    raise ApiError("EDITED_THINKING",
                                   f"{at}: Invalid `signature` in `thinking` block", at)
            if index + 1 < len(contents):
                answered = {block.get("tool_use_id") for block in contents[index + 1]
                            if block["type"] == "tool_result"}
                unanswered = [block.get("id") for block in content
                              if block["type"] == "tool_use" and block.get("id") not in answered]
                if unanswered:
                    raise ApiError("UNANSWERED_TOOL_CALL", f"messages.{index}: `tool_use` ids "
                                   "were found without `tool_result` blocks immediately after: "
                                   + ", ".join(map(str, unanswered)) + ". Each `tool_use` block "
                                   "must have a corresponding `tool_result` block in the next "
                                   "message.", f"messages.{index}")
        last = len(contents) - 1
        if thinking and last > 0 and any(block["type"] == "tool_result"
                                         for block in contents[last]):
            first = contents[last - 1][0]["type"] if contents[last - 1] else "text"
            if first not in ("thinking", "redacted_thinking"):
                at = f"messages.{last - 1}.content.0"
                raise ApiError("DROPPED_THINKING", f"{at}.type: Expected `thinking` or "
                               f"`redacted_thinking`, but found `{first}`. When `thinking` is "
                               "enabled, a final `assistant` message must start with a thinking "
                               "block (preceeding the lastmost set of `tool_use` and "
                               "`tool_result` blocks). We recommend you include thinking blocks "
                               "from previous turns. To avoid this requirement, disable "
                               "`thinking`. Please consult our documentation at "
                               + _EXTENDED_THINKING_DOCS, at)

    def message(self, call, reply, content, stop_reason, output_tokens):
        return {"id": "msg_" + _random_hex(24), "type": "message", "role": "assistant",
                "model": call.model, "content": content, "stop_reason": stop_reason,
                "stop_sequence": reply.stop_sequence if stop_reason else None,
                "usage": {"input_tokens": reply.prompt_tokens, "output_tokens": output_tokens}}

    @staticmethod
    def tool_use(call, **fields):
        return {"type": "tool_use", "id": call["id"], "name": call["name"], **fields}

    @staticmethod
    def thinking_block(call, reply, thinking=None, signature=None):
        return {"type": "thinking", "thinking": reply.reasoning if thinking is None else thinking,
                "signature": _signature(call.spec.seed, reply.reasoning)
                if signature is None else signature}

    def answer(self, call, reply, created):
        content = ([{"type": "text", "text": reply.text}] if reply.tool_calls is None else
                   [self.tool_use(tool_call, input=_arguments_object(tool_call))
                    for tool_call in reply.tool_calls])
        if reply.reasoning:
            content.insert(0, self.thinking_block(call, reply))
        return self.message(call, reply, content, self.finish[reply.end],
                            reply.completion_tokens)

    # Its stream: a thinking block if the model reasons (its text as
    # thinking_delta pieces, then its signature), then a text block, or a
    # tool_use block per call (opened with empty input, then its input as
    # input_json_delta pieces).

    def message_start(self, render, piece):
        return {"type": "message_start",
                "message": self.message(render.call, render.reply, [], None, 0)}

    def first_block_start(self, render, piece):
        if render.reply.reasoning:
            return {"type": "content_block_start", "index": 0, "content_block":
                    self.thinking_block(render.call, render.reply, "", "")}
        return self.text_block_start(render, piece)

    def text_block_start(self, render, piece):
        if render.reply.tool_calls is None:
            return {"type": "content_block_start", "index": _after_reasoning(render),
                    "content_block": {"type": "text", "text": ""}}
        return None

    def ping(self, render, piece):
        return {"type": "ping"}

    def thinking_delta(self, render, text):
        return {"type": "content_block_delta", "index": 0,
                "delta": {"type": "thinking_delta", "thinking": text}}

    def signature_delta(self, render, piece):
        return {"type": "content_block_delta", "index": 0, "delta": {
            "type": "signature_delta",
            "signature": _signature(render.call.spec.seed, render.reply.reasoning)}}

    def thinking_stop(self, render, piece):
        return self.block_stop(render, 0)

    def text_delta(self, render, text):
        return {"type": "content_block_delta", "index": _after_reasoning(render),
                "delta": {"type": "text_delta", "text": text}}

    def tool_use_start(self, render, index):
        return {"type": "content_block_start", "index": _after_reasoning(render) + index,
                "content_block": self.tool_use(render.reply.tool_calls[index], input={})}

    def input_delta(self, render, piece):
        index, text = piece
        return {"type": "content_block_delta", "index": _after_reasoning(render) + index,
                "delta": {"type": "input_json_delta", "partial_json": text}}

    def block_stop(self, render, index):
        return {"type": "content_block_stop", "index": index}

    def tool_use_stop(self, render, index):
        return self.block_stop(render, _after_reasoning(render) + index)

    def text_block_stop(self, render, piece):
        return (self.block_stop(render, _after_reasoning(render))
                if render.reply.tool_calls is None else None)

    def message_delta(self, render, piece):
        reply = render.reply
        return {"type": "message_delta", "delta": {"stop_reason": self.finish[reply.end],
                                                   "stop_sequence": reply.stop_sequence},
                "usage": {"output_tokens": reply.completion_tokens}}

    def message_stop(self, render, piece):
        return {"type": "message_stop"}

    stream_events = {
        "open": (("message_start", message_start, "AnthropicMessageStart"),
                 ("content_block_start", first_block_start, "AnthropicBlockStart"),
                 ("ping", ping, "AnthropicPing")),
        "thought": (("content_block_delta", thinking_delta, "AnthropicBlockDelta"),),
        "thought_done": (("content_block_delta", signature_delta, "AnthropicBlockDelta"),
                         ("content_block_stop", thinking_stop, "AnthropicBlockStop"),
                         ("content_block_start", text_block_start, "AnthropicBlockStart")),
        "piece": (("content_block_delta", text_delta, "AnthropicBlockDelta"),),
        "call": (("content_block_start", tool_use_start, "AnthropicBlockStart"),),
        "arguments": (("content_block_delta", input_delta, "AnthropicBlockDelta"),),
        "call_done": (("content_block_stop", tool_use_stop, "AnthropicBlockStop"),),
        "close": (("content_block_stop", text_block_stop, "AnthropicBlockStop"),
                  ("message_delta", message_delta, "AnthropicMessageDelta"),
                  ("message_stop", message_stop, "AnthropicMessageStop")),
        "error": (("error", _Surface.error_event, "AnthropicError"),),
    }

    @_api("Anthropic Messages: count a request's input tokens", request="AnthropicCountRequest",
          answers={200: "AnthropicTokens"})
    def count_tokens(self, app, request):
        values = _with_defaults(_given(_json_body(request), self.COUNT_REQUEST, None),
                                self.COUNT_REQUEST, app.config)
        return _Answer(200, {"input_tokens": sum(_tokens(message["content"])
                                                 for message in self.messages(values))})

    routes = (
        _route("POST", "/v1/messages", _model_call, api=_model_api(
            "Anthropic Messages: a message, streamed or not", "AnthropicRequest",
            {200: "AnthropicMessage", 429: None, 500: None, 504: None, 529: None},
            refuses=REFUSES)),
        _route("POST", "/v1/messages/count_tokens", count_tokens),
    )


_ANTHROPIC_MESSAGES = _AnthropicMessages()


# --- Surfaces: Gemini -------------------------------------------------------------

_CONTENT_ROLES = ["user", "model", "function"]


def _check_contents(value, field):
    if not isinstance(value, list) or not value:
        raise _ValidationError(field, "must be a non-empty array of contents")
    for index, content in enumerate(value):
        _check_content(content, f"{field}[{index}]")
    return value


def _check_content(value, field):
    """A Gemini content: {"role": "user" or "model", "parts": [{"text": ...}, ...]}
    (role "function" too: the older way to give a function's response)."""
    if not isinstance(value, dict) or value.get("role", "user") not in _CONTENT_ROLES:
        raise _ValidationError(field, 'must be an object with role "user" or "model"')
    parts = value.get("parts")
    if not isinstance(parts, list) or not all(isinstance(part, dict) for part in parts):
        raise _ValidationError(f"{field}.parts", "must be an array of parts")
    for index, part in enumerate(parts):
        if not isinstance(part.get("text", ""), str):
            raise _ValidationError(f"{field}.parts[{index}].text", "must be a string")
    return value


_THINKING_CONFIG = {
    "includeThoughts": _Field(_Bool(), False, "The reply's parts begin with its thoughts "
                              "(parts with thought: true)."),
    "thinkingBudget": _Field(_Int(-1, 10_000_000), None, "More than 0: the model thinks first "
                             "(simulate.reasoning sets how long), counted as thoughtsTokenCount."),
    "thinkingLevel": _Field(_Text(), None, "The model thinks first, as thinkingBudget."),
}
# google-genai writes these three in snake case (and the API reads both).
_THINKING_CONFIG.update({re.sub("([A-Z])", lambda upper: "_" + upper.group(1).lower(), name): field
                         for name, field in _THINKING_CONFIG.items()})


def _check_thinking_config(value, field):
    """The thinking config, its keys in camel case."""
    return {re.sub("_([a-z])", lambda lower: lower.group(1).upper(), key): item
            for key, item in _given(value, _THINKING_CONFIG, field).items()}


_GENERATION_CONFIG = {
    "thinkingConfig": _Field(_Check(_check_thinking_config, _object_schema(_THINKING_CONFIG)),
                             {}, None),
    "maxOutputTokens": _Field(_Int(1, 10_000_000), None,
                              "Cut the reply to this many tokens (finishReason MAX_TOKENS)."),
    "stopSequences": _Field(_Check(_check_strings, _STRINGS_SCHEMA), (),
                            "The reply ends before the first of these it meets."),
    "responseMimeType": _Field(_Text(), None, "application/json: the reply is a JSON object."),
    "responseSchema": _Field(_OBJECT, None, "The reply is JSON valid against this (OpenAPI) "
                             "schema."),
    "responseJsonSchema": _Field(_JSON_SCHEMA, None,
                                 "The reply is JSON valid against this JSON Schema."),
}
_FUNCTION_CALLING = {
    "mode": _Field(_Choice("AUTO", "ANY", "NONE", "VALIDATED", "MODE_UNSPECIFIED"), "AUTO",
                   "ANY: the reply calls a function (the first allowed), with arguments drawn "
                   "from its parameters."),
    "allowedFunctionNames": _Field(_Check(_check_strings, _STRINGS_SCHEMA), (),
                                   "The functions ANY may call."),
}
_TOOL_CONFIG = {"functionCallingConfig": _Field(_Check(
    lambda value, field: _given(value, _FUNCTION_CALLING, field),
    _object_schema(_FUNCTION_CALLING)), {}, None)}


class _Gemini(_Surface):
    """Google's Generative Language API (Gemini): generateContent, its stream
    (server-sent events with ?alt=sse, else one JSON array written as it
    grows), countTokens and the models.  The calls answer under /v1beta and
    under /v1 (google-genai's default); the model list only under /v1beta, as
    /v1/models is OpenAI's."""

    name = "gemini"
    title = "Google Gemini"
    keyed = True
    error_schema = "GoogleError"
    validation_status = 400
    error_types = {
        400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
        404: "NOT_FOUND", 405: "NOT_FOUND", 408: "DEADLINE_EXCEEDED", 409: "ABORTED",
        429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED",
        503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
        "OVERLOADED": "UNAVAILABLE", "INJECTED_FAULT": "UNKNOWN",
        "4xx": "INVALID_ARGUMENT", "5xx": "UNKNOWN",
    }
    finish = {"end": "STOP", "max_tokens": "MAX_TOKENS", "stop_sequence": "STOP",
              "tool_calls": "STOP"}
    request_headers = ("x-goog-api-key",)
    sdk_environ = {"GOOGLE_GEMINI_BASE_URL": "", "GEMINI_API_KEY": None}
    quota_header = None  # Google tells the wait in the body's RetryInfo, and no quota
    CONTENT = {"type": "object", "required": ["parts"], "properties": {
        "role": {"enum": _CONTENT_ROLES},
        "parts": {"type": "array", "items": {"type": "object", "properties": {
            "text": {"type": "string"}}}}}}
    REQUEST = {
        "contents": _Field(_Check(_check_contents, {"type": "array", "minItems": 1,
                                                    "items": CONTENT}),
                           _REQUIRED, "The conversation; the last user content feeds the reply."),
        "systemInstruction": _Field(_Check(_check_content, CONTENT), None, "A system prompt."),
        "generationConfig": _Field(_Check(
            lambda value, field: _given(value, _GENERATION_CONFIG, field),
            _object_schema(_GENERATION_CONFIG)), {}, None),
        "tools": _Field(_TOOLS, (), "functionDeclarations the reply may call."),
        "toolConfig": _Field(_Check(lambda value, field: _given(value, _TOOL_CONFIG, field),
                                    _object_schema(_TOOL_CONFIG)), {}, None),
        "safetySettings": _Field(_LIST, None, "Accepted."),
        **_EXTENSIONS,
    }
    COUNT_REQUEST = _pick(REQUEST, "contents", "systemInstruction")
    QUERY = {"alt": _Field(_Choice("sse", "json"), None, "sse: stream server-sent events"),
             "key": _Field(_Text(), None, "The API key, when no x-goog-api-key header")}

    def schemas(self):
        return {
            "GoogleError": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message", "status"], "properties": {
                    "code": {"type": "integer"}, "message": {"type": "string"},
                    "status": {"type": "string"}, "details": {"type": "array"}}}}},
            "GeminiRequest": _object_schema(self.REQUEST, example={
                "contents": [{"role": "user", "parts": [{"text": "Hello"}]}],
                "simulate": {"latency_ms": 300}}),
            "GeminiCountRequest": _object_schema(self.COUNT_REQUEST, example={
                "contents": [{"role": "user", "parts": [{"text": "Hello"}]}]}),
            "GeminiResponse": {"type": "object", "required": ["candidates", "usageMetadata"],
                               "properties": {"candidates": {"type": "array"},
                                              "usageMetadata": {"type": "object"},
                                              "modelVersion": {"type": "string"},
                                              "responseId": {"type": "string"}}},
            "GeminiChunk": _object({"candidates": {"type": "array"}},
                                   {"usageMetadata": _AN_OBJECT, "modelVersion": _A_STRING,
                                    "responseId": _A_STRING}),
            "GeminiTokens": {"type": "object",
                             "properties": {"totalTokens": {"type": "integer"}}},
            "GeminiModel": {"type": "object", "properties": {
                "name": {"type": "string"}, "displayName": {"type": "string"},
                "supportedGenerationMethods": {"type": "array"}}},
            "GeminiModelList": {"type": "object", "properties": {
                "models": {"type": "array", "items": _ref("GeminiModel")}}},
        }

    def credential(self, request):
        key = request.headers.get("x-goog-api-key")
        if key is None and request.query:
            key = urllib.parse.parse_qs(request.query).get("key", [None])[-1]
        return key

    def error_body(self, error, status, retry_ms):
        body = {"error": {"code": status, "message": error.message,
                          "status": self.error_type(error, status)}}
        if retry_ms is not None and status == 429:  # how Google's clients learn the delay
            body["error"]["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                                         "retryDelay": f"{retry_ms / 1000:g}s"}]
        return body

    def stream_framing(self, call):
        return _SSE if call.options["sse"] else _JSON_ARRAY

    @staticmethod
    def messages(values):
        """The conversation as text messages (see _Surface.call), the system
        instruction first; a functionResponse part is a tool's result."""
        contents = ([dict(values["systemInstruction"], role="system")]
                    if values.get("systemInstruction") else [])
        messages = []
        for content in contents + values["contents"]:
            results = [part["functionResponse"] for part in content["parts"]
                       if isinstance(part.get("functionResponse"), dict)]
            messages.extend({"role": "tool", "content": json.dumps(result.get("response")),
                             "tool": result.get("name")} for result in results)
            if not results:
                role = content.get("role", "user")
                messages.append({"role": {"model": "assistant"}.get(role, role),
                                 "content": _content_text(content["parts"])})
        return messages

    @staticmethod
    def tools(values):
        """The functionDeclarations of the request's tools, and the one it forces."""
        declared = {}
        for index, tool in enumerate(values["tools"]):
            declared.update(_tool_table(tool.get("functionDeclarations"),
                                        f"tools[{index}].functionDeclarations",
                                        # google-genai 3.6 writes the last
                                        schema_keys=("parameters", "parametersJsonSchema",
                                                     "parameters_json_schema")))
        calling = values["toolConfig"].get("functionCallingConfig", {})
        forced = None
        if calling.get("mode") == "ANY":
            allowed = calling.get("allowedFunctionNames") or ("any",)
            forced = (allowed[0], "toolConfig.functionCallingConfig.allowedFunctionNames[0]")
        return declared, forced

    @staticmethod
    def output(generation):
        """(JSON Schema, field) of the structured output a request asks for."""
        for key in ("responseJsonSchema", "responseSchema"):
            if generation.get(key) is not None:
                return generation[key], "generationConfig." + key
        if generation.get("responseMimeType") == "application/json":
            return True, "generationConfig.responseMimeType"
        return None

    def parse(self, request, config):
        values = _with_defaults(_given(_json_body(request), self.REQUEST, None), self.REQUEST,
                                config)
        generation = values["generationConfig"]
        tools, forced = self.tools(values)
        if not config.lenient:
            self.check_conversation(values["contents"])
        thinking = generation.get("thinkingConfig", {})
        return self.call(request, config, model=request.params["model"],
                         messages=self.messages(values),
                         stream=request.path.endswith(":streamGenerateContent"),
                         max_tokens=generation.get("maxOutputTokens"),
                         stop=generation.get("stopSequences", ()), user=None,
                         timeout_ms=values["timeout_ms"], simulate=values["simulate"],
                         tools=tools, forced=forced, output=self.output(generation),
                         reasoning=bool(thinking.get("includeThoughts")
                                        or (thinking.get("thinkingBudget") or 0) > 0
                                        or thinking.get("thinkingLevel")),
                         thoughts=thinking.get("includeThoughts", False),
                         sse=request.args.get("alt") == "sse")

    @staticmethod
    def check_conversation(contents):
        """Refuse what Gemini refuses of a conversation (see --lenient): a
        turn of function responses that does not follow a turn of function
        calls, or answers a different number of them."""
        def calls(content):
            return sum(isinstance(part.get("functionCall"), dict) for part in content["parts"])
        for index, content in enumerate(contents):
            answers = sum(isinstance(part.get("functionResponse"), dict)
                          for part in content["parts"])
            if not answers:
                continue
            asked = calls(contents[index - 1]) if index else 0
            if not asked:
                raise ApiError("ORPHAN_TOOL_RESULT", "Please ensure that function response "
                               "turn comes immediately after a function call turn.",
                               f"contents[{index}]")
            if answers != asked:
                raise ApiError("UNANSWERED_TOOL_CALL", "Please ensure that the number of "
                               "function response parts is equal to the number of function "
                               "call parts of the function call turn.", f"contents[{index}]")

    @staticmethod
    def response(call, response_id, parts, finish=None, reply=None):
        candidate = {"content": {"role": "model", "parts": parts}, "index": 0}
        body = {"candidates": [candidate]}
        if finish is not None:
            candidate["finishReason"] = finish
            thoughts = _reasoning_tokens(reply)
            body["usageMetadata"] = {
                "promptTokenCount": reply.prompt_tokens,
                "candidatesTokenCount": reply.completion_tokens - thoughts,
                "totalTokenCount": reply.prompt_tokens + reply.completion_tokens}
            if thoughts:
                body["usageMetadata"]["thoughtsTokenCount"] = thoughts
        body.update(modelVersion=call.model, responseId=response_id)
        return body

    @staticmethod
    def function_call(call):
        return {"functionCall": {"id": call["id"], "name": call["name"],
                                 "args": _arguments_object(call)}}

    @staticmethod
    def signed(call, reply, part, first=True):
        """A part; after thoughts, the first one carries their signature."""
        if reply.reasoning and first:
            part["thoughtSignature"] = _signature(call.spec.seed, reply.reasoning)
        return part

    def answer(self, call, reply, created):
        parts = ([{"text": reply.text}] if reply.tool_calls is None else
                 [self.function_call(tool_call) for tool_call in reply.tool_calls])
        parts[0] = self.signed(call, reply, parts[0])
        if reply.reasoning and call.options["thoughts"]:
            parts.insert(0, {"text": reply.reasoning, "thought": True})
        return self.response(call, _random_hex(24), parts, self.finish[reply.end], reply)

    # Its stream: a response per piece of thought (when asked) and of text,
    # a function call whole; the thoughts' signature on the first call, or
    # on the last part, empty, of a text.

    def begin_stream(self, render):
        render.id = _random_hex(24)

    def thought_part(self, render, text):
        if render.call.options["thoughts"]:
            return self.response(render.call, render.id, [{"text": text, "thought": True}])
        return None

    def text_part(self, render, text):
        return self.response(render.call, render.id, [{"text": text}])

    def call_part(self, render, index):
        return self.response(render.call, render.id, [self.signed(
            render.call, render.reply, self.function_call(render.reply.tool_calls[index]),
            index == 0)])

    def last_part(self, render, piece):
        reply = render.reply
        return self.response(render.call, render.id, [self.signed(
            render.call, reply, {"text": ""}, reply.tool_calls is None)],
            self.finish[reply.end], reply)

    stream_events = {
        "open": (), "arguments": (), "call_done": (),
        "thought": ((None, thought_part, "GeminiChunk"),),
        "piece": ((None, text_part, "GeminiChunk"),),
        "call": ((None, call_part, "GeminiChunk"),),
        "close": ((None, last_part, "GeminiResponse"),),
        "error": ((None, _Surface.error_event, "GoogleError"),),
    }
    framings = (_JSON_ARRAY, _SSE)

    def model(self, model_id):
        return {"name": "models/" + model_id, "version": "001", "displayName": model_id,
                "inputTokenLimit": 1_048_576, "outputTokenLimit": 65_536,
                "supportedGenerationMethods": ["generateContent", "streamGenerateContent",
                                               "countTokens"]}

    @_api("Gemini: count a request's tokens", request="GeminiCountRequest",
          answers={200: "GeminiTokens"}, query=QUERY)
    def count_tokens(self, app, request):
        values = _with_defaults(_given(_json_body(request), self.COUNT_REQUEST, None),
                                self.COUNT_REQUEST, app.config)
        return _Answer(200, {"totalTokens": sum(_tokens(message["content"])
                                                for message in self.messages(values))})

    @_api("Gemini: the models (every name is served)", answers={200: "GeminiModelList"},
          query=QUERY)
    def list_models(self, app, request):
        return _Answer(200, {"models": [self.model("gemini-dummyllm")]})

    @_api("Gemini: a model (every name is served)", answers={200: "GeminiModel"}, query=QUERY)
    def get_model(self, app, request):
        return _Answer(200, self.model(request.params["model"]))

    REFUSES = {"toolConfig": _FORCES_AN_UNOFFERED_TOOL, "tools": _UNDRAWABLE_SCHEMA,
               "contents": _REFUSED_CONVERSATION,
               "generationConfig.responseJsonSchema": _UNDRAWABLE_SCHEMA,
               "generationConfig.responseSchema": _UNDRAWABLE_SCHEMA}
    CALLS = (("generateContent", _model_call, _model_api(
                  "Gemini: generate content", "GeminiRequest",
                  {200: "GeminiResponse", 429: None, 500: None, 503: None, 504: None}, QUERY,
                  streams=False, refuses=REFUSES)),
             ("streamGenerateContent", _model_call, _model_api(
                 "Gemini: generate content as a stream (?alt=sse for server-sent events)",
                 "GeminiRequest", {200: None, 429: None}, QUERY, refuses=REFUSES)),
             ("countTokens", count_tokens, None))
    routes = (
        *(_route("POST", f"{version}/models/{{model}}:{call}", handler, api=api)
          for version, (call, handler, api) in itertools.product(("/v1beta", "/v1"), CALLS)),
        _route("GET", "/v1beta/models", list_models),
        _route("GET", "/v1beta/models/{model}", get_model),
    )


_GEMINI = _Gemini()


# --- Surfaces: Ollama -------------------------------------------------------------

_OLLAMA_OPTIONS = {
    "num_predict": _Field(_Int(-2, 10_000_000), None,
                          "Cut the reply to this many tokens (done_reason length)."),
    "stop": _Field(_Check(_check_strings, _STRINGS_SCHEMA), (),
                   "The reply ends before the first of these it meets."),
}


def _check_ollama_format(value, field):
    if value not in ("", "json") and not isinstance(value, dict):
        raise _ValidationError(field, 'must be "json" or a JSON Schema')
    return value


class _Ollama(_Surface):
    """Ollama's API: chat and generate (streamed as NDJSON unless "stream":
    false), embed and the older embeddings, and the model list, show, ps and
    version.  Errors are {"error": message}."""

    name = "ollama"
    title = "Ollama"
    sdk_environ = {"OLLAMA_HOST": ""}
    keyed = True
    error_schema = "OllamaError"
    validation_status = 400
    finish = {"end": "stop", "max_tokens": "length", "stop_sequence": "stop",
              "tool_calls": "stop"}
    framing = _NDJSON
    quota_header = None  # Ollama tells no quota
    VERSION = "0.12.0"
    MODEL = "dummyllm:latest"
    COMMON = {
        "model": _MODEL,
        "stream": _Field(_Bool(), True, "NDJSON lines as the reply grows (default true)."),
        "options": _Field(_Check(lambda value, field: _given(value, _OLLAMA_OPTIONS, field),
                                 _object_schema(_OLLAMA_OPTIONS)), {}, None),
        "format": _Field(_Check(_check_ollama_format, {"oneOf": [
            {"enum": ["", "json"]}, {"type": "object"}]}), "",
            "json, or a JSON Schema: the reply is JSON valid against it."),
        "keep_alive": _Field(_Check(lambda value, field: value, {}), None, "Accepted."),
        **_EXTENSIONS,
    }
    CHAT = {**COMMON, "messages": _Field(_Check(lambda value, field: _check_messages(
        value, field, allow_empty=True), _MESSAGES_SCHEMA), [], "The conversation."),
            "tools": _Field(_TOOLS, (), "Functions the reply may call.")}
    GENERATE = {**COMMON, "prompt": _Field(_Text(), "", "The prompt."),
                "system": _Field(_Text(), None, "A system prompt.")}
    EMBED = {"model": COMMON["model"],
             "input": _Field(_Check(lambda value, field: [value] if isinstance(value, str) else
                                    _check_strings(value, field), _string_or_strings()),
                             _REQUIRED, "A string or strings."),
             "dimensions": _Field(_DIMENSIONS, 1536, "Length of each vector."),
             "truncate": _Field(_Bool(), True, "Accepted."),
             **_pick(COMMON, "options", "keep_alive", "timeout_ms", "simulate")}
    EMBEDDINGS = {"model": COMMON["model"], "prompt": _Field(_Text(), _REQUIRED, "The text."),
                  **_pick(COMMON, "options", "keep_alive", "timeout_ms", "simulate")}
    KINDS = {"chat": CHAT, "generate": GENERATE, "embed": EMBED, "embeddings": EMBEDDINGS}
    SHOW = {"model": _Field(_Text(non_empty=True), None, "The model."),
            "name": _Field(_Text(non_empty=True), None, "The model, by its older name.")}

    def schemas(self):
        return {
            "OllamaError": {"type": "object", "required": ["error"],
                            "properties": {"error": {"type": "string"}}},
            "OllamaChat": _object_schema(self.CHAT, example={
                "model": "llama3.2", "messages": [{"role": "user", "content": "Hello"}],
                "stream": False}),
            "OllamaGenerate": _object_schema(self.GENERATE, example={
                "model": "llama3.2", "prompt": "Hello", "stream": False}),
            "OllamaEmbed": _object_schema(self.EMBED, example={"model": "nomic-embed-text",
                                                               "input": "Hello"}),
            "OllamaEmbeddings": _object_schema(self.EMBEDDINGS, example={
                "model": "nomic-embed-text", "prompt": "Hello"}),
            "OllamaAnswer": {"type": "object", "properties": {
                "model": {"type": "string"}, "created_at": {"type": "string"},
                "done": {"type": "boolean"}}},
            "OllamaShow": dict(_object_schema(self.SHOW, example={"model": "llama3.2"}),
                               anyOf=[{"required": [key], "properties": {key: _A_STRING}}
                                      for key in self.SHOW]),
            "OllamaLine": _object({"model": _A_STRING, "created_at": _A_STRING,
                                   "done": {"type": "boolean"}},
                                  {"message": _AN_OBJECT, "response": _A_STRING}),
            "OllamaModels": {"type": "object", "properties": {"models": {"type": "array"}}},
        }

    def error_body(self, error, status, retry_ms):
        return {"error": error.message}

    def parse(self, request, config):
        """A call to /api/chat, /api/generate, /api/embed or /api/embeddings."""
        kind = request.path.rsplit("/", 1)[1]
        fields = self.KINDS[kind]
        values = _with_defaults(_given(_json_body(request), fields, None), fields, config)
        options = values["options"]
        tools = output = None
        if kind in ("chat", "generate") and values["format"] != "":
            output = (True if values["format"] == "json" else values["format"]), "format"
        if kind == "chat":
            messages = _text_messages(values["messages"])
            tools = _tool_table(values["tools"], "tools", "function")
        elif kind == "generate":
            messages = [{"role": "user", "content": values["prompt"]}]
            if values["system"] is not None:
                messages.insert(0, {"role": "system", "content": values["system"]})
        else:
            texts = values["input"] if kind == "embed" else [values["prompt"]]
            messages = [{"role": "user", "content": text} for text in texts]
        max_tokens = options.get("num_predict")
        return self.call(request, config, model=values["model"], messages=messages,
                         stream=values.get("stream", False),
                         max_tokens=max_tokens if max_tokens and max_tokens > 0 else None,
                         stop=options.get("stop", ()), user=None,
                         timeout_ms=values["timeout_ms"], simulate=values["simulate"], kind=kind,
                         tools=tools, output=output, dimensions=values.get("dimensions", 1536))

    @staticmethod
    def created_at(created):
        return time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime(created))

    def line(self, call, created, text, done=False, tool_calls=None):
        """One answer object: chat's message or generate's response."""
        body = {"model": call.model, "created_at": self.created_at(created)}
        if call.options["kind"] == "generate":
            body["response"] = text
        else:
            body["message"] = {"role": "assistant", "content": text}
            if tool_calls:
                body["message"]["tool_calls"] = [
                    {"id": tool_call["id"], "function": {
                        "index": index, "name": tool_call["name"],
                        "arguments": _arguments_object(tool_call)}}
                    for index, tool_call in tool_calls]
        body["done"] = done
        return body

    def final(self, call, reply, created, text, streamed_ms, tool_calls=None):
        """The last object, with the counts and durations (in ns) of the
        simulated timing: the prompt took the time to the first token, the
        reply token_ms a token."""
        eval_ms = streamed_ms if call.stream else min(
            reply.elapsed_ms, reply.gap.total(reply.completion_tokens + 1))
        nanoseconds = 1_000_000
        body = self.line(call, created, text, done=True, tool_calls=tool_calls)
        total, evaluated = (round(ms * nanoseconds) for ms in (reply.elapsed_ms + streamed_ms,
                                                                eval_ms))
        body.update(done_reason=self.finish[reply.end], total_duration=total,
                    load_duration=0, prompt_eval_count=reply.prompt_tokens,
                    prompt_eval_duration=max(0, total - max(1, evaluated)),
                    eval_count=reply.completion_tokens, eval_duration=max(1, evaluated))
        if call.options["kind"] == "generate":
            body["context"] = []
        return body

    def answer(self, call, reply, created):
        kind, texts = call.options["kind"], [message["content"] for message in
                                             call.spec.args["messages"]]
        if kind == "embeddings":
            return {"embedding": _embedding(call.model, texts[0], 1536, call.spec.embedding)}
        if kind == "embed":
            return {"model": call.model, "total_duration": reply.elapsed_ms * 1_000_000,
                    "load_duration": 0, "prompt_eval_count": reply.prompt_tokens,
                    "embeddings": [_embedding(call.model, text, call.options["dimensions"],
                                              call.spec.embedding)
                                   for text in texts]}
        return self.final(call, reply, created, reply.text, 0,
                          list(enumerate(reply.tool_calls or ())))

    # Its stream: a line per piece of text, a tool call whole, then the
    # final line with the counts.

    def text_line(self, render, text):
        return self.line(render.call, render.created, text)

    def call_line(self, render, index):
        return self.line(render.call, render.created, "",
                         tool_calls=[(index, render.reply.tool_calls[index])])

    def final_line(self, render, piece):
        streamed_ms = render.reply.gap.total(_piece_count(render.reply))
        return self.final(render.call, render.reply, render.created, "", streamed_ms)

    stream_events = {
        "open": (), "arguments": (), "call_done": (),
        "piece": ((None, text_line, "OllamaLine"),),
        "call": ((None, call_line, "OllamaLine"),),
        "close": ((None, final_line, "OllamaLine"),),
        "error": ((None, _Surface.error_event, "OllamaError"),),
    }

    def model(self, name=None):
        return {"name": name or self.MODEL, "model": name or self.MODEL,
                "modified_at": "2026-01-01T00:00:00Z", "size": 0,
                "digest": hashlib.sha256((name or self.MODEL).encode()).hexdigest(),
                "details": {"format": "gguf", "family": "dummyllm", "parameter_size": "0B",
                            "quantization_level": "none"}}

    @_api("Ollama: the local models", answers={200: "OllamaModels"})
    def tags(self, app, request):
        return _Answer(200, {"models": [self.model()]})

    @_api("Ollama: the running models", answers={200: "OllamaModels"})
    def running(self, app, request):
        return _Answer(200, {"models": [dict(self.model(), expires_at="2099-01-01T00:00:00Z",
                                             size_vram=0)]})

    @_api("Ollama: a model's details (every name is served)", request="OllamaShow",
          answers={200: "OllamaAnswer"})
    def show(self, app, request):
        values = _given(_json_body(request), self.SHOW, None)
        name = values.get("model", values.get("name"))
        if name is None:
            raise _ValidationError("model", "is required")
        model = self.model(name)
        return _Answer(200, {"modelfile": f"FROM {name}", "parameters": "",
                             "template": "{{ .Prompt }}", "details": model["details"],
                             "model_info": {}, "capabilities": ["completion", "tools", "embedding"],
                             "modified_at": model["modified_at"]})

    @_api("Ollama: the server's version", answers={200: "OllamaAnswer"})
    def version(self, app, request):
        return _Answer(200, {"version": self.VERSION})

    routes = (
        _route("POST", "/api/chat", _model_call, api=_model_api(
            "Ollama chat (NDJSON lines unless stream is false)", "OllamaChat",
            {200: "OllamaAnswer"})),
        _route("POST", "/api/generate", _model_call, api=_model_api(
            "Ollama generate (NDJSON lines unless stream is false)", "OllamaGenerate",
            {200: "OllamaAnswer"})),
        _route("POST", "/api/embed", _model_call, api=_model_api(
            "Ollama embed: the vectors of /v1/embeddings", "OllamaEmbed", {200: "OllamaAnswer"},
            streams=False)),
        _route("POST", "/api/embeddings", _model_call, api=_model_api(
            "Ollama embeddings (the older call)", "OllamaEmbeddings", {200: "OllamaAnswer"},
            streams=False)),
        _route("GET", "/api/tags", tags),
        _route("POST", "/api/show", show),
        _route("GET", "/api/ps", running),
        _route("GET", "/api/version", version),
    )


_OLLAMA = _Ollama()


# --- Surfaces: Cohere -------------------------------------------------------------
# Cohere's v2 chat, as cohere.ClientV2 speaks it: OpenAI-like messages and
# tools, its own answer, finish reasons and stream events.

_COHERE_THINKING = {
    "type": _Field(_Choice("enabled", "disabled"), _REQUIRED,
                   "enabled: the reply begins with a thinking content item."),
    "token_budget": _Field(_Int(1, 10_000_000), None, "Accepted."),
}
_COHERE_FORMAT = {
    "type": _Field(_Choice("text", "json_object"), "text",
                   "json_object: the reply is JSON, valid against json_schema when given."),
    "json_schema": _Field(_JSON_SCHEMA, None, "The reply's JSON Schema."),
}


class _Cohere(_Surface):
    """Cohere's v2 chat: a message, or its events (message-start,
    content-start/-delta/-end, tool-call-start/-delta/-end, message-end).
    Errors are {"id", "message"}; error_after ends the stream with
    message-end whose finish_reason is ERROR, as Cohere does."""

    name = "cohere"
    title = "Cohere chat"
    keyed = True
    error_schema = "CohereError"
    validation_status = 400
    finish = {"end": "COMPLETE", "max_tokens": "MAX_TOKENS", "stop_sequence": "STOP_SEQUENCE",
              "tool_calls": "TOOL_CALL"}
    framing = _NAMED_SSE
    sdk_environ = {"CO_API_URL": "", "CO_API_KEY": None}
    quota_header = None  # Cohere tells the wait alone
    REQUEST = {
        "model": _MODEL,
        "messages": _Field(_Check(_check_messages, dict(_MESSAGES_SCHEMA, minItems=1)),
                           _REQUIRED, "The conversation; the last user message feeds the reply."),
        "stream": _Field(_Bool(), False, "Answer as server-sent events."),
        "max_tokens": _Field(_Int(1, 10_000_000), None,
                             "Cut the reply to this many tokens (finish_reason MAX_TOKENS)."),
        "stop_sequences": _Field(_Check(_check_strings, _STRINGS_SCHEMA), (),
                                 "The reply ends before the first of these it meets."),
        "tools": _Field(_TOOLS, (), "Functions the reply may call."),
        "tool_choice": _Field(_Choice("REQUIRED", "NONE"), None,
                              "REQUIRED: the reply calls a tool (the first), with arguments "
                              "drawn from its parameters."),
        "response_format": _Field(_Check(lambda value, field: _with_defaults(
            _given(value, _COHERE_FORMAT, field), _COHERE_FORMAT, None, field),
            _object_schema(_COHERE_FORMAT)), None, "json_object: the reply is JSON."),
        "thinking": _Field(_Check(lambda value, field: _with_defaults(
            _given(value, _COHERE_THINKING, field), _COHERE_THINKING, None, field),
            _object_schema(_COHERE_THINKING)), None,
                           "enabled: the model reasons first (simulate.reasoning sets how long)."),
        **_EXTENSIONS,
    }

    def schemas(self):
        return {
            "CohereError": _object({"message": _A_STRING}, {"id": _A_STRING}),
            "CohereRequest": _object_schema(self.REQUEST, example={
                "model": "command-a-03-2025", "messages": [{"role": "user", "content": "Hello"}],
                "simulate": {"latency_ms": 300}}),
            "CohereResponse": _object({"id": _A_STRING, "finish_reason": _A_STRING,
                                       "message": _AN_OBJECT, "usage": _AN_OBJECT}),
            "CohereEvent": _object({"type": _A_STRING}, {"id": _A_STRING, "index": _AN_INTEGER,
                                                         "delta": _AN_OBJECT}),
        }

    def error_body(self, error, status, retry_ms):
        return {"id": _uuid(random.random), "message": error.message}

    def parse(self, request, config):
        values = _with_defaults(_given(_json_body(request), self.REQUEST, None), self.REQUEST,
                                config)
        output = values["response_format"] or {"type": "text"}
        return self.call(request, config, model=values["model"],
                         messages=_text_messages(values["messages"]), stream=values["stream"],
                         max_tokens=values["max_tokens"], stop=values["stop_sequences"],
                         user=None, timeout_ms=values["timeout_ms"], simulate=values["simulate"],
                         tools=_tool_table(values["tools"], "tools", "function"),
                         forced=("any", "tool_choice") if values["tool_choice"] == "REQUIRED"
                         else None,
                         output=((True if output["json_schema"] is None else
                                  output["json_schema"], "response_format")
                                 if output["type"] == "json_object" else None),
                         reasoning=(values["thinking"] or {}).get("type") == "enabled")

    @staticmethod
    def tool_call(call, arguments=None):
        return {"id": call["id"], "type": "function", "function": {
            "name": call["name"],
            "arguments": _arguments_text(call) if arguments is None else arguments}}

    @staticmethod
    def usage(reply):
        tokens = {"input_tokens": reply.prompt_tokens, "output_tokens": reply.completion_tokens}
        return {"billed_units": tokens, "tokens": tokens}

    def answer(self, call, reply, created):
        message = {"role": "assistant"}
        if reply.tool_calls is None:
            message["content"] = [{"type": "text", "text": reply.text}]
        else:
            message["tool_calls"] = [self.tool_call(tool_call) for tool_call in reply.tool_calls]
        if reply.reasoning:
            message.setdefault("content", []).insert(0, {"type": "thinking",
                                                         "thinking": reply.reasoning})
        return {"id": _uuid(random.random),
                "finish_reason": self.finish[reply.end], "message": message,
                "usage": self.usage(reply)}

    # Its stream: the thinking item first if the model reasons, then the
    # text item, or a tool call each (started with its id and name, then its
    # arguments in pieces).

    def begin_stream(self, render):
        render.id = _uuid(random.random)

    def message_start(self, render, piece):
        return {"type": "message-start", "id": render.id, "delta": {"message": {
            "role": "assistant", "content": [], "tool_plan": "", "tool_calls": [],
            "citations": []}}}

    def content_start(self, render, kind, index):
        return {"type": "content-start", "index": index,
                "delta": {"message": {"content": {"type": kind, kind: ""}}}}

    def first_start(self, render, piece):
        if render.reply.reasoning:
            return self.content_start(render, "thinking", 0)
        return self.text_start(render, piece)

    def text_start(self, render, piece):
        if render.reply.tool_calls is None:
            return self.content_start(render, "text", _after_reasoning(render))
        return None

    def thinking_delta(self, render, text):
        return {"type": "content-delta", "index": 0,
                "delta": {"message": {"content": {"thinking": text}}}}

    def thinking_end(self, render, piece):
        return {"type": "content-end", "index": 0}

    def text_delta(self, render, text):
        return {"type": "content-delta", "index": _after_reasoning(render),
                "delta": {"message": {"content": {"text": text}}}}

    def text_end(self, render, piece):
        if render.reply.tool_calls is None:
            return {"type": "content-end", "index": _after_reasoning(render)}
        return None

    def call_start(self, render, index):
        return {"type": "tool-call-start", "index": index, "delta": {"message": {
            "tool_calls": self.tool_call(render.reply.tool_calls[index], "")}}}

    def arguments_delta(self, render, piece):
        index, text = piece
        return {"type": "tool-call-delta", "index": index,
                "delta": {"message": {"tool_calls": {"function": {"arguments": text}}}}}

    def call_end(self, render, index):
        return {"type": "tool-call-end", "index": index}

    def message_end(self, render, piece):
        return {"type": "message-end", "delta": {"finish_reason": self.finish[render.reply.end],
                                                  "usage": self.usage(render.reply)}}

    def error_event(self, render, piece):
        return {"type": "message-end", "delta": {"finish_reason": "ERROR",
                                                  "error": render.simulated_error().message}}

    stream_events = {
        "open": (("message-start", message_start, "CohereEvent"),
                 ("content-start", first_start, "CohereEvent")),
        "thought": (("content-delta", thinking_delta, "CohereEvent"),),
        "thought_done": (("content-end", thinking_end, "CohereEvent"),
                         ("content-start", text_start, "CohereEvent")),
        "piece": (("content-delta", text_delta, "CohereEvent"),),
        "call": (("tool-call-start", call_start, "CohereEvent"),),
        "arguments": (("tool-call-delta", arguments_delta, "CohereEvent"),),
        "call_done": (("tool-call-end", call_end, "CohereEvent"),),
        "close": (("content-end", text_end, "CohereEvent"),
                  ("message-end", message_end, "CohereEvent")),
        "error": (("message-end", error_event, "CohereEvent"),),
    }

    routes = (
        _route("POST", "/v2/chat", _model_call, api=_model_api(
            "Cohere v2 chat: a message, streamed or not", "CohereRequest",
            {200: "CohereResponse", **_MODEL_ERRORS},
            refuses={"tool_choice": _FORCES_AN_UNOFFERED_TOOL, "tools": _UNDRAWABLE_SCHEMA,
                     "response_format": _UNDRAWABLE_SCHEMA})),
    )


_COHERE = _Cohere()


# --- Surfaces: Amazon Bedrock -----------------------------------------------------
# Bedrock Runtime as boto3's bedrock-runtime client calls it: the Converse API
# (one format for every model) and InvokeModel with Anthropic's own bodies,
# each streamed in AWS's binary event stream.  A message of that stream is a
# prelude (its total length and its headers' length, 4 bytes each) and the
# prelude's CRC32, the headers (:event-type or :exception-type, :content-type,
# :message-type), a JSON payload, and the CRC32 of all that.  Requests come
# signed with SigV4, which is not checked: --api-key does not apply.

def _eventstream_message(headers, payload):
    """One message of AWS's event stream: headers ((name, text value), ...)
    and a payload."""
    head = b"".join(struct.pack(">B", len(name)) + name.encode() + struct.pack(
        ">BH", 7, len(value.encode())) + value.encode() for name, value in headers)
    prelude = struct.pack(">II", 16 + len(head) + len(payload), len(head))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + head + payload
    return message + struct.pack(">I", zlib.crc32(message))


def _eventstream_event(render, name, data):
    """A stream event as an event stream message: an exception's when its
    name is one (modelStreamErrorException...), else an event's."""
    kind = "exception" if name.endswith("Exception") else "event"
    return _eventstream_message(((f":{kind}-type", name), (":content-type", "application/json"),
                                 (":message-type", kind)), data)


def _eventstream_chunk(render, name, data):
    """InvokeModel's stream: each event of the model's own stream as a
    chunk, its JSON in base64 (exceptions as they are)."""
    if name.endswith("Exception"):
        return _eventstream_event(render, name, data)
    return _eventstream_event(render, "chunk", _json_bytes(
        {"bytes": base64.b64encode(data).decode()}))


_EVENTSTREAM = _Framing("application/vnd.amazon.eventstream", _eventstream_event, b"", b"")
_EVENTSTREAM_CHUNKS = _EVENTSTREAM._replace(event=_eventstream_chunk)


class _BedrockErrors:
    """Bedrock's errors, which botocore raises by the x-amzn-ErrorType
    header: {"message"} in the body, the exception's name in the header, its
    status Bedrock's own."""

    error_schema = "BedrockError"
    keyed = False
    validation_status = 400
    overloaded_status = 503
    quota_header = None
    error_types = {
        "VALIDATION_ERROR": "ValidationException", "INVALID_JSON": "ValidationException",
        "CONTEXT_LENGTH_EXCEEDED": "ValidationException", "NOT_FOUND": "ResourceNotFoundException",
        "TIMEOUT": "ModelTimeoutException", "QUOTA_EXHAUSTED": "ServiceQuotaExceededException",
        401: "AccessDeniedException", 403: "AccessDeniedException", 429: "ThrottlingException",
        503: "ServiceUnavailableException", 529: "ServiceUnavailableException",
        "4xx": "ValidationException", "5xx": "InternalServerException",
    }
    # The status of each exception, where Bedrock's differs from the error's.
    STATUS = {"ModelTimeoutException": 408, "ServiceQuotaExceededException": 400}
    stream_error = ("SIM_FAIL", "simulated stream error")
    answer_headers = ("x-amzn-RequestId", "x-amzn-ErrorType")
    sdk_environ = {"AWS_ENDPOINT_URL_BEDROCK_RUNTIME": "", "AWS_ACCESS_KEY_ID": None,
                   "AWS_SECRET_ACCESS_KEY": None, "AWS_DEFAULT_REGION": None}

    def schemas(self):
        return {"BedrockError": {"type": "object", "required": ["message"],
                                 "properties": {"message": {"type": "string"}}}}

    def error(self, error, retry_ms, now_ms, note=None):
        status, body, headers = _Surface.error(self, error, retry_ms, now_ms)
        kind = self.error_type(error, status)
        return self.STATUS.get(kind, status), body, headers + (
            ("x-amzn-ErrorType", kind), ("x-amzn-RequestId", _uuid(random.random)))

    def error_body(self, error, status, retry_ms):
        return {"message": error.message}

    def error_event(self, render, piece):
        """modelStreamErrorException: the model's error, with its status."""
        error = render.simulated_error()
        return {"message": error.message, "originalStatusCode": error.status,
                "originalMessage": error.message}

    @staticmethod
    def model(request):
        return urllib.parse.unquote(request.params["modelId"])


def _check_converse_messages(value, field):
    if not isinstance(value, list) or not value:
        raise _ValidationError(field, "must be a non-empty array of messages")
    for index, message in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise _ValidationError(where + ".role", 'must be "user" or "assistant"')
        content = message.get("content")
        if not isinstance(content, list) or not all(isinstance(block, dict) and len(block) == 1
                                                    for block in content):
            raise _ValidationError(where + ".content", "must be an array of content blocks, "
                                   "each an object with one member (text, toolUse...)")
    return value


_CONVERSE_MESSAGES_SCHEMA = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": ["user", "assistant"]}, "content": {"type": "array", "items": {
            "type": "object", "minProperties": 1, "maxProperties": 1}}}}}
_INFERENCE_CONFIG = {
    "maxTokens": _Field(_Int(1, 10_000_000), None, "Cut the reply to this many tokens."),
    "temperature": _Field(_Number(0, 1), None, "Accepted."),
    "topP": _Field(_Number(0, 1), None, "Accepted."),
    "stopSequences": _Field(_Check(_check_strings, _STRINGS_SCHEMA), (),
                            "The reply ends before the first of these it meets."),
}


class _BedrockConverse(_BedrockErrors, _Surface):
    """Bedrock's Converse API: a message, or its event stream (see the banner
    above).  Mode overloaded answers 503 ServiceUnavailableException, timeout
    408 ModelTimeoutException; error_after sends a modelStreamErrorException."""

    name = "bedrock.converse"
    title = "Amazon Bedrock: Converse"
    finish = {"end": "end_turn", "max_tokens": "max_tokens", "stop_sequence": "stop_sequence",
              "tool_calls": "tool_use"}
    framing = _EVENTSTREAM
    REQUEST = {
        "messages": _Field(_Check(_check_converse_messages, _CONVERSE_MESSAGES_SCHEMA),
                           _REQUIRED, "The conversation; the last user message feeds the reply."),
        "system": _Field(_objects("system block"), (), "System prompts: [{\"text\": ...}]."),
        "inferenceConfig": _Field(_Check(lambda value, field: _with_defaults(
            _given(value, _INFERENCE_CONFIG, field), _INFERENCE_CONFIG, None, field),
            _object_schema(_INFERENCE_CONFIG)), None, "maxTokens, stopSequences..."),
        "toolConfig": _Field(_OBJECT, None, "tools ([{\"toolSpec\": {name, inputSchema: "
                             "{json}}}]) and toolChoice (auto, any, or a named tool: the "
                             "reply uses it, with input drawn from its schema)."),
        **{name: _Field(_Check(lambda value, field: value, {}), None, "Accepted.") for name in (
            "additionalModelRequestFields", "additionalModelResponseFieldPaths",
            "guardrailConfig", "promptVariables", "requestMetadata", "performanceConfig",
            "serviceTier", "outputConfig")},
        **_EXTENSIONS,
    }

    def schemas(self):
        event = {"type": "object"}
        return {**super().schemas(),
                "BedrockConverseRequest": _object_schema(self.REQUEST, example={
                    "messages": [{"role": "user", "content": [{"text": "Hello"}]}],
                    "inferenceConfig": {"maxTokens": 256}}),
                "BedrockConverseResponse": {"type": "object", "required": [
                    "output", "stopReason", "usage", "metrics"], "properties": {
                    "output": {"type": "object"}, "stopReason": {"type": "string"},
                    "usage": {"type": "object"}, "metrics": {"type": "object"}}},
                **dict.fromkeys(("BedrockMessageStart", "BedrockBlockStart", "BedrockBlockDelta",
                                 "BedrockBlockStop", "BedrockMessageStop", "BedrockMetadata",
                                 "BedrockStreamError"), event)}

    @staticmethod
    def messages(values):
        """The conversation as text messages (see _Surface.call), the system
        prompts first; a toolResult block is a tool's result."""
        messages, names = [], {}
        if values["system"]:
            messages.append({"role": "system", "content": " ".join(
                block["text"] for block in values["system"] if isinstance(block.get("text"),
                                                                          str))})
        for message in values["messages"]:
            texts = [block["text"] for block in message["content"]
                     if isinstance(block.get("text"), str)]
            for block in message["content"]:
                if isinstance(block.get("toolUse"), dict):
                    names[block["toolUse"].get("toolUseId")] = block["toolUse"].get("name")
                elif isinstance(block.get("toolResult"), dict):
                    result = block["toolResult"]
                    parts = result.get("content") if isinstance(result.get("content"), list) else []
                    messages.append({"role": "tool", "tool": names.get(result.get("toolUseId")),
                                     "content": " ".join(
                                         part["text"] if isinstance(part.get("text"), str)
                                         else json.dumps(part.get("json")) for part in parts
                                         if isinstance(part, dict))})
            if texts or not any("toolResult" in block for block in message["content"]):
                messages.append({"role": message["role"], "content": " ".join(texts)})
        return messages

    def parse(self, request, config):
        values = _with_defaults(_given(_json_body(request), self.REQUEST, None), self.REQUEST,
                                config)
        inference = values["inferenceConfig"] or _defaults(_INFERENCE_CONFIG, None)[0]
        tools, forced = self.tools(values["toolConfig"] or {})
        extra = values["additionalModelRequestFields"]
        thinking = extra.get("thinking") if isinstance(extra, dict) else None
        if not config.lenient:
            self.check_conversation(values["messages"])
        return self.call(request, config, model=self.model(request),
                         messages=self.messages(values),
                         stream=request.route.path.endswith("-stream"),
                         max_tokens=inference["maxTokens"], stop=inference["stopSequences"],
                         user=None, timeout_ms=values["timeout_ms"], simulate=values["simulate"],
                         tools=tools, forced=forced, reasoning=isinstance(thinking, dict) and (
                             thinking.get("type") in ("enabled", "adaptive")))

    @staticmethod
    def check_conversation(messages):
        """Refuse what Bedrock refuses of a conversation (see --lenient): one
        that does not start with a user message, more toolResult blocks than
        the turn before had toolUse blocks, and a toolUse the next message
        does not answer."""
        if messages[0]["role"] != "user":
            raise ApiError("VALIDATION_ERROR", "A conversation must start with a user message. "
                           "Try again with a conversation that starts with a user message.",
                           "messages")
        asked = []
        for index, message in enumerate(messages):
            blocks = message["content"]
            answered = [block["toolResult"].get("toolUseId") for block in blocks
                        if isinstance(block.get("toolResult"), dict)]
            if len(answered) > len(asked):
                raise ApiError("ORPHAN_TOOL_RESULT", f"The number of toolResult blocks at "
                               f"messages.{index}.content exceeds the number of toolUse blocks "
                               "of previous turn.", f"messages[{index}].content")
            unanswered = [tool_use_id for tool_use_id in asked if tool_use_id not in answered]
            if unanswered:
                raise ApiError("UNANSWERED_TOOL_CALL", f"Expected toolResult blocks at "
                               f"messages.{index}.content for the following Ids: "
                               + ", ".join(map(str, unanswered)), f"messages[{index}].content")
            asked = [block["toolUse"].get("toolUseId") for block in blocks
                     if isinstance(block.get("toolUse"), dict)]

    @staticmethod
    def tools(config):
        """(the tool table, the forced tool: see _Surface.call) of a toolConfig."""
        tools, choice = config.get("tools") or [], config.get("toolChoice") or {}
        if not isinstance(tools, list):
            raise _ValidationError("toolConfig.tools", "must be an array of tools")
        if not isinstance(choice, dict) or not isinstance(choice.get("tool", {}), dict):
            raise _ValidationError("toolConfig.toolChoice", "must be auto, any or a tool")
        specs = []  # each toolSpec's inputSchema.json as its schema
        for tool in tools:
            spec = tool.get("toolSpec") if isinstance(tool, dict) else None
            if isinstance(spec, dict):
                schema = spec.get("inputSchema")
                specs.append({"toolSpec": dict(spec, inputSchema=schema.get("json") if
                                               isinstance(schema, dict) else None)})
        forced = (("any", "toolConfig.toolChoice.any") if "any" in choice else
                  (choice["tool"].get("name"), "toolConfig.toolChoice.tool.name")
                  if "tool" in choice else None)
        return _tool_table(specs, "toolConfig.tools", inner="toolSpec",
                           schema_keys=("inputSchema",)), forced

    @staticmethod
    def usage(reply, output_tokens=None):
        output_tokens = reply.completion_tokens if output_tokens is None else output_tokens
        return {"inputTokens": reply.prompt_tokens, "outputTokens": output_tokens,
                "totalTokens": reply.prompt_tokens + output_tokens}

    @staticmethod
    def tool_use(call):
        return {"toolUseId": call["id"], "name": call["name"]}

    def answer(self, call, reply, created):
        content = ([{"text": reply.text}] if reply.tool_calls is None else
                   [{"toolUse": dict(self.tool_use(tool_call),
                                     input=_arguments_object(tool_call))}
                    for tool_call in reply.tool_calls])
        if reply.reasoning:
            content.insert(0, {"reasoningContent": {"reasoningText": {
                "text": reply.reasoning, "signature": _signature(call.spec.seed,
                                                                 reply.reasoning)}}})
        return {"output": {"message": {"role": "assistant", "content": content}},
                "stopReason": self.finish[reply.end], "usage": self.usage(reply),
                "metrics": {"latencyMs": round(reply.elapsed_ms)}}

    # Its stream: the reasoning's deltas in block 0 if the model reasons
    # (its text, then its signature), then text deltas in the next block, or
    # a block per tool call (started with its id and name, then its input as
    # pieces of JSON text).

    def message_start(self, render, piece):
        return {"role": "assistant"}

    def reasoning_delta(self, render, text):
        return {"contentBlockIndex": 0, "delta": {"reasoningContent": {"text": text}}}

    def signature_delta(self, render, piece):
        return {"contentBlockIndex": 0, "delta": {"reasoningContent": {
            "signature": _signature(render.call.spec.seed, render.reply.reasoning)}}}

    def text_delta(self, render, text):
        return {"contentBlockIndex": _after_reasoning(render), "delta": {"text": text}}

    def tool_start(self, render, index):
        return {"contentBlockIndex": _after_reasoning(render) + index,
                "start": {"toolUse": self.tool_use(render.reply.tool_calls[index])}}

    def input_delta(self, render, piece):
        index, text = piece
        return {"contentBlockIndex": _after_reasoning(render) + index,
                "delta": {"toolUse": {"input": text}}}

    def block_stop(self, render, index):
        return {"contentBlockIndex": index}

    def reasoning_stop(self, render, piece):
        return self.block_stop(render, 0)

    def tool_stop(self, render, index):
        return self.block_stop(render, _after_reasoning(render) + index)

    def text_block_stop(self, render, piece):
        return (self.block_stop(render, _after_reasoning(render))
                if render.reply.tool_calls is None else None)

    def message_stop(self, render, piece):
        return {"stopReason": self.finish[render.reply.end]}

    def metadata(self, render, piece):
        return {"usage": self.usage(render.reply),
                "metrics": {"latencyMs": round(render.reply.elapsed_ms)}}

    stream_events = {
        "open": (("messageStart", message_start, "BedrockMessageStart"),),
        "thought": (("contentBlockDelta", reasoning_delta, "BedrockBlockDelta"),),
        "thought_done": (("contentBlockDelta", signature_delta, "BedrockBlockDelta"),
                         ("contentBlockStop", reasoning_stop, "BedrockBlockStop")),
        "piece": (("contentBlockDelta", text_delta, "BedrockBlockDelta"),),
        "call": (("contentBlockStart", tool_start, "BedrockBlockStart"),),
        "arguments": (("contentBlockDelta", input_delta, "BedrockBlockDelta"),),
        "call_done": (("contentBlockStop", tool_stop, "BedrockBlockStop"),),
        "close": (("contentBlockStop", text_block_stop, "BedrockBlockStop"),
                  ("messageStop", message_stop, "BedrockMessageStop"),
                  ("metadata", metadata, "BedrockMetadata")),
        "error": (("modelStreamErrorException", _BedrockErrors.error_event,
                   "BedrockStreamError"),),
    }

    REFUSES = {"toolConfig": _FORCES_AN_UNOFFERED_TOOL + ", or " + _UNDRAWABLE_SCHEMA,
               "messages": _REFUSED_CONVERSATION + ", or one that does not start with a user "
                           "message"}
    routes = (
        _route("POST", "/model/{modelId}/converse", _model_call, api=_model_api(
            "Bedrock Converse: a message", "BedrockConverseRequest",
            {200: "BedrockConverseResponse", 400: None, 408: None, 429: None, 500: None,
             503: None}, streams=False, refuses=REFUSES)),
        _route("POST", "/model/{modelId}/converse-stream", _model_call, api=_model_api(
            "Bedrock ConverseStream: a message as an event stream", "BedrockConverseRequest",
            {200: None, 400: None, 408: None, 429: None, 500: None, 503: None},
            refuses=REFUSES)),
    )


_BEDROCK_CONVERSE = _BedrockConverse()


class _BedrockInvoke(_BedrockErrors, _AnthropicMessages):
    """Bedrock's InvokeModel with an Anthropic model's own body (as the
    anthropic SDK's AnthropicBedrock sends it: anthropic_version, no model
    and no stream, which the path says), answered with Anthropic's message;
    its stream is Anthropic's events, each a chunk of the event stream."""

    name = "bedrock.invoke"
    title = "Amazon Bedrock: InvokeModel (Anthropic)"
    framing = _EVENTSTREAM_CHUNKS
    REQUEST = {
        "anthropic_version": _Field(_Text(non_empty=True), _REQUIRED,
                                    "Bedrock's version of the API: bedrock-2023-05-31."),
        **{name: field for name, field in _AnthropicMessages.REQUEST.items()
           if name not in ("model", "stream")},
    }
    stream_events = dict(_AnthropicMessages.stream_events, error=(
        ("modelStreamErrorException", _BedrockErrors.error_event, "BedrockStreamError"),))

    def schemas(self):
        return {**_BedrockErrors.schemas(self),
                "BedrockInvokeRequest": _object_schema(self.REQUEST, example={
                    "anthropic_version": "bedrock-2023-05-31", "max_tokens": 256,
                    "messages": [{"role": "user", "content": "Hello"}]}),
                "BedrockStreamError": {"type": "object"}}

    def parse(self, request, config):
        values = _with_defaults(_given(_json_body(request), self.REQUEST, None), self.REQUEST,
                                config)
        return self.called(request, config, values, self.model(request),
                           request.route.path.endswith("-stream"))

    @staticmethod
    def check_conversation(messages, thinking, seed):
        """Anthropic's refusals, which Bedrock passes on as the model's."""
        try:
            _AnthropicMessages.check_conversation(messages, thinking, seed)
        except ApiError as error:
            raise ApiError(error.code, "The model returned the following errors: "
                           + error.message, error.field) from None

    routes = (
        _route("POST", "/model/{modelId}/invoke", _model_call, api=_model_api(
            "Bedrock InvokeModel: an Anthropic message", "BedrockInvokeRequest",
            {200: "AnthropicMessage", 400: None, 408: None, 429: None, 500: None, 503: None},
            streams=False, refuses=_AnthropicMessages.REFUSES)),
        _route("POST", "/model/{modelId}/invoke-with-response-stream", _model_call,
               api=_model_api(
                   "Bedrock InvokeModelWithResponseStream: an Anthropic message's events, "
                   "each a chunk of the event stream", "BedrockInvokeRequest",
                   {200: None, 400: None, 408: None, 429: None, 500: None, 503: None},
                   refuses=_AnthropicMessages.REFUSES)),
    )


_BEDROCK_INVOKE = _BedrockInvoke()


# --- Surfaces: Google Vertex AI ---------------------------------------------------
# Gemini and Anthropic's models as Vertex AI serves them, under a project and
# a location: google-genai with vertexai=True (its base URL pointed here) and
# the anthropic SDK's AnthropicVertex (its base URL this server's /v1).  The
# OAuth token they send is not checked: --api-key does not apply.

def _vertex_models(version, publisher):
    """The path of a publisher's models on Vertex AI (a model's name and its
    method follow)."""
    return f"{version}/projects/{{project}}/locations/{{location}}/publishers/{publisher}/models/"


class _VertexGemini(_Gemini):
    """Gemini's generateContent, its stream and countTokens, as Vertex AI
    serves them (under /v1 and /v1beta1, google-genai's default there)."""

    name = "vertex.gemini"
    title = "Google Vertex AI: Gemini"
    keyed = False
    sdk_environ = {}
    routes = tuple(
        _route("POST", _vertex_models(version, "google") + "{model}:" + call, handler, api=api)
        for version, (call, handler, api) in itertools.product(("/v1", "/v1beta1"),
                                                               _Gemini.CALLS))


_VERTEX_GEMINI = _VertexGemini()


class _VertexAnthropic(_AnthropicMessages):
    """Anthropic's Messages as Vertex AI serves them: rawPredict and
    streamRawPredict take Anthropic's body with anthropic_version
    (vertex-2023-10-16) and no model, which the path has; "stream" in the
    body streams, as the SDK sends it to streamRawPredict."""

    name = "vertex.anthropic"
    title = "Google Vertex AI: Anthropic"
    keyed = False
    sdk_environ = {}
    REQUEST = {
        "anthropic_version": _Field(_Text(non_empty=True), _REQUIRED,
                                    "Vertex's version of the API: vertex-2023-10-16."),
        **{name: field for name, field in _AnthropicMessages.REQUEST.items() if name != "model"},
    }

    def schemas(self):
        return {"VertexAnthropicRequest": _object_schema(self.REQUEST, example={
            "anthropic_version": "vertex-2023-10-16", "max_tokens": 256,
            "messages": [{"role": "user", "content": "Hello"}]})}

    def parse(self, request, config):
        values = _with_defaults(_given(_json_body(request), self.REQUEST, None), self.REQUEST,
                                config)
        return self.called(request, config, values, request.params["model"], values["stream"])

    routes = (
        _route("POST", _vertex_models("/v1", "anthropic") + "count-tokens:rawPredict",
               _AnthropicMessages.count_tokens),
        *(_route("POST", _vertex_models("/v1", "anthropic") + "{model}:" + call, _model_call,
                 api=_model_api(
                     f"Vertex AI, Anthropic: a message ({call})", "VertexAnthropicRequest",
                     {200: "AnthropicMessage", 429: None, 500: None, 504: None, 529: None},
                     refuses=_AnthropicMessages.REFUSES))
          for call in ("rawPredict", "streamRawPredict")),
    )


_VERTEX_ANTHROPIC = _VertexAnthropic()


# --- Surfaces: batches ------------------------------------------------------------

# OpenAI's files and batches, and Anthropic's message batches.  A batch is a
# job in the store, its states the job's under the vendor's names; each of
# its requests is answered as it is created, by the route that answers such
# a request alone (see _batch_answers), and its results are read once it ends.

_BATCH_WINDOW_MS = 86_400_000  # both vendors' completion window: 24 hours
_BATCH_SIMULATE = _Field(_SIMULATE, None, "How the batch runs, as a job (an extension).")
_MULTIPART_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^\s;]+))', re.I)
_FORM_FIELD = re.compile(rb'(?im)^content-disposition:[^\r\n]*?\bname="([^"]*)"'
                         rb'(?:[^\r\n]*?\bfilename="([^"]*)")?')


def _multipart_form(request):
    """The fields of a multipart/form-data body: {name: (filename or None, bytes)}."""
    kind, _, parameters = request.headers.get("content-type", "").partition(";")
    boundary = _MULTIPART_BOUNDARY.search(parameters)
    if kind.strip().lower() != "multipart/form-data" or boundary is None:
        raise _ValidationError(None, "request body must be multipart/form-data")
    delimiter = b"--" + (boundary.group(1) or boundary.group(2)).encode("latin-1")
    fields = {}
    for part in request.body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            return fields  # the closing delimiter
        head, separator, content = part.partition(b"\r\n\r\n")
        field = _FORM_FIELD.search(head)
        if not separator or field is None or not content.endswith(b"\r\n"):
            break
        name, filename = (None if value is None else value.decode("utf-8", "replace")
                          for value in field.groups())
        fields[name] = filename, content[:-2]
    raise _ValidationError(None, "request body is malformed multipart/form-data")


def _batch_answers(app, request, path, bodies):
    """(status, JSON body) of each request of a batch, in order, as the
    route at `path` answers it alone: under the batch request's key and test
    scope, from when it arrived, each with its own simulate (the header's
    are the batch's own); None for one that hangs.  A stream is refused, a
    status fault is that status and other transport faults leave the answer
    as it was: a batch's answers travel in a file."""
    route, params = app.router.match("POST", path)
    headers = {name: value for name, value in request.headers.items()
               if name != _SIMULATE_HEADER.lower()}
    answers = []
    for body in bodies:
        inner = _Request("POST", path, "", headers, request.received_ms,
                         request.received_wall_ms, _json_bytes(body))
        inner.route, inner.params, inner.test_id = route, params, request.test_id
        try:
            if body.get("stream") is True:
                raise _ValidationError("stream", "must be false in a batch")
            answer = route.handler(route.surface, app, inner)
            payload = answer.payload
            if answer.fault is not None and answer.fault.kind == "status":
                payload = _fault_error(answer.fault)
            if isinstance(payload, ApiError):
                raise payload
            answers.append(None if answer.status is None else (answer.status, payload))
        except ApiError as error:
            status, error_body, _ = route.surface.error(error, None, request.received_wall_ms)
            answers.append((status, error_body))
    return answers


def _batch_job(app, request, op, prefix, args, simulate, view):
    """The answer that stores a batch as a job and shows view(job): it runs
    as its simulate and the X-DummyLLM-Simulate header say (queue_ms while it
    is checked, latency_ms while it runs, mode timeout: it expires)."""
    settings = _simulate_settings({**_simulate_header(request), **(simulate or {})}, app.config)
    settings.update(ttft_ms=None, prefill_ms_per_token=0)  # a batch has no first token
    spec = _JobSpec(op=op, args=args, timeout_ms=_BATCH_WINDOW_MS, trace_id=_TRACE_ID_HEADER(
        request.headers.get("x-trace-id"), "X-Trace-Id"), test_id=request.test_id,
        callback_url=None, rule=None, forced_tool=None, output=None, **settings)
    _admit(app, request, spec)
    spec, batch, _, _ = app.store.create(spec, prefix=prefix, view=view)
    if batch is None:
        return _Answer(fault=spec.fault)  # lost before the batch was created
    request.note.job_id = batch["id"]
    return _Answer(200, batch, fault=spec.fault, dribble_ms=spec.dribble_ms)


def _page(items, limit, after=None, before=None):
    """The page of items, newest first, that follows the one with id
    `after` or precedes the one with id `before`: {"data", "has_more",
    "first_id", "last_id"}, as both vendors list."""
    ids = [item["id"] for item in items]
    if before is not None:
        newer = items[:ids.index(before)] if before in ids else []
        page, more = newer[-limit:], len(newer) > limit
    else:
        if after is not None:
            items = items[ids.index(after) + 1:] if after in ids else []
        page, more = items[:limit], len(items) > limit
    return {"data": page, "has_more": more, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None}


class _Batches:
    """What both vendors' batches share: a batch is a job of `op` with ids
    `prefix`_..., shown by viewer(app, request), a function of the job;
    `status_key` is the field of its state, `ended` its values once it has
    ended.  Routes describe these handlers (see routes_of)."""

    op = prefix = status_key = None
    ended = ()
    LIST = {}     # the query of a list: limit, its cursors
    listing = {}  # what a list's answer adds to the page

    def viewer(self, app, request):
        """The view of a batch for a request (see _JobStore)."""
        raise NotImplementedError

    def batch_id(self, request):
        request.note.job_id = batch_id = request.params["id"]
        if not batch_id.startswith(self.prefix + "_"):
            raise ApiError("NOT_FOUND", f"no batch with id {batch_id!r}", "id")
        return batch_id

    def retrieve(self, app, request):
        batch, fault = app.store.poll(self.batch_id(request), view=self.viewer(app, request))
        return _polled(request, batch, fault, self.status_key,
                       batch[self.status_key] in self.ended)

    def cancel(self, app, request):
        return _Answer(200, app.store.cancel(self.batch_id(request),
                                             view=self.viewer(app, request)))

    def batches(self, app, request):
        """A page of batches, newest first: the query's `limit` and cursors
        (those of LIST, after then before), what `listing` adds."""
        cursor = (request.args[name] for name in self.LIST if name != "limit")
        return _Answer(200, {**self.listing, **_page(app.store.views(
            self.op, self.viewer(app, request), request.test_id), request.args["limit"],
            *cursor)})

    @classmethod
    def routes_of(cls, path, title, batch, listing, query):
        """The routes to read, list and cancel batches under `path`."""
        return (
            _route("GET", path, cls.batches, api=_describe(
                f"{title}: the batches, newest first", answers={200: listing}, query=query)),
            _route("GET", path + "/{id}", cls.retrieve, api=_describe(
                f"{title}: a batch", answers={200: batch})),
            _route("POST", path + "/{id}/cancel", cls.cancel, api=_describe(
                f"{title}: cancel a batch", answers={200: batch})))


class _OpenAIBatches(_Batches, _OpenAI):
    """OpenAI's files and batches: a file of requests (a JSON line each:
    custom_id, method, url, body) is uploaded, a batch made of it runs as a
    job (validating while queued, in_progress while running, then completed,
    failed, expired or cancelled) and its output and error files are read
    back, a line per request."""

    title = "OpenAI files and batches"
    op, prefix, status_key = "openai.batch", "batch", "status"
    listing = {"object": "list"}
    STATUS = {"queued": "validating", "running": "in_progress", "ok": "completed",
              "fail": "failed", "timeout": "expired", "cancelled": "cancelled"}
    # Each way a batch ends, and the times it sets then.
    ENDED_STAMPS = {"completed": ("finalizing_at", "completed_at"), "failed": ("failed_at",),
                    "expired": ("expired_at",), "cancelled": ("cancelling_at", "cancelled_at")}
    ended = tuple(ENDED_STAMPS)
    # The paths a batch's requests may go to: the model calls of these units.
    ENDPOINTS = tuple(route.path for unit in (_OPENAI_CHAT, _OPENAI_EMBEDDINGS,
                                              _OPENAI_COMPLETIONS, _OPENAI_RESPONSES)
                      for route in unit.routes if route.handler is _model_call)
    PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
    MAX_REQUESTS = 50_000
    EXPIRED = {"code": "batch_expired",
               "message": "This request could not be executed before the completion window "
                          "expired."}
    BATCH = {
        "input_file_id": _Field(_Text(non_empty=True), _REQUIRED,
                                "An uploaded file of requests, a JSON line each."),
        "endpoint": _Field(_Choice(*ENDPOINTS), _REQUIRED, "Where every request goes."),
        "completion_window": _Field(_Choice("24h"), _REQUIRED, "24h."),
        "metadata": _Field(_OBJECT, None, "Kept and shown."),
        "output_expires_after": _Field(_OBJECT, None, "Accepted."),
        "simulate": _BATCH_SIMULATE,
    }
    LIST = {"limit": _Field(_Int(1, 100), 20, "Page size"),
            "after": _Field(_Text(), None, "The last id of the previous page")}

    def schemas(self):
        stamp = {"type": ["integer", "null"]}
        return {
            **super().schemas(),
            "FileUpload": {"type": "object", "required": ["file", "purpose"], "properties": {
                "file": {"type": "string", "format": "binary"},
                "purpose": {"type": "string", "enum": list(self.PURPOSES)}}},
            "FileObject": _object({
                "id": _A_STRING, "object": {"const": "file"}, "bytes": _AN_INTEGER,
                "created_at": _AN_INTEGER, "filename": _A_STRING, "purpose": _A_STRING,
                "status": {"const": "processed"}}),
            "FileList": _object({"object": {"const": "list"}, "data": {
                "type": "array", "items": _ref("FileObject")}, "has_more": {"type": "boolean"}}),
            "FileDeleted": _object({"id": _A_STRING, "object": {"const": "file"},
                                    "deleted": {"const": True}}),
            "BatchRequest": _object_schema(self.BATCH, example={
                "input_file_id": "file-...", "endpoint": "/v1/chat/completions",
                "completion_window": "24h", "simulate": {"latency_ms": 2000}}),
            "Batch": _object({
                "id": _A_STRING, "object": {"const": "batch"}, "endpoint": _A_STRING,
                "input_file_id": _A_STRING, "completion_window": _A_STRING,
                "status": {"enum": list(self.STATUS.values())}, "created_at": _AN_INTEGER,
                "request_counts": _object({key: _AN_INTEGER
                                           for key in ("total", "completed", "failed")}),
                "output_file_id": {"type": ["string", "null"]},
                "error_file_id": {"type": ["string", "null"]},
                "errors": {"type": ["object", "null"]}, "metadata": {"type": ["object", "null"]},
                **{key: stamp for key in ("in_progress_at", "expires_at", *itertools.chain(
                    *self.ENDED_STAMPS.values()))}}),
            "BatchList": _object({"object": {"const": "list"}, "data": {
                "type": "array", "items": _ref("Batch")}, "has_more": {"type": "boolean"}}),
        }

    # Files

    @_api("OpenAI files: upload a file (multipart/form-data: file and purpose)",
          request="FileUpload", request_type="multipart/form-data",
          answers={200: "FileObject"})
    def upload(self, app, request):
        fields = _multipart_form(request)
        for name in ("file", "purpose"):
            if name not in fields:
                raise _ValidationError(name, "is required")
        purpose = _Choice(*self.PURPOSES)(fields["purpose"][1].decode("utf-8", "replace"),
                                          "purpose")
        filename, data = fields["file"]
        return _Answer(200, app.files.add(filename or "file", purpose, data, request.test_id))

    @_api("OpenAI files: the uploaded files, newest first", answers={200: "FileList"},
          query={"purpose": _Field(_Text(), None, "Only files of this purpose")})
    def files(self, app, request):
        return _Answer(200, {"object": "list", "has_more": False, "data": app.files.list(
            request.args["purpose"], request.test_id)})

    def file_of(self, app, file_id):
        """(the file object, the content) of an uploaded file, or of a batch's
        output or error file once the batch has ended."""
        batch_id, _, kind = file_id[len("file-"):].rpartition("-")
        if not file_id.startswith("file-batch_") or kind not in ("output", "errors"):
            return app.files.get(file_id)
        try:
            job = app.store.snapshot(batch_id, lambda job: job)
        except ApiError:
            job = None
        if job is None or self.file_ids(job)[kind] != file_id:
            raise ApiError("NOT_FOUND", f"no file with id {file_id!r}", "id")
        # An ended batch changes no more: its file is written outside the lock.
        lines = [line for line in self.lines(job) if (kind == "output") == (
            line["error"] is None and line["response"]["status_code"] < 400)]
        content = b"".join(_json_bytes(line) + b"\n" for line in lines)
        return {"id": file_id, "object": "file", "bytes": len(content),
                "created_at": job.updated_at, "filename": f"batch_{kind}.jsonl",
                "purpose": "batch_output", "status": "processed", "expires_at": None,
                "status_details": None}, content

    @_api("OpenAI files: a file", answers={200: "FileObject"})
    def file(self, app, request):
        return _Answer(200, self.file_of(app, request.params["id"])[0])

    @_api("OpenAI files: a file's content (a batch's output: a JSON line per request)",
          answers={200: "application/octet-stream"})
    def content(self, app, request):
        return _Answer(200, self.file_of(app, request.params["id"])[1],
                       content_type="application/octet-stream")

    @_api("OpenAI files: forget an uploaded file", answers={200: "FileDeleted"})
    def delete_file(self, app, request):
        app.files.delete(request.params["id"])
        return _Answer(200, {"id": request.params["id"], "object": "file", "deleted": True})

    # Batches

    def requests_of(self, data, endpoint):
        """([(custom_id, body)] of a file's lines, [the errors that fail the
        batch as OpenAI lists them])."""
        requests, errors, seen = [], [], set()
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except (ValueError, RecursionError):
                item = None
            if not isinstance(item, dict) or not isinstance(item.get("body"), dict):
                errors.append({"code": "invalid_json_line", "line": number, "param": None,
                               "message": "This line is not a JSON object with a body."})
            elif item.get("url") != endpoint or item.get("method") != "POST":
                errors.append({"code": "mismatched_endpoint", "line": number, "param": "url",
                               "message": f"The request is not a POST to {endpoint}, the "
                                          "batch's endpoint."})
            elif not isinstance(item.get("custom_id"), str) or item["custom_id"] in seen:
                errors.append({"code": "duplicate_custom_id", "line": number,
                               "param": "custom_id", "message": "Each request needs a "
                                                                "custom_id of its own."})
            else:
                seen.add(item["custom_id"])
                requests.append((item["custom_id"], item["body"]))
        if not requests and not errors:
            errors.append({"code": "empty_file", "line": None, "param": None,
                           "message": "The file has no requests."})
        if len(requests) > self.MAX_REQUESTS:
            errors.append({"code": "too_many_requests", "line": None, "param": None,
                           "message": f"A batch has at most {self.MAX_REQUESTS} requests."})
        return requests, errors

    @_api("OpenAI batches: run the requests of an uploaded file as a batch",
          request="BatchRequest", answers={200: "Batch"}, headers=_SIMULATE_HEADERS,
          refuses={"input_file_id": "naming no uploaded file"})
    def create(self, app, request):
        values = _with_defaults(_given(_json_body(request), self.BATCH, None), self.BATCH,
                                app.config)
        _, data = app.files.get(values["input_file_id"], "input_file_id")
        requests, errors = self.requests_of(data, values["endpoint"])
        answers = () if errors else _batch_answers(app, request, values["endpoint"],
                                                   [body for _, body in requests])
        args = {key: values[key] for key in ("input_file_id", "endpoint", "completion_window",
                                             "metadata")}
        args.update(errors=errors, results=[(custom_id, answer) for (custom_id, _), answer
                                            in zip(requests, answers)])
        return _batch_job(app, request, self.op, self.prefix, args, values["simulate"],
                          self.viewer(app, request))

    def counts(self, job):
        """How many of a batch's requests completed and failed (none before it ends)."""
        results = job.spec.args["results"]
        if job.state not in ("ok", "timeout"):
            return {"completed": 0, "failed": 0}
        completed = 0 if job.state == "timeout" else sum(
            1 for _, answer in results if answer is not None and answer[0] < 400)
        return {"completed": completed, "failed": len(results) - completed}

    def file_ids(self, job):
        """{"output", "errors"}: the ids of an ended batch's files, None for one without a line."""
        counts = self.counts(job)
        return {kind: f"file-{job.id}-{kind}" if counts[count] else None
                for kind, count in (("output", "completed"), ("errors", "failed"))}

    def lines(self, job):
        """The lines of an ended batch's output and error files, in its requests' order."""
        hex_id = job.id[len("batch_"):]
        for index, (custom_id, answer) in enumerate(job.spec.args["results"]):
            line = {"id": f"batch_req_{hex_id}{index:x}", "custom_id": custom_id,
                    "response": None, "error": None}
            if job.state == "timeout" or answer is None:
                line["error"] = self.EXPIRED
            else:
                line["response"] = {"status_code": answer[0], "body": answer[1],
                                    "request_id": f"req_{hex_id}{index:x}"}
            yield line

    def batch(self, clock, job):
        """A batch as it is now (a view for _JobStore)."""
        args, status = job.spec.args, self.STATUS[job.state]
        if args["errors"] and job.state != "queued":
            status = "failed"  # its file was checked, and refused
        stamps = dict.fromkeys(("in_progress_at", *itertools.chain(*self.ENDED_STAMPS.values())))
        if job.state != "queued" and not args["errors"]:
            stamps["in_progress_at"] = (job.created_at_ms + round(clock.real_ms(
                job.plan.running_at_ms or 0))) // 1000
        for key in self.ENDED_STAMPS.get(status, ()):
            stamps[key] = job.updated_at
        files = self.file_ids(job)
        return {
            "id": job.id, "object": "batch", "endpoint": args["endpoint"],
            "errors": {"object": "list", "data": args["errors"] or [
                {"code": "server_error", "line": None, "param": None,
                 "message": job.error["message"]}]} if status == "failed" else None,
            "input_file_id": args["input_file_id"],
            "completion_window": args["completion_window"], "status": status,
            "output_file_id": files["output"], "error_file_id": files["errors"],
            "created_at": job.created_at, "expires_at": job.created_at + _BATCH_WINDOW_MS // 1000,
            **stamps, "metadata": args["metadata"],
            "request_counts": {"total": len(args["results"]), **self.counts(job)},
        }

    def viewer(self, app, request):
        return functools.partial(self.batch, app.clock)

    routes = (
        _route("POST", "/v1/files", upload),
        _route("GET", "/v1/files", files),
        _route("GET", "/v1/files/{id}", file),
        _route("GET", "/v1/files/{id}/content", content),
        _route("DELETE", "/v1/files/{id}", delete_file),
        _route("POST", "/v1/batches", create),
        *_Batches.routes_of("/v1/batches", "OpenAI batches", "Batch", "BatchList", LIST),
    )


_OPENAI_BATCHES = _OpenAIBatches()


def _check_batch_requests(value, field):
    if not isinstance(value, list) or not 1 <= len(value) <= _AnthropicBatches.MAX_REQUESTS:
        raise _ValidationError(field, "must be a list of 1 to "
                               f"{_AnthropicBatches.MAX_REQUESTS} requests")
    seen = set()
    for index, item in enumerate(value):
        at = f"{field}[{index}]"
        if not isinstance(item, dict):
            raise _ValidationError(at, "must be an object with custom_id and params")
        custom_id = _BATCH_CUSTOM_ID(item.get("custom_id"), at + ".custom_id")
        if custom_id in seen:
            raise _ValidationError(at + ".custom_id", "repeats another request's")
        seen.add(custom_id)
        _OBJECT(item.get("params"), at + ".params")
    return value


def _check_custom_id(value, field):
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        raise _ValidationError(field, "must be 1 to 64 letters, digits, _ or -")
    return value


_BATCH_CUSTOM_ID = _Check(_check_custom_id, {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"})


class _AnthropicBatches(_Batches, _AnthropicMessages):
    """Anthropic's message batches: the requests (each a custom_id and the
    params of a message) run as a job (in_progress while queued or running,
    then ended) and its results are read as JSON lines, one per request:
    succeeded, errored, canceled or expired."""

    name = None
    title = "Anthropic message batches"
    # Where a batch's requests go: the model call of the Messages unit.
    MESSAGES, = (route.path for route in _AnthropicMessages.routes if route.handler is _model_call)
    op, prefix, status_key, ended = "anthropic.batch", "msgbatch", "processing_status", ("ended",)
    MAX_REQUESTS = 100_000
    BATCH = {
        "requests": _Field(_Check(_check_batch_requests, {
            "type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["custom_id", "params"], "properties": {
                    "custom_id": _BATCH_CUSTOM_ID.schema, "params": {"type": "object"}}}}),
            _REQUIRED, "Each a custom_id and the params of a message (checked as it runs: a "
                       "bad one is errored)."),
        "simulate": _BATCH_SIMULATE,
    }
    LIST = {"limit": _Field(_Int(1, 1000), 20, "Page size"),
            "after_id": _Field(_Text(), None, "The last id of the previous page"),
            "before_id": _Field(_Text(), None, "The first id of the next page")}
    # What every request's result is, by the job's final state when it is not ok.
    RESULTS = {"cancelled": "canceled", "timeout": "expired", "fail": "errored"}

    def schemas(self):
        stamp = {"type": ["string", "null"]}
        return {
            **super().schemas(),
            "MessageBatchRequest": _object_schema(self.BATCH, example={"requests": [
                {"custom_id": "first", "params": {"model": "claude-sonnet-4-5", "max_tokens": 64,
                                                  "messages": [{"role": "user",
                                                                "content": "Hello"}]}}]}),
            "MessageBatch": _object({
                "id": _A_STRING, "type": {"const": "message_batch"},
                "processing_status": {"enum": ["in_progress", "canceling", "ended"]},
                "request_counts": _object({key: _AN_INTEGER for key in (
                    "processing", "succeeded", "errored", "canceled", "expired")}),
                "created_at": _A_STRING, "expires_at": _A_STRING, "ended_at": stamp,
                "archived_at": stamp, "cancel_initiated_at": stamp, "results_url": stamp}),
            "MessageBatchList": _object({"data": {"type": "array", "items": _ref("MessageBatch")},
                                         "has_more": {"type": "boolean"}}),
            "MessageBatchDeleted": _object({"id": _A_STRING,
                                            "type": {"const": "message_batch_deleted"}}),
            "MessageBatchIndividualResponse": _object({"custom_id": _A_STRING, "result": _object(
                {"type": {"enum": ["succeeded", "errored", "canceled", "expired"]}},
                {"message": _ref("AnthropicMessage"), "error": _ref("AnthropicError")})}),
        }

    @staticmethod
    def rfc3339(epoch_ms):
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_ms // 1000)) + (
            f".{epoch_ms % 1000:03d}Z")

    @_api("Anthropic message batches: run messages as a batch", request="MessageBatchRequest",
          answers={200: "MessageBatch"}, headers=_SIMULATE_HEADERS,
          refuses={"requests": "with a custom_id that repeats another's"})
    def create(self, app, request):
        values = _with_defaults(_given(_json_body(request), self.BATCH, None), self.BATCH,
                                app.config)
        requests = values["requests"]
        answers = _batch_answers(app, request, self.MESSAGES,
                                 [item["params"] for item in requests])
        args = {"results": [(item["custom_id"], answer)
                            for item, answer in zip(requests, answers)]}
        return _batch_job(app, request, self.op, self.prefix, args, values["simulate"],
                          self.viewer(app, request))

    def viewer(self, app, request):
        # Its results_url is on the host the client named.
        return functools.partial(self.batch, "http://" + request.headers.get("host", "127.0.0.1"))

    def results_of(self, job):
        """[(custom_id, result)] of an ended batch."""
        results = []
        for custom_id, answer in job.spec.args["results"]:
            kind = self.RESULTS.get(job.state) or (
                "expired" if answer is None else "succeeded" if answer[0] < 400 else "errored")
            result = {"type": kind}
            if kind == "succeeded":
                result["message"] = answer[1]
            elif kind == "errored":
                result["error"] = answer[1] if job.state == "ok" else self.error_body(
                    ApiError("SIM_FAIL", job.error["message"]), 500, None)
            results.append((custom_id, result))
        return results

    def batch(self, base_url, job):
        """A message batch as it is now (a view for _JobStore)."""
        ended = job.state in _TERMINAL_STATES
        counts = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
        if ended:
            counts.update(collections.Counter(result["type"]
                                              for _, result in self.results_of(job)))
        else:
            counts["processing"] = len(job.spec.args["results"])
        ended_at = self.rfc3339(job.updated_at_ms) if ended else None
        return {
            "id": job.id, "type": "message_batch",
            "processing_status": "ended" if ended else "in_progress", "request_counts": counts,
            "ended_at": ended_at, "created_at": self.rfc3339(job.created_at_ms),
            "expires_at": self.rfc3339(job.created_at_ms + _BATCH_WINDOW_MS),
            "archived_at": None,
            "cancel_initiated_at": ended_at if job.state == "cancelled" else None,
            "results_url": f"{base_url}/v1/messages/batches/{job.id}/results" if ended else None,
        }

    @_api("Anthropic message batches: forget an ended batch",
          answers={200: "MessageBatchDeleted"})
    def delete(self, app, request):
        batch_id = self.batch_id(request)
        if app.store.snapshot(batch_id, lambda job: job.state in _ACTIVE_STATES):
            raise ApiError("BAD_REQUEST", "a batch that is in progress cannot be deleted; "
                           "cancel it first", "id")
        app.store.delete(batch_id)
        return _Answer(200, {"id": batch_id, "type": "message_batch_deleted"})

    @_api("Anthropic message batches: the results of an ended batch, a JSON line each",
          answers={200: _EventStream(_Framing("application/x-jsonl", None, b"", b""), (
              (None, "MessageBatchIndividualResponse"),))})
    def results(self, app, request):
        results = app.store.snapshot(self.batch_id(request), lambda job: job.state in
                                     _TERMINAL_STATES and self.results_of(job))
        if results is False:
            raise ApiError("NOT_FOUND", "the batch has not ended: its results_url is null "
                           "until it has", "id")
        return _Answer(200, b"".join(_json_bytes({"custom_id": custom_id, "result": result})
                                     + b"\n" for custom_id, result in results),
                       content_type="application/x-jsonl")

    routes = (
        _route("POST", "/v1/messages/batches", create),
        *_Batches.routes_of("/v1/messages/batches", "Anthropic message batches",
                            "MessageBatch", "MessageBatchList", LIST),
        _route("DELETE", "/v1/messages/batches/{id}", delete),
        _route("GET", "/v1/messages/batches/{id}/results", results),
    )


_ANTHROPIC_BATCHES = _AnthropicBatches()


# --- Surfaces: MCP ----------------------------------------------------------------
# A tool server on MCP's streamable HTTP transport: JSON-RPC 2.0 messages
# POSTed to /mcp, each request answered with JSON or, when it sends progress
# notifications or is to break, an event stream.  A session begins with
# initialize (its id in Mcp-Session-Id) and ends with DELETE.  The tools are
# those of --mcp-tools and POST /v1/mcp/tools; a call of one is planned as a
# model call is, with the same simulate settings, in a sequence of its own
# (the key mcp:{tool}:{X-Trace-Id}), and journaled under X-Trace-Id, where
# the verdict reads how the agent used its tools.

# Where a tools/call's params._meta carries simulate settings of its own.
_MCP_SIMULATE_META = "dummyllm/simulate"


def _admits(accept, media_type):
    """Whether an Accept header (a list of types) admits a media type."""
    kinds = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    return bool({media_type, media_type.split("/")[0] + "/*", "*/*"} & kinds)


def _rpc_id(value):
    """A JSON-RPC request's id: a string or an integer (MCP allows no null)."""
    return isinstance(value, str) or _is_int(value)


def _arguments_digest(arguments):
    return _body_digest(json.dumps(arguments, sort_keys=True, ensure_ascii=False).encode())


_MCP_VERSION_HEADER = _Field(_Choice(*_MCP_VERSIONS), None, "The version initialize agreed")
_MCP_SESSION_HEADERS = {
    "Mcp-Session-Id": _Field(_Text(), _REQUIRED, "The session initialize opened"),
    "MCP-Protocol-Version": _MCP_VERSION_HEADER}


class _Mcp(_Surface):
    """MCP's streamable HTTP transport at /mcp (see the banner above)."""

    title = "MCP: a tool server (streamable HTTP)"
    error_schema = "JsonRpcError"
    request_headers = ("Mcp-Session-Id", "MCP-Protocol-Version")
    answer_headers = ("Mcp-Session-Id",)
    quota_header = None
    stream_error = ("INTERNAL", "the tool's answer failed")
    # JSON-RPC's code of each error, and whether it is the method's answer
    # (HTTP 200) rather than a refusal of the message (at the error's status).
    rpc_errors = {"INVALID_JSON": (-32700, False), "BAD_REQUEST": (-32600, False),
                  "UNKNOWN_METHOD": (-32601, True), "VALIDATION_ERROR": (-32602, True),
                  "TOOL_ERROR": (-32603, True)}

    def schemas(self):
        rpc_id = {"type": ["string", "integer", "null"]}
        return {
            "JsonRpcMessage": {"type": "object", "required": ["jsonrpc"], "properties": {
                "jsonrpc": {"const": "2.0"}, "id": {"type": ["string", "integer"]},
                "method": {"type": "string"}, "params": {"type": "object"},
                "result": {}, "error": {}}, "oneOf": [
                    {"required": ["method"], "not": {"anyOf": [{"required": ["result"]},
                                                              {"required": ["error"]}]}},
                    {"required": ["id", "result"], "not": {"required": ["method"]}},
                    {"required": ["id", "error"], "not": {"required": ["method"]}}]},
            "JsonRpcResult": {"type": "object", "required": ["jsonrpc", "id", "result"],
                              "properties": {"jsonrpc": {"const": "2.0"}, "id": rpc_id,
                                             "result": {"type": "object"}}},
            "JsonRpcNotification": {"type": "object", "required": ["jsonrpc", "method"],
                                    "properties": {"jsonrpc": {"const": "2.0"},
                                                   "method": {"type": "string"},
                                                   "params": {"type": "object"}}},
            "JsonRpcAnswer": {"anyOf": [_ref("JsonRpcResult"), _ref("JsonRpcError")]},
            "JsonRpcError": {"type": "object", "required": ["jsonrpc", "id", "error"],
                             "properties": {"jsonrpc": {"const": "2.0"}, "id": rpc_id, "error": {
                                 "type": "object", "required": ["code", "message"],
                                 "properties": {"code": {"type": "integer"},
                                                "message": {"type": "string"}, "data": {}}}}},
        }

    def event_streams(self):
        return [_EventStream(_NAMED_SSE, (("message", "JsonRpcNotification"),
                                          ("message", "JsonRpcResult"),
                                          ("message", "JsonRpcError")))]

    def error(self, error, retry_ms, now_ms, note=None):
        code, answers = self.rpc_errors.get(error.code, (
            -32603 if (error.status or 500) >= 500 else -32600, False))
        body = dict(error.detail) if error.detail else {
            "code": code, "message": error.message,
            "data": {"code": error.code, **({"field": error.field} if error.field else {})}}
        mcp = note and note.mcp
        return (200 if answers else error.status,
                {"jsonrpc": "2.0", "id": mcp and mcp["id"], "error": body},
                error.headers + self.retry_headers(error, retry_ms, now_ms))

    # --- the transport

    @_api("Send a JSON-RPC message: a request (initialize, ping, tools/list, tools/call, "
          "resources/list, resources/templates/list, prompts/list) or a notification",
          "JsonRpcMessage", {200: "JsonRpcAnswer", 202: None, 400: "JsonRpcError",
                             403: "JsonRpcError", 404: "JsonRpcError", 406: "JsonRpcError",
                             429: "JsonRpcError", 503: "JsonRpcError"},
          headers={"Mcp-Session-Id": _Field(_Text(), None, "The session, on every message "
                                            "after initialize"),
                   "MCP-Protocol-Version": _MCP_VERSION_HEADER, **_SIMULATE_HEADERS},
          streams=True, refuses={"Mcp-Session-Id": "missing on a message after initialize, or "
                                                   "naming a session closed or never opened"})
    def post(self, app, request):
        note = self._note(request)
        accept = request.headers.get("accept", "*/*")
        if not (_admits(accept, "application/json") and _admits(accept, "text/event-stream")):
            raise ApiError("NOT_ACCEPTABLE", "Accept must admit application/json and "
                           "text/event-stream: either may answer", "Accept")
        self._check_origin(app, request)
        self._check_version(request)
        if not request.body.strip():
            raise ApiError("INVALID_JSON", "request body is empty; send a JSON-RPC message")
        message = _json_value(request.body, "request body")
        if isinstance(message, list):
            raise ApiError("BAD_REQUEST", "a batch of JSON-RPC messages is not taken (MCP "
                           "dropped batches in 2025-06-18): send one message per POST")
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            raise ApiError("BAD_REQUEST", 'not a JSON-RPC 2.0 message: an object with '
                           '"jsonrpc": "2.0"', "jsonrpc")
        method, rpc_id = message.get("method"), message.get("id")
        note.update(method=method if isinstance(method, str) else None,
                    id=rpc_id if _rpc_id(rpc_id) else None)
        if method is None and ("result" in message or "error" in message):
            self._session(app, request)
            return _Answer(202)  # an answer to a request of ours: there are none to answer
        if not isinstance(method, str):
            raise ApiError("BAD_REQUEST", "method must be a string", "method")
        if "id" in message and not _rpc_id(rpc_id):
            raise ApiError("BAD_REQUEST", "id must be a string or an integer", "id")
        params = message.get("params", {})
        if not isinstance(params, dict):
            raise ApiError("BAD_REQUEST", "params must be an object", "params")
        if "id" not in message:  # a notification
            if method == "notifications/cancelled":
                cancels = params.get("requestId")
                note["cancels"] = cancels if _rpc_id(cancels) else None
            self._session(app, request)
            return _Answer(202)
        handler = self.METHODS.get(method)
        if handler is None:
            raise ApiError("UNKNOWN_METHOD", f"Method not found: {method}", "method")
        session = None if method == "initialize" else self._session(app, request)
        result = handler(self, app, request, session, params)
        if isinstance(result, _Answer):
            return result
        return _Answer(200, {"jsonrpc": "2.0", "id": rpc_id, "result": result})

    @_api("End a session", answers={200: None, 400: "JsonRpcError", 403: "JsonRpcError",
                                    404: "JsonRpcError"}, headers=_MCP_SESSION_HEADERS)
    def close(self, app, request):
        self._note(request)
        self._check_origin(app, request)
        self._check_version(request)
        self._session(app, request)
        app.mcp.close(request.headers["mcp-session-id"])
        return _Answer(200)

    @_api("Open a stream of the server's own messages: there are none, so a session's is "
          "405, as MCP allows", answers={400: "JsonRpcError", 403: "JsonRpcError",
                                         404: "JsonRpcError", 405: "JsonRpcError"},
          headers=_MCP_SESSION_HEADERS)
    def listen(self, app, request):
        self._note(request)
        self._check_origin(app, request)
        self._check_version(request)
        self._session(app, request)
        raise ApiError("METHOD_NOT_ALLOWED", "this server sends no messages of its own: "
                       "there is no stream to open", headers=[("Allow", "POST, DELETE")])

    @staticmethod
    def _note(request):
        """Start the request's note of an MCP message (see _NOTE_FIELDS), and
        take its key: the journal and the verdict know it as MCP's."""
        request.note.mcp = {"session": request.headers.get("mcp-session-id"), "method": None,
                            "id": None, "tool": None, "arguments": None, "outcome": None,
                            "text": None, "cancels": None}
        request.note.trace_id = _TRACE_ID_HEADER(request.headers.get("x-trace-id"), "X-Trace-Id")
        return request.note.mcp

    @staticmethod
    def _check_origin(app, request):
        """MCP asks servers to refuse a browser's request from a page of another
        origin (DNS rebinding): one not on loopback, unless --cors allows it."""
        origin = request.headers.get("origin")
        if origin is None or app.config.cors in ("*", origin):
            return
        host = urllib.parse.urlsplit(origin).hostname
        if host is None or not (host == "localhost" or _is_loopback(host)):
            raise ApiError("FORBIDDEN", f"Origin {origin} is not allowed; --cors may allow it",
                           "Origin")

    @staticmethod
    def _session(app, request):
        """The session a message after initialize belongs to: 400 without
        one, 404 for one closed or never opened."""
        session_id = request.headers.get("mcp-session-id")
        if session_id is None:
            raise ApiError("BAD_REQUEST", "Mcp-Session-Id is required after initialize",
                           "Mcp-Session-Id")
        session = app.mcp.find(session_id, request.test_id)
        if session is None:
            raise ApiError("NOT_FOUND", f"no session {session_id}: it was closed or never "
                           "opened; initialize a new one", "Mcp-Session-Id")
        return session

    @staticmethod
    def _check_version(request):
        version = request.headers.get("mcp-protocol-version")
        if version is not None and version not in _MCP_VERSIONS:
            raise ApiError("BAD_REQUEST", f"MCP-Protocol-Version {version} is not served; "
                           "these are: " + ", ".join(_MCP_VERSIONS), "MCP-Protocol-Version")

    # --- the methods

    def initialize(self, app, request, session, params):
        offered = params.get("protocolVersion")
        if not isinstance(offered, str):
            raise _ValidationError("params.protocolVersion", "must be a string")
        version = offered if offered in _MCP_VERSIONS else _MCP_VERSIONS[-1]
        session_id = app.mcp.open(request.test_id, version)
        request.note.mcp["session"] = session_id
        return _Answer(200, {"jsonrpc": "2.0", "id": request.note.mcp["id"], "result": {
            "protocolVersion": version,
            "capabilities": {"tools": {"listChanged": False}, "resources": {}, "prompts": {}},
            "serverInfo": {"name": "dummyLLM", "version": __version__}}},
            headers=[("Mcp-Session-Id", session_id)])

    def ping(self, app, request, session, params):
        return {}

    def list_tools(self, app, request, session, params):
        if params.get("cursor") is not None:
            raise _ValidationError("params.cursor", "is not a cursor this server gave (it "
                                   "lists every tool at once)")
        return {"tools": [tool.listing() for tool in app.mcp_tools(request.test_id)]}

    def list_nothing(self, app, request, session, params):
        return {self.LISTS[request.note.mcp["method"]]: []}

    LISTS = {"resources/list": "resources", "resources/templates/list": "resourceTemplates",
             "prompts/list": "prompts"}

    def call_tool(self, app, request, session, params):
        """A tool's answer, as its plan says: a result (isError when the tool
        fails or times out), a JSON-RPC error, no answer, a refusal or a
        fault; an event stream when progress is asked for or the stream is
        to break."""
        note = request.note.mcp
        name, arguments = params.get("name"), params.get("arguments")
        if not isinstance(name, str):
            raise _ValidationError("params.name", "must be a string: a tool's name")
        tool = next((tool for tool in app.mcp_tools(request.test_id) if tool.name == name), None)
        if tool is None:
            raise ApiError("VALIDATION_ERROR", f"Unknown tool: {name}", "params.name")
        arguments = {} if arguments is None else arguments
        if not isinstance(arguments, dict):
            raise _ValidationError("params.arguments", "must be an object")
        meta = params.get("_meta") or {}
        if not isinstance(meta, dict):
            raise _ValidationError("params._meta", "must be an object")
        key = request.note.trace_id
        note.update(tool=name, arguments=_arguments_digest(arguments))
        broken = _schema_violation(arguments, tool.spec["inputSchema"], "arguments")
        if broken is not None:
            note["outcome"] = "refused"
            if _MCP_VERSIONS.index(session.version) < _MCP_VERSIONS.index(
                    _MCP_ARGUMENTS_AS_RESULT):
                raise _ValidationError("params." + broken[0], broken[1])
            note["text"] = f"Invalid arguments for tool {name}: {broken[0]} {broken[1]}"
            return {"content": [{"type": "text", "text": note["text"]}], "isError": True}
        answer = tool.answer(arguments, app.mcp.step(request.test_id, key, name))
        spec = self._spec(app, request, tool, answer, arguments, meta)
        spec, plan, _ = app.store.plan_call(spec)
        if plan.state in _REFUSED_STATES:
            raise _refusal(spec, plan, self.overloaded_status)
        if plan.ends_at_ms is None:
            note["outcome"] = "hang"
            return _Answer(status=None)
        if plan.state != "ok":
            reason = (f"timed out after {spec.timeout_ms} ms" if plan.state == "timeout"
                      else f"failed: {plan.error['message']}")
            note.update(outcome="error", text=f"Tool {name} {reason}")
            payload = {"content": [{"type": "text", "text": note["text"]}], "isError": True}
        elif answer["rpc_error"] is not None:
            note["outcome"] = "rpc_error"
            payload = ApiError("TOOL_ERROR", answer["rpc_error"]["message"],
                               detail=answer["rpc_error"])
        else:
            note["outcome"] = "ok"
            payload = self._result(spec, plan, answer, arguments)
        message = payload if isinstance(payload, ApiError) else {
            "jsonrpc": "2.0", "id": note["id"], "result": payload}
        at_ms = request.received_ms + plan.ends_at_ms
        progress = tool.spec["progress"] if "progressToken" in meta else 0
        if spec.fault is None and (progress or spec.stream):
            return self._stream(request, message, plan.ends_at_ms, progress,
                                meta.get("progressToken"), spec.stream)
        return _Answer(200, message, at=at_ms, fault=spec.fault, dribble_ms=spec.dribble_ms)

    def _spec(self, app, request, tool, answer, arguments, meta):
        """The _JobSpec of a tool call: the tool's simulate settings, under
        those of its answer (a case or a script's step), the header's and
        the call's own (_meta's "dummyllm/simulate")."""
        own = (_SIMULATE(meta[_MCP_SIMULATE_META], "params._meta." + _MCP_SIMULATE_META)
               if _MCP_SIMULATE_META in meta else {})
        settings = _simulate_settings({**(tool.spec["simulate"] or {}), **(
            answer["simulate"] or {} if answer is not tool.spec else {}),
            **_simulate_header(request), **own},
            app.config)
        given = answer["content"] or answer["structured"] or answer["rpc_error"]
        schema = tool.spec["outputSchema"]
        return _JobSpec(
            op="mcp.tool", args={"tool": tool.name, "arguments": arguments},
            timeout_ms=app.config.timeout_ms,
            trace_id=f"mcp:{tool.name}:{request.note.trace_id or ''}",
            test_id=request.test_id, callback_url=None, rule=None, forced_tool=None,
            output=None if given or schema is None else {
                "schema": schema, "field": f"tools[{tool.name}].outputSchema"}, **settings)

    @staticmethod
    def _result(spec, plan, answer, arguments):
        """The result of a call that succeeds: its arguments as JSON (mode
        echo); else the answer's content and structured content as given;
        else JSON drawn from the tool's output schema; else simulate.ok_text,
        or a line naming the tool."""
        content, structured = answer["content"], answer["structured"]
        if plan.mode == "echo":
            content, structured = [{"type": "text", "text": json.dumps(
                arguments, ensure_ascii=False)}], None
        if content is None and structured is None and spec.output is not None:
            structured = json.loads(plan.result["text"])
        if content is None:
            text = (json.dumps(structured, ensure_ascii=False) if structured is not None else
                    spec.ok_text or f"Simulated result of {spec.args['tool']}")
            content = [{"type": "text", "text": text}]
        result = {"content": content, "isError": False}
        if structured is not None:
            result["structuredContent"] = structured
        return result

    def _stream(self, request, message, end_ms, progress, token, failure):
        """The answer as an event stream: `progress` notifications evenly
        spaced before it, then it; broken as the stream failure says (its
        count takes in the notifications and the answer)."""
        event = functools.partial(_NAMED_SSE.event, None, "message")

        def encoded(payload):
            if isinstance(payload, ApiError):
                payload = self.error(payload, None, 0, request.note)[1]
            return event(_json_bytes(payload))
        frames = [(round(end_ms * step / (progress + 1)), encoded({
            "jsonrpc": "2.0", "method": "notifications/progress",
            "params": {"progressToken": token, "progress": step, "total": progress}}))
            for step in range(1, progress + 1)] + [(end_ms, encoded(message))]
        def error_event():
            return encoded(ApiError("INTERNAL", self.stream_error[1]))
        frames, kind = _broken(frames, failure, error_event)
        return _Answer(200, at=request.received_ms, stream=frames, failure=kind,
                       stream_error=error_event, content_type=_NAMED_SSE.content_type)

    METHODS = {"initialize": initialize, "ping": ping, "tools/list": list_tools,
               "tools/call": call_tool, **dict.fromkeys(LISTS, list_nothing)}

    routes = (
        _route("POST", "/mcp", post),
        _route("GET", "/mcp", listen),
        _route("DELETE", "/mcp", close),
    )


_MCP = _Mcp()


class _McpTools(_Control):
    """The tools /mcp serves, added and removed at run time, and the report
    of which each key called."""

    title = "MCP: tools and the report of their use"

    def schemas(self):
        return {
            "McpTool": _object_schema(_MCP_TOOL_FIELDS, strict=True, example={
                "name": "get_weather", "description": "The weather in a city",
                "inputSchema": {"type": "object", "required": ["city"],
                                "properties": {"city": {"type": "string"}}},
                "cases": [{"arguments": {"city": "Paris"}, "content": "Sunny, 21 C"}],
                "simulate": {"latency_ms": 50}}),
            "McpTools": {"type": "object", "properties": {"tools": {
                "type": "array", "items": {"type": "object"}}}},
            "McpReport": _MCP_REPORT_SCHEMA,
        }

    @_api("The tools /mcp lists (given a test id, those its sessions see)",
          answers={200: "McpTools"}, query=_Control.TEST_QUERY)
    def tools(self, app, request):
        return _Answer(200, {"tools": [tool.to_json()
                                       for tool in app.mcp_tools(self.test_id(request))]})

    @_api("Add a tool to /mcp (with a test id, for that test alone; a tool of the same name "
          "is replaced there)", request="McpTool", answers={201: "McpTools"},
          query=_Control.TEST_QUERY)
    def add_tool(self, app, request):
        return _Answer(201, {"tools": [app.add_mcp_tool(_json_body(request),
                                                        self.test_id(request))]})

    @_api("Remove the tools added at run time (those of --mcp-tools stay; with a test id, "
          "those added for it)", answers={200: "Removed"}, query=_Control.TEST_QUERY)
    def clear_tools(self, app, request):
        return _Answer(200, {"removed": {"mcp_tools": app.clear_mcp_tools(
            self.test_id(request))}})

    @_api("Which tools each key called, how often, how many failed, and which it never "
          "called", answers={200: "McpReport"}, query={
              "trace_id": _Field(_Text(), None, "Only this key's calls"), **_Control.TEST_QUERY})
    def report(self, app, request):
        return _Answer(200, app.mcp_report(request.args["trace_id"], self.test_id(request)))

    routes = (
        _route("GET", "/v1/mcp/tools", tools, chaos=False),
        _route("POST", "/v1/mcp/tools", add_tool, admin=True, chaos=False),
        _route("DELETE", "/v1/mcp/tools", clear_tools, admin=True, chaos=False),
        _route("GET", "/v1/mcp/report", report, chaos=False, journal=False),
    )


_MCP_TOOLS = _McpTools()


# --- Surfaces: registration -------------------------------------------------------

# The surfaces served, in the order their routes are tried.  A new provider
# is its unit above and one entry here.
_SURFACES = [_CONTROL, _JOB_API, _OPENAI_CHAT, _OPENAI_RESPONSES, _OPENAI_EMBEDDINGS,
             _OPENAI_COMPLETIONS, _AZURE_CHAT, _AZURE_EMBEDDINGS, _AZURE_COMPLETIONS,
             _AZURE_RESPONSES, _OPENROUTER,
             _ANTHROPIC_MESSAGES, _GEMINI, _OLLAMA, _COHERE, _BEDROCK_CONVERSE, _BEDROCK_INVOKE,
             _VERTEX_GEMINI, _VERTEX_ANTHROPIC, _OPENAI_BATCHES, _ANTHROPIC_BATCHES, _MCP,
             _MCP_TOOLS]


def _register(surface):
    """Serve a surface too (after those registered before it); the
    application takes the routes of the surfaces registered when it starts."""
    global _REGISTRY
    _SURFACES.append(surface)
    _REGISTRY = None


def _unregister(surface):
    global _REGISTRY
    _SURFACES.remove(surface)
    _REGISTRY = None


_REGISTRY = None


def _registry():
    """What derives from the registered surfaces (made at first use)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _Registry(_SURFACES)
    return _REGISTRY


def _surface_names():
    """The names of the surfaces that answer model calls, which reply rules match."""
    return [surface.name for surface in _registry().model_surfaces]


class _Registry:
    """The registered surfaces, and what derives from them: the routes (each
    with its surface), the router, the surfaces of model calls, the CORS
    headers and the API document.  Each is made at first use."""

    def __init__(self, surfaces):
        self.surfaces = tuple(surfaces)
        self.routes = tuple(
            route._replace(surface=surface, auth=surface.keyed if route.auth is None
                           else route.auth)
            for surface in self.surfaces for route in surface.routes)
        self.model_surfaces = tuple(surface for surface in self.surfaces if surface.name)
        self.reasons = dict(_REASONS)
        for surface in self.surfaces:
            self.reasons.update(surface.reasons)

    @functools.cached_property
    def router(self):
        return _Router(self.routes)

    @functools.cached_property
    def cors_allowed(self):
        """The request headers a browser may send (CORS)."""
        return ", ".join(dict.fromkeys(_COMMON_REQUEST_HEADERS + tuple(
            name for surface in self.surfaces for name in surface.request_headers)))

    @functools.cached_property
    def cors_exposed(self):
        """The answer headers a browser may read (CORS)."""
        names = list(_COMMON_ANSWER_HEADERS)
        for surface in self.surfaces:
            names += surface.answer_headers
            if surface.quota_header is not None:
                names += [surface.quota_header.format(part=part, kind=kind)
                          for kind in ("requests", "tokens")
                          for part in ("limit", "remaining", "reset")]
        return ", ".join(dict.fromkeys(names))

    @functools.cached_property
    def document(self):
        return _openapi_document(self)


class _Router:
    """Match a method and path to a route; 404 and 405 come from here.  As
    OpenAPI matches paths, a path without parameters wins over those with,
    and one with parameters over another that matches its paths too
    (/v1/models/{model}:countTokens over /v1/models/{id+})."""

    def __init__(self, routes):
        by_path = {}
        for route in routes:
            by_path.setdefault(route.path, []).append(route)
        self._exact = {path: found for path, found in by_path.items() if "{" not in path}
        # The others in the order their routes came, but each before the first
        # that would match its paths too.
        self._templates = []
        for path, found in by_path.items():
            if "{" in path:
                sample = re.sub(r"\{[^}]*\}", "x", path)
                place = next((index for index, (pattern, _) in enumerate(self._templates)
                              if pattern.match(sample)), len(self._templates))
                self._templates.insert(place, (re.compile(self._pattern(path)), found))

    @staticmethod
    def _pattern(path):
        path = re.sub(r"\{(\w+)\+\}", r"(?P<\1>.+)", path)
        return re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + r"\Z"

    def _answering(self, path):
        """(the routes of the path the request's path matches, its parameters)."""
        found = self._exact.get(path)
        if found is not None:
            return found, {}
        for pattern, found in self._templates:
            params = pattern.match(path)
            if params:
                return found, params.groupdict()
        return (), {}

    def match(self, method, path):
        """(the route, its path parameters), or the 404 or 405."""
        routes, params = self._answering(path)
        for route in routes:
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                return route, params
        if not routes:
            raise ApiError("NOT_FOUND", f"no endpoint at {path}")
        raise ApiError("METHOD_NOT_ALLOWED", f"{path} does not answer {method}",
                       headers=[("Allow", ", ".join(self.methods(path)))])

    def methods(self, path):
        """The methods the path answers (HEAD wherever GET)."""
        methods = [route.method for route in self._answering(path)[0]]
        return methods + ["HEAD"] if "GET" in methods else methods

    def surface_of(self, path):
        """The surface that answers for a path: that of a route the path
        matches, else that of the routes that share the longest leading
        segments with it when their errors have one shape (/v1/chat/nope is
        OpenAI's, /v1beta/nope Gemini's, /v1/nope shared by several), else
        the job API."""
        routes = self._answering(path)[0]
        if routes:
            return routes[0].surface
        segments = path.split("/")[1:]
        best, surfaces = 0, {}
        for route in itertools.chain(*self._exact.values(),
                                     *(found for _, found in self._templates)):
            shared = len(list(itertools.takewhile(
                lambda pair: pair[0] == pair[1], zip(segments, route.path.split("/")[1:]))))
            if shared > best:
                best, surfaces = shared, {}
            if shared == best:
                surfaces.setdefault(route.surface.error_schema, route.surface)
        return surfaces.popitem()[1] if best and len(surfaces) == 1 else _JOB_API


# --- Job store --------------------------------------------------------------------
# One dict of jobs behind one lock.  Pending transitions wait in a heap of
# due times served by one threading.Timer armed for the earliest, so a
# pending job costs a heap entry and a hanging job costs nothing.  Every
# operation first applies the transitions already due, so no answer depends
# on when the Timer ran.  Time comes from an injected clock.

class _Histogram:
    """Observations counted in buckets (upper bounds, +Inf last), with their sum."""

    def __init__(self, bounds):
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, value, times=1):
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times

    def copy(self):
        histogram = _Histogram(self.bounds)
        histogram.counts, histogram.sum = list(self.counts), self.sum
        return histogram


class _Clock:
    """Time as the store and the server see it, and --time-scale, which is
    applied here and nowhere else.

    Monotonic time is simulated: real time divided by the scale, so a
    plan's milliseconds add to it directly.  Wall time (epoch milliseconds)
    is real.  Tests inject a clock that only moves when told.
    """

    def __init__(self, scale=1):
        self.scale = scale

    def now_ms(self):
        return time.monotonic() * 1000 / self.scale

    def wall_ms(self):
        return time.time_ns() // 1_000_000

    def after(self, real_ms):
        """The simulated instant real_ms of real time from now."""
        return self.now_ms() + real_ms / self.scale

    def of_monotonic(self, seconds):
        """The simulated instant of a time.monotonic() time."""
        return seconds * 1000 / self.scale

    def real_ms(self, ms):
        """Real milliseconds of a simulated duration or instant."""
        return ms * self.scale

    def seconds_until(self, at_ms):
        """Real seconds from now to a simulated instant (0 if past)."""
        return max(0.0, (at_ms - self.now_ms()) * self.scale / 1000)

    def wait(self, condition, at_ms):
        """Wait on a condition (its lock held) until it is notified or a
        simulated instant comes.  A test's clock moves itself instead."""
        condition.wait(self.seconds_until(at_ms))

    def timer(self, at_ms, function):
        """A threading.Timer that calls function at a simulated instant, once
        started; cancel() stops it, started or not."""
        timer = threading.Timer(self.seconds_until(at_ms), function)
        timer.daemon = True
        return timer


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

    def __len__(self):
        return len(self._heap)

    def clear(self):
        self._heap.clear()
        self._cancelled = 0


class _StoreLock:
    """The store's lock.  What is asked `later` while it is held runs once it
    is released: starting the Timer, and telling on_finish of an ended job.
    Thread.start() waits for the new thread to get the GIL, and under the
    lock every request waits with it (started under the lock, create ran at
    0.81 to 1.02 of this speed in three bench runs)."""

    def __init__(self):
        self.lock = threading.Lock()
        self._later = []

    def later(self, function, *args):
        self._later.append((function, args))

    def __enter__(self):
        self.lock.acquire()

    def __exit__(self, *exc_info):
        later, self._later = self._later, []
        self.lock.release()
        for function, args in later:
            function(*args)


_job_values = operator.attrgetter(*_JOB_JSON)


class _Job:
    __slots__ = (*_JOB_JSON, "seq", "spec", "plan", "n", "step", "start_ms", "end_ms", "due",
                 "polls", "idempotency", "version", "changed", "callbacks")

    def created_json(self):
        return {"id": self.id, "state": self.state, "created_at": self.created_at}

    def to_json(self):
        return dict(zip(_JOB_JSON, _job_values(self)))

    def touch(self, wall_ms):
        self.updated_at_ms = max(self.updated_at_ms, wall_ms)
        self.updated_at = self.updated_at_ms // 1000


# What _JobStore.create answers: the settings of the attempt, a view of the
# job (None: nothing was created), whether it was replayed, its plan.
_Created = collections.namedtuple("_Created", "spec job replayed plan")


class _JobStore:
    """Jobs by id, their transitions, eviction and the seeded sequences.

    Reads take a `view`, a function of the _Job that renders it in a
    surface's format, called under the lock: one consistent snapshot."""

    MAX_SEQUENCES = 100_000  # (seed, key) counters kept; least recently used go first
    DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
    TIMER_SLACK_MS = 1       # transitions this close together share one firing of the Timer

    def __init__(self, config, clock=None):
        self.config = config
        self.clock = clock if clock is not None else _Clock(config.time_scale)
        self._lock = _StoreLock()
        self._jobs = {}                                 # id -> _Job, oldest first
        self._finished = collections.OrderedDict()      # ids of ended jobs, first ended first
        # Each key is in its test's scope (None: no test's).
        self._sequences = collections.OrderedDict()     # (seed, test, key) -> requests seen
        self._scripts = collections.OrderedDict()       # (test, key) -> attempts seen
        self._idempotency = {}                          # (test, Idempotency-Key) -> job id
        self._due = _Schedule()                         # jobs by their next transition
        self._timer = self._timer_at = None             # the Timer and when it fires
        self._firing = False                            # the Timer's work is under way
        self._closed = False
        self._ids = random.Random()
        self._seq = itertools.count(1)
        self.on_finish = None   # called with (job id, callback_url, job JSON) once a job ends
        self._by_state = collections.Counter()          # stored jobs by state
        self._created_by_mode = collections.Counter()   # for /metrics
        self._finished_by_state = collections.Counter()
        self._durations = _Histogram(self.DURATION_BUCKETS)

    def create(self, spec, idempotency=None, prefix="job", view=_Job.created_json, id_of=None):
        """Take the request's script step and store its job: a _Created of the
        settings of this attempt, view(job) (None when nothing was created),
        whether it was replayed, and its plan.

        `idempotency` is (key, fingerprint of the request) or None.  A key
        seen before with the same fingerprint answers that job again, with
        replayed True and no step taken; with another, IDEMPOTENCY_CONFLICT.
        A fault that loses the request first creates nothing.  Raises CAPACITY
        when full of active jobs, or the refusal the job's mode draws.  The
        job's id is id_of(settings, n), when given and free, else `prefix`_
        and 12 random hex digits.  The plan is drawn between
        the two holds of the lock, outside it.
        """
        with self._lock:
            self._apply_due()
            replayed = self._replayed(spec, idempotency, view)
            if replayed is not None:
                return replayed
            step, seed, n = self._take(spec)
        spec = _attempt_settings(spec, step)
        if _lost_before_work(spec):
            return _Created(spec, None, False, None)
        plan = _plan(spec, n, seed, self.config.weights, self.config.slow_factor)
        if plan.state in _REFUSED_STATES:
            raise _refusal(spec, plan)
        with self._lock:
            self._apply_due()
            replayed = self._replayed(spec, idempotency, view)  # a twin got there first
            if replayed is not None:
                return replayed
            self._make_room()
            job = _Job()
            job.id, job.seq = self._new_id(prefix, id_of and id_of(spec, n)), next(self._seq)
            job.spec, job.op, job.trace_id = spec, spec.op, spec.trace_id
            job.plan, job.n, job.step, job.idempotency = plan, n, step, idempotency
            job.state, job.result, job.error, job.due, job.polls = "queued", None, None, None, 0
            job.version, job.changed, job.callbacks, job.end_ms = 0, None, [], None
            job.created_at_ms = job.updated_at_ms = self.clock.wall_ms()
            job.created_at = job.updated_at = job.created_at_ms // 1000
            job.start_ms = self.clock.now_ms()
            self._by_state["queued"] += 1
            self._created_by_mode[plan.mode] += 1
            self._jobs[job.id] = job
            if idempotency is not None:
                self._idempotency[spec.test_id, idempotency[0]] = job.id
            created = view(job)
            self._schedule_next(job)
            return _Created(spec, created, False, plan)

    def plan_call(self, spec):
        """Take a model call's script step and draw its plan: (the settings of
        this attempt, its plan, its place in its sequence).  Nothing is
        stored; the plan is drawn outside the lock."""
        with self._lock:
            step, seed, n = self._take(spec)
        spec = _attempt_settings(spec, step)
        return spec, _plan(spec, n, seed, self.config.weights, self.config.slow_factor), n

    def replay_step(self, spec):
        """The number of earlier replays of the call's reply rule for its key
        (counted with the scripts: a replay is a script of recorded answers)."""
        with self._lock:
            return self._count(self._scripts, (spec.test_id,
                                               f"replay:{spec.rule}:{spec.trace_id or ''}"))

    def poll(self, job_id, wait_ms=0, view=_Job.to_json):
        """(view(job), the fault simulate.poll_faults gives this poll of it).

        With wait_ms (real time), an active job is answered as soon as it
        ends, or after wait_ms as it is then; the wait blocks on the job's
        own condition.
        """
        with self._lock:
            self._apply_due()
            job = self._job(job_id)
            if wait_ms:
                deadline_ms = self.clock.after(wait_ms)
                while (job.state in _ACTIVE_STATES and not self._closed
                       and self.clock.now_ms() < deadline_ms):
                    self._wait_for_change(job, deadline_ms)
                    self._apply_due()
            faults, job.polls = job.spec.poll_faults or (), job.polls + 1
            fault = faults[job.polls - 1] if job.polls <= len(faults) else None
            return view(job), _with_retry_after(fault, job.spec)

    def cancelled(self, job_id):
        """Whether a job was cancelled, or forgotten."""
        with self._lock:
            job = self._jobs.get(job_id)
            return job is None or job.state == "cancelled"

    def snapshot(self, job_id, view=_Job.to_json):
        """view(job) now; unlike poll, not counted as a poll."""
        with self._lock:
            self._apply_due()
            return view(self._job(job_id))

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
                    self._wait_for_change(job, self.clock.after(heartbeat_s * 1000))
                    self._apply_due()
                if self._closed:
                    return
                changed, seen = seen != job.version, job.version
                snapshot = job.to_json() if changed else None
            yield snapshot
            if snapshot is not None and snapshot["state"] in _TERMINAL_STATES:
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
                        and (trace_id is None or job.trace_id == trace_id)
                        and (op is None or job.op == op)):
                    if len(page) == limit:
                        return page, page[-1]["seq"]
                    page.append(dict(job.to_json(), seq=job.seq, mode=job.plan.mode))
            return page, None

    def views(self, op, view, test_id=None):
        """view(job) of every job of an op (of one test's scope, given its
        id), newest first."""
        with self._lock:
            self._apply_due()
            return [view(job) for job in reversed(self._jobs.values())
                    if job.op == op and test_id in (None, job.spec.test_id)]

    def delete(self, job_id):
        """Cancel the job if it is active, and forget it."""
        with self._lock:
            self._forget(self._cancel(job_id).id)

    def cancel(self, job_id, view=lambda job: {"id": job.id, "state": job.state}):
        """End an active job as cancelled (an ended job is left as it is); view(job)."""
        with self._lock:
            return view(self._cancel(job_id))

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
            "trace_id": spec.trace_id, "rule": spec.rule, "created_at_ms": job.created_at_ms,
            "idempotency_key": job.idempotency and job.idempotency[0], "polls": job.polls,
            "callback": spec.callback_url and {"url": spec.callback_url,
                                               "attempts": list(job.callbacks)},
            "simulate": settings,
            "outcome": ({"state": job.state, "at_ms": job.end_ms} if job.end_ms is not None
                        else {"state": plan.state, "at_ms": plan.ends_at_ms}),
        }

    def reset(self, test_id=None):
        """Cancel every active job and forget every job, pending transition,
        seeded sequence, script counter and idempotency key (of one test's
        scope, given its id); answers how many of each went."""
        if test_id is not None:
            return self._reset_test(test_id)
        with self._lock:
            self._apply_due()
            removed = {"jobs": len(self._jobs),
                       "active_jobs_cancelled": len(self._jobs) - len(self._finished),
                       "script_counters": len(self._scripts),
                       "sequences": len(self._sequences),
                       "idempotency_keys": len(self._idempotency)}
            for job in list(self._jobs.values()):
                if job.state in _ACTIVE_STATES:
                    self._finish(job, "cancelled", None, {
                        "code": "CANCELLED", "message": "job was cancelled by a server reset"},
                        self._elapsed_ms(job))
            for table in (self._jobs, self._finished, self._scripts, self._sequences,
                          self._idempotency, self._by_state):
                table.clear()
            self._due.clear()
            return removed

    def _reset_test(self, test_id):
        with self._lock:
            self._apply_due()
            jobs = [job for job in self._jobs.values() if job.spec.test_id == test_id]
            active = [job for job in jobs if job.state in _ACTIVE_STATES]
            for job in active:
                self._finish(job, "cancelled", None, {
                    "code": "CANCELLED", "message": "job was cancelled by a reset of its test"},
                    self._elapsed_ms(job))
            for job in jobs:
                self._forget(job.id)
            scripts = [key for key in self._scripts if key[0] == test_id]
            sequences = [key for key in self._sequences if key[1] == test_id]
            for table, keys in ((self._scripts, scripts), (self._sequences, sequences)):
                for key in keys:
                    del table[key]
            return {"jobs": len(jobs), "active_jobs_cancelled": len(active),
                    "script_counters": len(scripts), "sequences": len(sequences),
                    "idempotency_keys": sum(job.idempotency is not None for job in jobs)}

    def metrics(self):
        """(jobs created by mode, finished by state, active, duration histogram)."""
        with self._lock:
            self._apply_due()
            return (dict(self._created_by_mode), dict(self._finished_by_state),
                    len(self._jobs) - len(self._finished),
                    self._durations.copy())

    def ended_at(self, job_ids):
        """When each of these jobs that the store keeps and that has ended
        did, in real ms on the clock's monotonic scale (as the journal's)."""
        with self._lock:
            self._apply_due()
            ended = {}
            for job_id in job_ids:
                job = self._jobs.get(job_id)
                if job is not None and job.end_ms is not None:
                    ended[job_id] = self.clock.real_ms(job.start_ms + job.end_ms)
            return ended

    def record_callback(self, job_id, attempt):
        """Add a webhook attempt to the job's record, if it is still stored."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None:
                job.callbacks.append(attempt)

    def scripts(self, test_id=None):
        """The attempts counted per script key (of one test's, given its id)."""
        with self._lock:
            return [{"key": key, "test_id": test, "attempts": n}
                    for (test, key), n in self._scripts.items()
                    if test_id in (None, test)]

    def counts(self):
        with self._lock:
            self._apply_due()
            return {"stored": len(self._jobs), "active": len(self._jobs) - len(self._finished),
                    "by_state": {state: n for state, n in self._by_state.items() if n}}

    def close(self):
        """Disarm the Timer and wake every waiter; pending transitions are dropped."""
        with self._lock:
            self._closed = True
            self._due.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            for job in self._jobs.values():
                self._changed(job)

    def _fire(self):
        """The Timer's work: apply what is due, then arm once for what comes next."""
        with self._lock:
            self._timer, self._firing = None, True
            try:
                self._apply_due()
            finally:
                self._firing = False
            self._arm(not_before_ms=self.clock.now_ms() + self.TIMER_SLACK_MS)

    # Everything below runs with self._lock held.

    def _arm(self, not_before_ms=None):
        """Arm the Timer for the earliest pending transition, unless it is
        armed for no later than that already."""
        at_ms = self._due.next_time()
        if at_ms is None or self._closed or self._firing:
            return
        if not_before_ms is not None:
            at_ms = max(at_ms, not_before_ms)
        if self._timer is not None:
            if self._timer_at <= at_ms + self.TIMER_SLACK_MS:
                return
            self._timer.cancel()
        self._timer_at = at_ms
        self._timer = self.clock.timer(at_ms, self._fire)
        self._lock.later(self._timer.start)

    def _take(self, spec):
        """What must be ordered, and nothing else: (its script step, the
        seed of its draws, its place among the requests with its seed, or
        none, and its key).  A script's steps are counted per key (step None
        without a script); a request with no seed draws from a fresh one."""
        step = None
        seed = spec.seed
        if spec.script is not None:
            step = self._count(self._scripts, (spec.test_id, spec.trace_id or ""))
            seed = spec.script[min(step, len(spec.script) - 1)].get("seed", seed)
        n = self._count(self._sequences, (seed, spec.test_id, spec.trace_id or ""))
        return step, self._ids.getrandbits(64) if seed is None else seed, n

    def _replayed(self, spec, idempotency, view):
        """The _Created of a replay of an Idempotency-Key seen before (with
        the settings asked, no step taken), or None."""
        if idempotency is None or (spec.test_id, idempotency[0]) not in self._idempotency:
            return None
        job = self._jobs[self._idempotency[spec.test_id, idempotency[0]]]
        if job.idempotency != idempotency:
            raise ApiError("IDEMPOTENCY_CONFLICT", field="Idempotency-Key")
        return _Created(spec, view(job), True, job.plan)

    def _make_room(self):
        """At max_jobs, the job that ended first goes; with none ended, CAPACITY."""
        if len(self._jobs) < self.config.max_jobs:
            return
        if not self._finished:
            raise ApiError("CAPACITY", f"all {self.config.max_jobs} stored jobs are still "
                           "active; retry later", headers=[("Retry-After", "1")])
        self._forget(self._finished.popitem(last=False)[0])

    def _cancel(self, job_id):
        self._apply_due()
        job = self._job(job_id)
        if job.state in _ACTIVE_STATES:
            self._finish(job, "cancelled", None, {"code": "CANCELLED",
                                                  "message": _ERRORS["CANCELLED"].message},
                         self._elapsed_ms(job))
        return job

    def _job(self, job_id):
        job = self._jobs.get(job_id)
        if job is None:
            raise ApiError("NOT_FOUND", f"no job with id {job_id!r}", "id")
        return job

    def _new_id(self, prefix, chosen=None):
        job_id = chosen and self.own_id(chosen)
        while job_id is None or job_id in self._jobs:
            job_id = self.own_id(f"{prefix}_{self._ids.getrandbits(48):012x}")
        return job_id

    def own_id(self, made):
        """An id this server made, as --replica I/N has it: its hex part
        begins with the digit I."""
        if self.config.replica is None:
            return made
        prefix, _, digits = made.partition("_")
        return f"{prefix}_{int(self.config.replica.partition('/')[0]):x}{digits[1:]}"

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
            del self._idempotency[job.spec.test_id, job.idempotency[0]]

    def _schedule_next(self, job):
        plan = job.plan
        if job.state == "queued" and plan.running_at_ms is not None:
            at_ms = plan.running_at_ms
        elif plan.ends_at_ms is not None:
            at_ms = plan.ends_at_ms
        else:
            return  # a hanging job: nothing will ever happen to it by itself
        job.due = self._due.push(job.start_ms + at_ms, job)
        if job.start_ms + at_ms <= self.clock.now_ms():
            self._apply_due()  # due already (queue_ms 0): made now, with no Timer
        elif self._due.is_first(job.due):
            self._arm()

    def _apply_due(self):
        """Make every transition whose time has come."""
        now_ms = self.clock.now_ms()
        while True:
            job = self._due.pop_due(now_ms)
            if job is None:
                return
            job.due = None
            if job.state == "queued" and job.plan.running_at_ms is not None:
                self._set_state(job, "running")
                job.touch(self.clock.wall_ms())
                self._changed(job)
                self._schedule_next(job)
            else:
                self._finish(job, job.plan.state, job.plan.result, job.plan.error,
                             job.plan.ends_at_ms)

    def _elapsed_ms(self, job):
        return round(self.clock.now_ms() - job.start_ms)

    def _finish(self, job, state, result, error, at_ms):
        """End a job in `state`, at_ms (simulated) after its creation."""
        job.end_ms = at_ms
        if job.due is not None:
            self._due.cancel(job.due)
            job.due = None
        self._set_state(job, state)
        job.result, job.error = result, error
        job.touch(self.clock.wall_ms())
        self._finished[job.id] = None
        self._finished_by_state[state] += 1
        seconds = self.clock.real_ms(self.clock.now_ms() - job.start_ms) / 1000
        self._durations.observe(seconds)
        self._changed(job)
        if job.spec.callback_url and self.on_finish is not None:
            self._lock.later(self.on_finish, job.id, job.spec.callback_url, job.to_json())

    def _set_state(self, job, state):
        self._by_state[job.state] -= 1
        self._by_state[state] += 1
        job.state = state

    def _changed(self, job):
        job.version += 1
        if job.changed is not None:
            job.changed.notify_all()

    def _wait_for_change(self, job, until_ms):
        # A condition per watched job, on the store's lock: a transition wakes
        # only the waiters of that job.
        if job.changed is None:
            job.changed = threading.Condition(self._lock.lock)
        self.clock.wait(job.changed, until_ms)


class _Files:
    """Uploaded files (OpenAI's /v1/files) by id, each in the scope of the
    test that uploaded it: at most MAX_FILES, kept until deleted or reset."""

    MAX_FILES = 10_000
    _File = collections.namedtuple("_File", "json content test_id")

    def __init__(self, clock):
        self._clock, self._lock, self._files = clock, threading.Lock(), {}

    def add(self, filename, purpose, content, test_id):
        """Keep a file; its file object."""
        with self._lock:
            if len(self._files) >= self.MAX_FILES:
                raise ApiError("CAPACITY", f"{self.MAX_FILES} files are kept; delete some first")
            file_id = "file-" + _random_hex(24)
            self._files[file_id] = self._File({
                "id": file_id, "object": "file", "bytes": len(content),
                "created_at": self._clock.wall_ms() // 1000, "filename": filename,
                "purpose": purpose, "status": "processed", "expires_at": None,
                "status_details": None}, content, test_id)
            return dict(self._files[file_id].json)

    def get(self, file_id, field="id"):
        """(the file object, the content) of a file."""
        with self._lock:
            found = self._files.get(file_id)
        if found is None:
            raise ApiError("NOT_FOUND", f"no file with id {file_id!r}", field)
        return dict(found.json), found.content

    def list(self, purpose=None, test_id=None):
        """The file objects, newest first (of a purpose, of a test's scope)."""
        with self._lock:
            return [dict(found.json) for found in reversed(self._files.values())
                    if purpose in (None, found.json["purpose"])
                    and test_id in (None, found.test_id)]

    def delete(self, file_id):
        with self._lock:
            if self._files.pop(file_id, None) is None:
                raise ApiError("NOT_FOUND", f"no file with id {file_id!r}", "id")

    def clear(self, test_id=None):
        """Forget every file (of a test's scope); how many went."""
        with self._lock:
            return _forget(self._files, test_id, lambda file_id, found: found.test_id)


class _McpSessions:
    """The MCP sessions open, each in the scope of the test that opened it
    (the newest MAX_SESSIONS; an older one is forgotten, and its client told
    404), and how many times each key called each tool (a tool's script
    steps)."""

    MAX_SESSIONS = 10_000
    _Session = collections.namedtuple("_Session", "test_id version")

    def __init__(self):
        self._lock, self._sessions = threading.Lock(), collections.OrderedDict()
        self._calls = collections.Counter()  # (test id, key, tool) -> calls

    def open(self, test_id, version):
        """A new session's id."""
        session_id = _random_hex(32)
        with self._lock:
            self._sessions[session_id] = self._Session(test_id, version)
            if len(self._sessions) > self.MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return session_id

    def find(self, session_id, test_id):
        """The session of that id in that test's scope, or None."""
        with self._lock:
            session = self._sessions.get(session_id)
        return session if session is not None and session.test_id == test_id else None

    def close(self, session_id):
        with self._lock:
            self._sessions.pop(session_id, None)

    def step(self, test_id, key, tool):
        """The number of earlier calls of the tool by the key."""
        with self._lock:
            calls = self._calls[test_id, key, tool]
            self._calls[test_id, key, tool] += 1
            return calls

    def clear(self, test_id=None):
        """Forget every session and count (of a test's scope); how many sessions went."""
        with self._lock:
            _forget(self._calls, test_id, lambda counted, calls: counted[0])
            return _forget(self._sessions, test_id, lambda session_id, session: session.test_id)


def _forget(items, test_id, test_of):
    """Remove from a dict the items in a test's scope (every item, given no
    test id), test_of(key, item) telling whose each is; how many went."""
    gone = [key for key, item in items.items() if test_id in (None, test_of(key, item))]
    for key in gone:
        del items[key]
    return len(gone)


class _Quotas:
    """Requests and tokens per minute, per key (--rpm, --tpm, simulate.rpm
    and tpm): a sliding window of one simulated minute over the requests
    admitted, so no minute ever holds more than the limit.  Refused requests
    do not count."""

    WINDOW_MS = 60_000

    def __init__(self, clock):
        self.clock = clock
        self._lock = threading.Lock()
        self._windows = {}   # (test, key) -> [deque of (admitted at, tokens), tokens in it]
        self._swept_at = 1024
        self.refused = collections.Counter()  # "requests" or "tokens" -> refusals

    def admit(self, key, rpm, tpm, tokens):
        """Count a request of `tokens` tokens against the key's limits (None:
        none).  Returns the quota left, {"requests" and/or "tokens": (limit,
        remaining, real ms until the window frees room)}; over a limit,
        raises the 429 that tells the true wait."""
        now = self.clock.now_ms()
        with self._lock:
            if len(self._windows) > self._swept_at:
                self._sweep(now)
            window = self._windows.setdefault(key, [collections.deque(), 0])
            admitted = window[0]
            while admitted and admitted[0][0] <= now - self.WINDOW_MS:
                window[1] -= admitted.popleft()[1]
            waits = {}
            if rpm is not None and len(admitted) >= rpm:
                waits["requests"] = admitted[len(admitted) - rpm][0]
            if tpm is not None and window[1] and window[1] + tokens > tpm:
                freed = 0
                for at, spent in admitted:  # the oldest leave first
                    freed += spent
                    if window[1] - freed + tokens <= tpm:
                        break
                waits["tokens"] = at
            if not waits:
                admitted.append((now, tokens))
                window[1] += tokens
            reset_ms = math.ceil(self.clock.real_ms(
                admitted[0][0] + self.WINDOW_MS - now)) if admitted else 0
            quota = {}
            if rpm is not None:
                quota["requests"] = (rpm, max(0, rpm - len(admitted)), reset_ms)
            if tpm is not None:
                quota["tokens"] = (tpm, max(0, tpm - window[1]), reset_ms)
            if not waits:
                return quota
            kind = max(waits, key=waits.get)
            self.refused[kind] += 1
        wait_ms = math.ceil(self.clock.real_ms(waits[kind] + self.WINDOW_MS - now))
        limit = f"{rpm} requests" if kind == "requests" else f"{tpm} tokens"
        raise ApiError("RATE_LIMITED", f"rate limit of {limit} per minute reached for this "
                       f"key; retry in {wait_ms} ms", retry_after_ms=wait_ms / self.clock.scale,
                       quota=quota)

    def _sweep(self, now):
        """Forget the keys whose window is empty (under the lock)."""
        self._windows = {key: window for key, window in self._windows.items()
                         if window[0] and window[0][-1][0] > now - self.WINDOW_MS}
        self._swept_at = max(1024, 2 * len(self._windows))

    def counts(self):
        """(keys with requests in their window, refusals by limit), for /health and /metrics."""
        since = self.clock.now_ms() - self.WINDOW_MS
        with self._lock:
            return (sum(1 for admitted, _ in self._windows.values()
                        if admitted and admitted[-1][0] > since), dict(self.refused))

    def clear(self, test_id=None):
        """Forget every key's window and the refusals counted (or one test's windows)."""
        with self._lock:
            if test_id is not None:
                self._windows = {key: window for key, window in self._windows.items()
                                 if key[0] != test_id}
                return
            self._windows.clear()
            self.refused.clear()


class _ModelCounts:
    """What vLLM's metrics count of one model's calls (times in seconds)."""

    # vLLM's buckets (vllm/v1/metrics/loggers.py).
    TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
    ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)
    E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

    def __init__(self):
        self.ttft = _Histogram(self.TTFT_BUCKETS)
        self.itl = _Histogram(self.ITL_BUCKETS)
        self.e2e = _Histogram(self.E2E_BUCKETS)
        self.prompt_tokens = self.generation_tokens = 0
        self.finished = collections.Counter()  # vLLM's finished_reason -> calls

    def copy(self):
        counts = _ModelCounts()
        counts.ttft, counts.itl, counts.e2e = (self.ttft.copy(), self.itl.copy(),
                                               self.e2e.copy())
        counts.prompt_tokens, counts.generation_tokens = self.prompt_tokens, self.generation_tokens
        counts.finished = collections.Counter(self.finished)
        return counts


class _Capacity:
    """--slots, --queue and --load-factor: the model calls that generate at
    once, and what vLLM's metrics count of them.

    A call holds a slot from its first token to its last.  Every time of a
    call is known when it arrives (its plan and its reply's gaps), so its
    slot is booked then: the one that frees first, after the calls that
    came before it.  A call whose first token falls due before that waits,
    its wait added to its time to first token; up to --queue calls may wait
    at once, and past that a call is refused, with the wait until a place
    frees.  Its token gaps are stretched by the load when it starts: x1 with
    one call generating, rising in a line to x--load-factor with every slot
    held.  Times are simulated ms on the store's clock.

    A call is counted in the metrics when booked: its figures go to a tally,
    summed into the histograms when they are read or the tally is long,
    equal figures at once (summing each call as it came made a chat answer
    take 62 us of server time instead of 57)."""

    TALLY = 4096  # calls tallied before they are summed

    def __init__(self, config, clock):
        self.slots, self.queue, self.load_factor = config.slots, config.queue, config.load_factor
        self.clock = clock
        self._lock = threading.Lock()
        self._free_at = [-math.inf] * (self.slots or 0)  # a heap: when each slot frees
        self._calls = []     # a heap of (ends, starts, first token due, model) of calls not ended
        self._tally = []     # (model, reply's figures, first and last token ms, pieces, factor)
        self._models = {}    # model name -> _ModelCounts

    def book(self, model, received_ms, due_ms, reply, overloaded_status, generates=True):
        """(when its first token goes out, the reply with its gaps
        stretched) of a call received at received_ms whose first token is
        due at due_ms; past the queue, raises the surface's overloaded error.
        A call that does not generate (a plain answer without --slots, sent
        whole when its first token is due) ends then."""
        pieces = _piece_count(reply) if generates else 0
        generating_ms = reply.gap.total(pieces)  # drawn gaps are drawn here, outside the lock
        now = self.clock.now_ms()
        with self._lock:
            while self._calls and self._calls[0][0] <= now:
                heapq.heappop(self._calls)
            start_ms, factor = due_ms, 1
            if self.slots is not None:
                start_ms = max(due_ms, self._free_at[0])
                if start_ms > due_ms and self.queue is not None:
                    self._check_queue(due_ms, now, overloaded_status)
                held = sum(1 for free_at in self._free_at if free_at > start_ms)
                factor = 1 + (self.load_factor - 1) * held / max(1, self.slots - 1)
                heapq.heapreplace(self._free_at, start_ms + factor * generating_ms)
            ends_ms = start_ms + factor * generating_ms
            heapq.heappush(self._calls, (ends_ms, start_ms, due_ms, model))
            self._tally.append((model, reply.gap.constant if pieces > 1 else 0,
                                reply.prompt_tokens, reply.completion_tokens, reply.end,
                                start_ms - received_ms, ends_ms - received_ms, pieces, factor,
                                None if reply.gap.constant is not None else reply.gap))
            if len(self._tally) >= self.TALLY:
                self._sum_tally()
        if start_ms != due_ms or factor != 1:
            reply = reply._replace(gap=reply.gap.stretched(factor),
                                   elapsed_ms=start_ms - received_ms)
        return start_ms, reply

    def _check_queue(self, due_ms, now, overloaded_status):
        """Refuse a call that would wait when --queue calls that came before
        it wait for a slot they will not have by its first token (under the
        lock)."""
        waiting = [starts for _, starts, due, _ in self._calls if due < starts and due_ms < starts]
        if len(waiting) < self.queue:
            return
        wait_ms = max(1, math.ceil(self.clock.real_ms(min(waiting or self._free_at) - now)))
        raise ApiError("OVERLOADED", f"all {self.slots} slots are busy and {self.queue} calls "
                       f"wait; retry in {wait_ms} ms", status=overloaded_status,
                       retry_after_ms=wait_ms / self.clock.scale)

    def _sum_tally(self):
        """Sum the tallied calls into their models' counts (under the lock)."""
        in_seconds = self.clock.real_ms(0.001)  # real seconds of a simulated ms
        for (model, constant, prompt_tokens, completion_tokens, end, first_token_ms,
             last_token_ms, pieces, factor, gaps), calls in collections.Counter(
                self._tally).items():
            counts = self._models.get(model)
            if counts is None:
                counts = self._models[model] = _ModelCounts()
            counts.ttft.observe(first_token_ms * in_seconds, calls)
            counts.e2e.observe(last_token_ms * in_seconds, calls)
            if gaps is None:
                counts.itl.observe(constant * factor * in_seconds, calls * max(0, pieces - 1))
            else:
                for index in range(1, pieces):
                    counts.itl.observe(gaps(index) * factor * in_seconds, calls)
            counts.prompt_tokens += prompt_tokens * calls
            counts.generation_tokens += completion_tokens * calls
            counts.finished["length" if end == "max_tokens" else "stop"] += calls
        self._tally.clear()

    def snapshot(self):
        """{model: (calls running, calls waiting for a slot, its _ModelCounts
        copied)}; a call runs from its arrival to its last token but while
        it waits."""
        now = self.clock.now_ms()
        with self._lock:
            self._sum_tally()
            calls = [call for call in self._calls if call[0] > now]
            models = {model: counts.copy() for model, counts in self._models.items()}
        running, waiting = collections.Counter(), collections.Counter()
        for _, starts, due, model in calls:
            (waiting if due <= now < starts else running)[model] += 1
        return {model: (running[model], waiting[model], counts)
                for model, counts in sorted(models.items())}


_JOURNAL_BODY_BYTES = 4096
_JOURNAL_HEADERS = ("Idempotency-Key", "X-Trace-Id", "User-Agent")


def _body_digest(body):
    return hashlib.blake2b(body, digest_size=8).hexdigest()


class _Journal:
    """The last `size` requests the server answered, oldest first."""

    ENTRY_SCHEMA = {"type": "object", "properties": {
        "seq": {"type": "integer"}, "at_ms": {"type": "integer"},
        "monotonic_ms": {"type": "number"}, "method": {"type": "string"},
        "path": {"type": "string"}, "query": {"type": "string"}, "headers": {"type": "object"},
        "body": {"type": "string"}, "body_truncated": {"type": "boolean"},
        "status": {"type": ["integer", "null"]}, "fault": {},
        "answered_ms": {"type": "number", "description": "monotonic_ms of the answer going out"},
        "test_id": {"type": ["string", "null"], "description": "The test whose scope it was in"},
        "surface": {"type": ["string", "null"],
                    "description": "The surface that answered it, for a model call"},
        **{name: dict(schema, description=about) for name, (schema, about)
           in _NOTE_FIELDS.items()},
        "body_digest": {"type": "string"}}}

    def __init__(self, size):
        self._entries = collections.deque(maxlen=size)
        self._lock = threading.Lock()
        self._seq = itertools.count()

    def record(self, request, status, fault, clock):
        """Record a request and how it was answered (status None: no answer).
        The entry is written out when read: on the answer's path it took a
        tenth of a chat request's time."""
        body = request.body
        if len(body) > _JOURNAL_BODY_BYTES:  # keep what is shown, not the body
            body = (body[:_JOURNAL_BODY_BYTES], _body_digest(body))
        row = (request.method, request.path, request.query, request.headers, request.note,
               request.received_wall_ms, body, status, fault,
               clock.real_ms(request.received_ms), clock.real_ms(clock.now_ms()),
               request.route and request.route.surface.name, request.test_id)
        with self._lock:
            self._entries.append((next(self._seq), row))

    @staticmethod
    def _entry(seq, row):
        (method, path, query, headers, note, wall_ms, body, status, fault, monotonic_ms,
         answered_ms, surface, test_id) = row
        body, digest = (body, None) if isinstance(body, bytes) else body
        return {
            "seq": seq, "at_ms": wall_ms, "monotonic_ms": round(monotonic_ms, 3),
            "method": method, "path": path, "query": query,
            "headers": {name: headers[name.lower()] for name in _JOURNAL_HEADERS
                        if name.lower() in headers},
            "body": body.decode("utf-8", "replace"), "body_truncated": digest is not None,
            "status": status, "fault": fault and fault.to_json(),
            "answered_ms": round(answered_ms, 3), "test_id": test_id, "surface": surface,
            **{name: getattr(note, name) for name in _NOTE_FIELDS},
            "trace_id": note.trace_id or headers.get("x-trace-id"),
            "body_digest": digest or _body_digest(body),
        }

    def find(self, trace_id=None, path=None, limit=None, test_id=None):
        """The newest `limit` entries that match, oldest first."""
        with self._lock:
            rows = [(seq, row) for seq, row in self._entries
                    if test_id is None or row[-1] == test_id]
        found = [entry for entry in itertools.starmap(self._entry, rows)
                 if (trace_id is None or entry["trace_id"] == trace_id)
                 and (path is None or entry["path"] == path)]
        return found[-limit:] if limit else found

    def clear(self, test_id=None):
        """Forget every entry (or one test's); returns how many went."""
        with self._lock:
            removed = len(self._entries)
            if test_id is None:
                self._entries.clear()
                return removed
            kept = [(seq, row) for seq, row in self._entries if row[-1] != test_id]
            self._entries.clear()
            self._entries.extend(kept)
            return removed - len(kept)


# --- Verdict ----------------------------------------------------------------------
# What a client's requests, as the journal holds them, say about its retries,
# back-off, polling and idempotency (see _FINDINGS).  Pure: journal entries
# and a "now" in, findings out.  Requests are judged by sequence key: their
# trace_id, else that of the job they name.  A retry is the next request of a
# key with the same method, path and body after one that failed.

_EARLY_SLACK_MS = 2          # a retry this much before the retry-after is on time
_STORM_PER_SECOND = 20
_POLLS_AFTER_END_MS = 2000
_LOST_FAULTS = ("reset", "disconnect", "empty", "malformed")  # the answer never arrived whole


def _failed(entry):
    """Whether a request failed: no answer, an error, a broken answer or stream."""
    fault = entry["fault"]
    return (entry["status"] is None or entry["status"] >= 400 or entry["stream_failure"]
            is not None or (isinstance(fault, str) and fault in _LOST_FAULTS))


def _retryable(entry):
    """Whether a failed request is worth retrying: not a 4xx but 408 and 429,
    not an exhausted quota."""
    status = entry["status"]
    return status is None or not (400 <= status < 500) or (
        status in (408, 429) and entry["code"] != "QUOTA_EXHAUSTED")


def _outcome(entry):
    """A request's outcome in a word or two: its status, fault or stream failure."""
    fault = entry["fault"]
    what = entry["stream_failure"] or (fault if isinstance(fault, str) else None)
    return f"{entry['status'] or 'no answer'}" + (f" ({what})" if what else "")


class _Judge:
    """Findings from the requests of one key, oldest first (see _verdict)."""

    def __init__(self, now_ms, settle_ms, max_attempts, min_poll_ms, ended_ms):
        self.now_ms, self.settle_ms = now_ms, settle_ms
        self.max_attempts, self.min_poll_ms = max_attempts, min_poll_ms
        self.ended_ms = ended_ms

    def judge(self, entries):
        """(attempts as the verdict lists them, findings, retry gaps for
        NO_JITTER).  MCP messages are judged as an agent's tool calls alone
        (see tools): their retries are the agent's, not its HTTP client's."""
        requests = [entry for entry in entries if entry["mcp"] is None]
        attempts, chains, last, retries = [], [], {}, []  # retries: (failed request, retry)
        chain_of = {}  # seq -> the chain of attempts it ends
        for entry in requests:
            target = (entry["method"], entry["path"], entry["body_digest"])
            before = last.get(target)
            last[target] = entry
            gap = None if before is None else entry["monotonic_ms"] - before["answered_ms"]
            is_retry = before is not None and _failed(before)
            attempts.append((entry, gap, is_retry))
            if is_retry:
                retries.append((before, entry, gap))
                chain = chain_of.pop(before["seq"])
                chain.append(entry)
            else:
                chain = [entry]
                chains.append(chain)
            chain_of[entry["seq"]] = chain
        findings = [self.early(retries), self.non_retryable(retries), self.no_backoff(chains),
                    self.storm(chains), *self.unfinished(requests, last.values()),
                    self.duplicates(requests), *self.polls(requests), *self.tools(entries),
                    *self.conversations(requests)]
        plain = [gap for before, _, gap in retries
                 if _retryable(before) and before["retry_after_ms"] is None]
        return attempts, [finding for finding in findings if finding], plain

    @staticmethod
    def finding(code, evidence, message):
        return evidence and {"code": code, "evidence": evidence, "message": message}

    def early(self, retries):
        early = [(before, retry, gap) for before, retry, gap in retries
                 if before["retry_after_ms"] is not None
                 and gap < before["retry_after_ms"] - _EARLY_SLACK_MS]
        return self.finding(
            "RETRY_AFTER_IGNORED", [retry["seq"] for _, retry, _ in early],
            "; ".join(f"request {retry['seq']} came {gap:.0f} ms after a {_outcome(before)} "
                      f"that asked for {before['retry_after_ms']} ms"
                      for before, retry, gap in early))

    def non_retryable(self, retries):
        again = [(before, retry) for before, retry, _ in retries if not _retryable(before)]
        return self.finding(
            "RETRIED_NON_RETRYABLE", [retry["seq"] for _, retry in again],
            "; ".join(f"request {retry['seq']} repeated request {before['seq']}, answered "
                      f"{_outcome(before)}" + (f" {before['code']}" if before["code"] else "")
                      for before, retry in again))

    def no_backoff(self, chains):
        evidence, messages = [], []
        for chain in chains:
            run = []  # (gap, seq) of retries in a row after failures with no retry-after
            for before, retry in zip(chain, chain[1:] + [None]):
                if retry is not None and _retryable(before) and before["retry_after_ms"] is None:
                    run.append((retry["monotonic_ms"] - before["answered_ms"], retry["seq"]))
                    continue
                # Grown: the last gap half as long again as the first, beyond timer noise.
                if len(run) >= 3 and run[-1][0] <= run[0][0] * 1.5 + 5:
                    evidence += [seq for _, seq in run]
                    messages.append(f"{len(run)} retries of request {chain[0]['seq']} came "
                                    + ", ".join(f"{gap:.0f}" for gap, _ in run) + " ms apart")
                run = []
        return self.finding("NO_BACKOFF", evidence, "; ".join(messages))

    def storm(self, chains):
        evidence, messages = [], []
        for chain in chains:
            times = [entry["monotonic_ms"] for entry in chain]
            burst = [entry["seq"] for index, entry in enumerate(chain)
                     if index >= _STORM_PER_SECOND
                     and times[index] - times[index - _STORM_PER_SECOND] < 1000]
            beyond = [entry["seq"] for entry in chain[self.max_attempts:]]
            if beyond:
                messages.append(f"request {chain[0]['seq']} was tried {len(chain)} times, "
                                f"more than max_attempts={self.max_attempts}")
            if burst:
                messages.append(f"request {chain[0]['seq']} was tried more than "
                                f"{_STORM_PER_SECOND} times in one second")
            evidence += sorted(set(beyond + burst))
        return self.finding("RETRY_STORM", evidence, "; ".join(messages))

    def unfinished(self, requests, lasts):
        """GAVE_UP and TRUNCATED_STREAM_ACCEPTED: the last attempt of a request
        failed, worth a retry, and none came before settle_ms or the next request."""
        gave_up, truncated = [], []
        for entry in lasts:
            settled = (self.now_ms - entry["answered_ms"] >= self.settle_ms
                       or requests[-1] is not entry)
            if _failed(entry) and _retryable(entry) and settled:
                broken = entry["stream_failure"] in _BROKEN_STREAM_FAILURES
                (truncated if broken else gave_up).append(entry)
        return (self.finding("GAVE_UP", [entry["seq"] for entry in gave_up], "; ".join(
                    f"request {entry['seq']} ended {_outcome(entry)} and was not tried again"
                    for entry in gave_up)),
                self.finding("TRUNCATED_STREAM_ACCEPTED", [entry["seq"] for entry in truncated],
                             "; ".join(f"the stream of request {entry['seq']} broke "
                                       f"({entry['stream_failure']}) and was not tried again"
                                       for entry in truncated)))

    def duplicates(self, requests):
        evidence, messages, lost = [], [], {}  # lost: body digest -> the create that lost
        for entry in requests:
            if entry["method"] != "POST" or entry["job_id"] is None:
                continue
            first = lost.get(entry["body_digest"])
            if first is not None and first["job_id"] != entry["job_id"]:
                evidence += [first["seq"], entry["seq"]]
                messages.append(f"request {entry['seq']} created {entry['job_id']} for the body "
                                f"of request {first['seq']}, whose {first['job_id']} was "
                                f"created but its answer lost ({_outcome(first)})")
            elif first is None and _failed(entry):  # created, but the client never knew
                lost[entry["body_digest"]] = entry
        return self.finding("DUPLICATE_WORK", sorted(set(evidence)), "; ".join(messages))

    def polls(self, requests):
        """POLL_TOO_FAST and NO_CANCEL, from what each answer said of its job."""
        by_job = {}
        for entry in requests:
            if entry["job_id"] is not None:
                by_job.setdefault(entry["job_id"], []).append(entry)
        fast, fast_messages, left, left_messages = [], [], [], []
        for job_id, named in by_job.items():
            polls = [entry for entry in named
                     if entry["method"] == "GET" and entry["job_ended"] is not None]
            if len(polls) >= 3:
                mean = (polls[-1]["monotonic_ms"] - polls[0]["monotonic_ms"]) / (len(polls) - 1)
                if mean < self.min_poll_ms:
                    fast += [entry["seq"] for entry in polls[1:]]
                    fast_messages.append(f"{len(polls)} polls of {job_id} came {mean:.0f} ms "
                                         f"apart on average (min_poll_ms={self.min_poll_ms})")
            ended = next((entry for entry in polls if entry["job_ended"]), None)
            late = ended and [entry["seq"] for entry in polls if entry["monotonic_ms"]
                              > ended["answered_ms"] + _POLLS_AFTER_END_MS]
            if late:
                fast += late
                fast_messages.append(f"{len(late)} polls of {job_id} came more than "
                                     f"{_POLLS_AFTER_END_MS} ms after request {ended['seq']} "
                                     "said it had ended")
            final = named[-1]
            settled = self.now_ms - final["answered_ms"] >= self.settle_ms
            ended = self.ended_ms.get(job_id)  # it may have ended by itself meanwhile
            if final["job_ended"] is False and settled and (
                    ended is None or ended > final["answered_ms"] + self.settle_ms):
                left.append(final["seq"])
                left_messages.append(f"{job_id} was last seen active by request {final['seq']}, "
                                     f"then neither polled nor cancelled")
        return (self.finding("POLL_TOO_FAST", sorted(set(fast)), "; ".join(fast_messages)),
                self.finding("NO_CANCEL", left, "; ".join(left_messages)))


    def conversations(self, requests):
        """A finding for each kind of conversation the server refused as the
        real API does (see _CONVERSATION_ERRORS): the client built it wrong."""
        for code in _CONVERSATION_ERRORS:
            refused = [entry for entry in requests if entry["code"] == code]
            yield self.finding(code, [entry["seq"] for entry in refused], "; ".join(
                f"request {entry['seq']} was refused with {entry['status']}: "
                f"{_ERRORS[code].message}" + (f" ({entry['field']})" if entry["field"] else "")
                for entry in refused))

    def tools(self, entries):
        """The findings on an agent's MCP tool calls, read among its model
        calls: TOOL_ARGUMENTS_REFUSED, TOOL_RETRIED_UNCHANGED,
        TOOL_ERROR_IGNORED and TOOL_HANG_NOT_CANCELLED."""
        refused, ignored, hung, runs, latest = [], [], [], [], {}
        unseen = []  # error results no model call has carried yet
        # A call is cancelled by its id, or with its session.
        cancelled = {(entry["mcp"]["session"], entry["mcp"]["cancels"]) for entry in entries
                     if entry["mcp"] is not None and entry["mcp"]["cancels"] is not None}
        closed = {entry["mcp"]["session"] for entry in entries
                  if entry["mcp"] is not None and entry["method"] == "DELETE"}
        for entry in entries:
            mcp = entry["mcp"]
            if mcp is None:
                if entry["surface"] is not None and entry["method"] == "POST":  # a model call
                    results = entry["tool_results"] or ()
                    ignored += [(error, entry) for error in unseen
                                if not any(error["mcp"]["text"][:100] in result
                                           for result in results)]
                    unseen = []
                continue
            if mcp["method"] != "tools/call" or mcp["tool"] is None:
                continue
            refused += [entry] if mcp["outcome"] == "refused" else []
            unseen += [entry] if mcp["text"] is not None else []
            call = mcp["tool"], mcp["arguments"]
            run = latest.get(call)
            if run is not None and _tool_failed(run[-1]):
                run.append(entry)
            else:
                latest[call] = [entry]
                runs.append(latest[call])
            if (mcp["outcome"] == "hang" and (mcp["session"], mcp["id"]) not in cancelled
                    and mcp["session"] not in closed and self.now_ms - entry["answered_ms"] >= self.settle_ms):
                hung.append(entry)
        runs = [run for run in runs if len(run) > 3]
        return (
            self.finding("TOOL_ARGUMENTS_REFUSED", [entry["seq"] for entry in refused], "; ".join(
                f"request {entry['seq']} called {entry['mcp']['tool']} with arguments its "
                "input schema refuses" for entry in refused)),
            self.finding("TOOL_RETRIED_UNCHANGED", [entry["seq"] for run in runs
                                                    for entry in run[3:]], "; ".join(
                f"{run[0]['mcp']['tool']} was called {len(run)} times with the same arguments, "
                f"each after the last failed (requests {run[0]['seq']} to {run[-1]['seq']})"
                for run in runs)),
            self.finding("TOOL_ERROR_IGNORED", [error["seq"] for error, _ in ignored], "; ".join(
                f"the error result of {error['mcp']['tool']} (request {error['seq']}) is not "
                f"among the tool results of the next model call (request {call['seq']})"
                for error, call in ignored)),
            self.finding("TOOL_HANG_NOT_CANCELLED", [entry["seq"] for entry in hung], "; ".join(
                f"request {entry['seq']} called {entry['mcp']['tool']}, which never answered, "
                "and no notifications/cancelled named it" for entry in hung)))


def _tool_failed(entry):
    """Whether an MCP tool call failed: an error result or a JSON-RPC error,
    no answer, or the HTTP request failed."""
    return entry["mcp"]["outcome"] in ("error", "refused", "rpc_error", "hang") or _failed(entry)


def _tool_report(entries, declared):
    """Per key, the tools it called through /mcp (calls, and how many
    failed) and the declared tools it never called."""
    keys = {}
    for entry in entries:
        mcp = entry["mcp"]
        if mcp is not None and mcp["method"] == "tools/call" and mcp["tool"] is not None:
            counts = keys.setdefault(entry["trace_id"], {}).setdefault(
                mcp["tool"], {"calls": 0, "failed": 0})
            counts["calls"] += 1
            counts["failed"] += _tool_failed(entry)
    return {"declared": declared, "keys": [
        {"key": key, "tools": tools, "never_called": [name for name in declared
                                                      if name not in tools]}
        for key, tools in keys.items()]}


_MCP_REPORT_SCHEMA = {"type": "object", "required": ["declared", "keys"], "properties": {
    "declared": {"type": "array", "items": {"type": "string"}},
    "keys": {"type": "array", "items": {"type": "object", "properties": {
        "key": {"type": ["string", "null"]},
        "tools": {"type": "object", "additionalProperties": {
            "type": "object", "properties": {"calls": {"type": "integer"},
                                             "failed": {"type": "integer"}}}},
        "never_called": {"type": "array", "items": {"type": "string"}}}}}}}


def _herd(plain_gaps):
    """NO_JITTER: three or more keys whose first two retries (after failures
    that gave no retry-after) came after gaps equal to the millisecond.
    plain_gaps: {key: [gap, ...]}."""
    keys = [key for key, gaps in plain_gaps.items() if len(gaps) >= 2]
    herds = []
    for key in keys:
        herd = next((herd for herd in herds if all(
            abs(a - b) <= 1 for a, b in zip(plain_gaps[herd[0]][:2], plain_gaps[key][:2]))), None)
        if herd is None:
            herds.append([key])
        else:
            herd.append(key)
    return [herd for herd in herds if len(herd) >= 3]


def _verdict(entries, now_ms, ended_ms=None, trace_id=None, path=None, since_seq=0,
             settle_ms=2000, max_attempts=10, min_poll_ms=50, errors=()):
    """The verdict on a client, from journal entries (oldest first) at now_ms
    (monotonic, real), and when the jobs they name ended, {job id: monotonic
    real ms}: {"requests", "attempts", "findings", "ok"}.  Without trace_id,
    every key is judged, and so is how the keys retry together."""
    key_of_job = {}
    for entry in entries:
        if entry["job_id"] is not None and entry["trace_id"] is not None:
            key_of_job.setdefault(entry["job_id"], entry["trace_id"])
    by_key = {}
    for entry in entries:
        key = entry["trace_id"] if entry["trace_id"] is not None else key_of_job.get(
            entry["job_id"])
        if (entry["seq"] >= since_seq and (path is None or entry["path"] == path)
                and (trace_id is None or key == trace_id)):
            by_key.setdefault(key, []).append(entry)
    judge = _Judge(now_ms, settle_ms, max_attempts, min_poll_ms, ended_ms or {})
    start = min((requests[0]["monotonic_ms"] for requests in by_key.values()), default=0)
    attempts, findings, plain_gaps = [], [], {}
    for key, requests in by_key.items():
        judged, found, plain_gaps[key] = judge.judge(requests)
        attempts += [_attempt(key, start, *attempt) for attempt in judged]
        findings += [dict(finding, key=key) for finding in found]
    for herd in (_herd(plain_gaps) if trace_id is None else ()):
        gaps = ", ".join(f"{gap:.0f}" for gap in plain_gaps[herd[0]][:2])
        findings.append({"code": "NO_JITTER", "key": None, "evidence": sorted(
            attempt["seq"] for attempt in attempts if attempt["key"] in herd and attempt["retry"]),
            "message": f"{len(herd)} keys ({', '.join(map(str, herd))}) retried after the "
                       f"same gaps: {gaps} ms"})
    for finding in findings:
        finding["severity"] = "error" if finding["code"] in errors else _FINDINGS[
            finding["code"]].severity
    attempts.sort(key=operator.itemgetter("seq"))
    findings.sort(key=lambda finding: finding["evidence"][0])
    return {"requests": len(attempts), "attempts": attempts,
            "findings": [{name: finding[name] for name in _FINDING_KEYS} for finding in findings],
            "ok": not any(finding["severity"] == "error" for finding in findings)}


_FINDING_KEYS = ("code", "severity", "key", "message", "evidence")


def _attempt(key, start_ms, entry, gap, is_retry):
    """A request as the verdict lists it; times in ms from the first request
    judged, gap_ms from the answer to the last request like it."""
    fault = entry["fault"]
    return {"seq": entry["seq"], "key": key, "at_ms": round(entry["monotonic_ms"] - start_ms),
            "answered_at_ms": round(entry["answered_ms"] - start_ms),
            "gap_ms": None if gap is None else round(gap), "retry": is_retry,
            "method": entry["method"], "path": entry["path"], "status": entry["status"],
            "fault": entry["stream_failure"] or (
                fault if isinstance(fault, str) else fault and next(iter(fault))),
            "code": entry["code"], "retry_after_ms": entry["retry_after_ms"],
            "idempotency_key": entry["headers"].get("Idempotency-Key"),
            "job_id": entry["job_id"]}


# The verdict's answer, as GET /v1/verdict and DummyLLMServer.verdict give it.
_VERDICT_SCHEMA = {"type": "object", "required": ["requests", "attempts", "findings", "ok"],
                   "properties": {
    "requests": {"type": "integer"},
    "ok": {"type": "boolean", "description": "No finding of severity error"},
    "attempts": {"type": "array", "items": {"type": "object", "properties": {
        "seq": {"type": "integer"}, "key": {"type": ["string", "null"]},
        "at_ms": {"type": "integer", "description": "From the first request judged"},
        "answered_at_ms": {"type": "integer"},
        "gap_ms": {"type": ["integer", "null"],
                   "description": "From the answer to the last request like it"},
        "retry": {"type": "boolean"}, "method": {"type": "string"},
        "path": {"type": "string"}, "status": {"type": ["integer", "null"]},
        "fault": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]},
        "retry_after_ms": {"type": ["integer", "null"]},
        "idempotency_key": {"type": ["string", "null"]},
        "job_id": {"type": ["string", "null"]}}}},
    "findings": {"type": "array", "items": {"type": "object", "properties": {
        "code": {"enum": list(_FINDINGS)}, "severity": {"enum": ["error", "warning"]},
        "key": {"type": ["string", "null"]}, "message": {"type": "string"},
        "evidence": {"type": "array", "items": {"type": "integer"},
                     "description": "The seq of each offending request"}}}}}}


# --- Server -----------------------------------------------------------------------
# The wire work.  A thread per connection (ThreadingHTTPServer) reads each
# request with its own parser, has the application answer it, and writes
# the answer in one send, as a stream, or spoiled by a fault.  One thread
# sends every stream's chunks, one keeps the idle and held connections, a
# few post webhooks, one writes the log.

# --- Server: the log --------------------------------------------------------------

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

    def close(self, timeout=0.5):
        """Write what is queued (for at most `timeout` seconds), then stop."""
        try:
            self._lines.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _run(self):
        for line in iter(self._lines.get, None):
            try:
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass  # stderr closed: the log is lost, the server goes on


def _printable(text):
    """Text for a terminal: control characters (ESC among them) escaped."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


# --- Server: webhooks -------------------------------------------------------------

class _Webhooks:
    """POST each ended job's JSON to its callback_url: up to 3 attempts, each
    with 5 s to answer, 0.5 s then 1 s apart (simulated times: --time-scale
    applies).  Each host has its own queue and a worker while it has one,
    so a host that never answers delays only its own callbacks; at most
    MAX_QUEUED wait in all, and a callback beyond that is dropped and said so."""

    ATTEMPT_TIMEOUT_MS, BACKOFF_MS, MAX_QUEUED = 5000, (500, 1000), 10_000

    def __init__(self, store, stopping, log):
        self._store, self._stopping, self._log = store, stopping, log
        self._queues = {}   # host -> deque of (job id, url, body)
        self._queued = 0
        self._lock = threading.Lock()

    def send(self, job_id, url, payload):
        host = urllib.parse.urlsplit(url).netloc
        with self._lock:
            full = self._queued >= self.MAX_QUEUED
            if not full:
                self._queued += 1
                waiting = self._queues.get(host)
                if waiting is None:
                    waiting = self._queues[host] = collections.deque()
                    threading.Thread(target=self._run, args=(host,), name="dummyllm-webhook",
                                     daemon=True).start()
                waiting.append((job_id, url, _json_bytes(payload)))
        if full:
            self._store.record_callback(job_id, {"attempt": 0, "at_ms": self._store.clock.wall_ms(),
                                                 "error": "dropped: the webhook queue is full"})
            self._log(f"dummyLLM: {self.MAX_QUEUED} callbacks wait already; "
                      f"the callback of {job_id} is dropped")

    def close(self):
        with self._lock:
            self._queues.clear()  # each worker ends after its delivery in hand

    def _run(self, host):
        while True:
            with self._lock:
                waiting = self._queues.get(host)
                if not waiting:
                    self._queues.pop(host, None)
                    return
                delivery = waiting.popleft()
                self._queued -= 1
            self._deliver(*delivery)

    def _deliver(self, job_id, url, body):
        clock = self._store.clock
        for attempt, backoff_ms in enumerate(self.BACKOFF_MS + (None,), start=1):
            record = {"attempt": attempt, "at_ms": clock.wall_ms()}
            try:
                record["status"] = self._post(url, body,
                                              clock.real_ms(self.ATTEMPT_TIMEOUT_MS) / 1000)
            except (OSError, http.client.HTTPException) as error:
                record["error"] = str(error) or type(error).__name__
            self._store.record_callback(job_id, record)
            if 200 <= record.get("status", 0) < 300 or backoff_ms is None:
                return
            if self._stopping.wait(clock.real_ms(backoff_ms) / 1000):
                return

    @staticmethod
    def _post(url, body, timeout_s):
        # http.client, not urllib: proxy variables must not send callbacks elsewhere.
        parts = urllib.parse.urlsplit(url)
        connection_class = (http.client.HTTPSConnection if parts.scheme == "https"
                            else http.client.HTTPConnection)
        connection = connection_class(parts.hostname, parts.port, timeout=timeout_s)
        try:
            target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
            connection.request("POST", target, body, {"Content-Type": "application/json",
                                                      "User-Agent": "dummyLLM/" + __version__})
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()


# --- Server: recording ------------------------------------------------------------

# Hop-by-hop headers (RFC 9110), and those a forwarded request gets anew.
_NOT_FORWARDED = frozenset(("connection", "keep-alive", "proxy-authenticate",
                            "proxy-authorization", "te", "trailer", "transfer-encoding",
                            "upgrade", "host", "content-length", "accept-encoding"))


class _UpstreamCut(Exception):
    """The upstream broke its stream: the client's is broken the same way."""


class _Recorder:
    """--record: model calls forwarded to an upstream, answered as its
    answer arrives, and each written to --record-to as a reply rule that
    replays it (see _replay), the file rewritten whole after each (a crash
    loses at most the call in flight).  Nothing the client sent is written:
    the rule matches the call by its digest and its key, and holds the
    upstream's answer (its status, its headers but cookies, its body or its
    stream's frames with the ms each came after the request).  With --rules,
    only the calls no rule matches are forwarded, and each recording is
    replayed from then on."""

    # No idle timeout shorter than the clients' own (the OpenAI SDK's: 600 s).
    TIMEOUT_S = 600

    def __init__(self, config, add_rule):
        self.config, self.add_rule = config, add_rule
        self.on_miss = bool(config.rules)
        self._lock = threading.Lock()
        self._rules = []
        if os.path.exists(config.record_to):
            rules = _check_rules(config.record_to, "record_to")
            self._rules = [rule.given for rule in rules]

    def upstream(self, surface):
        return next((upstream for upstream in self.config.record
                     if upstream.serves(surface.name)), None)

    def forwards(self, surface, call):
        return self.upstream(surface) is not None and not (
            self.on_miss and call.spec.rule is not None)

    def forward(self, app, surface, request, call):
        """The upstream's answer to the call, relayed as it arrives (see
        _relay); 502 in the surface's shape when it cannot be reached."""
        import ssl  # at first use: importing it takes 5.5 ms here
        upstream = self.upstream(surface)
        connection = (http.client.HTTPSConnection(
            upstream.host, upstream.port, timeout=self.TIMEOUT_S,
            context=ssl.create_default_context()) if upstream.scheme == "https"
            else http.client.HTTPConnection(upstream.host, upstream.port,
                                            timeout=self.TIMEOUT_S))
        headers = {name: value for name, value in request.headers.items()
                   if name not in _NOT_FORWARDED}
        headers["accept-encoding"] = "identity"
        target = upstream.path + request.path + ("?" + request.query if request.query else "")
        started = time.monotonic()
        try:
            connection.request(request.method, target, request.body, headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise ApiError("BAD_GATEWAY", f"the upstream {upstream.url} could not be reached: "
                           f"{error}") from None
        request.note.recording = "recorded"
        kept = [(name, value) for name, value in response.getheaders()
                if name.lower() not in _FRAMING_HEADERS and name.lower() != "set-cookie"]
        content_type = response.getheader("content-type", "application/json")
        return _Answer(response.status, headers=[
            (name, value) for name, value in kept if name.lower() != "content-type"],
            content_type=content_type, live=self._relay(
                surface, request, call, upstream, connection, response, kept, started))

    def _relay(self, surface, request, call, upstream, connection, response, headers, started):
        """The answer's bytes as they arrive, then its recording written.  A
        stream is recorded as frames (SSE events, JSON lines, else as read),
        each with the ms it came; a broken one is kept with "end": "cut", and
        raises _UpstreamCut for the client's to break too."""
        separator = {"text/event-stream": b"\n\n", "application/x-ndjson": b"\n"}.get(
            response.getheader("content-type", "").split(";")[0].strip().lower())
        frames, pending, kept_bytes, end, truncated = [], b"", 0, None, False
        try:
            while True:
                try:
                    data = response.read1(65536)
                except (OSError, http.client.HTTPException):
                    end = "cut"
                    break
                if not data:
                    break
                at_ms = round((time.monotonic() - started) * 1000, 1)
                yield data
                pending += data
                parts = pending.split(separator) if separator else [pending, b""]
                pending = parts.pop()
                for part in parts:
                    whole = part + (separator or b"")
                    truncated = truncated or (
                        kept_bytes + len(whole) > self.config.record_max_bytes)
                    if not truncated:
                        kept_bytes += len(whole)
                        frames.append([at_ms, whole])
        finally:  # the client may have left (GeneratorExit): nothing whole to record
            response.close()  # its file holds the socket open until it is closed too
            connection.close()
        if pending and not truncated:
            frames.append([round((time.monotonic() - started) * 1000, 1), pending])
        self._write(surface, request, call, upstream, self._recording(
            response.status, headers, frames, call.stream, end, truncated))
        if end == "cut":
            raise _UpstreamCut()

    def _recording(self, status, headers, frames, stream, end, truncated):
        """A recorded answer (see _RECORDING_SCHEMA), its text redacted; one
        that is not text (Bedrock's binary event stream) in base64."""
        content_type = next((value for name, value in headers
                             if name.lower() == "content-type"), "")
        binary = not (content_type.startswith("text/") or "json" in content_type)

        def redacted(text):
            return self.config.redact.sub("[redacted]", text) if self.config.redact else text

        def text(data):
            return (base64.b64encode(data).decode() if binary
                    else redacted(data.decode("utf-8", "replace")))
        recording = {"status": status, "headers": [[name, redacted(value)]
                                                   for name, value in headers]}
        if binary:
            recording["base64"] = True
        if stream:
            recording["frames"] = [[at_ms, text(data)] for at_ms, data in frames]
        else:
            recording.update(body=text(b"".join(data for _, data in frames)),
                             ms=frames[-1][0] if frames else 0)
        if end:
            recording["end"] = end
        if truncated:
            recording["truncated"] = True
        return recording

    def _write(self, surface, request, call, upstream, recording):
        """Add the recording to its rule (a new rule for a call not recorded
        before), and write the file anew: to a temporary file, then renamed
        over it."""
        match = {"surface": surface.name, "model": call.model,
                 "request": _request_digest(request.path, request.body)}
        if call.spec.trace_id:
            match["trace_id"] = call.spec.trace_id
        if request.test_id is not None:
            match["test_id"] = request.test_id
        asked = _last_text(_messages(call.spec))[:200]
        about = f"recorded from {upstream.url} on {_http_date()}" + (
            f": {asked!r}" if asked else "")
        with self._lock:
            rule = next((rule for rule in self._rules if rule["match"] == match
                         and "replay" in rule["simulate"]), None)
            if rule is None:
                rule = {"match": match, "simulate": {"replay": []}, "about": (
                    self.config.redact.sub("[redacted]", about) if self.config.redact
                    else about)}
                self._rules.append(rule)
            rule["simulate"]["replay"].append(recording)
            temporary = f"{self.config.record_to}.{os.getpid()}.tmp"
            with open(temporary, "w", encoding="utf-8") as file:
                json.dump(self._rules, file, indent=1, ensure_ascii=False)
            os.replace(temporary, self.config.record_to)
        if self.on_miss:
            self.add_rule(rule)


# --- Server: streams --------------------------------------------------------------

class _Stream:
    """One stream on its way: its frames, rendered one by one as they fall
    due, and the bytes taken from them that its socket has not yet taken."""

    __slots__ = ("sock", "head", "frames", "next", "pending", "backoff_s", "progress_at",
                 "due_at", "ok", "finished")

    def __init__(self, sock, head, frames):
        self.sock, self.head, self.frames = sock, head, frames  # the head goes with a chunk
        self.next = None          # a frame rendered, not yet due
        self.pending = b""        # bytes taken, not yet sent
        self.backoff_s = 0.0      # how long a full socket waits for a retry
        self.progress_at = 0.0    # when the client last took bytes
        self.due_at = time.monotonic()  # when the writer has work for it next
        self.ok = None            # once over: whether it was sent whole
        self.finished = threading.Event()


class _StreamWriter:
    """Renders and sends the frames of every open stream when they are due,
    from one thread.

    A thread per stream waking every token_ms fights the others for the GIL:
    with 200 streams at token_ms 10 chunks came 47 ms late at the median.
    One thread rendering and sending each frame at its time keeps them on
    time; work moved elsewhere competes with it for the GIL and makes them
    late (200 streams at once, median lateness of their chunks in one run:
    1.3 ms here; 5.4 ms with a second thread rendering them 50 ms ahead; 74
    ms for their first chunks when each handler rendered its own stream
    whole).  A frame that fails to render ends its own stream alone, with
    its surface's error event (see _Handler._rendered); a failure past that
    guard cuts it.  Streams reach the thread through an inbox: its lock is
    never held while sending (held through the sends, it kept 200 streams
    arriving at once waiting, and their first chunks 50 ms late).

    A stream holds its text and at most WINDOW bytes, never its frames: the
    frames due at once go out together up to WINDOW bytes, and the next is
    rendered once the socket has taken them (the handler sets its socket's
    buffer to WINDOW too).  A socket that takes nothing is tried again after
    a back-off (RETRY_S, doubling up to MAX_RETRY_S); a client that takes
    nothing for send_timeout_s is given up: its stream ends, its memory is
    freed and its handler closes the connection.  (300 clients that never
    read a 200 KB stream at token_ms 0, each stream's frames rendered and
    joined at once, took the server from 40 MB to 6 GB and /health to 26 s.)
    """

    WINDOW = 16 * 1024
    RETRY_S, MAX_RETRY_S = 0.005, 0.1

    def __init__(self, send_timeout_s):
        self.send_timeout_s = send_timeout_s
        self._lock = threading.Lock()   # guards _inbox, _closed and _thread
        self._inbox = collections.deque()
        self._wake = threading.Event()
        self._closed = False
        self._thread = None

    def start(self, sock, head, frames):
        """Send head with the first of frames, an iterator of (time.monotonic()
        time, bytes), then each at its time, on a non-blocking socket.
        Returns the stream, for wait(); None if the server stops."""
        stream = _Stream(sock, head, frames)
        with self._lock:
            if self._closed:
                return None
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dummyllm-streams",
                                                daemon=True)
                self._thread.start()
            self._inbox.append((0.0, stream))
        self._wake.set()
        return stream

    def wait(self, stream):
        """Block until the stream is sent (True) or over (False).  Each wait
        has a deadline: a stream the writer has had no work for in
        send_timeout_s is given up."""
        while not stream.finished.wait(self.send_timeout_s):
            if time.monotonic() - stream.due_at > self.send_timeout_s:
                self._finish(stream, False)
        return stream.ok

    def close(self):
        with self._lock:
            self._closed = True
            thread = self._thread
        self._wake.set()
        if thread is None:
            self._finish_all(_Schedule())

    def _run(self):
        due = _Schedule()  # this thread's own: no lock
        while not self._closed:
            with self._lock:
                while self._inbox:
                    due.push(*self._inbox.popleft())
            now = time.monotonic()
            stream = due.pop_due(now)
            if stream is not None:
                when = self._send(stream, now)
                if when is not None:
                    stream.due_at = when
                    due.push(when, stream)
                continue
            when = due.next_time()
            self._wake.wait(None if when is None else when - now)
            self._wake.clear()  # what set it is in the inbox, drained next
        self._finish_all(due)

    def _send(self, stream, now):
        """Send what is due of a stream; when to come back to it, or None."""
        if stream.ok is not None:
            return None  # given up by its handler
        if not stream.pending:
            taken, size = [stream.head], len(stream.head)
            while size < self.WINDOW and self._rendered(stream) and stream.next[0] <= now:
                taken.append(stream.next[1])
                size += len(stream.next[1])
                stream.next = None
            if len(taken) == 1 and stream.next is not None:
                return stream.next[0]  # its first frame is not due yet
            stream.head, stream.pending = b"", memoryview(b"".join(taken))
            stream.progress_at, stream.backoff_s = now, 0.0
        try:
            sent = stream.sock.send(stream.pending)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._finish(stream, False)
            return None
        stream.pending = stream.pending[sent:]
        if sent:
            stream.progress_at, stream.backoff_s = now, 0.0
        if stream.pending:
            if now - stream.progress_at >= self.send_timeout_s:
                self._finish(stream, False)  # a client that takes nothing
                return None
            stream.backoff_s = min(self.MAX_RETRY_S, max(self.RETRY_S, 2 * stream.backoff_s))
            return now + stream.backoff_s
        if not self._rendered(stream):
            if stream.ok is None:
                self._finish(stream, True)
            return None
        return stream.next[0]

    def _rendered(self, stream):
        """Whether the stream has a next frame (rendering it if need be);
        a failure past its handler's guard cuts the stream."""
        if stream.next is None and stream.frames is not None:
            try:
                stream.next = next(stream.frames, None)
            except Exception:
                self._finish(stream, False)
                return False
            if stream.next is None:
                stream.frames = None
        return stream.next is not None

    @staticmethod
    def _finish(stream, ok):
        if stream.ok is None:
            stream.ok = ok
        stream.next = stream.frames = None
        stream.pending = b""
        stream.finished.set()

    def _finish_all(self, due):
        with self._lock:
            while self._inbox:
                due.push(*self._inbox.popleft())
        for stream in iter(lambda: due.pop_due(math.inf), None):
            self._finish(stream, False)


# --- Server: the application ------------------------------------------------------

def _test_id(request):
    """The test whose scope a request is in: that of its path's /test/{id}
    prefix, which is taken off the path (so any client that takes a base
    URL can be scoped), else its X-Test-Id header, else None."""
    header = request.headers.get("x-test-id")
    if header is not None:
        header = _TEST_ID_TEXT(header, _TEST_ID_HEADER)
    found = _TEST_PATH.match(request.path) if request.path.startswith("/test/") else None
    if found is None:
        return header
    test_id = urllib.parse.unquote(found.group(1))
    request.path = found.group(2) or "/"
    _TEST_ID_TEXT(test_id, "the path's test id")
    if header not in (None, test_id):
        raise _ValidationError(_TEST_ID_HEADER, "differs from the test id of the path")
    return test_id


class _Application:
    """Everything a request meets but the socket: routing, the API key,
    chaos and the handlers, over the job store, the quotas, the journal and
    the reply rules; the accounting of each answer; the verdict.

    ``_Application(mode="fail", ...)`` takes the options of the command line
    as keywords (or a ready Config), and optionally the clock its store and
    handlers read.  A handler (see _Handler) reads a request, has answer()
    give its _Answer, writes it, and tells record(); a test may answer
    through a handler without a socket.  DummyLLMServer is this and the
    socket server.
    """

    heartbeat_s = 15  # seconds between heartbeats of a quiet job event stream

    def __init__(self, config=None, clock=None, **options):
        self.config = config if config is not None else make_config(**options)
        self.registry = registry = _registry()  # the surfaces registered now
        self.router, self.reasons = registry.router, registry.reasons
        self.cors_allowed = registry.cors_allowed
        self.cors_headers = () if self.config.cors is None else (
            f"Access-Control-Allow-Origin: {self.config.cors}", "Vary: Origin",
            "Access-Control-Expose-Headers: " + registry.cors_exposed)
        self.store = _JobStore(self.config, clock)
        self.clock = self.store.clock
        self.quotas = _Quotas(self.clock)
        self.files = _Files(self.clock)
        self.mcp = _McpSessions()
        self.capacity = _Capacity(self.config, self.clock)
        self.journal = _Journal(self.config.journal_size)
        self.stopping = threading.Event()   # wakes handlers that wait to answer
        self._log_writer = None
        self._log_lock = threading.Lock()
        self._rules_lock = threading.Lock()
        self._counts_lock = threading.Lock()
        self._requests_counted = collections.Counter()  # (method, route, status) -> answers
        self._faults_counted = collections.Counter()    # fault kind -> times injected
        self._stream_errors = 0                         # streams a render failure ended
        self._chaos_count = itertools.count()
        self.recorder = _Recorder(self.config, self._add_recorded) if self.config.record else None
        self.webhooks = _Webhooks(self.store, self.stopping, self.log)
        self.store.on_finish = self.webhooks.send

    def answer(self, request):
        """The _Answer to a request: CORS preflight, routing, the API key,
        chaos, then the route's handler.  Raises ApiError."""
        request.test_id = _test_id(request)
        if request.method == "OPTIONS" and self.config.cors:
            return self._preflight(request)
        route, request.params = self.router.match(request.method, request.path)
        request.route = route
        option, key = (("--admin-key", self.config.admin_key) if route.admin else
                       ("--api-key", self.config.api_key) if route.auth else (None, None))
        if key is not None:
            given = route.surface.credential(request) or ""
            if not hmac.compare_digest(given.encode(), key.encode()):
                raise ApiError("UNAUTHORIZED", "incorrect or missing key; send 'Authorization: "
                               f"Bearer <key>' with the key given to {option}")
        chaos = self._chaos_fault() if route.chaos and self.config.chaos else None
        if chaos is not None and chaos.kind != "dribble":
            return _Answer(fault=chaos)  # the request is lost before it is served
        query = route.api["query"]
        if query:
            request.args = _query_args(request, query)
        answer = route.handler(route.surface, self, request)
        answer.fault = answer.fault or chaos
        if request.note.quota is not None:
            answer.headers += route.surface.quota_headers(request.note.quota,
                                                          self.clock.wall_ms())
        return answer

    def surface_of(self, request):
        """The surface whose format answers a request: its route's; for a
        path no route has, the nearest route's (see _Router.surface_of); for
        one the parser refused, dummyLLM's own."""
        if request is None:
            return _JOB_API
        return request.route.surface if request.route else self.router.surface_of(request.path)

    def _preflight(self, request):
        """The answer to a browser's CORS preflight (OPTIONS) for a known path."""
        methods = self.router.methods(request.path)
        if not methods:
            raise ApiError("NOT_FOUND", f"no endpoint at {request.path}")
        requested = request.headers.get("access-control-request-headers", "")
        if not _TOKEN_LIST.fullmatch(requested):
            requested = self.cors_allowed  # only a list of header names is echoed
        return _Answer(204, headers=[("Access-Control-Allow-Methods", ", ".join(methods)),
                                     ("Access-Control-Allow-Headers", requested),
                                     ("Access-Control-Max-Age", "600")])

    def _chaos_fault(self):
        """The fault --chaos gives the next request, or None."""
        if not self.config.chaos:
            return None
        seed = self.config.seed if self.config.seed is not None else random.getrandbits(64)
        return _chaos_fault(seed, next(self._chaos_count), self.config.chaos,
                            self.config.chaos_faults)

    def record(self, request, status, fault, elapsed_ms, method, path):
        """Account for an answer going out (status None: none at all): the
        metrics, the access log and the journal.  `request` is None for a
        request the HTTP parser refused."""
        route = request and request.route
        with self._counts_lock:
            self._requests_counted[(method, route.path if route else "unmatched",
                                    status or "none")] += 1
            if fault is not None:
                self._faults_counted[fault.kind] += 1
        if not self.config.quiet:
            self._log_access(request, status, fault, elapsed_ms, method, path)
        if request is not None and (route is None or route.journal) and (
                _PAGE_HEADER.lower() not in request.headers):
            self.journal.record(request, status, fault, self.clock)

    def _log_access(self, request, status, fault, elapsed_ms, method, path):
        if self.config.log_format == "json":
            note = request.note if request else _Note()
            self.log(json.dumps({
                "time": self.clock.wall_ms() / 1000, "method": method, "path": path,
                "status": status, "ms": elapsed_ms, "job_id": note.job_id,
                "trace_id": note.trace_id or (request and request.headers.get("x-trace-id")),
                "fault": fault and fault.to_json()}))
        else:
            self.log(f"{_printable(method)} {_printable(path)} {status or '-'} {elapsed_ms}ms"
                     + (f" fault={json.dumps(fault.to_json())}" if fault else ""))

    def stream_failed(self, request):
        """A frame of a request's stream failed to render (a bug): one
        traceback in the log, one more in /metrics."""
        with self._counts_lock:
            self._stream_errors += 1
        self.log_traceback(f"a stream of {request.method} {request.path} failed to render")

    def counted(self):
        """(answers by (method, route, status), faults by kind, streams ended
        by a render failure), for /metrics."""
        with self._counts_lock:
            return (dict(self._requests_counted), dict(self._faults_counted),
                    self._stream_errors)

    def reset(self, test_id=None):
        """Start clean: cancel and forget every job, forget every counter,
        idempotency key, quota window, journal entry, uploaded file and rule added at run
        time; given a test id, only that test's.  Returns how many of each
        went."""
        removed = self.store.reset(test_id)
        removed["files"] = self.files.clear(test_id)
        self.quotas.clear(test_id)
        removed["journal_entries"] = self.journal.clear(test_id)
        removed["rules"] = self.clear_rules(test_id)
        removed["mcp_tools"] = self.clear_mcp_tools(test_id)
        removed["mcp_sessions"] = self.mcp.clear(test_id)
        if test_id is None:
            self._chaos_count = itertools.count()
        return removed

    def verdict(self, trace_id=None, **query):
        """The verdict on the client, from the journal, as GET /v1/verdict
        answers it: {"requests", "attempts", "findings", "ok"}.  Takes the
        query's parameters as keywords (see _VERDICT_QUERY); a bad one
        raises a ValueError naming it."""
        query = _with_defaults(_given(dict(query, trace_id=trace_id), _VERDICT_QUERY, None,
                                      strict=True), _VERDICT_QUERY, self.config)
        key = query.pop("key")
        entries = self.journal.find(test_id=query.pop("test_id"))
        if key is not None and query["trace_id"] not in (None, key):
            entries = []  # no request has two keys
        query["trace_id"] = query["trace_id"] or key
        ended = self.store.ended_at({entry["job_id"] for entry in entries if entry["job_id"]})
        return _verdict(entries, self.clock.real_ms(self.clock.now_ms()), ended, **query)

    def assert_client_ok(self, trace_id=None, **query):
        """Raise AssertionError, its message the findings, unless the verdict
        on the client is ok (no finding of severity error); else return it."""
        verdict = self.verdict(trace_id, **query)
        if not verdict["ok"]:
            raise AssertionError("the client broke the rules:\n" + "\n".join(
                f"{finding['code']} ({finding['severity']}): {finding['message']}"
                for finding in verdict["findings"]))
        return verdict

    def rules(self, test_id=None):
        """The reply rules, in the order they are tried, as GET /v1/rules
        lists them (given a test id, those that apply to its requests)."""
        return [rule.to_json(index) for index, rule in enumerate(self.config.rules)
                if test_id is None or rule.test_id in (None, test_id)]

    def add_rule(self, rule, test_id=None):
        """Add a reply rule, {"match": {...}, "simulate": {...}}, after the
        others (given a test id, for that test's requests alone); returns it
        as rules() lists it.  A bad rule raises a ValueError naming the field."""
        rule = _reply_rule(rule, None, "runtime", test_id)
        return rule.to_json(self._add("rules", rule))

    def clear_rules(self, test_id=None):
        """Remove the rules added at run time (given a test id, those added
        for it); returns how many went."""
        return self._clear("rules", test_id)

    def _add_recorded(self, rule):
        """A rule --record wrote, replayed from now on (kept as --rules' are)."""
        self._add("rules", _reply_rule(rule, None, "file"))

    def _add(self, option, item):
        """Add an item at run time to a list the config holds (rules, MCP
        tools); its index there.  The config is replaced whole."""
        with self._rules_lock:
            self.config = self.config._replace(**{option: getattr(self.config, option) + (item,)})
            return len(getattr(self.config, option)) - 1

    def _clear(self, option, test_id):
        """Remove the items of a list the config holds that were added at
        run time (given a test id, those added for it); how many went."""
        with self._rules_lock:
            items = getattr(self.config, option)
            kept = tuple(item for item in items if item.source == "file" or (
                test_id is not None and item.test_id != test_id))
            self.config = self.config._replace(**{option: kept})
        return len(items) - len(kept)

    def mcp_tools(self, test_id=None):
        """The tools /mcp lists to a test (every tool given no test id): those
        of --mcp-tools, then those added at run time; one added later
        replaces one of its name."""
        tools = {}
        for tool in self.config.mcp_tools:
            if test_id is None or tool.test_id in (None, test_id):
                tools[tool.name] = tool
        return list(tools.values())

    def add_mcp_tool(self, tool, test_id=None):
        """Add a tool to /mcp (given a test id, for that test's sessions
        alone); returns it as GET /v1/mcp/tools lists it.  A bad tool raises
        a ValueError naming the field."""
        tool = _mcp_tool(tool, None, "runtime", test_id)
        self._add("mcp_tools", tool)
        return tool.to_json()

    def clear_mcp_tools(self, test_id=None):
        """Remove the tools added at run time (given a test id, those added
        for it); returns how many went."""
        return self._clear("mcp_tools", test_id)

    def mcp_report(self, trace_id=None, test_id=None):
        """Which tools each key called through /mcp, how often, how many of
        those calls failed, and which it never called (see _tool_report)."""
        entries = self.journal.find(trace_id=trace_id, test_id=test_id)
        return _tool_report(entries, [tool.name for tool in self.mcp_tools(test_id)])

    def log(self, line):
        """Write a line to stderr, from the log's own thread (started on first use)."""
        with self._log_lock:
            if self._log_writer is None:
                self._log_writer = _LogWriter()
        self._log_writer.write(line)

    def log_traceback(self, what):
        """Log what went wrong, with the traceback of the exception being handled."""
        self.log(f"dummyLLM: {what}\n" + traceback.format_exc().rstrip())

    def close(self):
        """Wake every waiter, stop the store's Timer and the webhooks, and
        write out the log."""
        self.stopping.set()
        self.store.close()
        self.webhooks.close()
        with self._log_lock:
            if self._log_writer is not None:
                self._log_writer.close()
                self._log_writer = None


# --- Server: connections ----------------------------------------------------------

_date_cache = (0, "")


def _http_date():
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True))
    return _date_cache[1]


# A stream's header that tells nginx (and balancers that follow it) to pass
# the stream through as it is sent, whatever their buffering.
_UNBUFFERED = "X-Accel-Buffering: no"

_REQUEST_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+) (\S+) HTTP/([0-9])\.([0-9])\Z")
_TOKEN_LIST = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+( *, *[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")
_CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Header fields, each "name: value" and its line end; the value has no control characters.
_HEADER_FIELDS = re.compile(r"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00-\x08\x0a-\x1f\x7f]*\r?\n)*")
_HEADER_FIELD = re.compile(r"([^:\n]+):[ \t]*([^\r\n]*?)[ \t]*\r?\n")
_MAX_HEADER_FIELDS = 100
_MAX_LINE_BYTES = 65536
_MAX_HEAD_BYTES = 65536
_BODY_BYTES_PER_S = 65536    # the slowest body upload allowed, beyond head_timeout_s
_DRIBBLE_PIECES = 8
# The code http.server's own refusals are given.
_CODE_OF_STATUS = {}
for _code, _kind in _ERRORS.items():
    _CODE_OF_STATUS.setdefault(_kind.status, _code)
del _code, _kind


class _Idle(Exception):
    """No request began within the linger: the connection is parked."""


# What a read or write past its socket's timeout raises: Python's timeout, or
# the kernel's (see _set_timeouts).
_TIMED_OUT = (socket.timeout, BlockingIOError)


def _set_timeouts(sock, receive_s, send_s):
    """Blocking mode, with the kernel's timeouts on receives and sends
    (SO_RCVTIMEO, SO_SNDTIMEO): each read or write is one system call, where
    Python's own timeout polls before each.  Chat answered 6 to 26% more
    requests a second with them, and 200 requests at once went in 10 to 20%
    faster (three alternating runs)."""
    sock.settimeout(None)
    for option, seconds in ((socket.SO_RCVTIMEO, receive_s), (socket.SO_SNDTIMEO, send_s)):
        value = (struct.pack("I", round(seconds * 1000)) if os.name == "nt" else  # a DWORD of ms
                 struct.pack("ll", int(seconds), round(seconds % 1 * 1_000_000)))  # a timeval
        sock.setsockopt(socket.SOL_SOCKET, option, value)


# SO_TIMESTAMPNS of Linux (where the number is 35): the kernel stamps each
# read with the time its bytes arrived.
_ARRIVAL_STAMPS = 35 if sys.platform.startswith("linux") and os.uname().machine in (
    "x86_64", "amd64", "aarch64", "arm64", "i386", "i686", "armv7l") else None
_TIMESPEC = struct.Struct("ll")


class _RequestReader(io.RawIOBase):
    """The raw reads of one connection, behind its BufferedReader.

    The socket's receive timeout is the linger.  A read for a request that has not
    begun raises _Idle when the linger passes; once a request's first bytes
    arrive it has `deadline` (a time.monotonic() time) to arrive whole, and a
    read past it raises REQUEST_TIMEOUT however slowly the bytes trickle in.
    With `peeking` set, reads return nothing, so that peek() shows only what
    is already buffered; on a non-blocking socket, a read with nothing to
    read returns nothing too.  The socket's timeout is the kernel's (see
    _set_timeouts).

    `arrived` is when the bytes of the last read reached the machine, in
    time.monotonic() seconds, where the kernel stamps them: simulated times
    count from there, not from when a thread got round to the request.  200
    streams asked for at once waited their turn for the GIL, and each one's
    chunks came that much late (p50 15 to 23 ms; with the stamps, 1 to 2 ms).
    Without a stamp (off Linux, or in the moment before the kernel starts
    stamping) a request counts from when it is read.  `slot` is the lingering slot this connection
    holds while it waits for a request, given back as the wait ends.
    """

    def __init__(self, sock, head_timeout_s):
        self.sock, self.head_timeout_s = sock, head_timeout_s
        self.deadline, self.peeking, self.slot, self.arrived = None, False, None, None
        self._stamped = False
        if _ARRIVAL_STAMPS is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, _ARRIVAL_STAMPS, 1)
                self._stamped = True
            except OSError:
                pass

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.peeking:
            return None
        while True:
            try:
                count = self._receive(buffer)
            except _TIMED_OUT:
                if self.sock.gettimeout() == 0:
                    return None  # non-blocking, and nothing to read yet
                if self.deadline is None:
                    self.end_wait()
                    raise _Idle from None
                count = None
            if self.deadline is None:
                self.end_wait()
                self.deadline = time.monotonic() + self.head_timeout_s  # a request begins
            elif time.monotonic() > self.deadline:
                raise ApiError("REQUEST_TIMEOUT", "the request did not arrive in time")
            if count is not None:
                return count

    def _receive(self, buffer):
        if not self._stamped:
            return self.sock.recv_into(buffer)
        count, ancillary, _, _ = self.sock.recvmsg_into([buffer], 64)
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == _ARRIVAL_STAMPS and (
                    len(data) >= _TIMESPEC.size):
                seconds, nanoseconds = _TIMESPEC.unpack_from(data)
                self.arrived = seconds + nanoseconds / 1e9 - (time.time() - time.monotonic())
        return count

    def end_wait(self):
        if self.slot is not None:
            self.slot.release()
            self.slot = None


class _Parking:
    """Every open connection with no request in progress, in one thread.

    An idle keep-alive connection waits here for its next request, which a
    new handler thread then answers; a held one (hang, stall) until its
    client leaves.  Neither holds a thread.  When thousands of clients leave
    at once this thread closes their sockets: blocked in recv in threads of
    their own, 6,000 of them woke together and fought for the GIL (40 threads
    ended per second, both cores busy, /health unanswered for over 30 s).
    """

    def __init__(self, server):
        self._server = server
        self._lock = threading.Lock()
        self._idle = {}   # socket -> (address, its entry in _ages)
        self._ages = _Schedule()  # idle sockets by the time they went idle
        self._held = {}   # socket -> address
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        self._thread = None
        self._closed = False

    def park(self, sock, address, idle_since=None):
        """Take a connection: idle since that time.monotonic() time, or held
        (idle_since None) until its client leaves."""
        with self._lock:
            if self._closed:
                self._server.close_request(sock)
                return
            sock.setblocking(False)
            if idle_since is None:
                self._held[sock] = address
            else:
                self._idle[sock] = (address, self._ages.push(idle_since, sock))
            self._selector.register(sock, selectors.EVENT_READ)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dummyllm-parking",
                                                daemon=True)
                self._thread.start()
        self._wake_write.send(b"\0")  # a new idle deadline, and poll() sees the socket

    def close_longest_idle(self):
        """Close the connection idle longest, to make room; False if none is idle."""
        with self._lock:
            sock = self._ages.pop_due(math.inf)
            if sock is None:
                return False
            self._close(sock)
            return True

    def counts(self):
        with self._lock:
            return len(self._idle), len(self._held)

    def close(self):
        """Close every parked connection and stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for sock in list(self._idle) + list(self._held):
                self._close(sock)
        self._wake_write.send(b"\0")
        if self._thread is not None:
            self._thread.join(1)
        self._selector.close()
        self._wake_read.close()
        self._wake_write.close()

    def _run(self):
        while True:
            with self._lock:
                if self._closed:
                    return
                oldest = self._ages.next_time()
            timeout = None if oldest is None else max(
                0, oldest + self._server.idle_timeout_s - time.monotonic())
            ready = self._selector.select(timeout)
            returning = []
            with self._lock:
                if self._closed:
                    return
                for key, _ in ready:
                    if key.fileobj is self._wake_read:
                        self._drain(self._wake_read)
                    elif key.fileobj in self._held:
                        if not self._drain(key.fileobj):
                            self._close(key.fileobj)  # the client left
                    elif key.fileobj in self._idle:
                        sock = key.fileobj
                        if self._peek(sock):  # a request: a handler thread takes it
                            address, entry = self._idle.pop(sock)
                            self._ages.cancel(entry)
                            self._selector.unregister(sock)
                            returning.append((sock, address))
                        else:
                            self._close(sock)
                expired = time.monotonic() - self._server.idle_timeout_s
                for sock in iter(lambda: self._ages.pop_due(expired), None):
                    self._close(sock)
            for sock, address in returning:
                self._server.process_request(sock, address)

    @staticmethod
    def _drain(sock):
        """Read and drop what the client sent; False once it has left."""
        try:
            while sock.recv(65536):
                pass
            return False
        except BlockingIOError:
            return True
        except OSError:
            return False

    @staticmethod
    def _peek(sock):
        """Whether a request has begun (False: the client left)."""
        try:
            return bool(sock.recv(1, socket.MSG_PEEK))
        except BlockingIOError:
            return True  # woken for nothing; the handler will wait
        except OSError:
            return False

    def _close(self, sock):
        address, entry = self._idle.pop(sock, (None, None))
        if entry is not None:
            self._ages.cancel(entry)
        self._held.pop(sock, None)
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        self._server.close_request(sock)


class _Sender:
    """A handler's wfile: each write is one sendall, nothing is buffered."""

    def __init__(self, sock):
        self.write = sock.sendall


class _Handler(BaseHTTPRequestHandler):
    """One connection while a request is in progress: read each request, have
    the application answer it, and write the answer (one send, a stream, or
    spoiled by a fault).  Between requests it lingers, then parks the
    connection and lets its thread go.

    `server` is the application (a DummyLLMServer).  What touches the socket
    itself is in setup, handle, _send_timed, _hold and _send_rst, and the
    waits in _wait_until: a handler without a socket (a test's) replaces
    those and answers through everything else."""

    protocol_version = "HTTP/1.1"
    server_version = "dummyLLM/" + __version__
    _request = _fault = None  # the request being answered, and the fault that spoils it
    _broken = None            # how a stream whose frame failed to render ended
    handed_over = False       # the connection went to the parking, open

    def setup(self):
        self.connection = sock = self.request
        self._started = time.perf_counter()
        _set_timeouts(sock, self.server.linger_s, self.server.send_timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self._reader = _RequestReader(sock, self.server.head_timeout_s)
        self.rfile = io.BufferedReader(self._reader)
        self.wfile = _Sender(sock)
        self._idle_since = time.monotonic()  # and again as each answer goes out

    def finish(self):
        self.rfile.close()

    def handle(self):
        self.close_connection = False
        try:
            while not self.close_connection:
                self._await_request()
                self.handle_one_request()
        except _Idle:
            self.handed_over = True
            self.server.parking.park(self.connection, self.client_address, self._idle_since)
        except (ConnectionError, *_TIMED_OUT):
            pass  # the client left, or stopped reading our answer
        finally:
            self._reader.end_wait()

    def _await_request(self):
        """Before each request: what was sent already begins it; else linger
        for it if a lingering slot is free, else look once and park."""
        reader = self._reader
        reader.peeking = True
        pending = self.rfile.peek(1)
        reader.peeking = False
        if not pending:
            reader.deadline = None
            if self.server.lingering.acquire(blocking=False):
                reader.slot = self.server.lingering
                return
            # Thousands of connections lingering in threads would all wake
            # when their clients leave together, and fight for the GIL.
            self.connection.setblocking(False)
            try:
                pending = self.rfile.peek(1)
            finally:
                self.connection.settimeout(None)
            if not pending:
                raise _Idle
        reader.deadline = time.monotonic() + reader.head_timeout_s

    def handle_one_request(self):
        self.command, self._request, self._fault = None, None, None
        try:
            line = self.rfile.readline(_MAX_LINE_BYTES + 1)
            for _ in range(8):  # RFC 9112 2.2: empty lines before a request are ignored
                if line not in (b"\r\n", b"\n"):
                    break
                line = self.rfile.readline(_MAX_LINE_BYTES + 1)
            if not line:
                self.close_connection = True
                return
            self.raw_requestline = line
            if len(line) > _MAX_LINE_BYTES:
                self.requestline, self.request_version = "", "HTTP/1.1"
                return self._refuse("URI_TOO_LONG")
            if self.parse_request():
                self._dispatch()
        except ApiError as error:  # the request did not arrive in time
            self._refuse(error.code, error.message)

    def parse_request(self):
        # Replaces http.server's, which parses headers with the email package:
        # half the CPU time of a small request.  Sets what it sets.
        self.command, self.request_version, self.close_connection = None, "HTTP/1.0", True
        self.requestline = self.raw_requestline.decode("latin-1").rstrip("\r\n")
        line = _REQUEST_LINE.match(self.requestline)
        if not line:
            self._refuse("BAD_REQUEST", f"malformed request line {self.requestline[:200]!r}")
            return False
        if line.group(3) != "1":
            self._refuse("HTTP_VERSION_NOT_SUPPORTED")
            return False
        self.command, self.path = line.group(1), line.group(2)
        self.request_version = f"HTTP/1.{line.group(4)}"
        self.headers = headers = {}
        head_bytes, lines = len(self.raw_requestline), []
        for _ in range(_MAX_HEADER_FIELDS + 1):
            raw = self.rfile.readline(_MAX_LINE_BYTES + 1)
            if raw in (b"\r\n", b"\n", b""):
                break
            head_bytes += len(raw)
            if len(raw) > _MAX_LINE_BYTES or head_bytes > _MAX_HEAD_BYTES:
                self._refuse("HEADERS_TOO_LARGE", f"the request head is over {_MAX_HEAD_BYTES} "
                             "bytes")
                return False
            lines.append(raw)
        else:
            self._refuse("HEADERS_TOO_LARGE", f"more than {_MAX_HEADER_FIELDS} header fields")
            return False
        # The fields are checked and split in one pass over the head (line by
        # line, two regular expressions each, took 0.8 us more of a chat
        # request's 43).
        fields = b"".join(lines).decode("latin-1")
        if not _HEADER_FIELDS.fullmatch(fields):
            self._refuse("BAD_REQUEST", self._malformed(lines))
            return False
        for name, value in _HEADER_FIELD.findall(fields):
            name = name.lower()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if self.request_version == "HTTP/1.1" and "host" not in headers:
            self._refuse("BAD_REQUEST", "an HTTP/1.1 request needs a Host header")
            return False
        encoding = headers.get("transfer-encoding")
        if encoding is not None and encoding.lower() != "chunked":
            self._refuse("NOT_IMPLEMENTED", f"Transfer-Encoding {encoding!r}: only chunked is "
                         "understood")
            return False
        connection = headers.get("connection", "").lower()
        # With both Transfer-Encoding and Content-Length the framing is in doubt:
        # answer, then close (RFC 9112 6.1).
        self.close_connection = connection == "close" or (
            self.request_version == "HTTP/1.0" and connection != "keep-alive") or (
            encoding is not None and "content-length" in headers)
        if headers.get("expect", "").lower() == "100-continue" and self.request_version != "HTTP/1.0":
            return self.handle_expect_100()
        return True

    @staticmethod
    def _malformed(lines):
        """What is wrong with the first header line that is."""
        for raw in lines:
            name, colon, value = raw.decode("latin-1").partition(":")
            if not colon or not _HEADER_NAME.match(name):  # also obsolete line folding
                return f"malformed header line {raw[:200]!r}"
            if _CONTROL_CHARACTER.search(value.strip(" \t\r\n")):
                return f"header {name} has a control character"
        return "malformed header fields"

    def _dispatch(self):
        self._started = time.perf_counter()
        clock, reader = self.server.clock, self._reader
        received_ms = clock.now_ms()
        if reader.arrived is not None:  # a request read whole before is answered from now
            received_ms = min(received_ms, clock.of_monotonic(reader.arrived))
            reader.arrived = None
        path, _, query = self.path.partition("?")
        request = self._request = _Request(self.command, path, query, self.headers,
                                           received_ms, clock.wall_ms())
        try:
            request.body = self._read_body()
            answer = self.server.answer(request)
        except ApiError as error:
            answer = _Answer(payload=error)
        except (ConnectionError, *_TIMED_OUT):
            self.close_connection = True
            return
        except Exception:  # a bug: a 500 for the client, the traceback for the log
            self.server.log_traceback(f"internal error on {self.command} {self.path}")
            answer = _Answer(payload=ApiError("INTERNAL"))
        try:
            self._deliver(answer)
        except (ConnectionError, *_TIMED_OUT):
            self.close_connection = True  # the client left mid-answer

    def _deliver(self, answer):
        if answer.stream is not None:
            return self._send_stream(answer)
        if answer.live is not None:
            return self._send_live(answer)
        if answer.at is not None and not self._wait_until(answer.at):
            return  # the server stops
        if answer.status is None:
            self._answered(None)
            return self._hold()
        if answer.fault is not None:
            self._fault = answer.fault
            return _FAULT_DELIVERY[answer.fault.kind](self, answer, *self._render(answer))
        self._send_bytes(*self._render(answer))

    def _render(self, answer):
        """(status, headers, body, content type) of an answer that is not a stream."""
        payload = answer.payload
        if isinstance(payload, ApiError):
            return self._render_error(payload)
        if not isinstance(payload, bytes):
            payload = b"" if payload is None else _json_bytes(payload)
        return answer.status, answer.headers, payload, answer.content_type

    def _render_error(self, error):
        """An error in the format of the surface that answers the request."""
        request = self._request
        retry_ms = None if error.retry_after_ms is None else round(
            self.server.clock.real_ms(error.retry_after_ms))
        if request is not None:
            request.note.code, request.note.field = error.code, error.field
            request.note.retry_after_ms = retry_ms
        status, body, headers = self.server.surface_of(request).error(
            error, retry_ms, self.server.clock.wall_ms(), request and request.note)
        return status, headers, _json_bytes(body), "application/json"

    def _send_stream(self, answer):
        start_ms = self.server.clock.now_ms() if answer.at is None else answer.at
        head = self._head(answer.status, answer.headers, answer.content_type, None)
        request = self._request
        request.note.stream_failure = answer.failure
        self._answered(answer.status)
        # The journal has what it keeps of the body: a stream held for long
        # need not hold it too (300 streams of a 200 KB text held 60 MB of them).
        request.body = b""
        self._broken = None
        chunks = ((start_ms + ms, self._chunk(data)) for ms, data in self._rendered(answer)
                  if data)  # an empty chunk would end the body
        sent = self._send_timed(head, chunks)
        ending = self._broken or answer.failure
        if not sent:
            self.close_connection = True
        elif ending == "stall_after":
            self._hold()
        elif ending == "cut_after":
            self.close_connection = True  # the chunked body never ends: a broken stream
        elif self.request_version != "HTTP/1.0":
            self.wfile.write(self._chunk(b""))
            self.close_connection = self.close_connection or ending == "error_after"

    def _rendered(self, answer):
        """A stream's frames as they render.  One that fails to render (a
        bug) ends this stream alone: with the surface's error event, or a cut
        where that fails too; the traceback goes to the log once and
        /metrics counts it."""
        ms = 0
        try:
            for ms, data in answer.stream:
                yield ms, data
        except Exception:
            self.server.stream_failed(self._request)
            try:
                data = answer.stream_error()
            except Exception:
                data = b""
            self._broken = "error_after" if data else "cut_after"
            yield ms, data

    def _send_timed(self, head, chunks):
        """Send head with the first chunk, then each chunk at its time (on
        the clock): the stream writer renders and sends them (see
        _StreamWriter).  False if the client went away or the server stops."""
        streams, clock, sock = self.server.streams, self.server.clock, self.connection
        timeout = sock.gettimeout()
        sock.setblocking(False)
        # The kernel's buffer is the rest of the window: with its own (up to
        # 4 MB), 300 clients that read nothing had the writer render frames
        # into it for a minute, a core busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, streams.WINDOW)
        try:
            stream = streams.start(sock, head, ((clock.real_ms(at_ms) / 1000, data)
                                                for at_ms, data in chunks))
            return stream is not None and streams.wait(stream)
        finally:
            sock.settimeout(timeout)

    def _send_live(self, answer):
        """A body whose bytes are sent as they come (job events, an
        upstream's answer); one whose upstream broke is broken too."""
        self._answered(answer.status)
        self.wfile.write(self._head(answer.status, answer.headers, answer.content_type, None))
        try:
            for data in answer.live:
                if self.server.stopping.is_set():
                    self.close_connection = True
                    return
                self.wfile.write(self._chunk(data))
        except _UpstreamCut:
            self.close_connection = True
            return
        if self.request_version != "HTTP/1.0":
            self.wfile.write(self._chunk(b""))

    def _chunk(self, data):
        """Data framed as one chunk of a chunked body (as it is, for HTTP/1.0)."""
        if self.request_version == "HTTP/1.0":
            return data
        return b"%x\r\n%s\r\n" % (len(data), data)

    def _send_rst(self):
        """Close the connection with a TCP RST: SO_LINGER 0, then close at once."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # it holds a reference that would put the close off
        self.connection.close()

    def _wait_until(self, at_ms):
        """Sleep until a clock time; False if the server stops meanwhile."""
        delay = self.server.clock.seconds_until(at_ms)
        if delay > 0 and self.server.stopping.wait(delay):
            self.close_connection = True
            return False
        return True

    def _hold(self):
        """Send nothing more: the parking keeps the connection open, reading
        and dropping what the client sends, until it leaves or the server stops."""
        self.close_connection = self.handed_over = True
        self.server.parking.park(self.connection, self.client_address)

    def _read_body(self):
        """The body, which has head_timeout_s and a second per 64 KiB to arrive."""
        limit = self.server.config.max_body_bytes
        chunked = "transfer-encoding" in self.headers
        length = None if chunked else self._content_length()
        if not chunked and length is None:
            return b""
        if length is not None and length > limit:
            self.close_connection = True  # the rest of the body is never read
            raise self._too_large(limit)
        self._reader.deadline = time.monotonic() + self._reader.head_timeout_s + (
            limit if chunked else length) / _BODY_BYTES_PER_S
        try:
            if chunked:
                return self._read_chunked(limit)
            body = self.rfile.read(length)
        except ApiError:
            self.close_connection = True
            raise
        if len(body) < length:
            raise ConnectionError("client closed the connection mid-body")
        return body

    def _content_length(self):
        text = self.headers.get("content-length")
        if text is None:
            return None
        if not (text.isascii() and text.isdigit()):
            self.close_connection = True
            raise ApiError("BAD_REQUEST", "Content-Length must be a decimal number of bytes")
        return int(text) if len(text) <= 18 else math.inf

    @staticmethod
    def _too_large(limit):
        return ApiError("PAYLOAD_TOO_LARGE", f"request body is larger than {limit} bytes")

    def _read_chunked(self, limit):
        parts, size_so_far = [], 0
        while True:
            line = self.rfile.readline(1026)
            if not line:
                raise ConnectionError("client closed the connection mid-body")
            size_text = line.split(b";", 1)[0].strip()
            if not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", size_text):
                self.close_connection = True
                raise ApiError("BAD_REQUEST", "malformed chunk size in chunked request body")
            size = int(size_text, 16)
            if size == 0:
                break
            size_so_far += size
            if size_so_far > limit:
                self.close_connection = True
                raise self._too_large(limit)
            parts.append(self.rfile.read(size))
            self.rfile.readline(3)  # the CRLF that ends the chunk
        while self.rfile.readline(1026) not in (b"\r\n", b"\n", b""):
            pass  # trailer fields, ignored
        return b"".join(parts)

    def handle_expect_100(self):
        # Refuse an oversized body before the client sends it.
        text = self.headers.get("content-length", "")
        limit = self.server.config.max_body_bytes
        if text.isascii() and text.isdigit() and (len(text) > 18 or int(text) > limit):
            self.close_connection = True
            self._send_bytes(*self._render_error(self._too_large(limit)))
            return False
        return super().handle_expect_100()

    def _refuse(self, code, message=None):
        """Answer a request the parser refused, and close."""
        self.close_connection = True
        self._send_bytes(*self._render_error(ApiError(code, message)))

    def send_error(self, code, message=None, explain=None):
        # http.server's own refusals (a too long request line) take our shape.
        self._refuse(_CODE_OF_STATUS.get(code, "BAD_REQUEST"), message)

    def _head(self, status, headers, content_type, length):
        """The status line and header fields; length None: a chunked stream."""
        lines = [
            f"HTTP/1.1 {status} {self.server.reasons.get(status, '')}",
            "Server: " + self.server_version,
            "Date: " + _http_date(),
        ]
        if status == 204:
            pass  # No Content: neither a type nor a length
        elif length is not None:
            lines += ["Content-Type: " + content_type, f"Content-Length: {length}"]
        elif self.request_version == "HTTP/1.0":
            lines += ["Content-Type: " + content_type, _UNBUFFERED]
            self.close_connection = True  # no chunked encoding: the end of the body is the close
        else:
            lines += ["Content-Type: " + content_type, "Transfer-Encoding: chunked",
                      "Cache-Control: no-cache", _UNBUFFERED]
        lines.extend(f"{name}: {value}" for name, value in headers)
        lines.extend(self.server.cors_headers)
        if self.close_connection:
            lines.append("Connection: close")
        elif self.request_version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send_bytes(self, status, headers, body, content_type="application/json"):
        head = self._head(status, headers, content_type, len(body))
        self._answered(status)
        # One send: headers and body written apart stall on Nagle plus delayed ACK.
        self.wfile.write(head if self.command == "HEAD" else head + body)

    def _answered(self, status):
        """Account for the answer now going out (status None: none at all)."""
        request = self._request
        fault = self._fault or (request and request.note.fault)
        self._idle_since = time.monotonic()
        elapsed_ms = round((time.perf_counter() - self._started) * 1000, 1)
        self.server.record(request, status, fault, elapsed_ms, self.command or "-",
                           request.path if request else getattr(self, "path", "") or "-")

    def log_message(self, format, *args):
        if not self.server.config.quiet:
            self.server.log(f"{self.address_string()} {format % args}")


# How each transport fault is delivered: (handler, answer, then the status,
# headers, body and content type the answer would have had).
def _deliver_reset(handler, answer, status, headers, body, content_type):
    handler._answered(None)
    handler._send_rst()


def _deliver_disconnect(handler, answer, status, headers, body, content_type):
    handler._answered(None)
    handler.close_connection = True  # closed cleanly, nothing said


def _deliver_status(handler, answer, status, headers, body, content_type):
    handler._send_bytes(*handler._render_error(_fault_error(answer.fault)))


def _deliver_empty(handler, answer, status, headers, body, content_type):
    handler._send_bytes(200, headers, b"", content_type)


def _deliver_malformed(handler, answer, status, headers, body, content_type):
    handler._send_bytes(200, headers, body[:len(body) // 2], content_type)


def _deliver_dribble(handler, answer, status, headers, body, content_type):
    # The right answer, in _DRIBBLE_PIECES pieces dribble_ms apart.
    data = handler._head(status, headers, content_type, len(body)) + body
    handler._answered(status)
    start_ms, size = handler.server.clock.now_ms(), -(-len(data) // _DRIBBLE_PIECES)
    for index in range(_DRIBBLE_PIECES):
        if not handler._wait_until(start_ms + index * answer.dribble_ms):
            return
        handler.wfile.write(data[index * size:(index + 1) * size])


_FAULT_DELIVERY = {"reset": _deliver_reset, "disconnect": _deliver_disconnect,
                   "status": _deliver_status, "empty": _deliver_empty,
                   "malformed": _deliver_malformed, "dribble": _deliver_dribble}


# --- Server: DummyLLMServer and start_server --------------------------------------

class DummyLLMServer(_Application, ThreadingHTTPServer):
    """The dummyLLM HTTP server: ``DummyLLMServer(port=0, mode="fail", ...)``.

    Takes the options of the command line as keywords (or a ready Config),
    and optionally the clock its store and handlers read.  ``start()`` serves
    from a background thread, ``stop()`` ends it at once; the server is also
    a context manager that stops on exit.  It is the application (see
    _Application) on a socket server.

    Override points, for those who run it their own way:

    answer(request)   the _Answer to a request: CORS preflight, routing,
                      the API key, chaos, then the route's handler
    record(...)       accounting of each answer: metrics, access log, journal
    log(line)         where log lines go (stderr, from a thread of its own)
    reset()           what POST /v1/reset forgets
    idle_timeout_s    seconds an idle keep-alive connection is kept (30)
    linger_s          seconds a connection keeps its thread between requests,
                      before it is parked without one (0.5)
    max_lingering     connections that may linger at once; the others are
                      parked as soon as they have no request (256)
    head_timeout_s    seconds a request's head has to arrive once begun (10);
                      its body has as long again, plus a second per 64 KiB
    send_timeout_s    seconds an answer may wait for a client that reads
                      nothing, before it is given up (30)
    heartbeat_s       seconds between heartbeats of a quiet job event stream (15)
    """

    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024  # see server_activate
    allow_reuse_address = True
    idle_timeout_s = 30
    linger_s = 0.5
    max_lingering = 256
    head_timeout_s = 10
    send_timeout_s = 30

    def __init__(self, config=None, clock=None, **options):
        _Application.__init__(self, config, clock, **options)
        if ":" in self.config.host:
            self.address_family = socket.AF_INET6
        self._thread = None
        self.streams = _StreamWriter(self.send_timeout_s)
        self.lingering = threading.BoundedSemaphore(self.max_lingering)
        self.max_connections = self.config.max_connections or _default_max_connections()
        self._open = 0                      # connections open, parked ones included
        self._open_lock = threading.Lock()
        # serve_forever waits on the listening socket and on this, which
        # shutdown() writes to: socketserver's loop polls every 0.5 s (0.05
        # here before), and each stop() waited out a poll.
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_write.setblocking(False)  # a full pipe already holds a wake
        self._stop_asked, self._served = False, threading.Event()
        self._served.set()
        self._reserve_fd = os.open(os.devnull, os.O_RDONLY)  # given up to refuse at the fd limit
        self.parking = _Parking(self)
        try:
            ThreadingHTTPServer.__init__(self, (self.config.host, self.config.port), _Handler)
        except BaseException:
            self._release()
            raise

    def server_bind(self):
        # HTTPServer.server_bind also calls socket.getfqdn(), a reverse DNS
        # lookup that has taken 30 s on CI machines; the name is never used.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def server_activate(self):
        # A burst of connects beyond the listen backlog waits a second for the
        # client's SYN retry: listen as deep as the system allows.
        self.socket.listen(max(self.request_queue_size, _somaxconn()))

    def get_request(self):
        # At the open-file limit, make room by closing the longest idle
        # connection; with none idle, refuse the newcomer with the reserve fd.
        # Either way the listening socket is drained: no spinning on it.
        while True:
            try:
                return self.socket.accept()
            except OSError as error:
                if error.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                if not self.parking.close_longest_idle():
                    self._refuse_at_fd_limit()
                    raise

    def _refuse_at_fd_limit(self):
        os.close(self._reserve_fd)
        try:
            sock, _ = self.socket.accept()
            with sock:
                self._refuse_connection(sock)
        except OSError:
            time.sleep(0.01)  # the system is out of files: back off
        finally:
            self._reserve_fd = os.open(os.devnull, os.O_RDONLY)

    def verify_request(self, request, client_address):
        # Counted here, once per accepted connection.  At --max-connections,
        # the longest idle connection makes room; with none idle, a fast 503.
        with self._open_lock:
            self._open += 1
            full = self._open > self.max_connections
        if full and not self.parking.close_longest_idle():
            self._refuse_connection(request)
            return False
        return True

    @staticmethod
    def _refuse_connection(sock):
        status, body, headers = _JOB_API.error(ApiError(
            "TOO_MANY_CONNECTIONS", headers=[("Retry-After", "1")]), None, 0)
        body = _json_bytes(body)
        head = "".join(f"{name}: {value}\r\n" for name, value in headers)
        try:
            sock.sendall(f"HTTP/1.1 {status} {_REASONS[status]}\r\n{head}"
                         f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
        except OSError:
            pass

    def process_request_thread(self, request, client_address):
        try:
            handler = self.RequestHandlerClass(request, client_address, self)
        except Exception:
            self.handle_error(request, client_address)
        else:
            if handler.handed_over:
                return  # the parking has the connection now
        self.shutdown_request(request)

    def close_request(self, request):
        super().close_request(request)
        with self._open_lock:
            self._open -= 1

    def connections(self):
        """(open, idle parked, held parked) connections."""
        with self._open_lock:
            open_now = self._open
        return (open_now, *self.parking.counts())

    @property
    def url(self):
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve_forever(self, poll_interval=None):
        """Serve until shutdown(), which wakes it at once."""
        self._served.clear()
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._wake_read, selectors.EVENT_READ)
                while not self._stop_asked:
                    for key, _ in selector.select():
                        if key.fileobj is self._wake_read:
                            self._wake_read.recv(64)
                        elif not self._stop_asked:
                            self._handle_request_noblock()
                    self.service_actions()
        finally:
            self._stop_asked = False
            self._served.set()

    def shutdown(self):
        """Stop serve_forever and wait until it has returned."""
        self.ask_to_stop()
        self._served.wait()

    def wakeup_fd(self):
        """A non-blocking descriptor whose every byte wakes serve_forever
        (see signal.set_wakeup_fd)."""
        return self._wake_write.fileno()

    def ask_to_stop(self):
        """Make serve_forever return at once.  It takes no lock, so a signal
        handler may call it."""
        self._stop_asked = True
        try:
            self._wake_write.send(b"\0")
        except OSError:
            pass  # closed already (nothing is served), or a wake already waits

    def start(self):
        """Serve from a daemon thread; returns self."""
        self._thread = threading.Thread(target=self.serve_forever, name="dummyllm-server",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop serving (if started) and release the port and the threads."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def server_close(self):
        self.stopping.set()
        self.parking.close()
        self.streams.close()
        super().server_close()
        self._release()

    def _release(self):
        """Give back what the server holds besides its socket."""
        if self._reserve_fd is not None:
            os.close(self._reserve_fd)
            self._reserve_fd = None
        self._wake_read.close()
        self._wake_write.close()
        self.parking.close()
        self.close()

    def __exit__(self, *exc_info):
        self.stop()

    def handle_error(self, request, client_address):
        # Clients that vanish mid-answer are normal; anything else is logged.
        exc = sys.exc_info()[1]
        if not isinstance(exc, (ConnectionError, *_TIMED_OUT)):
            self.log(f"dummyLLM: error serving {client_address[0]}\n"
                     + traceback.format_exc().rstrip())


def _somaxconn():
    """The system's cap on a listen backlog (Linux), else 0."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def _default_max_connections():
    """Seven eighths of the open-file limit: the rest is for everything else."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0] if resource else 8192
    return max(16, (limit if limit != getattr(resource, "RLIM_INFINITY", -1) else 65536) * 7 // 8)


def _raise_file_limit():
    """Raise the soft open-file limit to the hard one; a warning if it cannot."""
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as error:
        return f"dummyLLM: cannot raise the open-file limit from {soft} to {hard}: {error}"
    return None


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


class ServerScope:
    """One test's own scope on a shared server (see _test_id): its base URL,
    and the journal, verdict, rules and state of its requests alone::

        scope = ServerScope(server, "test_checkout")
        client = openai.OpenAI(base_url=scope.url + "/v1", api_key="x")
        ...
        scope.assert_client_ok()
    """

    def __init__(self, server, test_id):
        _TEST_ID_TEXT(test_id, "test_id")
        self.server, self.test_id = server, test_id
        self.url = f"{server.url}/test/{urllib.parse.quote(test_id, safe='')}"

    def environ(self):
        """The variables that point each SDK at this scope (their base URLs;
        see _Surface.sdk_environ)."""
        return {name: self.url + path for surface in self.server.registry.surfaces
                for name, path in surface.sdk_environ.items() if path is not None}

    def requests(self, **query):
        """The journal's entries of this test's requests (see GET /v1/requests)."""
        return self.server.journal.find(test_id=self.test_id, **query)

    def verdict(self, trace_id=None, **query):
        return self.server.verdict(trace_id, test_id=self.test_id, **query)

    def assert_client_ok(self, trace_id=None, **query):
        return self.server.assert_client_ok(trace_id, test_id=self.test_id, **query)

    def add_rule(self, rule):
        """Add a reply rule that holds for this test's requests alone."""
        return self.server.add_rule(rule, self.test_id)

    def add_mcp_tool(self, tool):
        """Add a tool to /mcp for this test's sessions alone."""
        return self.server.add_mcp_tool(tool, self.test_id)

    def mcp_report(self, trace_id=None):
        """Which tools this test's keys called through /mcp (see GET /v1/mcp/report)."""
        return self.server.mcp_report(trace_id, self.test_id)

    def reset(self):
        """Forget this test's jobs, counters, keys, quotas, rules, MCP tools and
        sessions, and journal."""
        return self.server.reset(self.test_id)

    def report(self):
        """This test's requests and the verdict on them, as lines of text."""
        lines = [f"{entry['method']} {entry['path']} -> {entry['status'] or 'no answer'}"
                 + "".join(f" {name}={entry[name]}" for name in ("trace_id", "code", "fault",
                                                                  "stream_failure")
                           if entry[name] is not None)
                 for entry in self.requests()]
        verdict = self.verdict()
        lines.append("verdict: " + ("ok" if verdict["ok"] else "not ok"))
        lines += [f"  {finding['code']} ({finding['severity']}): {finding['message']}"
                  for finding in verdict["findings"]]
        return "\n".join(lines)



# --- API document and pages -------------------------------------------------------
# /openapi.json is made from the registered surfaces: their routes, each
# route's description and the schemas each surface declares.  /docs, the
# dashboard and the /journal timeline are self-contained pages that read it
# and the API.

def _openapi_document(registry):
    """The OpenAPI 3.2 document of the registered surfaces' routes."""
    paths, schemas = {}, {}
    for surface in registry.surfaces:
        schemas.update(surface.schemas())
    tags = [{"name": surface.title or surface.name} for surface in registry.surfaces
            if surface.routes]
    for route in registry.routes:
        api = route.api
        parameters = [{"name": name, "in": "path", "required": True,
                       "schema": {"type": "string"}}
                      for name in re.findall(r"\{(\w+)\+?\}", route.path)]
        parameters += [{"name": name, "in": "query", "required": spec.default is _REQUIRED,
                        "description": spec.about, "schema": spec.rule.schema}
                       for name, spec in api["query"].items()]
        parameters += [{"name": name, "in": "header", "required": spec.default is _REQUIRED,
                        "description": spec.about, **_header_schema(spec.rule.schema)}
                       for name, spec in api["headers"].items()]
        responses = {}
        for status, what in api["answers"].items():
            if what is None and status >= 400:
                what = route.surface.error_schema
            content = _answer_content(what)
            if status == 200 and api["streams"]:
                for stream in route.surface.event_streams():
                    content.update(_answer_content(stream))
            responses[str(status)] = {"description": registry.reasons[status],
                                      **({"content": content} if content else {})}
        responses["default"] = {"description": "An error", "content": {
            "application/json": {"schema": _ref(route.surface.error_schema)}}}
        operation_id = re.sub(r"[^0-9A-Za-z]+", "_", f"{route.method} {route.path}").strip("_")
        operation = {"summary": api["summary"], "operationId": operation_id.lower(),
                     "tags": [route.surface.title or route.surface.name],
                     "parameters": parameters, "responses": responses}
        if api["refuses"]:
            operation["x-dummyllm-refuses"] = api["refuses"]
        if api["request"]:
            operation["requestBody"] = {"required": True, "content": {
                api["request_type"]: {"schema": _ref(api["request"])}}}
        paths.setdefault(route.path.replace("+}", "}"), {})[route.method.lower()] = operation
    return {"openapi": "3.2.0",
            "info": {"title": "dummyLLM", "version": __version__,
                     "description": __doc__.split("\n\n")[1].replace("\n", " ")},
            "tags": tags, "paths": paths, "components": {"schemas": schemas}}


def _header_schema(schema):
    """A header's parameter fields: an object travels as JSON text."""
    if "$ref" in schema or schema.get("type") == "object":
        return {"content": {"application/json": {"schema": schema}}}
    return {"schema": schema}


def _answer_content(what):
    """The content of an answer, by media type: a schema's name is JSON, a
    media type has text of its own, an _EventStream each event described
    (OpenAPI 3.2's itemSchema: SSE events, NDJSON lines), or a JSON array."""
    if what is None:
        return {}
    if isinstance(what, str):
        if "/" in what:
            return {what: {"schema": {"type": "string"}}}
        return {"application/json": {"schema": _ref(what)}}
    framing, events = what

    def data(schemas):
        json_ = [_ref(schema) for schema in schemas if isinstance(schema, str)]
        return json_[0] if len(json_) == 1 else {"anyOf": json_}

    if framing.content_type != "text/event-stream":
        if framing.start:  # a JSON array
            return {framing.content_type: {"schema": {"type": "array", "items": data(
                schema for _, schema in events)}}}
        return {framing.content_type: {"itemSchema": data(schema for _, schema in events)}}
    variants = []
    for name in dict.fromkeys(name for name, _ in events):
        schemas = [schema for named, schema in events if named == name]
        text = {"contentMediaType": "application/json", "contentSchema": data(schemas)}
        sent_as_is = [schema.decode() for schema in schemas if isinstance(schema, bytes)]
        if sent_as_is:
            text = {"if": {"enum": sent_as_is}, "else": text}
        event = {"type": "object", "required": ["data"],
                 "properties": {"data": {"type": "string", **text}}}
        if name is not None:
            event["required"].append("event")
            event["properties"]["event"] = {"const": name}
        variants.append(event)
    return {"text/event-stream": {
        "itemSchema": variants[0] if len(variants) == 1 else {"oneOf": variants}}}


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

_DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<link rel="icon" href="data:,"><title>dummyLLM API</title>
<style>""" + _PAGE_STYLE + """</style></head>
<body>
<h1>dummyLLM API</h1>
<nav><a href="/">dashboard</a><a href="/openapi.json">openapi.json</a><a href="/metrics">metrics</a></nav>
<p id="about"></p>
<nav id="contents" aria-label="contents"></nav>
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
  if (schema.oneOf || schema.anyOf) return (schema.oneOf || schema.anyOf).map(typeOf).join(" or ");
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
  let body = null, form = null;
  if (op.requestBody) {
    const [type, {schema}] = Object.entries(op.requestBody.content)[0];
    box.append(el("p", {}, "Request body:"), fieldsTable(schema));
    if (resolve(schema).properties.simulate) {
      box.append(el("details", {}, el("summary", {}, "simulate fields"),
                    fieldsTable(spec.components.schemas.Simulate)));
    }
    if (type === "multipart/form-data") {  // a form: a file input for each binary field
      form = {};
      for (const [name, field] of Object.entries(resolve(schema).properties)) {
        form[name] = el("input", field.format === "binary" ? {type: "file", name}
                                                           : {name, placeholder: typeOf(field)});
        box.append(el("p", {}, el("code", {}, name), " ", form[name]));
      }
    } else {
      body = el("textarea", {name: "body"});
      body.value = JSON.stringify(resolve(schema).example || {}, null, 2);
      box.append(el("p", {}, "Example request (edit and send):"), body);
    }
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
    if (form) {
      init.body = new FormData();
      for (const [name, input] of Object.entries(form)) {
        init.body.append(name, input.type === "file" ? input.files[0] || new Blob() : input.value);
      }
    }
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
  // A section per surface (the operations' tag), a link to each up top.
  const list = document.getElementById("operations");
  const contents = document.getElementById("contents");
  list.textContent = "";
  contents.append(el("h2", {}, "Contents"));
  const links = el("ul");
  contents.append(links);
  spec.tags.forEach((tag, index) => {
    const section = el("section", {id: "surface-" + index, className: "surface"},
                       el("h2", {}, tag.name));
    for (const [path, ops] of Object.entries(spec.paths))
      for (const [method, op] of Object.entries(ops))
        if (op.tags[0] === tag.name) section.append(operation(path, method, op));
    const count = section.querySelectorAll(".op").length;
    links.append(el("li", {}, el("a", {href: "#" + section.id}, tag.name),
                    " (" + count + (count === 1 ? " endpoint)" : " endpoints)")));
    list.append(section);
  });
});
</script>
</body></html>
"""

# The dashboard: the model calls of the journal's newest requests, by surface
# and outcome, and the newest jobs.
_DASHBOARD_CALLS = 500
_DASHBOARD_OUTCOMES = ("2xx", "429", "4xx", "5xx", "broken")
_DASHBOARD_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<link rel="icon" href="data:,"><title>dummyLLM</title>
<style>""" + _PAGE_STYLE + """</style></head>
<body>
<h1>dummyLLM</h1>
<nav><a href="/docs">API docs</a><a href="/metrics">metrics</a><a href="/journal">request timeline</a><a href="/v1/requests">request journal</a></nav>
<h2>Model calls</h2>
<p>The journal's newest """ + str(_DASHBOARD_CALLS) + """ requests, by the surface that
answered them; each key's requests are on <a href="/journal">the timeline</a>.</p>
<table id="calls"><thead><tr><th>surface</th>""" + "".join(
    f"<th>{outcome}</th>" for outcome in _DASHBOARD_OUTCOMES) + """</tr></thead>
<tbody></tbody></table>
<table id="latest"><thead><tr><th>at</th><th>surface</th><th>request</th><th>outcome</th>
<th>key</th></tr></thead><tbody></tbody></table>
<h2>Jobs</h2>
<p class="counts" id="counts">...</p>
<table id="jobs"><thead><tr><th>id</th><th>op</th><th>mode</th><th>state</th><th>age</th></tr></thead>
<tbody></tbody></table>
<script>
"use strict";
const STATES = """ + json.dumps(list(_JOB_STATES)) + """;
const OUTCOMES = """ + json.dumps(list(_DASHBOARD_OUTCOMES)) + """;
function outcome(entry) {
  if (entry.status === null || entry.fault || entry.stream_failure) return "broken";
  if (entry.status === 429) return "429";
  return String(entry.status)[0] + "xx";
}
function fill(rows, cells) {
  const row = rows.insertRow();
  for (const cell of cells) {
    const td = row.insertCell();
    if (cell instanceof Node) td.append(cell); else td.textContent = cell;
  }
  return row;
}
function showCalls(journal) {
  const calls = journal.requests.filter((entry) => entry.surface !== null);
  const counts = new Map();
  for (const entry of calls) {
    if (!counts.has(entry.surface)) counts.set(entry.surface, new Map());
    const bySurface = counts.get(entry.surface);
    bySurface.set(outcome(entry), (bySurface.get(outcome(entry)) || 0) + 1);
  }
  const rows = document.querySelector("#calls tbody");
  rows.textContent = "";
  for (const [surface, bySurface] of counts) {
    fill(rows, [surface, ...OUTCOMES.map((name) => bySurface.get(name) || 0)]).dataset.surface =
      surface;
  }
  const latest = document.querySelector("#latest tbody");
  latest.textContent = "";
  for (const entry of calls.slice(-15).reverse()) {
    const link = document.createElement("a");
    const query = new URLSearchParams();
    if (entry.trace_id !== null) query.set("key", entry.trace_id);
    if (entry.test_id !== null) query.set("test_id", entry.test_id);
    link.href = "/journal?" + query;
    link.textContent = entry.trace_id === null ? "(no key)" : entry.trace_id;
    const row = fill(latest, [new Date(entry.at_ms).toLocaleTimeString(), entry.surface,
                              entry.method + " " + entry.path,
                              entry.status === null ? "no answer" : entry.status +
                              (entry.code ? " " + entry.code : "") +
                              (entry.fault ? " " + entry.fault.kind : "") +
                              (entry.stream_failure ? " " + entry.stream_failure : ""), link]);
    row.className = outcome(entry) === "2xx" ? "ok" : "fail";
  }
}
async function refresh() {
  try {
    const [health, list, journal] = await Promise.all([
      fetch("/health").then((r) => r.json()),
      fetch("/v1/jobs?limit=25", {headers: {'""" + _PAGE_HEADER + """': "dashboard"}})
        .then((r) => r.json()),
      fetch("/v1/requests?limit=""" + str(_DASHBOARD_CALLS) + """").then((r) => r.json())]);
    showCalls(journal);
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

# The timeline of /journal: a row per key, a mark per request on one time
# axis, the wait a 429 or 503 asked for shaded after it, the verdict beside.
_JOURNAL_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<link rel="icon" href="data:,"><title>dummyLLM journal</title>
<style>""" + _PAGE_STYLE + """
body { max-width: none; } #rows td { vertical-align: top; } .key { width: 10em; }
.findings { width: 28em; font-size: 13px; } .findings li { margin-bottom: 0.3em; }
.error { color: #b42318; } .warning { color: #9a6700; } svg { display: block; }
.mark { stroke: #fff; stroke-width: 1.5; } .mark.flagged { stroke: #b42318; stroke-width: 3; }
/* fill paints the SVG marks, background the legend's swatches */
.s2xx { fill: #1a7f37; background: #1a7f37; } .s4xx { fill: #d97706; background: #d97706; }
.s5xx { fill: #b42318; background: #b42318; } .transport { fill: #6f42c1; background: #6f42c1; }
.stream { fill: #1d232a; background: #1d232a; }
.retry-after { fill: #d97706; background: #d97706; opacity: 0.18; }
.gap, .tick { font: 11px system-ui; fill: #57606a; }
.legend span { margin-right: 1.2em; } .legend b { display: inline-block; width: 0.8em;
  height: 0.8em; border-radius: 50%; margin-right: 0.3em; vertical-align: -1px; }
.legend b.retry-after { border-radius: 0; opacity: 0.35; }
</style></head>
<body>
<h1>Request timeline</h1>
<nav><a href="/">dashboard</a><a href="/docs">API docs</a><a href="/v1/requests">journal JSON</a>
<a href="/v1/verdict">verdict JSON</a></nav>
<p><label>key <input id="key" placeholder="every key"></label>
<label>path <input id="path" placeholder="every path"></label></p>
<p class="legend"><span><b class="s2xx"></b>2xx</span><span><b class="s4xx"></b>4xx</span>
<span><b class="s5xx"></b>5xx</span><span><b class="transport"></b>transport fault</span>
<span><b class="stream"></b>stream fault</span><span><b class="retry-after"></b>retry-after
asked for</span><span id="summary"></span></p>
<table id="rows"><thead><tr><th class="key">key</th><th id="axis"></th>
<th class="findings">findings</th></tr></thead><tbody></tbody></table>
<p id="herd"></p>
<script>
"use strict";
const SVG = "http://www.w3.org/2000/svg", WIDTH = 760, HEIGHT = 34, LOST = """ + json.dumps(
    list(_LOST_FAULTS)) + """, BROKEN = """ + json.dumps(list(_STREAM_FAILURES)) + """;
function draw(tag, attributes, parent) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
  parent.append(element);
  return element;
}
function outcome(attempt) {
  if (BROKEN.includes(attempt.fault)) return "stream";
  if (attempt.status === null || LOST.includes(attempt.fault)) return "transport";
  return "s" + String(attempt.status)[0] + "xx";
}
function findingList(findings) {
  const list = document.createElement("ul");
  for (const finding of findings) {
    const item = document.createElement("li");
    item.className = "finding " + finding.severity;
    item.dataset.code = finding.code;
    item.textContent = finding.code + ": " + finding.message;
    list.append(item);
  }
  return list;
}
// The filters live in the page's URL (?key=&path=&test_id=), to be shared;
// test_id shows one test's requests (see the README's test ids).
const FILTERS = ["key", "path"];
const scope = new URLSearchParams(location.search).get("test_id");
for (const name of FILTERS) {
  document.getElementById(name).value = new URLSearchParams(location.search).get(name) || "";
}
function filters() {
  const query = new URLSearchParams();
  for (const name of FILTERS) {
    const value = document.getElementById(name).value.trim();
    if (value) query.set(name, value);
  }
  if (scope) query.set("test_id", scope);
  return query;
}
// A label is moved inside the drawing, and left out where it would overlap
// the one before it.
function fits(label, drawn) {
  let box = label.getBBox();
  const shift = box.x < 0 ? -box.x : Math.min(0, WIDTH - box.x - box.width);
  if (shift) {
    label.setAttribute("x", Number(label.getAttribute("x")) + shift);
    box = label.getBBox();
  }
  if (box.x < drawn.right + 4) {
    label.remove();
    return false;
  }
  drawn.right = box.x + box.width;
  return true;
}
async function refresh() {
  const query = filters(), journalQuery = new URLSearchParams();
  if (scope) journalQuery.set("test_id", scope);
  let verdict, journal;
  try {
    [verdict, journal] = await Promise.all([
      fetch("/v1/verdict?" + query).then((r) => r.json()),
      fetch("/v1/requests?" + journalQuery).then((r) => r.json())]);
  } catch (error) {
    document.getElementById("summary").textContent = "server unreachable: " + error;
    return;
  }
  if (!verdict.attempts) {
    document.getElementById("summary").textContent = verdict.error.message;
    return;
  }
  const entries = new Map(journal.requests.map((entry) => [entry.seq, entry]));
  const flagged = new Set(verdict.findings.flatMap((finding) => finding.evidence));
  // The axis spans the requests shown, from the first: a filter refits it.
  const shown = verdict.attempts;
  const start = shown.length ? Math.min(...shown.map((a) => a.at_ms)) : 0;
  const span = 1.05 * Math.max(1, ...shown.map((a) => Math.max(
    a.at_ms, a.answered_at_ms + (a.retry_after_ms || 0)) - start));
  const x = (ms) => 6 + (ms - start) * (WIDTH - 12) / span;
  const axis = document.getElementById("axis");
  axis.textContent = "";
  axis.title = "time since the first request shown";
  const scale = draw("svg", {width: WIDTH, height: 18}, axis);
  const step = Math.pow(10, Math.floor(Math.log10(span / 4)));
  const ticks = {right: -Infinity};
  for (let ms = 0; ms <= span; ms += step * (span / step > 20 ? 5 : span / step > 8 ? 2 : 1)) {
    const tick = draw("text", {x: x(start + ms), y: 13, class: "tick",
                               "text-anchor": ms ? "middle" : "start"}, scale);
    tick.textContent = ms >= 1000 ? +(ms / 1000).toFixed(3) + " s" : +ms.toFixed(1) + " ms";
    fits(tick, ticks);
  }
  const rows = new Map();
  for (const attempt of verdict.attempts) {
    const key = attempt.key === null ? "(no key)" : attempt.key;
    if (!rows.has(key)) rows.set(key, []);
    rows.get(key).push(attempt);
  }
  const body = document.querySelector("#rows tbody");
  body.textContent = "";
  for (const [key, attempts] of rows) {
    const row = body.insertRow();
    row.className = "key-row";
    row.dataset.key = key;
    row.insertCell().textContent = key;
    const svg = draw("svg", {width: WIDTH, height: HEIGHT}, row.insertCell());
    draw("line", {x1: 0, x2: WIDTH, y1: HEIGHT / 2, y2: HEIGHT / 2, stroke: "#dde2e7"}, svg);
    let previous = null;
    const gaps = {right: -Infinity};
    for (const attempt of attempts) {
      if (attempt.retry_after_ms !== null) {
        draw("rect", {class: "retry-after", x: x(attempt.answered_at_ms), y: 3, height: HEIGHT - 6,
                      width: x(attempt.answered_at_ms + attempt.retry_after_ms) -
                             x(attempt.answered_at_ms)}, svg);
      }
      if (attempt.retry && previous !== null) {
        const gap = draw("text", {class: "gap", "text-anchor": "middle", y: 10,
                                  x: (x(previous.at_ms) + x(attempt.at_ms)) / 2}, svg);
        gap.textContent = attempt.gap_ms + " ms";
        fits(gap, gaps);
      }
      previous = attempt;
    }
    for (const attempt of attempts) {
      const mark = draw("circle", {cx: x(attempt.at_ms), cy: HEIGHT / 2, r: 6,
                                   class: "mark " + outcome(attempt) +
                                          (flagged.has(attempt.seq) ? " flagged" : "")}, svg);
      mark.dataset.seq = attempt.seq;
      draw("title", {}, mark).textContent = JSON.stringify(
        entries.get(attempt.seq) || attempt, null, 1);
    }
    const cell = row.insertCell();
    cell.className = "findings";
    cell.append(findingList(verdict.findings.filter(
      (finding) => finding.code !== "NO_JITTER" && finding.key === attempts[0].key)));
  }
  const herd = document.getElementById("herd");
  herd.textContent = "";
  herd.append(findingList(verdict.findings.filter((finding) => finding.code === "NO_JITTER")));
  document.getElementById("summary").textContent = verdict.requests + " requests, " +
    verdict.findings.length + " findings, " + (verdict.ok ? "ok" : "not ok");
}
refresh();
setInterval(refresh, 1000);
for (const name of FILTERS) {
  document.getElementById(name).addEventListener("input", () => {
    const query = String(filters());
    history.replaceState(null, "", location.pathname + (query ? "?" + query : ""));
    refresh();
  });
}
</script>
</body></html>
"""


# --- Command line -----------------------------------------------------------------

class _UsageError(Exception):
    pass


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(message)


def _argument_parser():
    parser = _ArgumentParser(
        prog="dummyllm.py",
        description="dummyLLM: a deterministic HTTP simulator of LLM backends.",
        epilog="Each option can also be set by the environment variable shown; the flag wins.")
    for option in _OPTIONS:
        help_text = f"{option.about}; default {_option_text(option.default)}"
        if isinstance(option.rule, _Bool):
            parser.add_argument(option.flag, action="store_true", default=None, help=help_text,
                                dest=option.name)
        elif isinstance(option.rule, _Names):
            parser.add_argument(option.flag, metavar=option.name.upper(), dest=option.name,
                                action="append", help=f"{help_text}; ${option.env}")
        else:
            parser.add_argument(option.flag, metavar=option.name.upper(), dest=option.name,
                                help=f"{help_text}; ${option.env}")
    parser.add_argument("--version", action="version", version=f"dummyLLM {__version__}")
    return parser


def _config_from_command_line(argv, environ):
    """A Config from flags, then environment variables, then defaults."""
    flags = vars(_argument_parser().parse_args(argv))
    values = {}
    for option in _OPTIONS:
        given, source = flags[option.name], option.flag
        if given is None and option.env and option.env in environ:
            given, source = environ[option.env], option.env
        if given is None:
            continue
        if isinstance(given, list):  # a repeated flag
            given = ",".join(given)
        value = option.rule.from_text(given) if isinstance(given, str) else given
        try:
            values[option.name] = option.rule(value, source)
        except _ValidationError as error:
            raise _UsageError(f"{source} {error.reason} (got {given!r})") from None
    return make_config(**values)


def main(argv=None, environ=None):
    """Run the server until SIGINT or SIGTERM; returns the exit status."""
    try:
        config = _config_from_command_line(argv, os.environ if environ is None else environ)
    except _UsageError as error:
        print(f"dummyllm.py: error: {error}", file=sys.stderr)
        return 2
    warnings = [_raise_file_limit()]
    if config.admin_key is None and not _is_loopback(config.host):
        warnings.append(f"dummyLLM: listening on {config.host} without --admin-key: anyone who "
                        "reaches the port can reset it and delete jobs and the journal")
    try:
        server = DummyLLMServer(config)
    except _ValidationError as error:  # --record-to holds what is not a list of rules
        print(f"dummyllm.py: error: {error.message}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"dummyllm.py: error: cannot listen on {config.host}:{config.port}: "
              f"{error.strerror or error}", file=sys.stderr)
        return 1

    def stop(signum, frame):
        # Python runs a handler in the main thread, between two of its
        # bytecodes: it takes no lock, and raising could land anywhere.
        server.ask_to_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # The kernel gives a signal to any thread; one that went to another
    # thread left the main one asleep in select(), the handler unrun: now
    # and then, under load, a server that never exited.  The wake byte
    # ends that sleep whichever thread the signal went to.
    woken_by = signal.set_wakeup_fd(server.wakeup_fd())
    if warnings[0]:
        warnings[0] += f"; at most {server.max_connections} connections"
    for warning in filter(None, warnings):
        server.log(warning)
    try:
        print(f"dummyLLM listening on {server.url}", flush=True)
        server.serve_forever()
    finally:
        signal.set_wakeup_fd(woken_by)
        server.server_close()
    return 0


# --- pytest plugin ----------------------------------------------------------------
# `pytest -p dummyllm`, `pytest_plugins = ["dummyllm"]` in a conftest, or
# addopts in pytest.ini.  One server per session (per pytest-xdist worker:
# each is a session of its own), its options those of the command line as
# --dummyllm-<option> or ini dummyllm_<option>.  The `dummyllm` fixture gives
# a test its own ServerScope, named by its node id, with the SDKs' variables
# pointing at it; a failing test's report shows its requests and verdict.
# pytest is imported only when pytest loads the plugin.

_PYTEST_OPTIONS = tuple(option for option in _OPTIONS if option.name not in ("port", "quiet"))


def pytest_addoption(parser):
    group = parser.getgroup("dummyllm", "dummyLLM's session server")
    for option in _PYTEST_OPTIONS:
        name = "dummyllm_" + option.name
        about = f"{option.about} (dummyllm.py {option.flag})"
        if isinstance(option.rule, _Bool):
            group.addoption("--dummyllm-" + option.flag[2:], action="store_true", default=None,
                            dest=name, help=about)
        else:
            group.addoption("--dummyllm-" + option.flag[2:], dest=name, help=about)
        parser.addini(name, about)


def pytest_configure(config):
    import pytest
    try:
        server_config = _session_config(config)
    except (_UsageError, ValueError) as error:
        raise pytest.UsageError(f"dummyllm: {error}") from None
    config.pluginmanager.register(_pytest_fixtures(server_config), "dummyllm-fixtures")


def _session_config(config):
    """The session server's Config: its options from the command line, then
    the ini file, then DUMMYLLM_* variables; a free port, no access log."""
    argv = []
    for option in _PYTEST_OPTIONS:
        value = config.getoption("dummyllm_" + option.name)
        if value is None:
            value = config.getini("dummyllm_" + option.name) or None
        if value is None or value is False:
            continue
        if isinstance(option.rule, _Bool):
            if value is True or _Bool().from_text(value):
                argv.append(option.flag)
        else:
            argv += [option.flag, value]
    return _config_from_command_line(argv, os.environ)._replace(port=0, quiet=True)


def _node_test_id(nodeid):
    """A test's id from its node id, which may be longer than a test id can be."""
    if len(nodeid) <= _MAX_TRACE_ID_CHARS:
        return nodeid
    return nodeid[:_MAX_TRACE_ID_CHARS - 17] + "~" + _body_digest(nodeid.encode())


def _pytest_fixtures(server_config):
    """The plugin's fixtures and report hook, made once pytest is there."""
    import pytest

    @pytest.fixture(scope="session")
    def dummyllm_server():
        """The session's dummyLLM server (a DummyLLMServer)."""
        with DummyLLMServer(server_config).start() as server:
            yield server

    @pytest.fixture
    def dummyllm(request, dummyllm_server, monkeypatch):
        """This test's own ServerScope on the session's server, with the
        SDKs' base-URL variables (and placeholder keys) pointing at it."""
        scope = ServerScope(dummyllm_server, _node_test_id(request.node.nodeid))
        scope.reset()  # a rerun starts afresh
        for name, value in scope.environ().items():
            monkeypatch.setenv(name, value)
        for surface in dummyllm_server.registry.surfaces:  # SDKs refuse to start keyless
            for name, path in surface.sdk_environ.items():
                if path is None and not os.environ.get(name):
                    monkeypatch.setenv(name, "dummyllm")
        request.node.dummyllm_scope = scope
        yield scope
        scope.reset()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item, call):
        report = (yield).get_result()
        scope = getattr(item, "dummyllm_scope", None)
        if scope is not None and report.when == "call" and report.failed:
            report.sections.append(("dummyllm: this test's requests and verdict",
                                    scope.report()))

    plugin = types.ModuleType("dummyllm.pytest")  # pytest finds fixtures in a module
    plugin.dummyllm_server, plugin.dummyllm = dummyllm_server, dummyllm
    plugin.pytest_runtest_makereport = pytest_runtest_makereport
    return plugin


if __name__ == "__main__":
    sys.exit(main())
