"""Entry point: ``python -m warm_jax.train --gin_file=gin/quickstart.gin --workdir=DIR``."""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "gin config file(s); found relative to cwd and gin/.")
flags.DEFINE_multi_string("gin_bindings", [], "extra gin bindings, e.g. 'SEED=1'.")
flags.DEFINE_list("gin_search_paths", [], "extra folders to look for gin files in.")
flags.DEFINE_string("workdir", None, "where everything this run writes goes.", required=True)
flags.DEFINE_string("coordinator_address", None, "multi-process: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "multi-process: this process's id.")
flags.DEFINE_integer("init_timeout_s", 300, "multi-process: seconds to wait for all processes.")


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    # Orbax and jax log every checkpoint operation at INFO through absl; keep the terminal readable.
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from warm_jax import config, host_memory, runtime, stages

    logging.getLogger("warm_jax.train").info(host_memory.describe())

    try:
        runtime.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.init_timeout_s)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    try:
        config.parse(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    os.makedirs(FLAGS.workdir, exist_ok=True)
    if runtime.is_main_process():
        config.write_config(FLAGS.workdir, operative=False)
    stages.run_pipeline(workdir=FLAGS.workdir)
    if runtime.is_main_process():
        config.write_config(FLAGS.workdir, operative=True)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
