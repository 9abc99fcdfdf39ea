"""Store-level guarantees: manifest updates from concurrent processes are never lost."""

import multiprocessing

from trakwomp.store import Store


def add_entries(location, worker, count):
    handle = Store.open(location)
    for i in range(count):
        handle.set_entry("scores", f"w{worker}-{i}", {"worker": worker, "i": i})


def test_concurrent_manifest_updates_from_processes_are_all_kept(tmp_path):
    Store.open(tmp_path / "s", create=True)
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=add_entries, args=(str(tmp_path / "s"), w, 15)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join()
    assert [p.exitcode for p in workers] == [0] * 4
    scores = Store.open(tmp_path / "s").manifest["scores"]
    assert sorted(scores) == sorted(f"w{w}-{i}" for w in range(4) for i in range(15))
