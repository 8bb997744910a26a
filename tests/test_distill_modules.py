"""jaxkd.models.distill (FitNets' hint regressor, the LSTM state encoder) and
jaxkd.losses.lstm_state_loss against float64 NumPy implementations written from the definitions:
1x1 convolution and BatchNorm (Ioffe & Szegedy, ICML 2015), bilinear resampling with a triangle
filter widened by the downsampling factor, the per-window 3x3 convolution, and the LSTM gate
equations (Hochreiter & Schmidhuber, "Long Short-Term Memory", Neural Computation 1997) run in
both directions over two layers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import losses
from jaxkd.models.distill import HintRegressor, LSTMStateEncoder


def _perturbed(params, seed):
  """The parameters plus N(0, 0.3^2) noise, so that zero-initialised biases and every gate's
  weights enter the comparison."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      treedef, [np.asarray(p) + 0.3 * rng.standard_normal(p.shape).astype(np.float32)
                for p in leaves])


# ---------------------------------------------------------------- NumPy float64 references

def np_sigmoid(v):
  return 1.0 / (1.0 + np.exp(-v))


def np_lstm_step(p, x, h, c):
  """One LSTM step (i, f, g, o gates); p holds Flax's LSTMCell parameters: input kernels ii, if,
  ig, io (no bias) and recurrent kernels hi, hf, hg, ho with the biases."""
  def pre(gate):
    return (x @ np.float64(p[f"i{gate}"]["kernel"]) + h @ np.float64(p[f"h{gate}"]["kernel"])
            + np.float64(p[f"h{gate}"]["bias"]))
  i, f, g, o = np_sigmoid(pre("i")), np_sigmoid(pre("f")), np.tanh(pre("g")), np_sigmoid(pre("o"))
  c = f * c + i * g
  return o * np.tanh(c), c


def np_lstm_encoder(x, params, *, window, num_layers, hidden):
  """Windows of `window` rows -> per-window 3x3 conv over (window, W), zero padding 1 -> mean
  over W -> bidirectional LSTM, `num_layers` layers. Returns h, c [B, N, 2 * num_layers, hidden]."""
  x = np.float64(x)
  b, height, width, _ = x.shape
  n = height - window + 1
  kernel = np.float64(params["conv"]["kernel"])  # [3, 3, C, O]
  bias = np.float64(params["conv"]["bias"])
  h_out = np.zeros((b, n, 2 * num_layers, hidden))
  c_out = np.zeros((b, n, 2 * num_layers, hidden))
  for bi in range(b):
    for ni in range(n):
      vol = np.zeros((window + 2, width + 2, x.shape[-1]))
      vol[1:-1, 1:-1] = x[bi, ni:ni + window]
      conv = np.zeros((window, width, kernel.shape[-1]))
      for j in range(window):
        for w in range(width):
          conv[j, w] = bias + np.einsum("abc,abco->o", vol[j:j + 3, w:w + 3], kernel)
      seq = [conv[j].mean(axis=0) for j in range(window)]
      for layer in range(num_layers):
        outs = {}
        for d, name in enumerate(("forward", "backward")):
          p = params[f"lstm{layer}_{name}"]
          h, c = np.zeros(hidden), np.zeros(hidden)
          steps = range(window) if name == "forward" else range(window - 1, -1, -1)
          outs[name] = [None] * window
          for t in steps:
            h, c = np_lstm_step(p, seq[t], h, c)
            outs[name][t] = h
          h_out[bi, ni, 2 * layer + d] = h
          c_out[bi, ni, 2 * layer + d] = c
        seq = [np.concatenate([outs["forward"][t], outs["backward"][t]]) for t in range(window)]
  return h_out, c_out


def np_resize_axis(a, axis, out_size):
  """Bilinear resampling along one axis, half-pixel centres, triangle filter of radius
  max(in / out, 1) (antialiased when downsampling), weights renormalised over the inputs that
  exist."""
  in_size = a.shape[axis]
  scale = in_size / out_size
  radius = max(scale, 1.0)
  a = np.moveaxis(np.float64(a), axis, 0)
  out = np.zeros((out_size,) + a.shape[1:])
  for i in range(out_size):
    centre = (i + 0.5) * scale - 0.5
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(in_size) - centre) / radius)
    out[i] = np.tensordot(w / w.sum(), a, axes=1)
  return np.moveaxis(out, 0, axis)


def np_conv1x1_bn_train(x, kernel, scale, bias, eps=1e-5):
  y = np.einsum("bhwc,co->bhwo", np.float64(x), np.float64(kernel[0, 0]))
  mean = y.mean(axis=(0, 1, 2))
  var = ((y - mean) ** 2).mean(axis=(0, 1, 2))
  return (y - mean) / np.sqrt(var + eps) * np.float64(scale) + np.float64(bias)


# ---------------------------------------------------------------- LSTMStateEncoder

ENCODER = LSTMStateEncoder(channels=6, hidden=5, num_layers=2, window=3)


