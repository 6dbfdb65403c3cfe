"""Input pipelines: shuffling per seed and member, per-process shards, epochs, exact resume, global arrays."""

import dataclasses
import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tests.test_data_formats import TinyTokenizer
from warm_jax.data import builders, pipeline, preference
from warm_jax.ensemble import EnsembleConfig, member_iterators

N = 36


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "ds"
    records = [{"prompt": f"the movie {i}", "chosen": "good", "rejected": f"bad {i}"} for i in range(N)]
    builders.write_preference_dataset(
        out,
        {"train": records, "validation": records[:10]},
        tokenizer=TinyTokenizer(),
        max_prompt_len=6,
        max_response_len=3,
        flip_fraction=0.25,
        seed=0,
        source="test",
    )
    return out


def epoch_indices(it, steps):
    return np.concatenate([next(it)["index"].reshape(-1) for _ in range(steps)])


def test_load_split_and_batch_shapes(dataset):
    src = pipeline.load_split(dataset, "train")
    assert len(src) == N and len(pipeline.load_split(dataset, "validation")) == 10
    with pytest.raises(KeyError, match="no split 'test'"):
        pipeline.load_split(dataset, "test")
    batch = next(pipeline.PreferenceIterator(src, batch_size=4, seed=0, process_index=0, process_count=1))
    assert set(batch) == set(pipeline.DEFAULT_FIELDS) | {"valid"}
    assert batch["chosen_tokens"].shape == (4, 9) and batch["chosen_tokens"].dtype == np.int32
    assert batch["chosen_length"].shape == (4,) and batch["flipped"].dtype == np.bool_ and batch["valid"].all()
    members = next(
        pipeline.PreferenceIterator(src, batch_size=4, seed=0, num_members=3, process_count=1, process_index=0)
    )
    assert members["rejected_tokens"].shape == (3, 4, 9) and members["valid"].shape == (3, 4)
    # The stored example matches the index it claims.
    ex = src[int(batch["index"][0])]
    np.testing.assert_array_equal(ex["chosen_tokens"], batch["chosen_tokens"][0])


def test_epochs_are_seeded_permutations(dataset):
    src = pipeline.load_split(dataset, "train")
    make = lambda seed: pipeline.PreferenceIterator(
        src, batch_size=6, seed=seed, num_epochs=2, process_count=1, process_index=0
    )
    it = make(1)
    e0, e1 = epoch_indices(it, 6), epoch_indices(it, 6)
    with pytest.raises(StopIteration):
        next(it)
    assert sorted(e0) == sorted(e1) == list(range(N)) and not np.array_equal(e0, e1)
    np.testing.assert_array_equal(epoch_indices(make(1), 12), np.concatenate([e0, e1]))  # deterministic per seed
    assert not np.array_equal(epoch_indices(make(2), 6), e0)
    plain = pipeline.PreferenceIterator(src, batch_size=6, seed=1, shuffle=False, process_count=1, process_index=0)
    np.testing.assert_array_equal(epoch_indices(plain, 6), np.arange(N))


def test_member_orders_differ_and_each_covers_the_epoch(dataset):
    src = pipeline.load_split(dataset, "train")
    it = pipeline.PreferenceIterator(src, batch_size=9, seed=0, num_members=3, process_count=1, process_index=0)
    idx = np.concatenate([next(it)["index"] for _ in range(4)], axis=1)  # [M, N]
    for m in range(3):
        assert sorted(idx[m]) == list(range(N))
    assert not np.array_equal(idx[0], idx[1]) and not np.array_equal(idx[1], idx[2])
    shared = pipeline.PreferenceIterator(src, batch_size=9, seed=0, process_count=1, process_index=0)
    shared_order = epoch_indices(shared, 4)
    assert not any(np.array_equal(shared_order, idx[m]) for m in range(3))


