import itertools
import math

import pytest

from reddino_train.config import load_config
from reddino_train.schedules import WarmupCosine, build_schedules, scaled_lr


def test_warmup_cosine_endpoints_are_exact():
    schedule = WarmupCosine(start=0.0, peak=3e-4, end=1e-6, total_iters=1000, warmup_iters=100)
    assert schedule(0) == 0.0
    assert schedule(50) == pytest.approx(1.5e-4)
    assert schedule(100) == 3e-4
    assert schedule(999) == 1e-6
    assert schedule(5000) == 1e-6
    # halfway through the cosine (iteration 100 + 899 / 2) the value is halfway
    assert schedule(100 + 899 / 2) == pytest.approx((3e-4 + 1e-6) / 2)
    values = [schedule(i) for i in range(100, 1000)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_frozen_iterations_are_zero_then_follow_the_schedule():
    base = WarmupCosine(start=0.0, peak=1.0, end=0.0, total_iters=50, warmup_iters=10)
    frozen = WarmupCosine(start=0.0, peak=1.0, end=0.0, total_iters=50, warmup_iters=10, frozen_iters=20)
    assert [frozen(i) for i in (0, 15, 19)] == [0.0, 0.0, 0.0]
    assert [frozen(i) for i in (20, 30, 49)] == [base(i) for i in (20, 30, 49)]


def test_rising_schedule_reaches_its_end():
    momentum = WarmupCosine(start=0.992, peak=0.992, end=1.0, total_iters=300)
    assert (momentum(0), momentum(299)) == (0.992, 1.0)


def test_sqrt_batch_scaling():
    assert scaled_lr(4e-3, 1024) == 4e-3
    assert scaled_lr(4e-3, 256) == pytest.approx(2e-3)


def test_dinov2_default_schedules():
    schedules = build_schedules(load_config("dinov2-vits14"), world_size=16)  # 16 x 64 = 1024
    total, warmup, freeze, temp_warmup = 100 * 1250, 10 * 1250, 1 * 1250, 30 * 1250
    start, end = schedules.at(0), schedules.at(total - 1)
    assert (start.lr, schedules.at(warmup).lr, end.lr) == (0.0, 4e-3, 1e-6)
    assert (start.weight_decay, end.weight_decay) == (0.04, 0.4)
    assert (start.teacher_momentum, end.teacher_momentum) == (0.992, 1.0)
    assert (start.teacher_temp, schedules.at(temp_warmup).teacher_temp, end.teacher_temp) == (0.04, 0.07, 0.07)
    assert schedules.at(temp_warmup // 2).teacher_temp == pytest.approx(0.055)
    assert schedules.at(freeze - 1).last_layer_lr == 0.0
    assert schedules.at(freeze).last_layer_lr == schedules.at(freeze).lr > 0
    # cosine, not straight, between the ends: a quarter of the way, (1 - cos(pi / 4)) / 2 = 14.6 % of the change
    quarter = total // 4
    assert schedules.at(quarter).weight_decay == pytest.approx(0.04 + 0.36 * (1 - math.cos(math.pi / 4)) / 2, abs=1e-4)
    assert schedules.at(quarter).teacher_momentum == pytest.approx(0.992 + 0.008 * (1 - math.cos(math.pi / 4)) / 2,
                                                                   abs=1e-6)
    halfway = warmup + (total - warmup) // 2
    assert schedules.at(halfway).lr == pytest.approx((4e-3 + 1e-6) / 2, rel=1e-3)


def test_reddino_schedules():
    schedules = build_schedules(load_config("reddino-vits14"), world_size=2)
    total, warmup = 10 * 3200, 320  # warm-up of 0.1 epoch
    assert schedules.at(warmup).lr == pytest.approx(2e-4 * math.sqrt(2 * 280 / 1024))
    assert schedules.at(0).last_layer_lr == schedules.at(0).lr == 0.0  # no frozen last layer
    assert schedules.at(1).last_layer_lr == schedules.at(1).lr > 0
    assert (schedules.at(0).weight_decay, schedules.at(total - 1).weight_decay) == (0.04, 0.2)
    assert schedules.at(total - 1).teacher_momentum == 1.0
    # RedDino trains 10 epochs with a 30-epoch temperature warm-up: it ends a third of the way
    assert schedules.at(total).teacher_temp == pytest.approx(0.04 + 0.03 * total / (30 * 3200))
