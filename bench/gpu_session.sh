#!/usr/bin/env bash
# One device call: GPU tests, then the end-to-end and few-step benches, each under its own time cap,
# every log under $OUT. Carry .whl (diffusers 0.42.1 + importlib_metadata wheels; see docs/benchmarks.md).
#   bash bench/gpu_session.sh [tests,e2e,fewstep]
set -u
parts=${1:-tests,e2e,fewstep}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
case ,$parts, in *,tests,*)
  timeout 170 python3 -m pytest -q -p no:cacheprovider -m gpu tests -x -o addopts="" 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
esac
case ,$parts, in *,e2e,*)
  timeout 330 python3 bench/e2e.py --out "$OUT" --size 1.3B --steps 10 --cfg 5 --backends TORCH_SDPA,auto \
    > "$OUT/e2e.log" 2>&1; tail -12 "$OUT/e2e.log" ;;
esac
case ,$parts, in *,fewstep,*)
  if [ -f bench/fewstep.py ]; then
    timeout 120 python3 bench/fewstep.py --out "$OUT" --size 1.3B > "$OUT/fewstep.log" 2>&1; tail -12 "$OUT/fewstep.log"
  fi ;;
esac
