"""Per-host input: each (simulated) process reads exactly the rows of the global batch its devices hold, under
several layouts, and together the processes read the global batch a single process reads."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from warm_jax import sharding
from warm_jax.data import pipeline
from warm_jax.data.local_rows import LocalRows, assemble, local_rows
from warm_jax.ensemble import EnsembleConfig, member_iterators

N, B, M, L = 50, 8, 2, 3
FIELDS = ("index", "tokens")
RECORDS = [
    {
        "index": np.int32(i),
        "tokens": np.arange(L, dtype=np.int32) + 100 * i,
        **{f"{s}_tokens": np.arange(L, dtype=np.int32) + 100 * i for s in ("chosen", "rejected")},
        **{f"{s}_length": np.int32(i) for s in ("chosen", "rejected")},
    }
    for i in range(N)
]


def _mesh(order, shape, names):
    return Mesh(np.asarray(jax.devices())[list(order)].reshape(shape), names)


def _processes(mesh):
    """Two simulated processes: the first four of the 8 devices, and the rest (by device id)."""
    devs = sorted(mesh.devices.flat, key=lambda d: d.id)
    return [devs[:4], devs[4:]]


# (name, mesh, batch sharding, global lead shape, share of the global batch each process reads)
LAYOUTS = [
    ("data over processes", _mesh(range(8), (8,), ("data",)), P("data"), (B,), 0.5),
    ("data interleaved", _mesh([0, 4, 1, 5, 2, 6, 3, 7], (8,), ("data",)), P("data"), (B,), 0.5),
    ("ensemble over processes", _mesh(range(8), (2, 4), ("ensemble", "data")), P("ensemble", "data"), (M, B), 0.5),
    (
        "data over processes, ensemble within",
        _mesh(range(8), (4, 2), ("data", "ensemble")),
        P("ensemble", "data"),
        (M, B),
        0.5,
    ),
    (  # process 0 holds member 0's first half of rows and member 1's second half: not a members x rows box
        "checkerboard",
        _mesh([0, 1, 4, 5, 6, 7, 2, 3], (2, 4), ("ensemble", "data")),
        P("ensemble", "data"),
        (M, B),
        0.5,
    ),
    ("shared batch, ensemble over processes", _mesh(range(8), (2, 4), ("ensemble", "data")), P("data"), (B,), 1.0),
]


def _iterator(lead, local=None, seed=3):
    members = None if len(lead) == 1 else lead[0]
    return pipeline.PreferenceIterator(
        RECORDS, batch_size=B, seed=seed, num_members=members, fields=FIELDS, local=local or LocalRows.everything(lead)
    )


def _entries(batch, local):
    """{(member, row): record index} of the entries the process read."""
    idx = batch["index"].reshape((-1, len(local.rows)))
    members = [0] if local.members is None else local.members
    return {
        (int(m), int(r)): int(idx[i, j])
        for i, m in enumerate(members)
        for j, r in enumerate(local.rows)
        if local.needed[i, j]
    }


@pytest.mark.parametrize("name, mesh, spec, lead, share", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_processes_read_their_share_and_together_the_global_batch(name, mesh, spec, lead, share):
    sh = NamedSharding(mesh, P(*spec, None))
    whole = _iterator(lead)
    procs = [local_rows(sh, lead, devices) for devices in _processes(mesh)]
    its = [_iterator(lead, local) for local in procs]
    total = int(np.prod(lead))
    for _ in range(2 * (N // B) + 1):  # across epoch boundaries
        full = next(whole)
        want = _entries(full, LocalRows.everything(lead))
        got = {}
        for local, it in zip(procs, its):
            batch = next(it)
            mine = _entries(batch, local)
            assert len(mine) == share * total
            for key, value in mine.items():
                assert want[key] == value  # same record at the same place of the global batch
                # the tokens came from that record, not zero fill
                m, r = key
                j = list(local.rows).index(r)
                tokens = (
                    batch["tokens"][j] if local.members is None else batch["tokens"][list(local.members).index(m), j]
                )
                np.testing.assert_array_equal(tokens, RECORDS[value]["tokens"])
            got.update(mine)
        assert got == want
    for local, it in zip(procs, its):
        assert it.rows_read == share * total * (2 * (N // B) + 1)
        assert it.get_state() == whole.get_state()


def test_rows_come_from_the_sharding_not_from_process_order():
    _, mesh, spec, lead, _ = LAYOUTS[1]
    local = local_rows(NamedSharding(mesh, spec), lead, _processes(mesh)[0])
    assert local.rows.tolist() == [0, 2, 4, 6]  # devices 0-3 sit at even mesh positions


def test_layouts_split_as_described():
    split = {
        name: [local_rows(NamedSharding(mesh, spec), lead, d) for d in _processes(mesh)]
        for name, mesh, spec, lead, _ in LAYOUTS
    }
    assert [p.members.tolist() for p in split["ensemble over processes"]] == [[0], [1]]
    assert [p.rows.tolist() for p in split["data over processes, ensemble within"]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    board = split["checkerboard"][0]
    assert board.members.tolist() == [0, 1] and board.rows.tolist() == list(range(B))
    assert board.needed.tolist() == [[True] * 4 + [False] * 4, [False] * 4 + [True] * 4]


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_ensemble_over_processes_reads_only_its_members(monkeypatch, fraction):
    # As on a real 2-process run: nothing of a member iterator may depend on the process count.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    _, mesh, spec, lead, _ = LAYOUTS[2]
    sh = NamedSharding(mesh, P(*spec, None))
    cfg = EnsembleConfig(num_members=M, batch_size=B, member_data_fraction=fraction)
    seeds = [11, 12]
    whole = member_iterators(cfg, RECORDS, seeds)
    parts = [member_iterators(cfg, RECORDS, seeds, local_rows(sh, lead, d)) for d in _processes(mesh)]
    for _ in range(3):
        full = next(whole)
        for p, it in enumerate(parts):
            batch = next(it)
            assert batch["chosen_length"].shape == (1, B)  # the record index
            np.testing.assert_array_equal(batch["chosen_length"][0], full["chosen_length"][p])
    for p, it in enumerate(parts):
        assert it.rows_read == it.records_read == 3 * B  # the other member's iterator read nothing
        assert it.get_state() == whole.get_state()
    after = next(whole)
    for p, it in enumerate(parts):
        fresh = member_iterators(cfg, RECORDS, seeds, local_rows(sh, lead, _processes(mesh)[1 - p]))
        fresh.set_state(it.get_state())  # the other process restores what this one saved
        np.testing.assert_array_equal(next(fresh)["chosen_length"][0], after["chosen_length"][1 - p])


def test_one_process_reads_exactly_what_it_did_before():
    mesh = _mesh(range(8), (2, 4), ("ensemble", "data"))
    for members, lead in (("none", (B,)), ("stacked", (M, B))):
        sh = sharding.batch_sharding(mesh, len(lead) + 1, members=members)
        local = local_rows(sh, lead)
        assert local.num_needed == np.prod(lead)
        old = pipeline.PreferenceIterator(
            RECORDS,
            batch_size=B,
            seed=5,
            num_members=lead[0] if len(lead) == 2 else None,
            fields=FIELDS,
            process_index=0,
            process_count=1,
        )
        new = _iterator(lead, local, seed=5)
        for _ in range(8):
            a, b = next(old), next(new)
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
            g = pipeline.to_global(b, lambda k, x: NamedSharding(mesh, P(*tuple(sh.spec)[: x.ndim])), local)
            np.testing.assert_array_equal(np.asarray(g["tokens"]), a["tokens"])
        assert old.get_state() == new.get_state()


def test_assembling_rows_the_process_did_not_read_fails_loudly():
    _, mesh, spec, lead, _ = LAYOUTS[0]
    sh = NamedSharding(mesh, P(*spec, None))
    local = local_rows(sh, lead, _processes(mesh)[0])  # half the rows; this one process has all 8 devices
    batch = next(_iterator(lead, local))
    with pytest.raises(ValueError, match="did not read"):
        assemble(batch["tokens"], local, sh)


def test_local_rows_and_process_index_are_exclusive():
    with pytest.raises(ValueError, match="either local"):
        pipeline.PreferenceIterator(
            RECORDS, batch_size=B, seed=0, fields=FIELDS, local=LocalRows.everything((B,)), process_index=0
        )
