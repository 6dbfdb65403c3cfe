"""Entry point: ``python -m warm_jax.train --gin_file=gin/quickstart.gin --workdir=DIR``.

An expected failure (a bad gin file or binding, a configuration that differs from the one the
workdir's stages ran with, an unusable workdir, a stage's missing input) ends with one line
``error: ...`` on stderr and a non-zero exit: 2 for the configuration, 1 otherwise. ``--verbose``
(or WARM_JAX_VERBOSE=1) adds the traceback.
"""

from __future__ import annotations

import logging
import sys
import traceback

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
flags.DEFINE_string(
    "rerun_from",
    None,
    "rerun this listed stage and every stage after it, even if they finished or ran with another "
    "configuration; their old outputs move to WORKDIR/superseded/<UTC time>/ first.",
)
flags.DEFINE_bool("verbose", False, "show the Python traceback of an expected failure.")
flags.DEFINE_bool(
    "host_hugepages",
    False,
    "CPU hosts: re-run once with glibc's huge-page malloc (warm_jax/host_memory.py); also WARM_JAX_HUGEPAGES=1.",
)


def main(argv):
    del argv
    from warm_jax import host_memory  # imports nothing heavy: the re-exec must come before jax

    if FLAGS.host_hugepages or host_memory.requested():
        host_memory.reexec_with_hugepages()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    # Orbax and jax log every checkpoint operation at INFO through absl; keep the terminal readable.
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from warm_jax import cli_errors

    verbose = FLAGS.verbose or cli_errors.verbose_requested()
    return cli_errors.guarded(lambda: _train(verbose), verbose=verbose)


def _train(verbose: bool) -> int:
    from warm_jax import cli_errors, config, host_memory, loop, runtime, stages

    logging.getLogger("warm_jax.train").info(host_memory.describe())

    try:
        runtime.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.init_timeout_s)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        config.parse(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
        stages.run_pipeline(workdir=FLAGS.workdir, rerun_from=FLAGS.rerun_from)
    except config.ConfigError as e:
        if verbose:
            traceback.print_exc()
        print(f"error: {cli_errors.describe(e)}", file=sys.stderr)
        return 2
    except loop.NonFiniteUpdateError as e:  # the message names the stage and step; a result, not a bug
        raise cli_errors.UserError(str(e)) from e
    return 0


def run():
    app.run(main)


def console_main():
    """The ``warm-train`` command: `run`, except that ``--help`` prints this module's flags and exits 0 (absl's own
    help exits 1, which reads as a failure to scripts that check the command)."""
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in sys.argv[1:]):
        print(__doc__)
        print(FLAGS if "--helpfull" in sys.argv[1:] else FLAGS.module_help(sys.modules[__name__]))
        return 0
    return run()


if __name__ == "__main__":
    run()
