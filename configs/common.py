"""For config files that do `from configs import common` (from the repository root): jaxkd.config's
builders under their old names, nothing else.

Every key, its default, unit and meaning is defined once, in jaxkd/config.py; the configs in this
folder use it directly (`from jaxkd import config as schema`), which works from any directory and
with jaxkd installed. List every key:
`python main.py --config=configs/food101_mini.py --print_config`.
"""
from jaxkd.config import base_config, loss, optimizer, stage

__all__ = ["base_config", "loss", "optimizer", "stage"]
