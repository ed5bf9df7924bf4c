#!/usr/bin/env bash
# `make demo`: the seed walkthrough on real parts. A local control plane, the operator with an embedded
# MQTT broker, one simulated proplet, then an external Proplet and an addition Task that must answer "42".
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.testbed
BIN=target/debug

started_cluster=0
if [ ! -f "$DIR/pids" ]; then
  "$BIN/testbed" --dir "$DIR" up
  started_cluster=1
fi
set -a; . "$DIR/env"; set +a

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BROKER_PORT=$(free_port)
PROBE_PORT=$(free_port)
LOGS="$DIR/demo"; mkdir -p "$LOGS"
pids=()
cleanup() {
  # Delete while the operator still runs: the Task's finalizer needs it.
  kubectl delete --ignore-not-found --timeout=20s -f examples/task-addition.yaml -f examples/proplet-external.yaml >/dev/null 2>&1 || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$started_cluster" = 1 ] && [ "${KEEP_CLUSTER:-0}" != 1 ]; then "$BIN/testbed" --dir "$DIR" down >/dev/null; fi
}
trap cleanup EXIT

echo "== CRDs"
kubectl apply --validate=false -k crds/ >/dev/null
kubectl wait --for=condition=Established crd --all --timeout=60s >/dev/null

echo "== operator (embedded broker on 127.0.0.1:$BROKER_PORT)"
"$BIN/propeller-operator" --embedded-broker "127.0.0.1:$BROKER_PORT" \
  --domain-id demo-domain --channel-id demo-channel \
  --health-probe-bind-address "127.0.0.1:$PROBE_PORT" >"$LOGS/operator.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do curl -fsS "http://127.0.0.1:$PROBE_PORT/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
curl -fsS "http://127.0.0.1:$PROBE_PORT/readyz" >/dev/null || { tail -20 "$LOGS/operator.log"; echo "demo: operator not ready"; exit 1; }

echo "== simulated proplet edge-1"
"$BIN/proplet-sim" --mqtt-address "tcp://127.0.0.1:$BROKER_PORT" --domain-id demo-domain \
  --channel-id demo-channel --client-ids edge-1 --password edge-1-key --liveliness-interval 2 >"$LOGS/proplet.log" 2>&1 &
pids+=($!)

echo "== Proplet and Task"
kubectl delete --ignore-not-found -f examples/task-addition.yaml >/dev/null
kubectl apply -f examples/proplet-external.yaml
kubectl wait --for=jsonpath='{.status.phase}'=Running proplet/edge-1 --timeout=60s
kubectl apply -f examples/task-addition.yaml
if ! kubectl wait --for=jsonpath='{.status.phase}'=completed task/addition --timeout=60s; then
  kubectl get task addition -o yaml; tail -30 "$LOGS/operator.log"; exit 1
fi
echo
kubectl get proplet edge-1 -o wide
kubectl get task addition -o wide
result=$(kubectl get task addition -o jsonpath='{.status.results}')
echo
echo "status.results: $result"
[ "$result" = "42" ] || { echo "demo: expected 42"; exit 1; }
echo "demo: ok"
