"""Sends demo traffic through the tokentally gateway with the official OpenAI SDK.

usage: demo_traffic.py BASE_URL KEY [KEY ...]   (N requests per key: DEMO_GATEWAY_REQUESTS, default 40)

Each key makes a mix of chat completions (some streamed), responses and embeddings,
tagged with a course, so the dashboard shows gateway traffic per user, key and tag.
"""

import os
import random
import sys

import openai

QUESTIONS = [
    "explain borrow checking in two sentences",
    "summarise the causes of the first world war",
    "write a haiku about glaciers",
    "what is a monad, briefly",
    "translate good morning into Norwegian",
    "give three tips for a thesis defence",
]


def main():
    base, keys = sys.argv[1], sys.argv[2:]
    n = int(os.environ.get("DEMO_GATEWAY_REQUESTS", "40"))
    rng = random.Random(2026)
    done = refused = 0
    for i, key in enumerate(keys):
        client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=2)
        tags = {"x-tokentally-tags": f"course=inf{100 + i},source=demo"}
        for _ in range(n):
            q = rng.choice(QUESTIONS)
            words = rng.randint(20, 400)
            headers = {**tags, "x-simulator": f"words={words},cached={rng.randint(0, 3) * 16}"}
            kind = rng.random()
            try:
                send(client, kind, q, headers, tags)
            except openai.RateLimitError as e:
                # A limit of the demo (`tokentally limits`): 429 insufficient_quota.
                if refused == 0:
                    print(f"refused by a limit: {e.message}")
                refused += 1
            done += 1
    print(f"sent {done} requests through the gateway with the openai SDK {openai.__version__}; "
          f"{refused} refused by limits")


def send(client, kind, q, headers, tags):
    """One request of the mix: chat (plain or streamed), responses or embeddings."""
    if kind < 0.5:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": q}],
                                       extra_headers=headers)
    elif kind < 0.75:
        stream = client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                messages=[{"role": "user", "content": q}],
                                                extra_headers=headers)
        for _chunk in stream:
            pass
    elif kind < 0.92:
        client.responses.create(model="gpt-5-mini", input=q,
                                extra_headers={**headers, "x-simulator": headers["x-simulator"] + ",reasoning=64"})
    else:
        client.embeddings.create(model="text-embedding-3-small", input=[q], extra_headers=tags)


if __name__ == "__main__":
    main()
