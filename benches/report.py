"""Prints the ratios the README quotes from a `pytest --benchmark-json` file."""

from __future__ import annotations

import json
import sys

from ratios import ratios


def main(path: str) -> None:
    with open(path) as f:
        doc = json.load(f)
    by_group: dict[str, dict[str, dict[str, float]]] = {}
    extra: dict[str, dict[str, float]] = {}
    for b in doc["benchmarks"]:
        name = b["param"] or b["name"].removeprefix("test_")
        if (b["group"] or "").startswith("usage_"):
            name = b["name"].split("[")[-1].rstrip("]")
        by_group.setdefault(b["group"] or "", {})[name] = b["stats"]
        extra[name] = b.get("extra_info", {})
    decode = by_group.get("decode_1000", {})
    if decode:
        core = decode["core"]["median"]
        print("decode_1000 (median per 1000-event batch):")
        for name, st in sorted(decode.items(), key=lambda kv: kv[1]["median"]):
            print(f"  {name:9s} {st['median'] * 1e6:9.1f} us   {st['median'] / core:5.2f}x the core's time")
    dedup = by_group.get("dedup_1000", {})
    if dedup:
        print("dedup_1000 (median, fresh ids, batches of 1000 reserved 4 at a time):")
        rates = {name: extra[name].get("keys_per_round", 1000) / st["median"] for name, st in dedup.items()}
        ceiling = extra.get("redis_benchmark_ceiling", {}).get("keys_per_s")
        if ceiling:
            rates["redis-benchmark -P 1000"] = ceiling
        for name, rate in sorted(rates.items(), key=lambda kv: -kv[1]):
            share = f"   {rate / ceiling:6.1%} of redis-benchmark" if ceiling else ""
            print(f"  {name:24s} {rate:11,.0f} keys/s{share}")
    guarded = ratios(doc)
    if guarded:
        print("same-run ratios guarded by `make bench-compare`:")
        for name, value in sorted(guarded.items()):
            print(f"  {name:50s} {value:7.2f}x")
    closing = by_group.get("closing_1000", {})
    if closing:
        print("closing_1000 (median per pass: draft, finalize with a number, outbox row, archive JSON):")
        for name, st in sorted(closing.items()):
            info = extra[name]
            periods = info.get("periods", 1000)
            share = f"   pricing is {info['paired_ratio']:5.1%} of it" if "paired_ratio" in info else ""
            print(f"  {name:22s} {st['median']:7.2f} s   {periods / st['median']:7.0f} periods/s{share}")
    usage = {g: v for g, v in by_group.items() if g.startswith("usage_")}
    if usage:
        print("usage over 10M events (median per query):")
        for group, backends in sorted(usage.items()):
            cells = "   ".join(f"{b} {st['median'] * 1e3:7.1f} ms" for b, st in sorted(backends.items()))
            print(f"  {group.removeprefix('usage_'):13s} {cells}")
    pricing = by_group.get("pricing_month", {})
    if pricing and "float_rules" in pricing:
        floats = pricing["float_rules"]["median"]
        print("pricing_month (median, 5 charges, 14 lines):")
        for name, st in sorted(pricing.items(), key=lambda kv: kv[1]["median"]):
            print(f"  {name:12s} {st['median'] * 1e6:9.1f} us   {st['median'] / floats:5.2f}x the float rules' time")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".benchmarks/last.json")
