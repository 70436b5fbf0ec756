"""`python -m benchmarks.table FILE.jsonl [...]`: the JSON lines of `benchmarks.run` as one Markdown table
(what the README's Performance section shows; several files, e.g. fp32 and bf16, side by side by row)."""

from __future__ import annotations

import json
import sys

_SKIP = {'name', 'value', 'unit', 'config', 'device', 'dtype', 'overrides', 'num_devices'}


def _value(record: dict) -> str:
  value = record.get('value')
  if value is None:
    return f"error: {record.get('error', '?')}"
  if isinstance(value, float):
    value = f'{value:.3g}' if abs(value) < 1e4 else f'{value:.3e}'
  return f"{value} {record.get('unit') or ''}".strip()


def _details(record: dict) -> str:
  return ', '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}'
                   for k, v in record.items() if k not in _SKIP and k != 'error')


def table(paths: list[str]) -> str:
  rows = ['| measurement | value | device, dtype, devices | details |', '|---|---:|---|---|']
  for path in paths:
    with open(path) as f:
      for line in f:
        if line.strip():
          r = json.loads(line)
          rows.append(f"| `{r['name']}` | {_value(r)} | {r.get('device')}, {r.get('dtype')}, "
                      f"{r.get('num_devices')} | {_details(r)} |")
  return '\n'.join(rows)


if __name__ == '__main__':
  if len(sys.argv) < 2:
    sys.exit('usage: python -m benchmarks.table FILE.jsonl [FILE.jsonl ...]')
  print(table(sys.argv[1:]))
