"""Seeded, group-aware train/val/test splits (and k-fold) over case ids.

Procedure (see data_prep/README.md, "Splits"):

1. Groups. Cases that must stay on one side of every split are merged with union-find over
   (a) every pair listed in `<manual_dir>/near_duplicates.csv` (columns `name_a,name_b,...`;
   pairs naming a case that is not in the data are ignored) and (b) images whose file bytes
   have the same sha256 (exact duplicates; always applied, so a dataset without a
   near_duplicates.csv is grouped by hash alone).
2. Order. Groups are put in canonical order (by their smallest case id), then permuted with
   `numpy.random.default_rng(seed)`.
3. Assignment (`assign_splits`). Walking the permuted groups, each whole group goes to the split
   whose case count is furthest below its target (`ratio * n_cases`; ties -> train, val, test).
   Ratios hold to within one group's size.
4. k-fold (`kfold_splits`). Groups (largest first, ties in permuted order) are dealt to the fold
   with the fewest cases. Fold f: test = fold f; val = groups taken, in the order of
   `default_rng([seed, f])`, from the other folds until `val_ratio * n_cases` is reached;
   train = the rest. The k test sets are disjoint and cover every case.
"""
from __future__ import annotations

import csv
import hashlib
import os
from typing import Iterable, Mapping, Sequence

import numpy as np

SPLITS = ('train', 'val', 'test')
DEFAULT_RATIOS = (0.7, 0.1, 0.2)
NEAR_DUPLICATES_FILE = 'near_duplicates.csv'


class _UnionFind:

  def __init__(self, items: Iterable[str]):
    self.parent = {x: x for x in items}

  def find(self, x: str) -> str:
    root = x
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[x] != root:  # path compression
      self.parent[x], x = root, self.parent[x]
    return root

  def union(self, a: str, b: str) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      if rb < ra:
        ra, rb = rb, ra
      self.parent[rb] = ra


def read_near_duplicates(path: str) -> list[tuple[str, str]]:
  """Pairs (name_a, name_b) from a near_duplicates.csv (header with name_a, name_b)."""
  with open(path, newline='', encoding='utf-8') as f:
    reader = csv.DictReader(f)
    fields = reader.fieldnames or []
    if 'name_a' not in fields or 'name_b' not in fields:
      raise ValueError(f'{path}: expected columns name_a,name_b, found {",".join(fields)}')
    return [(row['name_a'], row['name_b']) for row in reader]


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def group_cases(case_ids: Sequence[str],
                pairs: Iterable[tuple[str, str]] = (),
                hashes: Mapping[str, str] | None = None) -> list[list[str]]:
  """Union-find groups over near-duplicate `pairs` and equal `hashes` (case_id -> digest).

  Returns groups (each sorted) in canonical order (by smallest case id).
  """
  ids = sorted(set(case_ids))
  if len(ids) != len(case_ids):
    raise ValueError('duplicate case ids')
  uf = _UnionFind(ids)
  for a, b in pairs:
    if a in uf.parent and b in uf.parent:
      uf.union(a, b)
  if hashes:
    first: dict[str, str] = {}
    for cid in ids:
      digest = hashes.get(cid)
      if digest is None:
        continue
      if digest in first:
        uf.union(first[digest], cid)
      else:
        first[digest] = cid
  groups: dict[str, list[str]] = {}
  for cid in ids:
    groups.setdefault(uf.find(cid), []).append(cid)
  return sorted(groups.values(), key=lambda g: g[0])


def _check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
  if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
    raise ValueError(f'ratios must be 3 non-negative numbers (train,val,test), got {list(ratios)}')
  s = float(sum(ratios))
  return tuple(float(r) / s for r in ratios)  # type: ignore[return-value]


