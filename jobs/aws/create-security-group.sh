#!/usr/bin/env bash
# The security group of cluster.yaml: SSH (tcp 22) from one CIDR, all traffic between members
# of the group (Ray's GCS, raylets, object managers), nothing else. Prints the group's ID for
# cluster.yaml's SecurityGroupIds (every node type).
#
#   jobs/aws/create-security-group.sh VPC_ID CIDR [REGION]
#   jobs/aws/create-security-group.sh vpc-0abc1234 203.0.113.0/24 us-west-2
#
# Why not provider.security_group in cluster.yaml: when Ray's AWS launcher creates the group
# itself it always adds "tcp 22 from 0.0.0.0/0" (ray.autoscaler._private.aws.config.
# _create_default_ssh_inbound_rules) beside whatever IpPermissions are written there. With
# SecurityGroupIds on every node type it creates and changes no group.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 VPC_ID CIDR [REGION]   (CIDR: the network SSH may come from, e.g. 203.0.113.0/24)" >&2
  exit 2
fi
vpc=$1 cidr=$2 region=${3:-us-west-2}
if ! [[ $cidr =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}/([0-9]|[12][0-9]|3[0-2])$ ]]; then
  echo "error: CIDR must look like 203.0.113.0/24, got '$cidr'" >&2
  exit 2
fi
if [[ ${cidr#*/} -lt 8 ]]; then
  echo "error: refusing SSH from $cidr (wider than /8): give the network you connect from" >&2
  exit 2
fi
sg=$(aws ec2 create-security-group --region "$region" --vpc-id "$vpc" --group-name leukray-ray \
  --description "leukray Ray cluster: SSH from $cidr, intra-cluster traffic" --query GroupId --output text)
aws ec2 authorize-security-group-ingress --region "$region" --group-id "$sg" \
  --ip-permissions "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=$cidr,Description=SSH}]" >/dev/null
aws ec2 authorize-security-group-ingress --region "$region" --group-id "$sg" \
  --ip-permissions "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$sg,Description=intra-cluster}]" >/dev/null
echo "$sg"
