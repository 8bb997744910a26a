"""Distillation schedules against the rules of their sources (temperature decay, progressive
transfer, accuracy-driven temperature, DKD's warm-up), values worked by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import schedules


def test_linear_temperature():
  sched = schedules.linear_temperature(10.0, 1.0, 100)
  # T(step) = 10 - 9 * step / 100, then constant.
  for step, expected in [(0, 10.0), (25, 7.75), (50, 5.5), (100, 1.0), (150, 1.0)]:
    assert float(sched(step)) == pytest.approx(expected, rel=1e-6)


def test_progressive_transfer_three_phases():
  temp, alpha = schedules.progressive_transfer(1000)
  # Phase 1: [0, 500): T 8, a 0.9. Phase 2: [500, 800): linear to T 2, a 0.7. Phase 3: T 1, a 0.5.
  expected = {0: (8.0, 0.9), 499: (8.0, 0.9), 500: (8.0, 0.9), 650: (5.0, 0.8),
              799: (8.0 - 6.0 * 299 / 300, 0.9 - 0.2 * 299 / 300), 800: (1.0, 0.5), 999: (1.0, 0.5)}
  for step, (t, a) in expected.items():
    assert float(temp(step)) == pytest.approx(t, rel=1e-5), step
    assert float(alpha(step)) == pytest.approx(a, rel=1e-5), step


def test_progressive_transfer_rejects_bad_fractions():
  with pytest.raises(ValueError, match="fractions"):
    schedules.progressive_transfer(100, fractions=(0.5, 0.5, 0.5))


def test_dkd_warmup_matches_mdistiller_rule():
  steps_per_epoch = 10
  sched = schedules.dkd_warmup(20 * steps_per_epoch)
  for step in [0, 1, 55, 199, 200, 1000]:
    assert float(sched(step)) == pytest.approx(min(step / 200, 1.0), abs=1e-7)
  assert float(schedules.dkd_warmup(0)(0)) == 1.0


def test_dkd_warmup_is_the_float32_formula_exactly():
  """min(float32(step) / warmup, 1) in float32, bit for bit, also inside jit on an int32 step
  (the train step's warm-up weight is this function)."""
  sched = schedules.dkd_warmup(300)
  jitted = jax.jit(sched)
  for step in [0, 1, 7, 101, 299, 300, 4000]:
    want = np.minimum(np.float32(step) / np.float32(300), np.float32(1))
    assert np.asarray(sched(step)) == want and np.asarray(jitted(jnp.int32(step))) == want
    assert np.asarray(jitted(jnp.int32(step))).dtype == np.float32


@pytest.mark.parametrize("acc,expected", [(0.0, 1.0), (0.6999, 1.0), (0.70, 3.0), (0.85, 3.0),
                                          (0.8999, 3.0), (0.90, 5.0), (0.99, 5.0)])
def test_temperature_from_accuracy(acc, expected):
  assert float(schedules.temperature_from_accuracy(acc)) == expected


def test_schedules_jit():
  temp, alpha = schedules.progressive_transfer(100)
  f = jax.jit(lambda s: (temp(s), alpha(s), schedules.temperature_from_accuracy(s / 100.0)))
  t, a, acc_t = f(jnp.int32(90))
  assert float(t) == 1.0 and float(a) == pytest.approx(0.5) and float(acc_t) == 5.0


# ------------------------------------------------------------------------------------------------
# Specs in configs (schedules.parse / check / parse_duration), against NumPy float64 formulas.

KEY_T = "student.loss.temperature"
STEPS = [0, 1, 2, 49, 50, 51, 99, 100, 101, 199, 200, 201, 499, 500, 501, 999, 1000, 5000]


def _values(sched, steps=STEPS):
  return np.array([float(sched(jnp.int32(s))) for s in steps], np.float64)


def _linear_ref(a, b, n, steps=STEPS):
  s = np.asarray(steps, np.float64)
  return a + (b - a) * np.minimum(s / max(n, 1), 1.0)


@pytest.mark.parametrize("spec,expected", [(4, 4.0), (0.9, 0.9), ("4", 4.0), ("0.9", 0.9),
                                           (" 1e-3 ", 1e-3), ("-2.5", -2.5),
                                           ("constant(2.5)", 2.5), ("constant( 7 )", 7.0),
                                           (np.float32(3.0), 3.0)])
def test_parse_numbers_are_plain_floats(spec, expected):
  value = schedules.parse(spec, key=KEY_T)
  assert type(value) is float and value == expected
  schedules.check(spec, key=KEY_T)


def test_parse_passes_callables_and_none():
  sched = schedules.linear_temperature(10.0, 1.0, 100)
  assert schedules.parse(sched, key=KEY_T) is sched
  assert schedules.parse(None, key="student.loss.kd_alpha") is None


@pytest.mark.parametrize("spec,a,b,n,total,spe", [
    ("linear(10, 1)", 10.0, 1.0, 1000, 1000, None),
    ("linear( 10 , 1 )", 10.0, 1.0, 200, 200, None),
    ("linear(10, 1, 20ep)", 10.0, 1.0, 200, None, 10),
    ("linear(10,1,20 epochs)", 10.0, 1.0, 200, None, 10),
    ("linear(4, 2, 0.5ep)", 4.0, 2.0, 50, None, 100),
    ("linear(0.9, 0.5, 500steps)", 0.9, 0.5, 500, None, None),
    ("linear(1, 3, 1step)", 1.0, 3.0, 1, None, None),
    ("linear(1, 3, 0steps)", 1.0, 3.0, 1, None, None),  # at least one transition step
    ("linear(8, 2, 50%)", 8.0, 2.0, 500, 1000, None),
    ("linear(8, 2, 12.5%)", 8.0, 2.0, 100, 800, None),
])
def test_parse_linear(spec, a, b, n, total, spe):
  sched = schedules.parse(spec, key=KEY_T, total_steps=total, steps_per_epoch=spe)
  np.testing.assert_allclose(_values(sched), _linear_ref(a, b, n), rtol=1e-6)
  schedules.check(spec, key=KEY_T)


def test_parse_warmup_is_dkd_warmup_bit_for_bit():
  sched = schedules.parse("warmup(20ep)", key="student.loss.warmup", steps_per_epoch=10)
  ref = schedules.dkd_warmup(200)
  jitted, jitted_ref = jax.jit(sched), jax.jit(ref)
  for step in STEPS:
    want = np.minimum(np.float32(step) / np.float32(200), np.float32(1))
    assert np.asarray(sched(step)) == np.asarray(ref(step)) == want
    # Under jit, XLA may turn the division by the constant into a multiplication by its
    # reciprocal (1 ulp off at some steps): the same for both, so still bit for bit.
    got = np.asarray(jitted(jnp.int32(step)))
    assert got == np.asarray(jitted_ref(jnp.int32(step))) and got.dtype == np.float32
    np.testing.assert_allclose(got, min(step / 200, 1.0), rtol=1e-6)


@pytest.mark.parametrize("spec,scale,n,total,spe", [
    ("warmup(50%, 0.5)", 0.5, 500, 1000, None),
    ("warmup( 300steps , 2 )", 2.0, 300, None, None),
    ("warmup(1.5ep)", 1.0, 15, None, 10),
    ("warmup(0steps)", 1.0, 0, None, None),
    ("warmup(0ep, 2.5)", 2.5, 0, None, 10),
])
def test_parse_warmup(spec, scale, n, total, spe):
  sched = schedules.parse(spec, key="student.loss.kd_weight", total_steps=total,
                          steps_per_epoch=spe)
  s = np.asarray(STEPS, np.float64)
  want = scale * (np.ones_like(s) if n == 0 else np.minimum(s / n, 1.0))
  np.testing.assert_allclose(_values(sched), want, rtol=1e-6)


def test_parse_progressive_is_the_published_rule():
  """T 8 / alpha 0.9 for the first 50%, linearly to T 2 / alpha 0.7 over the next 30%, then
  T 1 / alpha 0.5."""
  total = 1000
  temp = schedules.parse("progressive", key=KEY_T, total_steps=total)
  alpha = schedules.parse(" progressive ", key="student.loss.kd_alpha", total_steps=total)
  s = np.asarray(STEPS + [650, 700, 799, 800, 801], np.float64)

  def rule(v1, v2, v3):
    ramp = v1 + (v2 - v1) * (s - 500) / 300
    return np.where(s < 500, v1, np.where(s < 800, ramp, v3))

  steps = [int(x) for x in s]
  np.testing.assert_allclose(_values(temp, steps), rule(8, 2, 1), rtol=1e-6)
  np.testing.assert_allclose(_values(alpha, steps), rule(0.9, 0.7, 0.5), rtol=1e-6)


def test_parse_from_accuracy():
  rule = schedules.parse("from_accuracy", key=KEY_T)
  assert rule == schedules.AccuracyRule() and rule.initial == 1.0


def test_accuracy_rule_agrees_with_temperature_from_accuracy():
  grid = np.concatenate([np.linspace(0.0, 1.0, 401), [0.7, 0.9, 0.6999, 0.7001, 0.8999, 0.9001,
                                                      np.nextafter(np.float32(0.7), 0),
                                                      np.nextafter(np.float32(0.9), 1)]])
  for thresholds, values in [((0.70, 0.90), (1.0, 3.0, 5.0)), ((0.5,), (2.0, 4.0))]:
    rule = schedules.AccuracyRule(thresholds, values)
    for acc in grid:
      want = float(schedules.temperature_from_accuracy(acc, thresholds=thresholds,
                                                       temperatures=values))
      assert rule(float(acc)) == want, acc
      # By hand: values[number of thresholds <= acc].
      assert rule(float(acc)) == values[sum(np.float32(t) <= np.float32(acc)
                                            for t in thresholds)]
  rule = schedules.AccuracyRule()
  assert (rule(0.0), rule(0.6999), rule(0.7), rule(0.8999), rule(0.9), rule(1.0)) == (
      1.0, 1.0, 3.0, 3.0, 5.0, 5.0)
  with pytest.raises(ValueError, match="85.0"):
    rule(85.0)
  with pytest.raises(ValueError, match="one more value"):
    schedules.AccuracyRule((0.5,), (1.0,))
  with pytest.raises(ValueError, match="increasing"):
    schedules.AccuracyRule((0.9, 0.7), (1.0, 2.0, 3.0))


@pytest.mark.parametrize("key,spec,fragment", [
    (KEY_T, "linear(10)", "2 or 3 arguments"),
    (KEY_T, "linear(10, 1, 20)", "no unit"),
    (KEY_T, "linear(10, 1, 20ep, 3)", "2 or 3 arguments"),
    (KEY_T, "linear(a, 1)", "must be a number"),
    (KEY_T, "linear(10, , 1)", "empty argument"),
    (KEY_T, "linear", "needs its arguments"),
    (KEY_T, "Linear(10, 1)", "lower case"),
    (KEY_T, "cosine(10, 1)", "unknown schedule"),
    (KEY_T, "fast", "not a schedule spec"),
    (KEY_T, "", "not a schedule spec"),
    (KEY_T, "4 5", "not a schedule spec"),
    (KEY_T, "nan", "not a schedule spec"),
    (KEY_T, "constant()", "one argument"),
    (KEY_T, "constant(1, 2)", "one argument"),
    (KEY_T, "progressive()", "no arguments"),
    ("student.loss.kd_weight", "warmup(-5ep)", "negative"),
    ("student.loss.kd_weight", "warmup(2.5steps)", "whole number"),
    ("student.loss.kd_weight", "warmup(20min)", "unknown duration unit"),
    ("student.loss.kd_weight", "warmup(ep)", "not a duration"),
    ("student.loss.kd_weight", "warmup()", "1 or 2 arguments"),
    ("student.loss.kd_weight", "warmup(20ep, x)", "must be a number"),
    ("student.loss.beta", "progressive", "temperature and kd_alpha"),
    ("student.loss.kd_alpha", "from_accuracy", "temperature only"),
    (KEY_T, True, "boolean"),
    (KEY_T, [1, 2], "list"),
])
def test_bad_specs_raise_naming_key_and_value(key, spec, fragment):
  for fn in (lambda: schedules.check(spec, key=key),
             lambda: schedules.parse(spec, key=key, total_steps=100, steps_per_epoch=10)):
    with pytest.raises(ValueError) as err:
      fn()
    message = str(err.value)
    assert message.startswith(f"{key}={spec!r}: "), message
    assert fragment in message, message
    assert "accepted" in message or "DUR" in message or "unit" in message, message


def test_bare_number_duration_says_add_a_unit():
  with pytest.raises(ValueError) as err:
    schedules.check("warmup(20)", key="student.loss.kd_weight")
  assert "20ep" in str(err.value) and "20steps" in str(err.value) and "20%" in str(err.value)


@pytest.mark.parametrize("spec,missing", [("linear(10, 1)", "total_steps"),
                                          ("linear(10, 1, 50%)", "total_steps"),
                                          ("progressive", "total_steps"),
                                          ("warmup(20ep)", "steps_per_epoch")])
def test_parse_needs_the_steps(spec, missing):
  schedules.check(spec, key=KEY_T)
  with pytest.raises(ValueError, match=missing) as err:
    schedules.parse(spec, key=KEY_T)
  assert str(err.value).startswith(f"{KEY_T}={spec!r}")


@pytest.mark.parametrize("text,total,spe,steps", [
    ("20ep", None, 10, 200), ("20 epochs", None, 10, 200), ("1epoch", None, 7, 7),
    ("0.5ep", None, 10, 5), ("0.25ep", None, 6, 2), ("500steps", None, None, 500),
    ("1 step", None, None, 1), ("0steps", None, None, 0), ("50%", 1000, None, 500),
    ("12.5%", 80, None, 10), ("100%", 37, None, 37)])
def test_parse_duration(text, total, spe, steps):
  assert schedules.parse_duration(text, key="k", total_steps=total, steps_per_epoch=spe) == steps


@pytest.mark.parametrize("text,fragment", [("20", "no unit"), ("-3ep", "negative"),
                                           ("3.5steps", "whole number"), ("ep", "not a duration"),
                                           ("3 weeks", "unknown duration unit"),
                                           (20, "a duration is a string")])
def test_parse_duration_errors(text, fragment):
  with pytest.raises(ValueError, match=fragment) as err:
    schedules.parse_duration(text, key="stage.until", total_steps=100, steps_per_epoch=10)
  assert str(err.value).startswith(f"stage.until={text!r}: ")
  with pytest.raises(ValueError, match="steps_per_epoch"):
    schedules.parse_duration("2ep", key="k")


def test_is_scheduled_and_describe():
  assert not schedules.is_scheduled(4.0) and not schedules.is_scheduled("0.9")
  assert not schedules.is_scheduled(None)
  assert schedules.is_scheduled("linear(10, 1)") and schedules.is_scheduled("constant(2)")
  assert schedules.is_scheduled(schedules.dkd_warmup(10))
  assert schedules.is_scheduled(schedules.AccuracyRule())
  assert schedules.describe(" linear( 10 ,1, 20 ep ) ") == "linear(10, 1, 20ep)"
  assert schedules.describe("4") == "4" and schedules.describe(0.9) == "0.9"
  assert schedules.describe(schedules.AccuracyRule()) == (
      "from_accuracy (1 below 0.7, 3 below 0.9, 5 from 0.9)")


# ------------------------------------------------------------------------------------------------
# Staged distillation phases.

TERMS = ("ce", "kd", "features", "lstm")


def test_parse_phases_active_under_jit():
  phases = schedules.parse_phases(("features until 20ep", "features + lstm until 50ep", "all"),
                                  key="student.loss.phases", terms=TERMS, steps_per_epoch=10)
  assert phases.boundaries == (200, 500)
  f = jax.jit(lambda s: (jnp.stack([phases.active(t, s) for t in TERMS]), phases.index(s)))
  # Phase i covers [boundary_{i-1}, boundary_i): 0..199 features; 200..499 +lstm; then all.
  table = {0: (0, [0, 0, 1, 0]), 1: (0, [0, 0, 1, 0]), 199: (0, [0, 0, 1, 0]),
           200: (1, [0, 0, 1, 1]), 499: (1, [0, 0, 1, 1]), 500: (2, [1, 1, 1, 1]),
           10**6: (2, [1, 1, 1, 1])}
  for step, (index, active) in table.items():
    got, got_index = f(jnp.int32(step))
    assert got.dtype == jnp.float32 and got_index.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(active, np.float32), str(step))
    assert int(got_index) == index, step


