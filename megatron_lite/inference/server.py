"""The text-generation server's engine: Megatron-LM's REST API on rank 0, every rank decoding.

    PUT /api  {"prompts": ["..."], "tokens_to_generate": 32, "temperature": 1.0, "top_k": 0,
               "top_p": 0.0, "logprobs": false, "random_seed": 1234}
      -> 200 {"text": [prompt + continuation, ...], "tokens": [[...]], "logprobs": [[...]]}
    GET /health -> 200 {"status": "ok"}

Rank 0 serves HTTP with the standard library's ThreadingHTTPServer: each request is read,
size-checked, parsed, tokenized and validated on its own handler thread (a bad one gets a 4xx JSON
error and nothing else happens), then queued. Rank 0's main thread takes one request at a time off
the queue, broadcasts it to every rank, and all ranks decode it together (a generation is a
collective at TP x PP > 1); the handler thread waits for its result. Concurrent clients are thus
queued, never interleaved; a full queue answers 503. While idle, rank 0 broadcasts a no-op every
``keepalive_s`` so the followers' broadcast never reaches the collective timeout.
"""
from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional

import torch.distributed as dist

from megatron_lite.inference.generation import Generation, generate, max_sequence_length
from megatron_lite.inference.sampling import SamplingParams

MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1000


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ServerLimits:
    max_request_bytes: int = 1 << 20
    max_prompts: int = 128
    max_tokens_to_generate: int = 1024
    max_queue: int = 64


@dataclass
class GenerationRequest:
    prompts: List[str]
    prompt_ids: List[List[int]]
    tokens_to_generate: int
    sampling: SamplingParams
    logprobs: bool


def _typed(body: dict, key: str, kinds, default, what: str):
    value = body.get(key, default)
    # bool is an int in Python; a JSON true is not a count
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise RequestError(400, f"{key} must be {what}, got {json.dumps(value)}")
    return value


