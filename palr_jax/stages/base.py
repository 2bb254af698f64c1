"""The stage declaration: what a stage is, as data. The stages build these; `palr_jax.runner` runs them.

A `Stage` names the config keys its fingerprint hashes, the stages whose outputs it reads, the outputs it
writes under the workdir W, how it runs on N processes and its function (palr_jax/runner.py says how a
stage is skipped, rerun and resumed). How a stage runs on a multi-process job (`processes`):
  collective  every process, on the global mesh (training);
  sharded     every process its share of the work (users split over processes) on its host-local
              mesh, each writing its own part files; then process 0 runs `merge`, which joins them;
  host        process 0 alone (CPU work: evaluation, the report); the others wait at a barrier.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any

COLLECTIVE, SHARDED, HOST = 'collective', 'sharded', 'host'


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  run: Callable[[Any], Any]              # run(ctx); on the processes `processes` says
  hashes: tuple[str, ...]                # config keys (dotted) its fingerprint hashes
  upstream: tuple[str, ...] = ()         # stages whose outputs it reads
  outputs: tuple[str, ...] = ()          # paths under W it writes (files or folders)
  processes: str = HOST                  # collective | sharded | host
  merge: Callable[[Any], Any] | None = None   # sharded: process 0 joins the parts
  inputs: tuple[str, ...] = ()           # files outside W it reads (data, model)
  also_hashes: Any = None                # anything else its result depends on (JSON-able), also hashed
  scratch: tuple[str, ...] = ()          # paths under W of partial work a rerun would resume from
  per_process: str = ''                  # what each process does, for the log and docs/pods.md
  resumes: Callable[[Any], str | None] | None = None  # resumes(ctx): the partial work a run picks up, in words

  def __post_init__(self):
    if self.processes not in (COLLECTIVE, SHARDED, HOST):
      raise ValueError(f'stage {self.name}: processes={self.processes!r}')
    if self.processes == SHARDED and self.merge is None:
      raise ValueError(f'stage {self.name}: a sharded stage needs a merge')


def process_table(stages: Sequence[Stage]) -> str:
  """Markdown: each stage, how it runs on N processes and what each process does (docs/pods.md)."""
  rows = ['| stage | processes | what each process does |', '|---|---|---|']
  return '\n'.join(rows + [f'| `{s.name}` | {s.processes} | {s.per_process} |' for s in stages])
