"""Drives an endpoint with the official OpenAI, Anthropic and Google Gen AI Python SDKs
(from PyPI).

usage: sdk.py BASE_URL API_KEY < calls.json > results.json

Each call is an object: {"sdk": "openai"|"anthropic"|"genai", "api": "chat"|"responses"|
"embeddings"|"messages"|"models"|"generate", "stream": bool, "include_usage": bool, "model": str,
"messages"/"input": ..., "max_tokens": int, "headers": {...}, "leave_after": N}.
`leave_after` reads N stream items and then closes the connection (a client that goes
away). `base` sends one call to another endpoint; `at` waits until that many seconds
after the start to send it (paced traffic); each result carries `sent_at` (unix
seconds). With SDK_STOP_AFTER_REFUSED=N in the environment the calls stop after N
refusals (401) in a row. Each result: {"ok": true, "request_id": the gateway's x-tokentally-request-id,
"status": HTTP status, "headers": {...}, "response": the SDK's object as a dict, or
"chunks": [every streamed item as a dict]} or {"ok": false, "status", "error_type" (the
SDK's exception class), "body", "headers"}.
"""

import json
import os
import sys
import time

import anthropic
import openai
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types


def dump(obj):
    return obj.model_dump(mode="json", exclude_unset=False)


def headers_of(raw):
    return {k.lower(): v for k, v in raw.headers.items()}


def run_openai(client, call):
    extra = {"extra_headers": call.get("headers", {})}
    api = call["api"]
    stream = call.get("stream", False)
    if api == "models":
        raw = client.models.with_raw_response.list(**extra)
        return raw, {"response": [m.id for m in raw.parse().data]}
    if api == "chat":
        kwargs = dict(model=call["model"], messages=call["messages"], **extra)
        if "max_tokens" in call:
            kwargs["max_tokens"] = call["max_tokens"]
        if stream:
            kwargs["stream"] = True
            if call.get("include_usage"):
                kwargs["stream_options"] = {"include_usage": True}
            raw = client.chat.completions.with_raw_response.create(**kwargs)
            return raw, {"chunks": read_stream(raw.parse(), call)}
        raw = client.chat.completions.with_raw_response.create(**kwargs)
        return raw, {"response": dump(raw.parse())}
    if api == "responses":
        kwargs = dict(model=call["model"], input=call["input"], **extra)
        if stream:
            raw = client.responses.with_raw_response.create(stream=True, **kwargs)
            return raw, {"chunks": read_stream(raw.parse(), call)}
        raw = client.responses.with_raw_response.create(**kwargs)
        return raw, {"response": dump(raw.parse())}
    if api == "embeddings":
        raw = client.embeddings.with_raw_response.create(model=call["model"], input=call["input"], **extra)
        return raw, {"response": dump(raw.parse())}
    raise ValueError(f"unknown openai api {api}")


def run_anthropic(client, call):
    extra = {"extra_headers": call.get("headers", {})}
    kwargs = dict(model=call["model"], max_tokens=call.get("max_tokens", 64), messages=call["messages"], **extra)
    if call.get("stream"):
        raw = client.messages.with_raw_response.create(stream=True, **kwargs)
        return raw, {"chunks": read_stream(raw.parse(), call)}
    raw = client.messages.with_raw_response.create(**kwargs)
    return raw, {"response": dump(raw.parse())}


def run_genai(client, call):
    """google-genai: `generate_content` or `generate_content_stream` (which always asks
    for `?alt=sse`). The SDK gives no raw response for streams: headers are empty there."""
    config = genai_types.GenerateContentConfig(
        max_output_tokens=call.get("max_tokens", 64),
        http_options=genai_types.HttpOptions(headers=call.get("headers", {})),
    )
    kwargs = dict(model=call["model"], contents=call["contents"], config=config)
    if call.get("stream"):
        out = []
        for chunk in client.models.generate_content_stream(**kwargs):
            out.append(chunk.model_dump(mode="json", exclude={"sdk_http_response"}, exclude_none=True))
        return 200, {}, {"chunks": out}
    res = client.models.generate_content(**kwargs)
    raw = getattr(res, "sdk_http_response", None)
    headers = {k.lower(): v for k, v in (raw.headers or {}).items()} if raw is not None else {}
    return 200, headers, {"response": res.model_dump(mode="json", exclude={"sdk_http_response"}, exclude_none=True)}


def read_stream(stream, call):
    out = []
    leave = call.get("leave_after")
    for item in stream:
        out.append(dump(item))
        if leave is not None and len(out) >= leave:
            stream.close()
            break
    return out


def main():
    base, key = sys.argv[1], sys.argv[2]
    calls = json.load(sys.stdin)
    oa = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)
    an = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=60)
    ga = genai.Client(api_key=key, http_options=genai_types.HttpOptions(
        base_url=base, timeout=60_000, retry_options=genai_types.HttpRetryOptions(attempts=1)))
    clients = {}

    def for_base(b):
        if b not in clients:
            clients[b] = (oa.with_options(base_url=b + "/v1"), an.with_options(base_url=b))
        return clients[b]

    started = time.time()
    stop_after = int(os.environ.get("SDK_STOP_AFTER_REFUSED", "0"))
    refused = 0
    results = []
    for call in calls:
        if stop_after and refused >= stop_after:
            break
        if "at" in call:
            time.sleep(max(0.0, started + call["at"] - time.time()))
        sent_at = time.time()
        n = len(results)
        run_one(call, oa, an, ga, for_base, results)
        for r in results[n:]:
            r["sent_at"] = sent_at
            refused = refused + 1 if r["status"] == 401 else 0
    json.dump(results, sys.stdout)


def run_one(call, oa, an, ga, for_base, results):
    if "base" in call:
        oa, an = for_base(call["base"])
    if call["sdk"] == "genai":
        try:
            status, h, body = run_genai(ga, call)
            results.append({"ok": True, "status": status, "request_id": h.get("x-tokentally-request-id"),
                            "headers": h, **body})
        except genai_errors.APIError as e:
            results.append({"ok": False, "status": e.code, "error_type": type(e).__name__,
                            "request_id": None, "headers": {}, "body": e.details})
        return
    try:
        # "max_retries": N lets the SDK retry as it would by default.
        retries = call.get("max_retries", 0)
        if call["sdk"] == "openai":
            raw, body = run_openai(oa.with_options(max_retries=retries), call)
        else:
            raw, body = run_anthropic(an.with_options(max_retries=retries), call)
        h = headers_of(raw)
        results.append({"ok": True, "status": raw.status_code, "request_id": h.get("x-tokentally-request-id"),
                        "headers": h, **body})
    except (openai.APIStatusError, anthropic.APIStatusError) as e:
        h = {k.lower(): v for k, v in e.response.headers.items()}
        try:
            body = e.response.json()
        except Exception:  # noqa: BLE001 - a non-JSON error body is reported as text
            body = e.response.text
        results.append({"ok": False, "status": e.status_code, "error_type": type(e).__name__,
                        "request_id": h.get("x-tokentally-request-id"), "headers": h, "body": body})


if __name__ == "__main__":
    main()
