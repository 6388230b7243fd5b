#!/usr/bin/env bash
# Build the image, create the kind cluster (no default CNI, no kube-proxy), load the image,
# install Ciliate, wait for it, then run the network-policy conformance cases against the cluster.
# Needs docker, kind and kubectl. Usage: infra/kind/install.sh [--keep] (default: keep cluster).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CLUSTER=${CILIATE_KIND_CLUSTER:-ciliate}
IMAGE=${CILIATE_IMAGE:-ciliate:dev}
NS=ciliate-system
CONFORMANCE=${CILIATE_CONFORMANCE_DIR:-$REPO/../shared/conformance/netpol}
CTX="kind-$CLUSTER"
k() { kubectl --context "$CTX" "$@"; }
rand() { head -c 18 /dev/urandom | base64 | tr -d '/+=' ; }

echo "==> building $IMAGE"
docker build -t "$IMAGE" -f "$REPO/infra/Dockerfile" "$REPO"

if ! kind get clusters | grep -qx "$CLUSTER"; then
  echo "==> creating kind cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --config "$HERE/kind-config.yaml" --wait 0s
fi
kind load docker-image "$IMAGE" --name "$CLUSTER"

echo "==> installing Ciliate"
k apply -f "$REPO/infra/k8s/00-namespace.yaml" -f "$REPO/infra/k8s/01-crds.yaml" \
        -f "$REPO/infra/k8s/02-rbac.yaml"
k wait --for=condition=Established crd --all --timeout=60s

if ! k -n "$NS" get secret ciliate-token >/dev/null 2>&1; then
  k -n "$NS" create secret generic ciliate-token --from-literal=token="$(rand)"
  pg=$(rand)
  k -n "$NS" create secret generic ciliate-postgres --from-literal=password="$pg" \
    --from-literal=url="postgresql+asyncpg://ciliate:$pg@POSTGRES_HOST:5432/ciliate"
  args=()
  for user in identity policy lb datapath security events k8s-sync cli; do
    var="CILIATE_NATS_PASSWORD_$(echo "$user" | tr 'a-z-' 'A-Z_')"
    args+=(--from-literal="$var=$(rand)")
  done
  k -n "$NS" create secret generic ciliate-nats "${args[@]}"
fi
k -n "$NS" create configmap nats-config --from-file="$REPO/infra/nats/nats-server.conf" \
  --dry-run=client -o yaml | k apply -f -

# Every Ciliate pod is on the host network (it is the pod network): point them at node addresses.
CP_IP=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' \
        "$CLUSTER-control-plane")
NODE_IPS=$(k get nodes -o jsonpath='{range .items[*]}{.status.addresses[?(@.type=="InternalIP")].address}{" "}{end}')
urls=""
for svc in identity:9871 policy:9872 lb:9873 events:9874 security:9876; do
  for ip in $NODE_IPS; do urls+="${svc%%:*}=http://$ip:${svc##*:},"; done
done
k -n "$NS" create configmap ciliate-config \
  --from-literal=nats_url="nats://$CP_IP:4222" \
  --from-literal=k8s_service_host="$CP_IP" --from-literal=k8s_service_port=6443 \
  --from-literal=service_urls="${urls%,}" --dry-run=client -o yaml | k apply -f -

# NATS and PostgreSQL run before there is a pod network: host network on the control plane.
for f in 03-nats.yaml 04-postgres.yaml; do
  sed -e 's/^    spec:$/    spec:\n      hostNetwork: true\n      nodeSelector: {node-role.kubernetes.io\/control-plane: ""}\n      tolerations: [{operator: Exists}]/' \
    "$REPO/infra/k8s/$f" | k apply -f -
done
k -n "$NS" get secret ciliate-postgres -o jsonpath='{.data.url}' | base64 -d | \
  sed "s/POSTGRES_HOST/$CP_IP/" > /tmp/ciliate-db-url.$$
k -n "$NS" create secret generic ciliate-postgres \
  --from-literal=password="$(k -n "$NS" get secret ciliate-postgres -o jsonpath='{.data.password}' | base64 -d)" \
  --from-literal=url="$(cat /tmp/ciliate-db-url.$$)" --dry-run=client -o yaml | k apply -f -
rm -f /tmp/ciliate-db-url.$$
k -n "$NS" rollout status statefulset/nats statefulset/postgres --timeout=180s

k -n "$NS" delete job ciliate-migrate --ignore-not-found
k apply -f "$REPO/infra/k8s/05-migrate-job.yaml"
k -n "$NS" wait --for=condition=Complete job/ciliate-migrate --timeout=180s
k apply -f "$REPO/infra/k8s/06-services.yaml"
for d in identity policy lb events k8s-sync; do
  k -n "$NS" rollout status "deployment/$d" --timeout=300s
done
k -n "$NS" rollout status daemonset/ciliate-node --timeout=300s
k wait --for=condition=Ready nodes --all --timeout=300s

echo "==> conformance: $CONFORMANCE"
python3 "$HERE/conformance.py" --context "$CTX" --dir "$CONFORMANCE"
