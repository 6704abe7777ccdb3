"""The batch of a scan: measured on the scan's first slices (a stand-in clock here), set, or by memory."""

import pytest

from tfsdeploy.batching import MARGIN, BatchChoice, fuse_in_batches


class FakeScan:
    """A scan whose fusing only advances a stand-in clock by `per_slice[batch] * batch` seconds."""

    def __init__(self, per_slice: dict[int, float], first_call: float = 100.0):
        self.per_slice, self.first_call = per_slice, first_call
        self.now = 0.0
        self.calls: list[tuple[int, int]] = []

    def clock(self) -> float:
        return self.now

    def run(self, start: int, count: int) -> None:
        self.now += self.first_call if not self.calls else self.per_slice.get(count, 1.0) * count
        self.calls.append((start, count))


def fuse(per_slice, n, cap=4, **kw):
    scan, heard = FakeScan(per_slice), []
    choice = fuse_in_batches(n, scan.run, cap=cap, measure=True, clock=scan.clock,
                             on_choice=lambda c: heard.append((c, len(scan.calls))), **kw)
    assert [c for c, _ in heard] == [choice]
    covered = [i for start, count in scan.calls for i in range(start, start + count)]
    assert covered == list(range(n))  # every slice once, in order: the measured ones are kept
    return choice, scan.calls, heard[0][1]


def test_batch_one_wins_when_batching_costs_time_per_slice():
    choice, calls, before_choice = fuse({1: 1.0, 2: 1.4, 4: 2.0}, 8)
    # an untimed first slice, batch 1 timed, batch 2 slower: the measurement stops there
    assert calls == [(0, 1), (1, 1), (2, 2), (4, 1), (5, 1), (6, 1), (7, 1)]
    assert (choice.batch, choice.how, before_choice) == (1, "measured", 3)
    assert choice.per_slice_s == pytest.approx({1: 1.0, 2: 1.4})
    assert choice.describe() == "measured: 1.00 s a slice at batch 1, 1.40 s at 2"


def test_the_fastest_batch_is_kept_and_the_first_slower_one_ends_the_measurement():
    choice, calls, _ = fuse({1: 1.0, 2: 0.8, 4: 0.9, 8: 0.1}, 16, cap=8)
    assert choice.batch == 2 and choice.per_slice_s == pytest.approx({1: 1.0, 2: 0.8, 4: 0.9})  # 8 never tried
    assert calls[:4] == [(0, 1), (1, 1), (2, 2), (4, 4)] and set(c for _, c in calls[4:]) == {2}


def test_batches_grow_to_the_cap_while_they_keep_winning():
    choice, calls, _ = fuse({1: 1.0, 2: 0.5, 4: 0.25}, 16)
    assert choice.batch == 4 and calls == [(0, 1), (1, 1), (2, 2), (4, 4), (8, 4), (12, 4)]


def test_a_larger_batch_must_win_by_the_margin():
    assert fuse({1: 1.0, 2: 1.0 - MARGIN / 2, 4: 0.1}, 8)[0].batch == 1
    assert fuse({1: 1.0, 2: 1.0 - 2 * MARGIN, 4: 1.0}, 8)[0].batch == 2


def test_a_short_scan_measures_what_its_slices_allow():
    choice, calls, _ = fuse({1: 1.0, 2: 0.5}, 3)  # no room left to time batch 2
    assert (choice.batch, choice.how, calls) == (1, "measured", [(0, 1), (1, 1), (2, 1)])
    assert choice.per_slice_s == pytest.approx({1: 1.0})
    choice, calls, _ = fuse({}, 1)
    assert choice == BatchChoice(1, "one slice") and calls == [(0, 1)]


def test_a_set_batch_and_a_memory_batch_are_not_measured():
    scan, heard = FakeScan({3: 1.0, 2: 1.0, 5: 1.0}), []
    choice = fuse_in_batches(8, scan.run, batch=3, cap=4, measure=True, clock=scan.clock,
                             on_choice=lambda c: heard.append(len(scan.calls)))
    assert choice == BatchChoice(3, "set") and heard == [0] and scan.calls == [(0, 3), (3, 3), (6, 2)]
    scan = FakeScan({})
    assert fuse_in_batches(5, scan.run, cap=5, measure=False, clock=scan.clock) == BatchChoice(5, "by memory")
    assert scan.calls == [(0, 5)]
    scan = FakeScan({})
    assert fuse_in_batches(2, scan.run, cap=1, measure=True, clock=scan.clock).how == "by memory"
    with pytest.raises(ValueError):
        fuse_in_batches(0, scan.run)
