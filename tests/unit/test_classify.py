"""Stack classification and the watchdog's decisions: pure logic, fake clock, no Ray.

The dump texts are in the exact formats trainkit captures: ``py-spy dump --full-filenames
--subprocesses`` (innermost frame first, qualified function names) and faulthandler
(``File "...", line N in f``).
"""

from __future__ import annotations

import pytest

from trainkit.diagnostics.classify import classify_dump, is_user_frame, parse_dump, Frame
from trainkit.diagnostics.watchdog import Hang, Observation, Watchdog, summary_line

SP = "/usr/lib/python3.11/site-packages"
STD = "/usr/lib/python3.11"
TK = "/work/main/trainkit"


def pyspy(*threads, pid=4242, header=True):
    out = [f"Process {pid}: ray::RankWorker.run", "Python v3.11.7 (/usr/bin/python3.11)", ""] if header else []
    for name, frames in threads:
        out.append(f'Thread {pid + 1} (idle): "{name}"')
        out += [f"    {fn} ({path}:{line})" for fn, path, line in frames]
    return "\n".join(out) + "\n"


WORKER_TAIL = [
    ("RankWorker.run", f"{TK}/backends/ray/worker.py", 188),
    ("_resume_span", f"{SP}/ray/util/tracing/tracing_helper.py", 463),
    ("actor_method_executor", f"{SP}/ray/_private/function_manager.py", 689),
    ("Thread.run", f"{STD}/threading.py", 982),
]
MAIN = ("MainThread", [("main_loop", f"{SP}/ray/_private/worker.py", 946),
                       ("<module>", f"{SP}/ray/_private/workers/default_worker.py", 330)])


def test_a_rank_in_its_own_function_is_user_code_with_the_innermost_user_frame():
    text = pyspy(MAIN, ("Thread-2", [("stuck", "/home/u/proj/train.py", 12),
                                     ("train_fn", "/home/u/proj/train.py", 30),
                                     ("_Session.run_fn", f"{TK}/session.py", 10)] + WORKER_TAIL))
    c = classify_dump(text)
    assert c.classification == "user_code"
    assert c.user_frame == "stuck (train.py:12)"
    assert c.user_file == "/home/u/proj/train.py" and c.user_line == 12
    assert c.thread == "Thread-2"


def test_a_rank_blocked_in_all_reduce_is_in_a_collective_at_the_calling_line():
    text = pyspy(MAIN, ("Thread-2", [("all_reduce", f"{SP}/torch/distributed/distributed_c10d.py", 2806),
                                     ("wrapper", f"{SP}/torch/distributed/c10d_logger.py", 81),
                                     ("train_fn", "/home/u/proj/train.py", 44)] + WORKER_TAIL))
    c = classify_dump(text)
    assert (c.classification, c.user_frame) == ("collective", "train_fn (train.py:44)")


def test_a_rank_waiting_for_its_dataloader_is_in_data_loading_and_shows_the_worker_process():
    main = pyspy(MAIN, ("Thread-2", [("Condition.wait", f"{STD}/threading.py", 331),
                                     ("Queue.get", f"{STD}/multiprocessing/queues.py", 113),
                                     ("_MultiProcessingDataLoaderIter._try_get_data",
                                      f"{SP}/torch/utils/data/dataloader.py", 1251),
                                     ("_MultiProcessingDataLoaderIter._next_data",
                                      f"{SP}/torch/utils/data/dataloader.py", 1450),
                                     ("train_fn", "/home/u/proj/train.py", 50)] + WORKER_TAIL))
    child = pyspy(("MainThread", [("slow_item", "/home/u/proj/data.py", 7),
                                  ("Items.__getitem__", "/home/u/proj/data.py", 15),
                                  ("_MapDatasetFetcher.fetch", f"{SP}/torch/utils/data/_utils/fetch.py", 52),
                                  ("_worker_loop", f"{SP}/torch/utils/data/_utils/worker.py", 351),
                                  ("BaseProcess.run", f"{STD}/multiprocessing/process.py", 108)]), pid=5000)
    c = classify_dump(main + "\n" + "-" * 80 + "\n" + child)
    assert (c.classification, c.user_frame) == ("data_loading", "train_fn (train.py:50)")
    assert c.subprocesses == ({"pid": 5000, "classification": "data_loading",
                               "user_frame": "slow_item (data.py:7)"},)


def test_a_dataset_read_in_the_rank_itself_is_data_loading_with_the_getitem_frame():
    text = pyspy(MAIN, ("Thread-2", [("Items.__getitem__", "/home/u/proj/data.py", 15),
                                     ("_MapDatasetFetcher.fetch", f"{SP}/torch/utils/data/_utils/fetch.py", 52),
                                     ("train_fn", "/home/u/proj/train.py", 50)] + WORKER_TAIL))
    c = classify_dump(text)
    assert (c.classification, c.user_frame) == ("data_loading", "Items.__getitem__ (data.py:15)")


def test_a_rank_inside_report_is_classified_report():
    text = pyspy(MAIN, ("Thread-2", [("sleep_hook", "/work/main/fault_injection/worker.py", 20),
                                     ("_Session.report", f"{TK}/session.py", 120),
                                     ("report", f"{TK}/session.py", 230),
                                     ("train_fn", "/home/u/proj/train.py", 61)] + WORKER_TAIL))
    c = classify_dump(text)
    assert (c.classification, c.user_frame) == ("report", "train_fn (train.py:61)")


def test_the_training_thread_is_found_among_other_threads_by_its_worker_frame():
    other = ("Thread-9", [("helper", "/home/u/proj/train.py", 3), ("Thread.run", f"{STD}/threading.py", 982)])
    train = ("Thread-2", [("step", "/home/u/proj/train.py", 77)] + WORKER_TAIL)
    c = classify_dump(pyspy(MAIN, other, train))
    assert c.user_frame == "step (train.py:77)" and c.thread == "Thread-2"