def assign_splits(groups: Sequence[Sequence[str]],
                  ratios: Sequence[float] = DEFAULT_RATIOS,
                  seed: int = 0) -> dict[str, list[str]]:
  """Whole groups -> {'train','val','test'}: sorted case-id lists (see module docstring)."""
  ratios = _check_ratios(ratios)
  groups = sorted((sorted(g) for g in groups), key=lambda g: g[0])
  n = sum(len(g) for g in groups)
  targets = [r * n for r in ratios]
  counts = [0, 0, 0]
  out: dict[str, list[str]] = {s: [] for s in SPLITS}
  order = np.random.default_rng(seed).permutation(len(groups))
  for gi in order:
    g = groups[int(gi)]
    deficits = [targets[i] - counts[i] for i in range(3)]
    best = max(range(3), key=lambda i: (deficits[i], -i))
    counts[best] += len(g)
    out[SPLITS[best]].extend(g)
  return {s: sorted(v) for s, v in out.items()}


def kfold_splits(groups: Sequence[Sequence[str]], k: int = 5, seed: int = 0,
                 val_ratio: float = DEFAULT_RATIOS[1]) -> list[dict[str, list[str]]]:
  """k group-aware folds; fold f = {'train','val','test'} (see module docstring)."""
  if k < 2:
    raise ValueError(f'kfold must be >= 2, got {k}')
  groups = sorted((sorted(g) for g in groups), key=lambda g: g[0])
  n = sum(len(g) for g in groups)
  perm = [int(i) for i in np.random.default_rng(seed).permutation(len(groups))]
  rank = {gi: r for r, gi in enumerate(perm)}
  by_size = sorted(range(len(groups)), key=lambda gi: (-len(groups[gi]), rank[gi]))
  fold_of: dict[int, int] = {}
  sizes = [0] * k
  for gi in by_size:
    f = min(range(k), key=lambda j: (sizes[j], j))
    fold_of[gi] = f
    sizes[f] += len(groups[gi])
  folds = []
  for f in range(k):
    rest = [gi for gi in range(len(groups)) if fold_of[gi] != f]
    order = np.random.default_rng([seed, f]).permutation(len(rest))
    val, n_val = [], 0
    for oi in order:
      if n_val >= val_ratio * n - 1e-9:
        break
      gi = rest[int(oi)]
      val.append(gi)
      n_val += len(groups[gi])
    val_set = set(val)
    folds.append({
        'train': sorted(c for gi in rest if gi not in val_set for c in groups[gi]),
        'val': sorted(c for gi in val for c in groups[gi]),
        'test': sorted(c for gi in range(len(groups)) if fold_of[gi] == f for c in groups[gi]),
    })
  return folds


def compute_groups(case_images: Mapping[str, str], manual_dir: str | None) -> list[list[str]]:
  """Groups for cases {case_id: image_path}: near_duplicates.csv in manual_dir + sha256."""
  pairs: list[tuple[str, str]] = []
  if manual_dir:
    nd = os.path.join(manual_dir, NEAR_DUPLICATES_FILE)
    if os.path.exists(nd):
      pairs = read_near_duplicates(nd)
  hashes = {cid: file_sha256(p) for cid, p in case_images.items()}
  return group_cases(list(case_images), pairs, hashes)


def write_split_files(out_dir: str, splits: Mapping[str, Sequence[str]]) -> None:
  os.makedirs(out_dir, exist_ok=True)
  for s in SPLITS:
    with open(os.path.join(out_dir, f'{s}.txt'), 'w', encoding='utf-8') as f:
      for cid in splits.get(s, []):
        f.write(f'{cid}\n')


def read_split_files(split_dir: str) -> dict[str, list[str]] | None:
  """{'train': [...], ...} from `split_dir/{train,val,test}.txt`; None when none exists.

  Missing individual files mean an empty split. Blank lines are ignored; lines keep inner spaces
  (BUSI ids contain spaces) but lose trailing whitespace / CR.
  """
  if not any(os.path.exists(os.path.join(split_dir, f'{s}.txt')) for s in SPLITS):
    return None
  out = {}
  for s in SPLITS:
    p = os.path.join(split_dir, f'{s}.txt')
    ids = []
    if os.path.exists(p):
      with open(p, encoding='utf-8') as f:
        ids = [line.rstrip('\r\n').rstrip() for line in f]
      ids = [i for i in ids if i]
    out[s] = ids
  return out
