"""Render ``docs/results/ops-<device>.json`` (written by ``benchmarks/ops.py``) as Markdown tables.

    python3 benchmarks/ops_table.py docs/results/ops-h200.json
"""

from __future__ import annotations

import json
import sys


def shape_label(row: dict) -> str:
    s = row["shape"]
    if row["op"] == "lookup_reduce":
        extra = f", D_p {s['D_p']} {s['act']}" if s["D_p"] else ""
        return (f"{s['name']}: T {s['T']} x n {s['n']}, D_v {s['D_v']}, h_c {s['h_c']}, E {s['E']}"
                f"{extra}, P {s['P']:,}, {s['idx']}")
    if row["op"] == "tucker_topk":
        return f"B {s['B']} x H {s['H']}, N {s['N']}, r {s['r']}, h_c {s['h_c']}, k {s['k']}, m {s['m']}"
    return ", ".join(f"{k} {v}" for k, v in s.items())


def main(path: str) -> None:
    doc = json.load(open(path))
    print(f"Device: {doc['device']}; copy bandwidth {doc['copy_GBps']:.0f} GB/s (read + write); "
          f"torch {doc.get('torch')}, triton {doc.get('triton')}.\n")
    rows = [r for r in doc["rows"] if "error" not in r]
    errors = [r["op"] for r in doc["rows"] if "error" in r]
    for op in dict.fromkeys(r["op"] for r in rows):
        print(f"\n**{op}**\n")
        print("| shape | impl | dir | µs | GB/s | of copy |")
        print("| --- | --- | --- | ---: | ---: | ---: |")
        for r in rows:
            if r["op"] != op:
                continue
            gbps = f"{r['GBps']:.0f}" if r["bytes"] else "–"
            frac = f"{r['frac_of_copy']:.2f}" if r["bytes"] else "–"
            print(f"| {shape_label(r)} | {r['impl']} | {r['direction']} | {r['ms'] * 1e3:.1f} | "
                  f"{gbps} | {frac} |")
    if errors:
        print(f"\nSections that failed: {', '.join(errors)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/results/ops-h200.json")
