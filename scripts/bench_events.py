#!/usr/bin/env python3
"""Prints one `INSERT … SELECT` that writes events [LO, HI) of a seeded synthetic set of
TOTAL usage events spread evenly over [START, END) (unix seconds) straight into
ClickHouse's `usage_events` (the rollup views fill the rollups as ingest would).

For dashboard benchmarks only (scripts/bench dashboard): loading 100M events through the
broker would take hours on this machine. The shape follows `tokentally emit`: the same
16 institutions with Zipf-like sizes (1/rank^1.1), users per institution falling with rank
(1,500 at the largest; about 5,100 in all), one or two keys per user, the 12 models with
emit's weights, office-hours seasonality, token counts of a few hundred to a few thousand,
token classes disjoint as in the event contract (a third of the events read half their
prompt from the cache), costs exact from integer rates (USD per 1M tokens). Deterministic: a function of the
event number only (cityHash64), so a rerun writes the same rows.

usage: bench_events.py TOTAL LO HI START END
"""
import os
import sys
import tomllib

INSTITUTIONS = [
    "uni-oslo", "eth-zurich", "tu-delft", "kth", "uni-helsinki", "acme-corp", "globex",
    "initech", "uni-bergen", "epfl", "dtu", "uni-vienna", "umbrella-labs", "hooli",
    "tu-munich", "uni-lund",
]
# provider, model as the gateway names it, weight, and the entry of the shipped price
# book (prices/) that prices it: its rates are read from the book, so stored costs are
# what ingest would compute (drafts and invoices refuse events whose stored cost differs
# from the book's).
MODELS = [
    ("openai", "gpt-4o-mini", 25, "openai:gpt-4o-mini:2024-01-01"),
    ("openai", "gpt-4.1-mini", 10, "openai:gpt-4.1-mini:2024-01-01"),
    ("openai", "gpt-4o-2024-08-06", 8, "openai:gpt-4o:2024-01-01"),
    ("openai", "gpt-5-mini", 10, "openai:gpt-5-mini:2024-01-01"),
    ("openai", "gpt-5", 5, "openai:gpt-5:2024-01-01"),
    ("openai", "o4-mini", 4, "openai:o4-mini:2024-01-01"),
    ("anthropic", "claude-sonnet-4-5-20250929", 12, "anthropic:claude-sonnet-4-5:2024-01-01"),
    ("anthropic", "claude-haiku-4-5", 8, "anthropic:claude-haiku-4-5:2024-01-01"),
    ("anthropic", "claude-opus-4-1", 2, "anthropic:claude-opus-4-1:2024-01-01"),
    ("gemini", "gemini-2.5-flash", 10, "google:gemini-2.5-flash:2024-01-01"),
    ("gemini", "gemini-2.5-pro", 5, "google:gemini-2.5-pro:2024-01-01"),
    ("gemini", "gemini-2.0-flash", 4, "google:gemini-2.0-flash:2024-01-01"),
]
BOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "prices")


def book_rates():
    """Price id -> (price model, input, cache read, output USD per 1M tokens) of the
    standard tier (no `service_tier`) of every entry in the shipped book."""
    out = {}
    for name in sorted(os.listdir(BOOK)):
        if name.endswith(".toml"):
            with open(os.path.join(BOOK, name), "rb") as f:
                for e in tomllib.load(f).get("price", []):
                    if "service_tier" in e:
                        continue
                    pid = f"{e['provider']}:{e['model']}:{e['effective_from']}"
                    out[pid] = (e["model"], e["input_per_mtok"],
                                e.get("cache_read_per_mtok", e["input_per_mtok"]),
                                e["output_per_mtok"])
    return out


def table(weights, size=1000):
    """Indexes (1-based) repeated by weight: a uniform pick from it is a weighted pick."""
    total = sum(weights)
    out = []
    for i, w in enumerate(weights):
        out += [i + 1] * round(size * w / total)
    return out


def micro(rate):
    """USD per 1M tokens -> millionths of that (an integer for every rate in the book)."""
    whole, _, frac = rate.partition(".")
    assert len(frac) <= 6, rate
    return int(whole) * 1000000 + int((frac + "000000")[:6])


