#!/usr/bin/env bash
# `make dev-up` / `make dev-down`: the test bed's cluster and mosquitto, the CRDs, the operator built from
# this tree and PROPLETS simulated proplets (default 3, edge-1…edge-N) registered as external Proplets in
# `default`, all left running in the background. The operator serves FL (coordinator, model registry,
# datasets) and the example FL client is a module ConfigMap, so examples/federated-job.yaml runs as is. Connection details are appended to .testbed/env. REPLICAS=3 runs three
# operator processes sharing the fleet (--leader-elect; shard identities propeller-operator-0..2, as a
# StatefulSet names its pods), each with its own log and metrics port.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.testbed
BIN=target/debug
DOMAIN=dev-domain
CHANNEL=dev-channel
PROPLETS=${PROPLETS:-3}
REPLICAS=${REPLICAS:-1}

stop_dev() {
  if [ -f "$DIR/dev.pids" ]; then
    while read -r pid; do kill "$pid" 2>/dev/null || true; done < "$DIR/dev.pids"
    rm -f "$DIR/dev.pids"
  fi
}

case "${1:-}" in
up)
  "$BIN/testbed" --dir "$DIR" up
  stop_dev
  set -a; . "$DIR/env"; set +a
  kubectl apply --validate=false -k crds/ >/dev/null
  kubectl wait --for=condition=Established crd --all --timeout=60s >/dev/null
  ids=()
  for i in $(seq "$PROPLETS"); do
    id="edge-$i"; ids+=("$id")
    mosquitto_passwd -b "$DIR/mosquitto/passwd" "$id" "$id-key"
  done
  kill -HUP "$(cat "$DIR/mosquitto.pid")"
  sleep 0.3
  free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
  urls=()
  for r in $(seq 0 $((REPLICAS - 1))); do
    probe=$(free_port)
    fl=$(free_port)
    urls+=("http://127.0.0.1:$probe/metrics")
    ha=()
    log="$DIR/operator.log"
    if [ "$REPLICAS" -gt 1 ]; then
      ha=(--leader-elect --identity "propeller-operator-$r" --leader-election-namespace default)
      log="$DIR/operator-$r.log"
    fi
    "$BIN/propeller-operator" --mqtt-address "$MQTT_ADDRESS" --client-id "$MQTT_USERNAME" \
      --client-key "$MQTT_PASSWORD" --domain-id "$DOMAIN" --channel-id "$CHANNEL" \
      --health-probe-bind-address "127.0.0.1:$probe" --fl-bind-address "127.0.0.1:$fl" \
      --fl-public-url "http://127.0.0.1:$fl" "${ha[@]}" >"$log" 2>&1 &
    echo $! >> "$DIR/dev.pids"
  done
  for id in "${ids[@]}"; do
    "$BIN/proplet-sim" --mqtt-address "$MQTT_ADDRESS" --domain-id "$DOMAIN" --channel-id "$CHANNEL" \
      --client-ids "$id" --password "$id-key" >>"$DIR/proplet-sim.log" 2>&1 &
    echo $! >> "$DIR/dev.pids"
    kubectl apply -f - >/dev/null <<YAML
apiVersion: propeller.propeller.abstractmachines.fr/v1
kind: Proplet
metadata: {name: $id, namespace: default}
spec:
  type: external
  external: {deviceType: proplet-sim, capabilities: [wasm]}
  connectionConfig: {domainId: $DOMAIN, channelId: $CHANNEL, clientId: $id, clientKey: $id-key, mqttAddress: "$MQTT_ADDRESS"}
YAML
  done
  # The example FL client, by the name examples/federated-job.yaml uses.
  kubectl create configmap fl-client -n default --from-file=module.wasm=target/wasm32-wasi/fl-client.wasm \
    --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl label configmap fl-client -n default --overwrite propeller.propeller.abstractmachines.fr/module=true >/dev/null
  kubectl annotate configmap fl-client -n default --overwrite \
    propeller.propeller.abstractmachines.fr/module-name=registry.example/fl-client.wasm:1 >/dev/null
  sed -i '/^DEV_/d;/^OPERATOR_METRICS_URL/d' "$DIR/env"
  {
    echo "DEV_DOMAIN_ID=$DOMAIN"
    echo "DEV_CHANNEL_ID=$CHANNEL"
    echo "DEV_PROPLETS=$(IFS=,; echo "${ids[*]}")"
    echo "OPERATOR_METRICS_URL=${urls[0]}"
    echo "OPERATOR_METRICS_URLS=$(IFS=,; echo "${urls[*]}")"
  } >> "$DIR/env"
  kubectl wait --for=jsonpath='{.status.phase}'=Running proplet --all -n default --timeout=60s >/dev/null
  if [ "$REPLICAS" -gt 1 ]; then
    kubectl get proplets -n default -L propeller.propeller.abstractmachines.fr/shard
    kubectl get leases -n default
    echo "dev: up with $REPLICAS replicas. set -a; . $DIR/env; set +a   (logs: $DIR/operator-N.log)"
  else
    kubectl get proplets -n default
    echo "dev: up. set -a; . $DIR/env; set +a   (operator log: $DIR/operator.log)"
  fi
  ;;
down)
  stop_dev
  if [ -f "$DIR/env" ]; then
    set -a; . "$DIR/env"; set +a
    kubectl delete proplets,tasks --all -n default --wait=false >/dev/null 2>&1 || true
  fi
  "$BIN/testbed" --dir "$DIR" down
  ;;
*) echo "usage: e2e/dev.sh up|down"; exit 2 ;;
esac
