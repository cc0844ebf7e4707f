#!/usr/bin/env bash
# One device call: the named parts in order, each under its own time cap, every log under $OUT.
# Wheels come from bench/fetch_wheels.sh: carry .whl (diffusers, the parity oracle) and, for the optional
# attention backends, .fa4b .ck .fvk; .fa4a (CUDA 13 half of cutlass-dsl) is too big to travel with them:
# carry it alone in a first call whose part is `unpack`, then chain the next call within 30 s.
#   bash bench/gpu_session.sh [unpack,tests,e2e,fewstep,e2e14_24,i2v40,a14b40,attn,int8v,vsa,e2e14_50d,e2e14_50o,fwd]
# Disk is 64 GB: e2e14_24 and a14b40 share the T2V-14B folder; i2v40 removes it for its own.
set -u
parts=${1:-tests,e2e,fewstep}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
case ,$parts, in *,unpack,*)
  mkdir -p /tmp/cu13x && tar xJf .fa4a/cu13.tar.xz -C /tmp/cu13x && du -sh /tmp/cu13x ;;
esac
S=/tmp/site  # --target installs skip .pth files: the paths they would add are set here
if [ ! -f $S/.done ] && ls .whl/*.whl >/dev/null 2>&1; then  # .fa4b and the rest are optional
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $S $(ls .whl/*.whl .fa4b/*.whl 2>/dev/null)
  python3 -c "import google.protobuf" 2>/dev/null || [ ! -d .fa4b/opt ] || python3 -m pip install -q --no-index --no-deps --target $S .fa4b/opt/*.whl
  [ -d /tmp/cu13x/nvidia_cutlass_dsl ] && cp -r /tmp/cu13x/nvidia_cutlass_dsl/. $S/nvidia_cutlass_dsl/
  [ -f .ck/ck.tar.gz ] && tar xzf .ck/ck.tar.gz -C $S
  [ -d .fvk ] && python3 -m pip install -q --no-index --no-deps --no-compile --target $S .fvk/*.whl
  touch $S/.done
fi
[ -d $S ] && export PYTHONPATH=$PYTHONPATH:$S:$S/nvidia_cutlass_dsl/dsl_packages
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
case ,$parts, in *,attn,*)  # issue 17: every installed backend, kernels and a compiled 1.3B forward each
  timeout 330 python3 bench/attention_table.py --out "$OUT" --forward > "$OUT/attn.log" 2>&1; grep '^|' "$OUT/attn.log" ;;
esac
case ,$parts, in *,int8v,*)  # issue 17: INT8_ATTN configs, whole call and kernel alone
  timeout 115 python3 bench/int8_variants.py --out "$OUT" --shapes 32760,75600 --budget-s 90 > "$OUT/int8v.log" 2>&1
  grep '^|' "$OUT/int8v.log" ;;
esac
case ,$parts, in *,vsa,*)  # issue 16: VSA set-ups and kernel configs, then FastVideo's own VSA on the same inputs
  timeout 115 python3 bench/fastwan.py --out "$OUT" --parts variants --budget-s 85 > "$OUT/vsa.log" 2>&1
  timeout 70 python3 bench/fastwan.py --out "$OUT/fv" --parts fastvideo >> "$OUT/vsa.log" 2>&1
  grep -v '^{' "$OUT/vsa.log" | tail -30; grep fastvideo_vsa "$OUT/vsa.log" ;;
esac
case ,$parts, in *,e2e14_50d,*)  # issue 14: 14B, 50 steps CFG 5, diffusers (its own call; then e2e14_50o)
  timeout 590 python3 bench/e2e.py --out "$OUT" --size 14B --steps 50 --first-steps 1 --parts build,diffusers \
    > "$OUT/e2e14_50d.log" 2>&1; grep -E '"call"|after_drop' "$OUT/e2e14_50d.log" | cut -c1-400 ;;
esac
case ,$parts, in *,e2e14_50o,*)  # issue 14: ours on the same folder, BACKENDS=FLASH_ATTN_4 or auto, compiled
  timeout 590 python3 bench/e2e.py --out "$OUT" --size 14B --steps 50 --first-steps 1 --parts build,ours --compile \
    --backends "${BACKENDS:-auto}" > "$OUT/e2e14_50o.log" 2>&1; grep -E '"call"|after_drop' "$OUT/e2e14_50o.log" | cut -c1-400 ;;
esac
case ,$parts, in *,fwd,*)  # issue 17: compiled forward per backend, bf16 and fp8 matmul, against diffusers eager
  timeout 400 python3 bench/attention_table.py --out "$OUT/fwd${SIZE:-14B}" --no-kernels --forward --size "${SIZE:-14B}" \
    --anchor --fp8-matmul --backends "${BACKENDS:-TORCH_SDPA,FLASH_ATTN_4,INT8_ATTN}" > "$OUT/fwd.log" 2>&1
  grep '^|' "$OUT/fwd.log" ;;
esac