def test_members_train_on_their_own_share_of_the_pairs(dataset):
    # Subagging: a member visits exactly its seeded share once per epoch; the share depends on its seed alone, so
    # rm_control's members (the seeds of members 0 and 1) see what those members saw.
    tokens = np.zeros(2, np.int32)
    records = [  # the record's position stands in its lengths
        {"chosen_tokens": tokens, "rejected_tokens": tokens, "chosen_length": i, "rejected_length": i} for i in range(N)
    ]
    seeds = [4, 5, 6]
    cfg = EnsembleConfig(num_members=3, batch_size=3, member_data_fraction=0.5)
    it = member_iterators(cfg, records, seeds)
    seen = np.concatenate([next(it)["chosen_length"] for _ in range(12)], axis=1)  # [M, 2 epochs of 18]
    shares = [preference.member_subset(N, 0.5, s) for s in seeds]
    for m in range(3):
        assert len(shares[m]) == 18
        assert sorted(seen[m, :18]) == sorted(seen[m, 18:]) == shares[m].tolist()
        assert not np.array_equal(seen[m, :18], seen[m, 18:])  # a new order each epoch
    assert len({tuple(s) for s in shares}) == 3
    control = member_iterators(dataclasses.replace(cfg, num_members=2), records, seeds[:2])
    np.testing.assert_array_equal(next(control)["chosen_length"], seen[:2, :3])
    # A resumed iterator goes on with the same shares and order.
    resumed = member_iterators(cfg, records, seeds)
    resumed.set_state(it.get_state())
    np.testing.assert_array_equal(next(resumed)["chosen_length"], next(it)["chosen_length"])
    # Over a written split the share is read in batches, record for record.
    src = pipeline.load_split(dataset, "train")
    part = pipeline.Subset(src, shares[0])
    assert len(part) == 18
    for got, i in zip(part.__getitems__([0, 17]), shares[0][[0, -1]]):
        np.testing.assert_array_equal(got["rejected_tokens"], src[int(i)]["rejected_tokens"])


@pytest.mark.parametrize(
    "bindings, error",
    [
        (dict(member_data_fraction=0.0), r"must be in \(0, 1\], got 0.0"),
        (dict(member_data_fraction=1.5), r"must be in \(0, 1\], got 1.5"),
        (dict(member_data_fraction=0.5, shared_data_order=True), "cannot be combined with member_data_fraction"),
    ],
)
def test_member_data_fraction_is_checked(bindings, error):
    with pytest.raises(ValueError, match=error):
        EnsembleConfig(**bindings)
    small = EnsembleConfig(num_members=2, batch_size=8, member_data_fraction=0.1)
    with pytest.raises(ValueError, match="leaves each member 4 of 36 training pairs, fewer than one batch"):
        member_iterators(small, list(range(N)), [1, 2])


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_two_processes_read_disjoint_shards_covering_the_split(dataset, drop_remainder):
    src = pipeline.load_split(dataset, "train")
    batch = 3 if drop_remainder else 5  # 36 = 6 x (3 x 2); 36 = 3 x 10 + 6, the last global batch padded
    its = [
        pipeline.PreferenceIterator(
            src,
            batch_size=batch,
            seed=4,
            num_members=2,
            num_epochs=1,
            drop_remainder=drop_remainder,
            process_index=p,
            process_count=2,
        )
        for p in range(2)
    ]
    batches = [list(it) for it in its]
    assert len(batches[0]) == len(batches[1]) == (6 if drop_remainder else 4)
    for m in range(2):
        seen = [np.concatenate([b["index"][m][b["valid"][m]] for b in bs]) for bs in batches]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(np.concatenate(seen)) == list(range(N))
    # The two processes together read what one process with the global batch reads.
    single = pipeline.PreferenceIterator(
        src,
        batch_size=2 * batch,
        seed=4,
        num_members=2,
        num_epochs=1,
        drop_remainder=drop_remainder,
        process_index=0,
        process_count=1,
    )
    for step, b in enumerate(single):
        np.testing.assert_array_equal(
            b["index"], np.concatenate([batches[0][step]["index"], batches[1][step]["index"]], axis=1)
        )