@pytest.fixture(scope="module")
def encoder_params():
  """Parameters of ENCODER's structure for C = 4 input channels, drawn here (uniform in +-0.8, so
  that every bias and gate weight matters): `init` is not compiled for this, because compiling
  the random initialisers of 18 arrays takes several seconds on CPU. The initialised parameters
  are compared in `test_lstm_encoder_initialised_matches_numpy_and_pytorch_init`."""
  shapes = jax.eval_shape(ENCODER.init, jax.random.key(0), jnp.zeros((1, 3, 1, 4)))["params"]
  rng = np.random.default_rng(11)
  return jax.tree_util.tree_map(
      lambda s: rng.uniform(-0.8, 0.8, s.shape).astype(np.float32), shapes)


def _apply_encoder(params, x, module=ENCODER):
  return jax.jit(lambda p, v: module.apply({"params": p}, v))(params, x)


def test_lstm_encoder_matches_numpy_float64(encoder_params):
  b, height, width, channels, hidden, layers = 2, 5, 5, 4, 5, 2
  x = np.random.default_rng(0).standard_normal((b, height, width, channels)).astype(np.float32)
  h, c = _apply_encoder(encoder_params, x)
  assert h.shape == c.shape == (b, height - 2, 2 * layers, hidden)
  assert h.dtype == c.dtype == jnp.float32
  h_ref, c_ref = np_lstm_encoder(x, encoder_params, window=3, num_layers=layers, hidden=hidden)
  np.testing.assert_allclose(np.asarray(h), h_ref, rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(np.asarray(c), c_ref, rtol=1e-5, atol=2e-6)


def test_lstm_encoder_single_window_single_column_bfloat16(encoder_params):
  # H == window (one window), W == 1 (the conv's side columns see only padding), bfloat16 input.
  x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 3, 1, 4)), jnp.bfloat16)
  h, c = _apply_encoder(encoder_params, x)
  h_ref, c_ref = np_lstm_encoder(np.asarray(x.astype(jnp.float32)), encoder_params, window=3,
                                 num_layers=2, hidden=5)
  assert h.shape == (1, 1, 4, 5) and h.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(h), h_ref, rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(np.asarray(c), c_ref, rtol=1e-5, atol=2e-6)


def test_lstm_encoder_initialised_matches_numpy_and_pytorch_init():
  # One layer (fewer arrays to initialise). Conv: U(+-1/sqrt(9 C)) (PyTorch's Conv2d default);
  # LSTM weights U(+-1/sqrt(hidden)) as nn.LSTM, the one Flax bias the sum of PyTorch's two
  # (within +-2/sqrt(hidden)).
  module = LSTMStateEncoder(channels=6, hidden=5, num_layers=1, window=2)
  x = np.random.default_rng(12).standard_normal((2, 4, 3, 4)).astype(np.float32)
  params = jax.jit(module.init)(jax.random.key(1), x)["params"]
  params = jax.tree_util.tree_map(np.asarray, params)
  assert set(params) == {"conv", "lstm0_forward", "lstm0_backward"}
  bound = 1 / np.sqrt(9 * 4)
  for p in params["conv"].values():
    assert np.abs(p).max() <= bound and np.abs(p).max() > 0.5 * bound
  for name in ("lstm0_forward", "lstm0_backward"):
    assert set(params[name]) == {"ii", "if", "ig", "io", "hi", "hf", "hg", "ho"}
    for gate, dense in params[name].items():
      assert np.abs(dense["kernel"]).max() <= 1 / np.sqrt(5), (name, gate)
      if "bias" in dense:
        assert 0 < np.abs(dense["bias"]).max() <= 2 / np.sqrt(5), (name, gate)
  h, c = _apply_encoder(params, x, module)
  assert h.shape == (2, 3, 2, 5)
  h_ref, c_ref = np_lstm_encoder(x, params, window=2, num_layers=1, hidden=5)
  np.testing.assert_allclose(np.asarray(h), h_ref, rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(np.asarray(c), c_ref, rtol=1e-5, atol=2e-6)


def test_lstm_encoder_refuses_short_or_non_nhwc_maps():
  module = LSTMStateEncoder(channels=3, hidden=2, num_layers=1, window=3)
  with pytest.raises(ValueError, match=r"H >= window=3.*\(2, 2, 5, 4\)"):
    module.init(jax.random.key(0), jnp.zeros((2, 2, 5, 4)))
  with pytest.raises(ValueError, match=r"NHWC.*\(2, 5, 4\)"):
    module.init(jax.random.key(0), jnp.zeros((2, 5, 4)))


# ---------------------------------------------------------------- lstm_state_loss

def _np_state_loss(h_s, c_s, h_t, c_t, w):
  def norm(d):
    return np.sqrt((np.float64(d).reshape(d.shape[0], -1) ** 2).sum(-1))
  per = norm(h_s - h_t) + norm(c_s - c_t)
  keep = w > 0
  return (per[keep] * w[keep]).sum() / w.sum()


def test_lstm_state_loss_matches_numpy_and_excludes_zero_weight_rows():
  rng = np.random.default_rng(5)
  h_s, c_s, h_t, c_t = (rng.standard_normal((3, 2, 4, 5)).astype(np.float32) for _ in range(4))
  w = np.array([1.0, 0.0, 2.0])
  got = losses.lstm_state_loss(h_s, c_s, h_t, c_t)
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(got, _np_state_loss(h_s, c_s, h_t, c_t, np.ones(3)), rtol=1e-6)
  h_s[1] = np.nan  # the excluded row may hold anything
  got = losses.lstm_state_loss(h_s, c_s, h_t, c_t, weights=w)
  np.testing.assert_allclose(got, _np_state_loss(h_s, c_s, h_t, c_t, w), rtol=1e-6)
  got = losses.lstm_state_loss(jnp.asarray(h_s, jnp.bfloat16), c_s, h_t, c_t, weights=w)
  assert got.dtype == jnp.float32


def test_lstm_state_loss_gradient_is_finite_at_zero_difference():
  rng = np.random.default_rng(6)
  h_t, c_t = (rng.standard_normal((2, 3, 2, 4)).astype(np.float32) for _ in range(2))
  h_s = h_t.copy()
  h_s[1] += 0.5  # example 0: no difference at all; example 1: only h differs
  grads = jax.grad(losses.lstm_state_loss, argnums=(0, 1))(h_s, c_t.copy(), h_t, c_t)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  # Where the difference is 0 the gradient is 0; elsewhere (h_s - h_t) / ||h_s - h_t|| / B.
  d = np.float64(h_s[1] - h_t[1])
  expected = np.zeros(h_s.shape)
  expected[1] = d / np.sqrt((d ** 2).sum()) / 2
  np.testing.assert_allclose(grads[0], expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(grads[1], 0.0)
  assert losses.lstm_state_loss(h_t, c_t, h_t, c_t) == 0.0


def test_lstm_state_loss_refuses_mismatched_shapes():
  a, b = jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 5))
  with pytest.raises(ValueError, match=r"\(2, 3, 4\) and \(2, 3, 5\)"):
    losses.lstm_state_loss(a, a, b, a)
  with pytest.raises(ValueError, match=r"h \(2, 3, 4\) and c \(2, 3, 5\)"):
    losses.lstm_state_loss(a, b, a, b)


