"""jaxkd command line: `python main.py --config=configs/food101_eca.py --workdir=runs/food101_eca`.

The same as the `jaxkd` console script; `python main.py --help` lists the flags and how config
keys are overridden, `--print_config` every key with its value, unit and meaning. See jaxkd/cli.py.
"""
from jaxkd.cli import main

if __name__ == "__main__":
  main()