def main():
    total, lo, hi, start, end = (int(a) for a in sys.argv[1:6])
    book = book_rates()
    rates = [book[m[3]] for m in MODELS]
    inst_pick = table([1 / (r + 1) ** 1.1 for r in range(len(INSTITUTIONS))])
    users = [-(-1500 // (r + 1)) + 3 for r in range(len(INSTITUTIONS))]
    model_pick = table([m[2] for m in MODELS])
    q = lambda xs: "[" + ",".join(f"'{x}'" for x in xs) + "]"
    n = lambda xs: "[" + ",".join(str(x) for x in xs) + "]"
    span = end - start
    # Seasonality: an event's second within its slot is stretched towards office hours by
    # picking its hour of day from a weighted table (weekdays 8-18 UTC busiest).
    hour_pick = table([3 if 8 <= h < 18 else 1 for h in range(24)], 240)
    print(f"""
INSERT INTO usage_events (event_id, occurred_at, occurred_ms, institution_id, user_id,
  api_key_id, provider, model, endpoint, service_tier, status, latency_ms, tag_keys,
  tag_values, input_tokens, cache_read_tokens, cache_write_tokens, output_tokens,
  reasoning_tokens, priced, cost, price_id, price_model, price_tier, kafka_topic,
  kafka_partition, kafka_offset, ingested_at, version, sign)
SELECT
  concat('bench-', toString(number)) AS event_id,
  toDateTime({start} + intDiv(intDiv(number * {span}, {total}), 86400) * 86400
    + (arrayElement({n(hour_pick)}, 1 + h1 % {len(hour_pick)}) - 1) * 3600 + h2 % 3600) AS occurred_at,
  toUInt16(h2 % 1000) AS occurred_ms,
  arrayElement({q(INSTITUTIONS)}, inst) AS institution_id,
  concat('user', toString(toUInt32(arrayElement({n(users)}, inst) * pow((h3 % 1000000) / 1000000, 2))),
         '@', institution_id, '.example') AS user_id,
  concat('key-', institution_id, '-', toString(toUInt32(arrayElement({n(users)}, inst) * pow((h3 % 1000000) / 1000000, 2))),
         if(h4 % 3 = 0, '-b', '')) AS api_key_id,
  arrayElement({q(m[0] for m in MODELS)}, model_i) AS provider,
  arrayElement({q(m[1] for m in MODELS)}, model_i) AS model,
  'chat.completions' AS endpoint,
  'default' AS service_tier,
  'ok' AS status,
  toUInt32(200 + h4 % 3000) AS latency_ms,
  arrayFilter(x -> h5 % 4 = 0, ['project']) AS tag_keys,
  arrayFilter(x -> h5 % 4 = 0, [concat('p', toString(h5 % 40))]) AS tag_values,
  toUInt64(100 + h1 % 4000) - cache_read_tokens AS input_tokens,
  toUInt64(if(h5 % 3 = 0, (100 + h1 % 4000) / 2, 0)) AS cache_read_tokens,
  toUInt64(0) AS cache_write_tokens,
  toUInt64(20 + h2 % 1000) AS output_tokens,
  toUInt64(0) AS reasoning_tokens,
  toUInt8(1) AS priced,
  toDecimal128(input_tokens * arrayElement({n(micro(r[1]) for r in rates)}, model_i)
    + cache_read_tokens * arrayElement({n(micro(r[2]) for r in rates)}, model_i)
    + output_tokens * arrayElement({n(micro(r[3]) for r in rates)}, model_i), 18)
    / toDecimal128(1000000000000, 0) AS cost,
  arrayElement({q(m[3] for m in MODELS)}, model_i) AS price_id,
  arrayElement({q(r[0] for r in rates)}, model_i) AS price_model,
  toUInt64(0) AS price_tier,
  'bench' AS kafka_topic,
  toInt32(0) AS kafka_partition,
  toInt64(number) AS kafka_offset,
  occurred_at AS ingested_at,
  toUInt32(0) AS version,
  toInt8(1) AS sign
FROM (
  SELECT number,
    cityHash64(number, 1) AS h1, cityHash64(number, 2) AS h2, cityHash64(number, 3) AS h3,
    cityHash64(number, 4) AS h4, cityHash64(number, 5) AS h5,
    arrayElement({n(inst_pick)}, 1 + cityHash64(number, 6) % {len(inst_pick)}) AS inst,
    arrayElement({n(model_pick)}, 1 + cityHash64(number, 7) % {len(model_pick)}) AS model_i
  FROM system.numbers WHERE number >= {lo} LIMIT {hi - lo}
)""")


if __name__ == "__main__":
    main()