# ---------------------------------------------------------------- HintRegressor

def test_hint_regressor_matches_conv1x1_bn_and_counts_parameters():
  cs, ct = 4, 7
  x = np.random.default_rng(7).standard_normal((3, 5, 5, cs)).astype(np.float32)
  module = HintRegressor(features=ct)
  variables = module.init(jax.random.key(0), x, train=False)
  assert set(variables) == {"params", "batch_stats"}
  n_params = sum(p.size for p in jax.tree_util.tree_leaves(variables["params"]))
  assert n_params == cs * ct + 2 * ct
  params = _perturbed(variables["params"], 8)
  y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                            train=True, target_hw=(5, 5), mutable=["batch_stats"])
  assert y.shape == (3, 5, 5, ct) and y.dtype == jnp.float32
  ref = np_conv1x1_bn_train(x, params["conv"]["kernel"], params["bn"]["scale"],
                            params["bn"]["bias"])
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  # Evaluation: the running statistics (initially mean 0, variance 1).
  y_eval = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                        train=False)
  conv = np.einsum("bhwc,co->bhwo", np.float64(x), np.float64(params["conv"]["kernel"][0, 0]))
  ref_eval = conv / np.sqrt(1 + 1e-5) * params["bn"]["scale"] + params["bn"]["bias"]
  np.testing.assert_allclose(y_eval, ref_eval, rtol=1e-5, atol=1e-5)
  # Without BN: a biased 1x1 convolution; PyTorch's Conv2d initialisation bound 1/sqrt(C_s).
  plain = HintRegressor(features=ct, use_bn=False).init(jax.random.key(0), x, train=False)
  assert set(plain) == {"params"}
  assert sum(p.size for p in jax.tree_util.tree_leaves(plain)) == cs * ct + ct
  for p in jax.tree_util.tree_leaves(plain):
    assert np.abs(p).max() <= 1 / np.sqrt(cs)


def test_hint_regressor_resizes_to_the_target_bilinearly():
  x = np.random.default_rng(9).standard_normal((2, 6, 4, 3)).astype(np.float32)
  module = HintRegressor(features=5, use_bn=False)
  variables = module.init(jax.random.key(0), x, train=False)
  same = np.float64(module.apply(variables, x, train=False))
  for target in ((3, 2), (12, 7), (4, 9)):  # smaller, larger, mixed
    y = module.apply(variables, x, train=False, target_hw=target)
    assert y.shape == (2,) + target + (5,) and y.dtype == jnp.float32
    ref = np_resize_axis(np_resize_axis(same, 1, target[0]), 2, target[1])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_hint_regressor_refusals():
  module = HintRegressor(features=5)
  with pytest.raises(ValueError, match=r"NHWC.*\(2, 6, 3\)"):
    module.init(jax.random.key(0), jnp.zeros((2, 6, 3)), train=False)
  with pytest.raises(ValueError, match=r"target_hw.*\(0, 3\)"):
    module.init(jax.random.key(0), jnp.zeros((2, 6, 4, 3)), train=False, target_hw=(0, 3))
