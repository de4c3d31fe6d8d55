"""Every schedule against hand-computed values: start, middle and end of a cycle, restarts."""

from __future__ import annotations

import math

import pytest

from fedcycle.config import ConfigError, RunSettings
from fedcycle.schedules import SCHEDULES, Envelope, LRSchedule, local_epochs_for_round

LO, HI, CYCLE = 0.01, 0.11, 10  # a 10-step cycle between 0.01 and 0.11


def lrs(name: str, steps: range, **kw) -> list[float]:
    schedule = LRSchedule(name=name, lr_min=LO, lr_max=HI, **kw)
    return [schedule.lr_at(step, CYCLE) for step in steps]


@pytest.mark.parametrize(
    "name, step, expected",
    [
        ("constant", 0, HI), ("constant", 7, HI), ("constant", 123, HI),
        # triangular: up for 5 steps, down for 5, restart
        ("triangular", 0, 0.01), ("triangular", 2, 0.05), ("triangular", 5, 0.11),
        ("triangular", 7, 0.07), ("triangular", 10, 0.01), ("triangular", 15, 0.11),
        # triangular2: the amplitude halves every cycle
        ("triangular2", 5, 0.11), ("triangular2", 10, 0.01), ("triangular2", 15, 0.06), ("triangular2", 25, 0.035),
        # exp_range (gamma 0.9): amplitude times gamma**step
        ("exp_range", 0, 0.01), ("exp_range", 2, 0.01 + 0.1 * 0.4 * 0.81), ("exp_range", 5, 0.01 + 0.1 * 0.9**5),
        # cosine with warm restarts (SGDR): from lr-max down to lr-min, then restart
        ("cosine", 0, 0.11), ("cosine", 5, 0.06), ("cosine", 10, 0.11),
        ("cosine", 12, 0.01 + 0.05 * (1 + math.cos(math.pi * 2 / 10))),
        ("cosine", 9, 0.01 + 0.05 * (1 + math.cos(math.pi * 9 / 10))),
    ],
)
def test_schedule_values(name, step, expected):
    got = lrs(name, range(step, step + 1), gamma=0.9)[0]
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_triangular_is_periodic_and_symmetric():
    values = lrs("triangular", range(0, 30))
    assert values[:10] == pytest.approx(values[10:20])
    assert values[:10] == pytest.approx(values[20:30])
    assert values[1:5] == pytest.approx(values[9:5:-1])


def test_cycle_units_set_cycle_length_in_steps():
    s = LRSchedule(cycle_unit="round", cycle_length=1)
    assert s.cycle_steps(steps_per_epoch=50, epochs_this_round=3) == 150
    assert LRSchedule(cycle_unit="round", cycle_length=2).cycle_steps(50, 3) == 300
    assert LRSchedule(cycle_unit="epochs", cycle_length=1.5).cycle_steps(50, 3) == 75
    assert LRSchedule(cycle_unit="steps", cycle_length=40).cycle_steps(50, 3) == 40


def test_a_cycle_of_two_rounds_continues_across_rounds():
    s = LRSchedule(name="triangular", lr_min=LO, lr_max=HI, cycle_unit="round", cycle_length=2)
    cycle = s.cycle_steps(steps_per_epoch=5, epochs_this_round=1)
    assert cycle == 10
    assert s.start_step(5, 1, server_round=1, epochs_before=0) == 0
    round2 = s.start_step(5, 1, server_round=2, epochs_before=1)
    assert s.lr_at(round2, cycle) == pytest.approx(HI)  # round 2 starts at the peak
    assert s.lr_at(s.start_step(5, 1, server_round=3, epochs_before=2), cycle) == pytest.approx(LO)


def test_epoch_cycles_start_where_the_last_round_stopped():
    s = LRSchedule(name="cosine", lr_min=LO, lr_max=HI, cycle_unit="epochs", cycle_length=4)
    assert s.start_step(steps_per_epoch=10, epochs_this_round=2, server_round=2, epochs_before=2) == 20
    assert s.lr_at(20, s.cycle_steps(10, 2)) == pytest.approx(0.06)  # half-way down the 40-step cycle


