"""Export a finished run's model, verify it with the official runtime, measure it.

  python -m jaxkd.export WORKDIR --format=tflite|onnx [--role=student]
                         [--quantize=none|float16|int8] [--out=FILE]

Writes FILE (default WORKDIR/export/<role>_<float32|float16|int8>.<tflite|onnx>) and FILE.json
(class names, input size, the resize-and-crop rule, the measured figures). Mistakes print one
line starting with 'usage error:', 'export error:' or 'missing dependency:' and exit with code 2
(1 for a failed verification).
"""
from __future__ import annotations

import argparse
import json
import sys

from jaxkd.export.deploy import FORMATS, QUANTIZATIONS


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m jaxkd.export", description=__doc__.split("\n")[0])
  p.add_argument("workdir", help="the --workdir of a finished jaxkd run")
  p.add_argument("--format", required=True, choices=FORMATS)
  p.add_argument("--role", default="student", choices=("student", "teacher"))
  p.add_argument("--quantize", default="none", choices=QUANTIZATIONS,
                 help="none (float32), float16 weights, or int8 post-training quantisation")
  p.add_argument("--out", default=None, help="the file to write (FILE.json goes beside it)")
  p.add_argument("--num_representative", type=int, default=200,
                 help="training images that calibrate int8 ranges")
  p.add_argument("--max_verify_images", type=int, default=None,
                 help="verify on at most this many val images (default: all)")
  p.add_argument("--latency_runs", type=int, default=50,
                 help="batch-1 runs per latency median (0: no latency)")
  p.add_argument("--tflite_batch_size", type=int, default=1,
                 help="the fixed batch size of a TFLite file")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from jaxkd.config import ConfigError
  from jaxkd.data import DataError
  from jaxkd.export import ExportError, MissingExtraError, export
  try:
    figures = export(args.workdir, args.format, args.quantize, args.out, role=args.role,
                     num_representative=args.num_representative,
                     max_verify_images=args.max_verify_images, latency_runs=args.latency_runs,
                     tflite_batch_size=args.tflite_batch_size,
                     progress=lambda line: print(f"[jaxkd] {line}", flush=True))
  except MissingExtraError as e:
    print(f"missing dependency: {e}", file=sys.stderr)
    return 2
  except (ConfigError, DataError, ValueError, FileNotFoundError) as e:
    print(f"export error: {e}", file=sys.stderr)
    return 2
  except ExportError as e:
    print(f"export error: {e}", file=sys.stderr)
    return 1
  print(json.dumps({k: figures[k] for k in ("file", "size_bytes", "parity", "top1",
                                            "latency_ms")}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
