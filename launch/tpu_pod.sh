#!/usr/bin/env bash
# Runs training on every worker of a Cloud TPU pod slice (one JAX process per TPU VM host).
#
#   launch/tpu_pod.sh TPU_NAME ZONE -- --config=configs/stage2.py --workdir=gs://BUCKET/runs/stage2 [--config.x=y ...]
#
# Every worker runs `python -m llava_jax.train <flags> --config.distributed.coordinator=auto` in $REPO_DIR
# (default ~/llava_jax, which must already hold the project and its dependencies on every worker, e.g. set up
# once with SETUP="git -C ~/llava_jax pull && pip install -e ~/llava_jax"). JAX finds the other hosts itself.
# Use a gs:// workdir (all hosts write the checkpoint); rerunning the same command resumes from it. Weights
# and data paths must exist on every worker (or be gs:// paths). Extra gcloud flags: GCLOUD_FLAGS="--project=P".
set -euo pipefail
if [[ $# -lt 3 || "$3" != "--" ]]; then
  echo "usage: $0 TPU_NAME ZONE -- <llava_jax.train flags>" >&2
  exit 2
fi
tpu="$1" zone="$2"
shift 3
repo_dir="${REPO_DIR:-~/llava_jax}"
flags="$(printf '%q ' "$@")"
command="cd ${repo_dir} && ${SETUP:+${SETUP} && }python -m llava_jax.train ${flags}--config.distributed.coordinator=auto"
# shellcheck disable=SC2086
exec gcloud compute tpus tpu-vm ssh "${tpu}" --zone="${zone}" --worker=all ${GCLOUD_FLAGS:-} --command="${command}"
