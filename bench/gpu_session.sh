#!/usr/bin/env bash
# One device call: GPU tests, then the end-to-end and few-step benches, each under its own time cap,
# every log under $OUT. Carry .whl (diffusers 0.42.1, importlib_metadata, zipp, ftfy, wcwidth wheels;
# see docs/benchmarks.md).
#   bash bench/gpu_session.sh [tests,e2e,fewstep,e2e14_24,i2v40,a14b40]
# Disk is 64 GB: e2e14_24 and a14b40 share the T2V-14B folder; i2v40 removes it for its own.
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
case ,$parts, in *,e2e14_24,*)  # issue 14: 14B within a 24 GiB budget, card peak (NVML)
  timeout 200 python3 bench/e2e.py --out "$OUT" --size 14B --parts build,ours --steps 2 --cfg 5 --backends auto \
    --gpu-memory-gb 24 > "$OUT/e2e14_24.log" 2>&1; grep -E '"call"|after_drop' "$OUT/e2e14_24.log" | cut -c1-600 ;;
esac
case ,$parts, in *,i2v40,*)  # issue 18: I2V-14B, 40 steps, ours and diffusers (its own 14B folder: room for it)
  rm -rf /tmp/e2e_models/Wan2.1-T2V-14B-random /tmp/e2e_models/Wan2.2-T2V-A14B-random
  timeout 590 python3 bench/image_models.py --out "$OUT" --todo i2v --steps 40 --warmup-steps 1 --drop > "$OUT/i2v40.log" 2>&1
  tail -8 "$OUT/i2v40.log" ;;
esac
case ,$parts, in *,a14b40,*)  # issue 18: T2V-A14B, 40 steps, ours and diffusers (links the T2V-14B folder)
  rm -rf /tmp/e2e_models/Wan2.1-I2V-14B-480P-random
  timeout 590 python3 bench/image_models.py --out "$OUT" --todo a14b --steps 40 --warmup-steps 1 > "$OUT/a14b40.log" 2>&1
  tail -8 "$OUT/a14b40.log" ;;
esac
