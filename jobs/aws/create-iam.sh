#!/usr/bin/env bash
# The head and worker roles and instance profiles of cluster.yaml, from the policies in
# jobs/iam/ with ACCOUNT_ID and YOUR-BUCKET filled in:
#   leukray-ray-head   (jobs/iam/head-policy.json): launch and stop this cluster's workers, pass
#                      only the worker role, read the bucket, write s3://BUCKET/leukray/*, read the token
#   leukray-ray-worker (jobs/iam/worker-policy.json): read the bucket, write only checkpoints and
#                      Tune/Train state (so no worker can replace a model bundle), read the token
#
#   jobs/aws/create-iam.sh ACCOUNT_ID BUCKET
set -euo pipefail
if [[ $# -ne 2 ]]; then
  echo "usage: $0 ACCOUNT_ID BUCKET" >&2
  exit 2
fi
account=$1 bucket=$2
here=$(cd "$(dirname "$0")/../iam" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for role in head worker; do
  sed -e "s/ACCOUNT_ID/$account/g" -e "s/YOUR-BUCKET/$bucket/g" "$here/$role-policy.json" >"$tmp/$role.json"
  aws iam create-role --role-name "leukray-ray-$role" \
    --assume-role-policy-document "file://$here/ec2-trust.json" >/dev/null
  aws iam put-role-policy --role-name "leukray-ray-$role" --policy-name "leukray-ray-$role" \
    --policy-document "file://$tmp/$role.json"
  aws iam create-instance-profile --instance-profile-name "leukray-ray-$role" >/dev/null
  aws iam add-role-to-instance-profile --instance-profile-name "leukray-ray-$role" --role-name "leukray-ray-$role"
  echo "instance profile leukray-ray-$role"
done