def test_config_round_trip():
    s = LRSchedule(name="exp_range", lr_min=0.001, lr_max=0.2, cycle_unit="epochs", cycle_length=3, gamma=0.95)
    wire = s.to_config()
    assert wire == {"lr-schedule": "exp_range", "lr-min": 0.001, "lr-max": 0.2, "lr-cycle-unit": "epochs",
                    "lr-cycle-length": 3, "lr-gamma": 0.95}
    assert LRSchedule.from_config(wire) == s


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "sawtooth"}, "lr-schedule='sawtooth' is unknown; choose one of"),
        ({"lr_min": 0.2, "lr_max": 0.1}, "lr-min=0.2 must be between 0 and lr-max=0.1"),
        ({"lr_max": 0.0}, "lr-max=0.0 must be a positive number"),
        ({"name": "constant", "lr_min": 0.5, "lr_max": 0.1}, "lr-min=0.5 must be between 0 and lr-max=0.1"),
        ({"cycle_unit": "hours"}, "lr-cycle-unit='hours' is unknown"),
        ({"cycle_length": 0}, "lr-cycle-length=0 must be above 0"),
    ],
)
def test_bad_schedules_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        LRSchedule(**kwargs)


def test_local_epochs_grow_with_the_round_up_to_the_cap():
    assert [local_epochs_for_round(2, 0.0, 0, r) for r in (1, 5, 50)] == [2, 2, 2]
    assert [local_epochs_for_round(1, 0.5, 3, r) for r in (1, 2, 3, 4, 5, 9)] == [1, 1, 2, 2, 3, 3]
    assert local_epochs_for_round(1, 1.0, 0, 10) == 10


def test_an_exponential_envelope_decays_the_peak_per_cycle_after_a_warm_up():
    s = LRSchedule(name="triangular", lr_min=LO, lr_max=HI, cycle_unit="round", cycle_length=2)
    envelope = Envelope("exponential", decay=0.5, warmup_rounds=1)
    # cycles of 2 rounds: the peak's span (0.1) x1, x1, x0.5, x0.5, x0.25; round 1 warms up at 1/2
    peaks = [envelope.apply(s, r, num_rounds=6).lr_max for r in range(1, 7)]
    assert peaks == pytest.approx([0.06, 0.11, 0.06, 0.06, 0.035, 0.035])
    # what a site's scheduler does with round 3's and 4's schedule (a 10-step cycle over 2 rounds of 5
    # steps): the cycle's start at lr-min, its middle at the decayed peak, its end back near lr-min
    r3, r4 = envelope.apply(s, 3, 6), envelope.apply(s, 4, 6)
    cycle = s.cycle_steps(steps_per_epoch=5, epochs_this_round=1)
    assert r3.lrs(r3.start_step(5, 1, 3, 2), 5, cycle) == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05])
    assert r4.lrs(r4.start_step(5, 1, 4, 3), 5, cycle) == pytest.approx([0.06, 0.05, 0.04, 0.03, 0.02])


def test_a_cosine_envelope_spans_the_run_and_never_falls_below_lr_min():
    s = LRSchedule(name="triangular", lr_min=LO, lr_max=HI)  # a cycle per round
    envelope = Envelope("cosine")
    peaks = [envelope.apply(s, r, num_rounds=4).lr_max for r in range(1, 5)]
    expected = [LO + 0.5 * (1 + math.cos(math.pi * t / 4)) * (HI - LO) for t in range(4)]
    assert peaks == pytest.approx(expected) and peaks[0] == HI and min(peaks) > LO
    # per-epoch cycles: the envelope's clock is the round
    epochs = LRSchedule(name="cosine", lr_min=LO, lr_max=HI, cycle_unit="epochs", cycle_length=1)
    assert Envelope("exponential", decay=0.9).apply(epochs, 3, 10).lr_max == pytest.approx(LO + 0.81 * (HI - LO))


