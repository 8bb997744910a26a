"""jaxkd: knowledge distillation for image classification in JAX/Flax.

Submodules are imported on demand (``import jaxkd.losses``); importing the
package itself stays light and never imports TensorFlow.
"""

__version__ = "0.1.0"
