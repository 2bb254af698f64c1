"""Config sweeps: run a grid of config overrides, or emit one pod launch per point; collect the results.

A sweep file (`configs/sweeps/*.py`) defines `get_sweep()`, returning a list of override dicts
`{'dotted.config.key': value}` built with `axis`, `product` and `zip_`, and may name the config it
sweeps over in `BASE_CONFIG` (`--config` replaces it):

  from palr_jax.sweep.spec import axis, product, zip_
  BASE_CONFIG = 'configs/ml100k.py:quick'
  def get_sweep():
    return product(axis('lora.rank', [4, 8, 16]), zip_(axis('lora.alpha', [8., 16.]), axis('seed', [0, 1])))

  python -m palr_jax.tools.sweep --sweep configs/sweeps/lora_rank.py --workdir W

Point `lora.rank=8,seed=0` runs `palr_jax.main.run(config, W/<point>, shared_dir=W/_shared)`; stages whose
fingerprint does not depend on the swept keys (data, retriever, profiles ...) are computed once in
`W/_shared` and reused by every point. When a run returns, `W/<point>/sweep_point.json` records the
overrides and the full config: a point is finished when that record matches its config and its
`results.json` exists, so a killed sweep resumes at the first unfinished point. Every invocation ends by
collecting the finished points into `W/sweep.csv` (every metric), `W/sweep.md` (HR@10 and NDCG@10 per
method) and `W/sweep.png` (the swept axis against HR@10 and NDCG@10).

On a pod, `--emit-launch tpu_vm|slurm` prints one launcher command per unfinished point instead, each
running this module for that point alone (`--only NAME`); `--collect` then builds the reports.

The library: palr_jax/sweep/ (spec: sweep files and points; run: running them; report; launch).
"""
from __future__ import annotations

import shlex
import sys

from absl import flags
from etils import epath
from ml_collections import config_flags

from palr_jax import cli
from palr_jax import distributed
from palr_jax import validate
from palr_jax.cli import load_config
from palr_jax.sweep import launch
from palr_jax.sweep import report
from palr_jax.sweep import run
from palr_jax.sweep import spec


def _define_flags() -> None:
  """Only when run as a program (tests import this module beside others that define --config)."""
  flags.DEFINE_string('sweep', None, 'Sweep file defining get_sweep().', required=True)
  flags.DEFINE_string('workdir', None, 'Sweep directory: W/<point>, W/_shared, W/sweep.*.', required=True)
  config_flags.DEFINE_config_file(
      'config', None, "Base config path.py[:arg] (default: the sweep file's BASE_CONFIG).",
      lock_config=False)
  flags.DEFINE_multi_string('only', [], 'Run only these points (by name).')
  flags.DEFINE_enum('emit-launch', None, ['tpu_vm', 'slurm'],
                    'Print one launcher command per unfinished point instead of running.')
  flags.DEFINE_string('launch-args', '', 'Options for the launcher, e.g. "--name palr --zone us-west4-a".')
  flags.DEFINE_bool('collect', False, 'Only collect finished points into the reports.')
  cli.define_compilation_cache_flag()


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  sweep_path, workdir = FLAGS.sweep, FLAGS.workdir
  try:
    points, base_config = spec.load_sweep(sweep_path)
  except spec.SweepError as e:
    raise validate.ConfigError(str(e)) from None
  if FLAGS.config is not None:
    config = FLAGS.config
    config_spec = config_flags.get_config_filename(FLAGS['config'])
    config_overrides = config_flags.get_override_values(FLAGS['config'])
  elif base_config:
    config, config_spec, config_overrides = load_config(base_config), base_config, {}
  else:
    raise validate.ConfigError(f'{sweep_path} has no BASE_CONFIG: pass --config path.py[:arg]')
  where = f'sweep {sweep_path}'
  if not FLAGS.collect:
    if not FLAGS['emit-launch'].value:
      cli.use_compilation_cache(FLAGS.compilation_cache)  # points that share a program compile it once
      distributed.initialize_from_flags()  # On a pod: one job across the hosts before any device is used.
    run.check_points(config, points, where, None if FLAGS['emit-launch'].value else workdir, FLAGS.only)
  if FLAGS['emit-launch'].value:
    todo = [p for p in points
            if not run.is_finished(epath.Path(workdir) / spec.point_name(p), spec.apply_overrides(config, p, where))]
    for line in launch.launch_commands(FLAGS['emit-launch'].value, todo, sweep_path=sweep_path, workdir=workdir,
                                       config_spec=config_spec, config_overrides=config_overrides,
                                       launch_args=shlex.split(FLAGS['launch-args'].value)):
      print(line)
    return
  if not FLAGS.collect:
    run.run_sweep(config, points, workdir, only=FLAGS.only, where=where)
  if run.is_writer():
    rows = report.write_reports(points, workdir)
    print(f'{len(rows)}/{len(points)} points finished; reports in {workdir}/sweep.{{csv,md,png}}',
          file=sys.stderr)


if __name__ == '__main__':
  cli.run(main, _define_flags)
