"""Which splits a run is evaluated on: ``validation`` and the dataset's own out-of-distribution splits.

An ood split is one named ``ood`` or ``ood_<shift>``. The built-in task writes two: ``ood_cue`` (a higher sampling
temperature with the length cue reversed) and ``ood_temp`` (the temperature shift alone); a dataset prepared from
external files, or a workdir written before the split was divided, has one ``ood``. Every consumer — rm_eval, the
probe gate, rm_control, the report and the claims — takes the list from here, so a dataset's ood splits flow
through to eval.json (``acc[split]``), eval_examples.npz (``<split>/<model>``) and each claim's intervals.
"""

from __future__ import annotations

from collections.abc import Iterable

OOD = "ood"
VALIDATION = "validation"
TRAIN = "train"
# rm_eval cuts the training split in two by its flip mask; train_corrupted is judged against the flipped labels.
TRAIN_VIEWS = ("train_clean", "train_corrupted")

# What the built-in task's ood splits shift (``task/builtin_pairs.py``), as the report describes them.
BUILTIN_SHIFTS = {
    "ood_cue": "sampled at the ood temperature, with the length cue reversed (shorter chosen more often)",
    "ood_temp": "sampled at the ood temperature, with the length cue as in training",
}


def is_ood(name: str) -> bool:
    """Whether ``name`` names an out-of-distribution split: ``ood`` or ``ood_<shift>``."""
    return name == OOD or name.startswith(OOD + "_")


def is_eval_split(name: str) -> bool:
    """Whether rm_eval can measure a split of this name: a view of train, validation or an ood split."""
    return name in TRAIN_VIEWS or name == VALIDATION or is_ood(name)


def check_selection_split(name: str, binding: str) -> str:
    """``name`` if members may be ranked on it; a ValueError naming ``binding`` otherwise. Ranking (or choosing which
    members WARM averages) on an ood split would let the test distribution pick the model it is then judged on."""
    if not is_eval_split(name):
        raise ValueError(f"{binding} must be {KNOWN}, got {name!r}")
    if is_ood(name):
        raise ValueError(
            f"{binding} = {name!r}: members are ranked on held-in data only (validation or a train view), never on an "
            "ood split, which judges the result"
        )
    return name


KNOWN = f"{', '.join(TRAIN_VIEWS)}, {VALIDATION} or an ood split ({OOD}, {OOD}_<shift>)"


def ood_splits(names: Iterable[str]) -> tuple[str, ...]:
    """The ood splits among ``names``, sorted (``ood`` before ``ood_cue`` before ``ood_temp``)."""
    return tuple(sorted({n for n in names if is_ood(n)}))


def held_out(names: Iterable[str]) -> tuple[str, ...]:
    """The splits claims are judged on, among ``names``: ``validation`` (when present) and every ood split."""
    names = list(names)
    return ((VALIDATION,) if VALIDATION in names else ()) + ood_splits(names)


def ordered(names: Iterable[str]) -> tuple[str, ...]:
    """rm_eval's splits among ``names`` in table order: train_clean, train_corrupted, validation, the ood splits."""
    names = list(names)
    return tuple(s for s in TRAIN_VIEWS if s in names) + held_out(names)


def measured(dataset_names: Iterable[str]) -> tuple[str, ...]:
    """rm_eval's splits measured from the dataset splits ``dataset_names``: train_clean and train_corrupted when
    ``train`` is among them, then ``validation`` (when present) and the ood splits."""
    dataset_names = list(dataset_names)
    return (TRAIN_VIEWS if TRAIN in dataset_names else ()) + held_out(dataset_names)


def dataset_splits(dataset_dir: str) -> tuple[str, ...]:
    """The split names of the dataset at ``dataset_dir`` (its preference_metadata.json)."""
    # Imported here: the dataset reader brings in jax, which `warm-claims` (the name rules above only) does not need.
    from warm_jax.data import pipeline

    return tuple(pipeline.load_metadata(dataset_dir)["splits"])


def dataset_held_out(dataset_dir: str) -> tuple[str, ...]:
    """``validation`` and the ood splits the dataset at ``dataset_dir`` has (the probe gate's splits).

    ``validation`` is named even when the dataset lacks it: members are ranked on it, and reading it then fails
    with the error that names the dataset and its splits."""
    return (VALIDATION,) + ood_splits(dataset_splits(dataset_dir))


def dataset_rm_splits(dataset_dir: str) -> tuple[str, ...]:
    """rm_eval's splits of the dataset at ``dataset_dir``: train_clean, train_corrupted, validation (all three named
    whether or not the dataset has them, as ``dataset_held_out``), then its ood splits."""
    return TRAIN_VIEWS + dataset_held_out(dataset_dir)
