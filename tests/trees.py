"""Pytree helpers shared by the tests: host copies, and exact equality naming the failing leaf."""
import jax
import numpy as np


def numpy_tree(tree):
  """A host (NumPy) copy of every leaf: unaffected by later donation of the device buffers."""
  return jax.tree.map(lambda x: np.array(x), tree)


def assert_trees_equal(a, b):
  """Same structure and bit-identical leaves; a mismatch names the leaf's path."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