def test_the_server_sends_each_round_its_enveloped_peak():
    settings = RunSettings.from_run_config(
        {"lr-min": 0.01, "lr-max": 0.11, "lr-envelope": "exponential", "lr-decay": 0.5, "lr-warmup-rounds": 2,
         "num-server-rounds": 4}
    )
    assert [settings.schedule_for_round(r).lr_max for r in (1, 2, 3, 4)] == pytest.approx(
        [0.01 + 0.1 / 3, 0.01 + 0.1 * 0.5 * 2 / 3, 0.01 + 0.1 * 0.25, 0.01 + 0.1 * 0.125]
    )
    assert RunSettings().schedule_for_round(7) == RunSettings().schedule  # flat: unchanged


@pytest.mark.parametrize(
    "config, message",
    [
        ({"lr-envelope": "linear"}, "lr-envelope='linear' is unknown; choose one of ['flat', 'exponential', 'cosine']"),
        ({"lr-decay": 0.0}, "lr-decay=0.0 must be in (0, 1]"),
        ({"lr-warmup-rounds": -1}, "lr-warmup-rounds=-1 must be at least 0"),
        ({"swa-start": -2}, "swa-start=-2 must be at least 0"),
    ],
)
def test_bad_envelopes_name_the_key(config, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        RunSettings.from_run_config(config)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("cycle", [1, 2, 7, 10])
def test_every_schedule_starts_anywhere_where_an_uninterrupted_one_would_be(name, cycle):
    schedule = LRSchedule(name=name, lr_min=LO, lr_max=HI, gamma=0.97)
    steps = schedule.lrs(0, 60, cycle)  # one scheduler stepped from 0 without stopping
    for start in (0, 1, cycle, 23, 59):  # a round (or a resumed run) starting at `start`
        assert schedule.lrs(start, 60 - start, cycle) == pytest.approx(steps[start:], rel=1e-12, abs=1e-15)


def test_a_one_step_cycle_repeats_every_step():
    one = LRSchedule(name="triangular", lr_min=LO, lr_max=HI)
    assert [one.lr_at(step, 1) for step in range(5)] == pytest.approx([LO] * 5)  # period 1, not 2
    assert [LRSchedule(name="cosine", lr_min=LO, lr_max=HI).lr_at(step, 1) for step in range(3)] == pytest.approx([HI] * 3)


def test_the_steps_unit_counts_the_steps_trained_before():
    s = LRSchedule(name="triangular", lr_min=LO, lr_max=HI, cycle_unit="steps", cycle_length=4)
    start = s.start_step(steps_per_epoch=3, epochs_this_round=1, server_round=3, epochs_before=2)
    assert start == 6  # 2 epochs of 3 steps: half-way through the second 4-step cycle
    assert s.lrs(start, 3, s.cycle_steps(3, 1)) == pytest.approx([HI, 0.06, LO])


def test_growing_local_epochs_keep_each_round_a_whole_cycle_and_decay_by_the_steps_trained():
    # 5 steps per epoch; local epochs 1, 2, 3 in rounds 1, 2, 3: round 3 has 15 steps, 15 trained before it
    s = LRSchedule(name="exp_range", lr_min=LO, lr_max=HI, gamma=0.9)
    start = s.start_step(steps_per_epoch=5, epochs_this_round=3, server_round=3, epochs_before=3)
    rates = s.lrs(start, 15, s.cycle_steps(5, 3), steps_before=15)
    assert rates[0] == pytest.approx(LO)  # the round starts its own cycle
    # its peak, 7 steps in, decayed by the 15 + 7 steps trained so far (not 30 + 7)
    assert max(rates) == pytest.approx(LO + (HI - LO) * 0.9 ** (15 + 7))
    assert max(rates) == pytest.approx(rates[7])
    # triangular2 halves per cycle: round 3 is the third cycle
    t2 = LRSchedule(name="triangular2", lr_min=LO, lr_max=HI)
    assert max(t2.lrs(start, 15, t2.cycle_steps(5, 3), steps_before=15)) == pytest.approx(LO + (HI - LO) / 4)