RESUME_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from warm_jax.data import pipeline
    dataset, state_file, out, steps, members = sys.argv[1:6]
    members = None if members == "none" else int(members)
    it = pipeline.PreferenceIterator(pipeline.load_split(dataset, "train"), batch_size=5, seed=7,
                                     num_members=members, process_index=0, process_count=1)
    it.set_state(json.load(open(state_file)))
    batches = [next(it) for _ in range(int(steps))]
    np.savez(out, **{f"{k}_{i}": v for i, b in enumerate(batches) for k, v in b.items()})
""")


@pytest.mark.parametrize("members", [None, 2])
def test_resume_in_fresh_process_replays_exact_batches_across_epochs(dataset, tmp_path, members):
    make = lambda: pipeline.PreferenceIterator(
        pipeline.load_split(dataset, "train"),
        batch_size=5,
        seed=7,
        num_members=members,
        process_index=0,
        process_count=1,
    )
    # 7 steps per epoch (36 // 5); stop after 5 and continue for 6 more, crossing into epoch 1.
    k, more = 5, 6
    reference = make()
    expected = [next(reference) for _ in range(k + more)]
    it = make()
    for _ in range(k):
        next(it)
    state = it.get_state()
    assert state["epoch"] == 0 and state["step"] == k
    (tmp_path / "state.json").write_text(json.dumps(state))
    subprocess.run(
        [
            sys.executable,
            "-c",
            RESUME_SCRIPT,
            str(dataset),
            str(tmp_path / "state.json"),
            str(tmp_path / "out.npz"),
            str(more),
            "none" if members is None else str(members),
        ],
        check=True,
        timeout=120,
    )
    got = np.load(tmp_path / "out.npz")
    for i, want in enumerate(expected[k:]):
        for key, value in want.items():
            np.testing.assert_array_equal(got[f"{key}_{i}"], value, err_msg=f"batch {i} field {key}")
    assert any(b["index"].size for b in expected[k:])  # non-empty comparison


def test_state_from_another_order_is_refused(dataset):
    src = pipeline.load_split(dataset, "train")
    state = pipeline.PreferenceIterator(src, batch_size=4, seed=0, process_count=1, process_index=0).get_state()
    other = pipeline.PreferenceIterator(src, batch_size=4, seed=1, process_count=1, process_index=0)
    with pytest.raises(ValueError, match="seed=0 but this iterator has seed=1"):
        other.set_state(state)
    # Same global batch on two processes: the state carries over.
    pipeline.PreferenceIterator(src, batch_size=2, seed=0, process_count=2, process_index=1).set_state(state)


def test_eval_batches_are_sequential_and_padded(dataset):
    src = pipeline.load_split(dataset, "validation")
    batches = list(pipeline.eval_batches(src, 4, fields=("index", "flipped")))
    assert len(batches) == 3 and all(b["index"].shape == (4,) for b in batches)
    idx = np.concatenate([b["index"][b["valid"]] for b in batches])
    np.testing.assert_array_equal(idx, np.arange(10))
    assert [int(b["valid"].sum()) for b in batches] == [4, 4, 2]
    assert not any(b["flipped"].any() for b in batches)  # validation stays clean


def test_to_global_builds_sharded_arrays(dataset):
    src = pipeline.load_split(dataset, "train")
    mesh = jax.make_mesh((2, 4), ("ensemble", "data"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    batch = next(
        pipeline.PreferenceIterator(src, batch_size=8, seed=0, num_members=2, process_count=1, process_index=0)
    )
    sharding = lambda name, x: NamedSharding(mesh, P("ensemble", "data", *([None] * (x.ndim - 2))))
    out = pipeline.to_global(batch, sharding)
    assert out["chosen_tokens"].shape == (2, 8, 9)
    assert out["chosen_tokens"].sharding.is_equivalent_to(NamedSharding(mesh, P("ensemble", "data", None)), 3)
    np.testing.assert_array_equal(np.asarray(out["index"]), batch["index"])
    shared = next(pipeline.PreferenceIterator(src, batch_size=8, seed=0, process_count=1, process_index=0))
    flat = pipeline.to_global(shared, NamedSharding(mesh, P(("ensemble", "data"))))
    assert flat["valid"].shape == (8,) and len(flat["valid"].addressable_shards) == 8
