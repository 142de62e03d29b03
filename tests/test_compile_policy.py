"""Compiling by measurement: the warm-start cache entries and records, and the decision whether compiling pays."""

import json

import pytest

from t5hooks import compile_cache
from t5hooks.compile_cache import CompileCache, cache_root, machine_tag
from t5hooks.compile_policy import CompileCost, SwitchWhenPaid, compile_pays, expected_cost


def test_cache_location_keys_and_clear(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "cc"))
    assert cache_root() == tmp_path / "cc"
    import torch

    assert machine_tag().startswith(f"torch-{torch.__version__}-py")  # one directory per torch build and machine
    a, b = CompileCache({"what": "x", "config": {"d_model": 8}}), CompileCache({"what": "x", "config": {"d_model": 16}})
    assert a.artifacts != b.artifacts and a.artifacts.parent == tmp_path / "cc" / machine_tag()
    assert CompileCache({"config": {"d_model": 8}, "what": "x"}).artifacts == a.artifacts  # key order does not matter
    a.record(cold_s=12.5)
    a.record(speedup=1.3)
    assert a.measurements() == {"cold_s": 12.5, "speedup": 1.3}
    assert json.loads(a.record_path.read_text())["key"]["config"] == {"d_model": 8}
    assert compile_cache.clear() == 1 and not (tmp_path / "cc").exists()
    assert compile_cache.clear() == 0


def test_a_damaged_entry_is_ignored(tmp_path):
    entry = CompileCache({"what": "x"}, root=tmp_path)
    entry.artifacts.parent.mkdir(parents=True, exist_ok=True)
    entry.artifacts.write_bytes(b"not a cache")
    assert entry.load() is False  # a cold compile follows and its save replaces the entry


def test_expected_cost_prefers_measurements(tmp_path):
    entry = CompileCache({"what": "x"}, root=tmp_path)
    default = expected_cost(entry, "cpu", training=True)
    assert not default.warm and "default" in default.basis
    entry.record(cold_s=40.0, warm_s=3.0, speedup=1.5)
    cold = expected_cost(entry, "cpu", training=True)
    assert (cold.compile_s, cold.speedup, cold.warm) == (40.0, 1.5, False)
    entry.artifacts.write_bytes(b"x")  # artefacts saved: the next compile is warm
    warm = expected_cost(entry, "cpu", training=True)
    assert (warm.compile_s, warm.warm) == (3.0, True) and "measured here" in warm.basis
    assert "about 3 s" in warm.describe()


def test_compile_pays_only_when_the_saving_exceeds_the_cost():
    cost = CompileCost(compile_s=30.0, speedup=1.5, warm=False, basis="test")
    assert not compile_pays(0.1, 100, cost)  # 10 s of eager work can save 3.3 s < 30 s
    assert compile_pays(0.1, 1000, cost)  # 100 s can save 33 s > 30 s
    assert not compile_pays(10.0, 10**6, CompileCost(1.0, 1.0, False, "no speed-up"))


def test_switch_when_paid_known_and_unknown_remaining_work():
    switch = SwitchWhenPaid(CompileCost(compile_s=20.0, speedup=2.0, warm=False, basis="test"), settle=1)
    switch.observe(5.0, 100)  # warm-up step: not counted
    assert switch.eager_rate is None and not switch.should_compile(10**9)
    switch.observe(1.0, 100)  # 0.01 s per token
    assert switch.eager_rate == pytest.approx(0.01)
    assert not switch.should_compile(remaining_work=3000)  # 30 s eager -> saves 15 s < 20 s
    assert switch.should_compile(remaining_work=5000)  # 50 s eager -> saves 25 s > 20 s
    # unknown remaining work: compile once half the eager time spent (the saving rate) reaches the compile cost
    for _ in range(38):
        switch.observe(1.0, 100)
    assert not switch.should_compile(None)  # 39 s spent, 19.5 s would have been saved
    switch.observe(1.0, 100)
    assert switch.should_compile(None)
    never = SwitchWhenPaid(CompileCost(compile_s=0.0, speedup=1.0, warm=True, basis="cpu"))
    never.observe(1.0, 1)
    never.observe(1.0, 1)
    assert not never.should_compile(10**9) and not never.should_compile(None)


def test_switch_records_the_measured_speed_up_for_the_next_choice(tmp_path):
    """After the switch, the compiled steps are timed (the first, which compiles, is not counted) and their
    speed-up over the eager steps is kept in the work's cache entry: the next run's expected cost uses it."""
    entry = CompileCache({"what": "x"}, root=tmp_path)
    switch = SwitchWhenPaid(expected_cost(entry, "cpu", training=True), record=entry)
    for seconds in (9.0, 2.0, 2.0):  # eager: a warm-up step, then 0.02 s per unit of work
        switch.observe(seconds, 100)
    for seconds in (60.0, 0.5, 0.5):  # the compile, then two compiled steps: not yet three measured
        switch.observe_compiled(seconds, 100)
    assert "speedup" not in entry.measurements()
    switch.observe_compiled(0.5, 100)
    assert entry.measurements()["speedup"] == pytest.approx(4.0)
    assert expected_cost(entry, "cpu", training=True).speedup == pytest.approx(4.0)


def test_a_small_training_job_stays_eager_by_default(capsys, monkeypatch):
    """`train_tiny` with its default `compile=None` on CPU: the measured eager steps decide, compiling would not
    pay for a few steps (at the CPU defaults, a 5 % saving against a 148 s compile), so nothing is compiled or announced."""
    from torch._dynamo.utils import counters

    from t5hooks.apps.commands import train_tiny as module

    monkeypatch.setattr(module, "exact_match_accuracy", lambda *a: 0.0)  # the held-out evaluation is not the point
    graphs = counters["stats"]["unique_graphs"]
    module.train_tiny(steps=4, batch_size=4, progress=False)
    assert counters["stats"]["unique_graphs"] == graphs
    assert "t5hooks: compiling" not in capsys.readouterr().err