def parse_request(raw: bytes, tokenizer, positions: int, limits: ServerLimits) -> GenerationRequest:
    """A validated request from a PUT body; RequestError(400, why) otherwise."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"the body is not UTF-8 JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    known = {"prompts", "tokens_to_generate", "temperature", "top_k", "top_p", "logprobs", "random_seed"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    prompts = body.get("prompts")
    if not isinstance(prompts, list) or not prompts:
        raise RequestError(400, "prompts must be a non-empty list of strings")
    if len(prompts) > limits.max_prompts:
        raise RequestError(400, f"at most {limits.max_prompts} prompts per request, got {len(prompts)}")
    if not all(isinstance(p, str) for p in prompts):
        raise RequestError(400, "prompts must be a non-empty list of strings")
    if any(not p for p in prompts):
        raise RequestError(400, "a prompt is empty: give at least one character")
    n = _typed(body, "tokens_to_generate", (int,), min(64, limits.max_tokens_to_generate), "an integer")
    if not 0 <= n <= limits.max_tokens_to_generate:
        raise RequestError(400, f"tokens_to_generate must be in 0..{limits.max_tokens_to_generate}, got {n}")
    temperature = float(_typed(body, "temperature", (int, float), 1.0, "a number"))
    if not 0.0 < temperature <= MAX_TEMPERATURE:
        raise RequestError(400, f"temperature must be in (0, {MAX_TEMPERATURE}], got {temperature}")
    top_k = _typed(body, "top_k", (int,), 0, "an integer")
    if not 0 <= top_k <= MAX_TOP_K:
        raise RequestError(400, f"top_k must be in 0..{MAX_TOP_K}, got {top_k}")
    top_p = float(_typed(body, "top_p", (int, float), 0.0, "a number"))
    if not 0.0 <= top_p <= 1.0:
        raise RequestError(400, f"top_p must be in [0, 1], got {top_p}")
    if top_k > 1 and top_p > 0:  # top_k 1 is greedy whatever top_p says
        raise RequestError(400, "give top_k or top_p, not both")
    logprobs = _typed(body, "logprobs", (bool,), False, "true or false")
    seed = _typed(body, "random_seed", (int, type(None)), None, "an integer")
    if seed is not None and not 0 <= seed < 2 ** 63:
        raise RequestError(400, f"random_seed must be in 0..2**63-1, got {seed}")
    try:
        ids = [tokenizer.tokenize(p) for p in prompts]
    except ValueError as e:  # e.g. a lone surrogate
        raise RequestError(400, f"a prompt cannot be tokenized: {e}") from None
    for i, t in enumerate(ids):
        if len(t) + n > positions:
            raise RequestError(400, f"prompt {i} has {len(t)} tokens; with tokens_to_generate {n} that is "
                                    f"{len(t) + n}, beyond the model's {positions} positions")
    return GenerationRequest(prompts, ids, n, SamplingParams(temperature, top_k, top_p, seed), logprobs)


def response_body(req: GenerationRequest, results: List[Generation], tokenizer) -> dict:
    texts = [p + g.continuation(tokenizer) for p, g in zip(req.prompts, results)]
    out = {"text": texts, "tokens": [g.tokens for g in results]}
    if req.logprobs:
        out["logprobs"] = [g.logprobs for g in results]
    return out


@dataclass
class _Job:
    request: GenerationRequest
    done: threading.Event = field(default_factory=threading.Event)
    result: Optional[dict] = None
    error: Optional[str] = None


def _run(model, tokenizer, req: GenerationRequest) -> List[Generation]:
    return generate(model, req.prompt_ids, req.tokens_to_generate, req.sampling, tokenizer.eod)


class TextGenerationServer:
    """Rank 0's HTTP front and request loop; other ranks call ``follow`` instead."""

    def __init__(self, model, tokenizer, host: str, port: int, limits: ServerLimits = ServerLimits(),
                 keepalive_s: float = 30.0, log=print):
        self.model, self.tokenizer, self.limits = model, tokenizer, limits
        self.positions = max_sequence_length(model)
        self.keepalive_s = keepalive_s
        self.log = log
        self.jobs: "queue.Queue[_Job]" = queue.Queue(maxsize=limits.max_queue)
        self.stopping = threading.Event()
        self.httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self.httpd.daemon_threads = True
        self.address = self.httpd.server_address

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # one line per request on rank 0's stdout, not stderr
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/health":
                    self._reply(200, {"status": "ok", "queued": server.jobs.qsize()})
                else:
                    self._reply(404, {"error": f"no such path {self.path}; use PUT /api"})

            def do_POST(self):
                self.do_PUT()

            def do_PUT(self):
                if self.path != "/api":
                    return self._reply(404, {"error": f"no such path {self.path}; use PUT /api"})
                length = self.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    return self._reply(411, {"error": "a Content-Length header is required"})
                if int(length) > server.limits.max_request_bytes:
                    self.close_connection = True  # the unread body must not be parsed as a request
                    return self._reply(413, {"error": f"the body has {length} bytes; at most "
                                                      f"{server.limits.max_request_bytes}"})
                raw = self.rfile.read(int(length))
                try:
                    req = parse_request(raw, server.tokenizer, server.positions, server.limits)
                except RequestError as e:
                    return self._reply(e.status, {"error": str(e)})
                job = _Job(req)
                try:
                    server.jobs.put_nowait(job)
                except queue.Full:
                    return self._reply(503, {"error": f"{server.limits.max_queue} requests are queued; retry later"})
                job.done.wait()
                if job.error is not None:
                    return self._reply(500, {"error": job.error})
                self._reply(200, job.result)

        return Handler

    def serve(self) -> None:
        """Serve until ``stop()`` (or a signal handler calling it); then release the followers."""
        thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        thread.start()
        host, port = self.address[:2]
        self.log(f"serving on http://{host}:{port}/api (PUT); {dist.get_world_size()} rank(s)", flush=True)
        idle = 0.0
        try:
            while not self.stopping.is_set():
                try:
                    job = self.jobs.get(timeout=0.5)
                except queue.Empty:
                    idle += 0.5
                    if idle >= self.keepalive_s:
                        from_rank0(("ping", None))
                        idle = 0.0
                    continue
                idle = 0.0
                from_rank0(("generate", job.request))
                try:
                    job.result = response_body(job.request, _run(self.model, self.tokenizer, job.request),
                                               self.tokenizer)
                except Exception as e:  # noqa: BLE001 - the client hears of it; a bug still stops us
                    job.error = f"generation failed: {e}"
                    raise
                finally:
                    job.done.set()
        finally:
            self.httpd.shutdown()
            self.httpd.server_close()
            from_rank0(("stop", None))

    def stop(self) -> None:
        self.stopping.set()


def from_rank0(value=None):
    """Rank 0's ``value`` on every rank (rank 0's requests and its stop; the others pass nothing)."""
    if dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def follow(model, tokenizer) -> None:
    """Non-zero ranks: decode whatever rank 0 broadcasts until it says stop."""
    while True:
        kind, req = from_rank0()
        if kind == "stop":
            return
        if kind == "generate":
            _run(model, tokenizer, req)