def test_faulthandler_output_is_parsed_and_classified_the_same_way():
    text = (
        "Thread 0x00007f374f76d6c0 (most recent call first):\n"
        '  File "/home/u/proj/train.py", line 12 in stuck\n'
        '  File "/home/u/proj/train.py", line 30 in train_fn\n'
        f'  File "{TK}/backends/ray/worker.py", line 188 in run\n'
        f'  File "{STD}/threading.py", line 982 in run\n'
        "\n"
        "Current thread 0x00007f3750626b80 (most recent call first):\n"
        f'  File "{SP}/ray/_private/worker.py", line 946 in main_loop\n'
    )
    procs = parse_dump(text)
    assert len(procs) == 1 and len(procs[0].threads) == 2
    c = classify_dump(text)
    assert (c.classification, c.user_frame) == ("user_code", "stuck (train.py:12)")


def test_py_spy_locals_lines_are_not_frames():
    text = pyspy(("Thread-2", [("stuck", "/home/u/train.py", 8)]))
    text = text.replace("    stuck (/home/u/train.py:8)\n",
                        "    stuck (/home/u/train.py:8)\n        Arguments:\n            x (int): 1\n")
    assert [f.function for f in parse_dump(text)[0].threads[0].frames] == ["stuck"]


@pytest.mark.parametrize("path,user", [
    ("/home/u/proj/train.py", True),
    ("/tmp/pytest-of-root/test_x.py", True),
    (f"{SP}/torch/distributed/distributed_c10d.py", False),
    (f"{SP}/ray/_private/worker.py", False),
    (f"{STD}/threading.py", False),
    ("/root/.pyenv/versions/3.11.7/lib/python3.11/queue.py", False),
    (f"{TK}/session.py", False),
    ("<frozen importlib._bootstrap>", False),
    ("threading.py", False),
])
def test_user_frames_skip_trainkit_torch_ray_site_packages_and_stdlib(path, user):
    assert is_user_frame(Frame("f", path, 1)) is user


def test_a_gone_process_is_dead_and_an_empty_dump_is_unknown():
    assert classify_dump("", alive=False).classification == "dead"
    assert classify_dump("py-spy failed").classification == "unknown"


# -- the watchdog with a fake clock ------------------------------------------------------------------
def _obs(now, arrived=(0, 2, 3), started=10.0, key=("report", 3), progress=5.0, committed=2, size=4):
    return Observation(now=now, world_size=size, committed_index=committed, last_progress=progress,
                       round_key=key if arrived else None, round_started=started if arrived else 0.0,
                       arrived=frozenset(arrived))


def test_a_barrier_hang_is_reported_once_the_first_arrival_waited_longer_than_the_timeout():
    dog = Watchdog(2.0)
    assert dog.check(_obs(11.9)) is None
    hang = dog.check(_obs(12.0))
    assert hang == Hang("barrier", 3, "report 3", (1,), (0, 2, 3), 2.0, 0)


def test_warn_repeats_with_back_off_and_progress_resets_it():
    dog = Watchdog(2.0)
    times = [t / 10 for t in range(100, 400)]
    fired = [t for t in times if dog.check(_obs(t))]
    assert fired == [12.0, 14.0, 18.0, 26.0]  # timeout, then 2x, 4x, 8x after the first arrival
    # a new round (progress) starts over
    assert dog.check(_obs(40.0, started=39.0, key=("report", 4))) is None
    assert dog.check(_obs(41.0, started=39.0, key=("report", 4))).index == 4


def test_fail_and_restart_report_a_hang_only_once():
    dog = Watchdog(2.0, repeat=False)
    fired = [t for t in (12.0, 14.0, 18.0, 30.0) if dog.check(_obs(t))]
    assert fired == [12.0]


def test_no_report_at_all_for_the_timeout_is_a_hang_of_the_whole_group():
    dog = Watchdog(2.0)
    assert dog.check(_obs(6.9, arrived=())) is None
    hang = dog.check(_obs(7.0, arrived=()))
    assert (hang.kind, hang.missing_ranks, hang.index, hang.at) == ("group", (0, 1, 2, 3), 3, "after report 2")


def test_a_trainkit_collective_round_is_named_by_its_operation():
    hang = Watchdog(1.0).check(_obs(12.0, key=("barrier", 2)))
    assert hang.at == "barrier #2" and hang.index == 3


def test_the_summary_line_names_ranks_frames_and_classifications():
    h = Hang("barrier", 3, "report 3", (1,), (0, 2, 3), 5.0)
    line = summary_line(h, {1: {"classification": "user_code", "description": "in user code",
                                "user_frame": "stuck_in_user_code (train.py:12)"}})
    assert line == ("hang at report 3: rank 1 has not arrived after 5.0 s (ranks 0, 2, 3 waiting); "
                    "it is in stuck_in_user_code (train.py:12), in user code")
    h2 = Hang("barrier", 3, "report 3", (0, 2), (1,), 2.0)
    rows = {0: {"classification": "collective", "description": "in a torch.distributed collective",
                "user_frame": "f (t.py:4)"},
            2: {"classification": "dead", "description": "dead (its process is gone)", "user_frame": None}}
    assert summary_line(h2, rows).endswith("rank 0 is in f (t.py:4), in a torch.distributed collective; "
                                           "rank 2 is dead (its process is gone)")


def test_a_timeout_that_is_not_positive_is_refused():
    with pytest.raises(ValueError):
        Watchdog(0)
