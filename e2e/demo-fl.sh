#!/usr/bin/env bash
# `make demo-fl`: a 3-round federated-learning experiment on real parts. A local control plane, the operator
# (embedded MQTT broker, FL coordinator, model registry and dataset server), three simulated proplets
# edge-1..3 running the example FL client (examples/fl-client, built for wasm32-wasi) on their own data
# (examples/fl-datasets.yaml), and examples/federated-job.yaml unchanged. Prints the loss per round, which
# must fall, and the final model.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.testbed
BIN=target/debug
MODULE=target/wasm32-wasi/fl-client.wasm
[ -f "$MODULE" ] || { echo "demo-fl: $MODULE is missing (make fl-client)"; exit 1; }

started_cluster=0
if [ ! -f "$DIR/pids" ]; then
  "$BIN/testbed" --dir "$DIR" up
  started_cluster=1
fi
set -a; . "$DIR/env"; set +a

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BROKER_PORT=$(free_port)
PROBE_PORT=$(free_port)
FL_PORT=$(free_port)
LOGS="$DIR/demo-fl"; mkdir -p "$LOGS"
pids=()
cleanup() {
  # Delete while the operator still runs: its finalizers need it.
  kubectl delete --ignore-not-found --timeout=30s -f examples/federated-job.yaml -f examples/fl-datasets.yaml \
    proplet/edge-1 proplet/edge-2 proplet/edge-3 configmap/fl-client >/dev/null 2>&1 || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$started_cluster" = 1 ] && [ "${KEEP_CLUSTER:-0}" != 1 ]; then "$BIN/testbed" --dir "$DIR" down >/dev/null; fi
}
trap cleanup EXIT

echo "== CRDs"
kubectl apply --validate=false -k crds/ >/dev/null
kubectl wait --for=condition=Established crd --all --timeout=60s >/dev/null

echo "== operator (embedded broker on 127.0.0.1:$BROKER_PORT, FL on http://127.0.0.1:$FL_PORT)"
"$BIN/propeller-operator" --embedded-broker "127.0.0.1:$BROKER_PORT" \
  --domain-id demo-domain --channel-id demo-channel \
  --fl-bind-address "127.0.0.1:$FL_PORT" --fl-public-url "http://127.0.0.1:$FL_PORT" \
  --health-probe-bind-address "127.0.0.1:$PROBE_PORT" >"$LOGS/operator.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do curl -fsS "http://127.0.0.1:$PROBE_PORT/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
curl -fsS "http://127.0.0.1:$PROBE_PORT/readyz" >/dev/null || { tail -20 "$LOGS/operator.log"; echo "demo-fl: operator not ready"; exit 1; }

echo "== simulated proplets edge-1..3, their Proplets, the FL client module and the datasets"
for i in 1 2 3; do
  "$BIN/proplet-sim" --mqtt-address "tcp://127.0.0.1:$BROKER_PORT" --domain-id demo-domain \
    --channel-id demo-channel --client-ids "edge-$i" --password "edge-$i-key" --liveliness-interval 2 \
    --registry-poll-ms 500 >"$LOGS/proplet-$i.log" 2>&1 &
  pids+=($!)
  kubectl apply -f - >/dev/null <<YAML
apiVersion: propeller.propeller.abstractmachines.fr/v1
kind: Proplet
metadata: {name: edge-$i}
spec:
  type: external
  external: {deviceType: proplet-sim, capabilities: [wasm]}
  connectionConfig: {domainId: demo-domain, channelId: demo-channel, clientId: edge-$i, clientKey: edge-$i-key, mqttAddress: "tcp://127.0.0.1:$BROKER_PORT"}
YAML
done
kubectl create configmap fl-client --from-file=module.wasm="$MODULE" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl label configmap fl-client --overwrite propeller.propeller.abstractmachines.fr/module=true >/dev/null
kubectl annotate configmap fl-client --overwrite \
  propeller.propeller.abstractmachines.fr/module-name=registry.example/fl-client.wasm:1 >/dev/null
kubectl apply -f examples/fl-datasets.yaml
kubectl wait --for=jsonpath='{.status.phase}'=Running proplet/edge-1 proplet/edge-2 proplet/edge-3 --timeout=60s

echo "== FederatedJob fl-demo (3 rounds)"
kubectl delete --ignore-not-found -f examples/federated-job.yaml >/dev/null
kubectl apply -f examples/federated-job.yaml
if ! kubectl wait --for=jsonpath='{.status.phase}'=Completed federatedjob/fl-demo --timeout=300s; then
  kubectl get federatedjob fl-demo -o yaml; kubectl get trainingrounds,tasks -o wide; tail -30 "$LOGS/operator.log"; exit 1
fi
echo
kubectl get federatedjob fl-demo -o wide
kubectl get trainingrounds -o wide
echo
echo "round  updates  samples  mean loss"
losses=$(kubectl get federatedjob fl-demo \
  -o jsonpath='{range .status.roundMetrics[*]}{.round} {.updates} {.totalSamples} {.metrics.loss}{"\n"}{end}')
echo "$losses" | awk '{printf "%5s  %7s  %7s  %s\n", $1, $2, $3, $4}'
echo
echo "global model v3: $(kubectl get configmap fl-demo-model-v3 -o jsonpath='{.data.model\.json}')"
echo "$losses" | awk 'NR > 1 && $4 >= prev { bad = 1 } { prev = $4 } END { exit bad }' \
  || { echo "demo-fl: the loss did not fall round after round"; exit 1; }
echo "demo-fl: ok (the loss fell every round)"