def test_parse_phases_last_until_then_all_and_empty():
  phases = schedules.parse_phases(["ce+kd until 10steps", "kd until 50%"], key="p",
                                  terms=TERMS, total_steps=40)
  assert phases.boundaries == (10, 20)
  assert phases.active_terms == (frozenset({"ce", "kd"}), frozenset({"kd"}), frozenset(TERMS))
  for step, want in [(0, 1), (9, 1), (10, 0), (19, 0), (20, 1), (39, 1)]:
    assert float(phases.active("ce", step)) == want
  always = schedules.parse_phases((), key="p", terms=TERMS)
  assert always == schedules.Phases.always(TERMS)
  assert all(float(always.active(t, 7)) == 1.0 for t in TERMS) and int(always.index(7)) == 0
  with pytest.raises(ValueError, match="unknown loss term 'feat'"):
    always.active("feat", 0)


@pytest.mark.parametrize("phases,bad,fragment", [
    (("features until 20ep", "bogus until 30ep"), 1, "unknown term 'bogus'"),
    (("features", "all"), 0, "only the last phase"),
    (("features until 50ep", "lstm until 20ep", "all"), 1, "increasing"),
    (("features until 20", "all"), 0, "no unit"),
    (("features until 0ep", "all"), 0, "step 0"),
    (("features until -1ep", "all"), 0, "negative"),
    (("until 20ep", "all"), 0, "until"),
    (("features+ until 20ep", "all"), 0, "empty term"),
])
def test_phase_errors(phases, bad, fragment):
  for fn in (lambda: schedules.check_phases(phases, key="student.loss.phases", terms=TERMS),
             lambda: schedules.parse_phases(phases, key="student.loss.phases", terms=TERMS,
                                            total_steps=1000, steps_per_epoch=10)):
    with pytest.raises(ValueError, match=fragment) as err:
      fn()
    assert str(err.value).startswith(f"student.loss.phases[{bad}]={phases[bad]!r}: ")
  with pytest.raises(ValueError, match="'ce', 'kd', 'features', 'lstm'"):
    schedules.check_phases(("feature until 2ep",), key="p", terms=TERMS)


def test_phase_boundaries_in_different_units_checked_by_parse():
  phases = ("features until 50%", "all until 100steps")
  schedules.check_phases(phases, key="p", terms=TERMS)  # units differ: known only with steps
  with pytest.raises(ValueError, match="increasing") as err:
    schedules.parse_phases(phases, key="p", terms=TERMS, total_steps=1000)
  assert str(err.value).startswith("p[1]='all until 100steps': ")
  with pytest.raises(ValueError, match="list of strings"):
    schedules.check_phases("features until 20ep", key="p", terms=TERMS)
