#!/usr/bin/env bash
# `make demo-multicluster`: hierarchical federated learning across three local clusters. A hub (operator
# with --hub) and two members, site-a and site-b, each with its own control plane, operator (embedded MQTT
# broker, FL coordinator), three simulated proplets running the example FL client (examples/fl-client) on
# their own data. The hub reaches members only through their API servers (kubeconfig Secrets) and runs
# examples/multicluster/hub-federated-job.yaml: 2 rounds, each a member FederatedJob per site, the member
# models averaged on the hub. Prints the members, each round, and the global model.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=.testbed-multicluster
BIN=target/debug
MODULE=target/wasm32-wasi/fl-client.wasm
[ -f "$MODULE" ] || { echo "demo-multicluster: $MODULE is missing (make fl-client)"; exit 1; }
mkdir -p "$BASE"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
kc() { local site=$1; shift; KUBECONFIG="$BASE/$site/cluster/kubeconfig" kubectl "$@"; }
pids=()
cleanup() {
  # The hub job first, while the operators run (its finalizer deletes the member jobs).
  kc hub delete --ignore-not-found --timeout=30s -f examples/multicluster/hub-federated-job.yaml >/dev/null 2>&1 || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${KEEP_CLUSTER:-0}" != 1 ]; then
    for site in hub site-a site-b; do "$BIN/testbed" --dir "$BASE/$site" down >/dev/null 2>&1 || true; done
  fi
}
trap cleanup EXIT

echo "== three local clusters: hub, site-a, site-b"
for site in hub site-a site-b; do
  "$BIN/testbed" --dir "$BASE/$site" up >"$BASE/$site.up.log" 2>&1 &
done
wait_all() { local ok=0; for j in $(jobs -p); do wait "$j" || ok=1; done; return $ok; }
if ! wait_all; then
  for site in hub site-a site-b; do tail -5 "$BASE/$site.up.log"; done
  echo "demo-multicluster: a cluster did not start"; exit 1
fi
for site in hub site-a site-b; do
  kc "$site" apply --validate=false -k crds/ >/dev/null
  kc "$site" wait --for=condition=Established crd --all --timeout=60s >/dev/null
done

operator() { # site, extra flags…
  local site=$1; shift
  local probe; probe=$(free_port)
  KUBECONFIG="$BASE/$site/cluster/kubeconfig" "$BIN/propeller-operator" \
    --domain-id demo-domain --channel-id demo-channel --health-probe-bind-address "127.0.0.1:$probe" "$@" \
    >"$BASE/$site/operator.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do curl -fsS "http://127.0.0.1:$probe/readyz" >/dev/null 2>&1 && return 0; sleep 0.2; done
  tail -20 "$BASE/$site/operator.log"; echo "demo-multicluster: the $site operator is not ready"; exit 1
}

member() { # site, dataset file, proplet numbers…
  local site=$1 data=$2; shift 2
  local broker fl; broker=$(free_port); fl=$(free_port)
  echo "== $site: operator (broker 127.0.0.1:$broker, FL http://127.0.0.1:$fl), proplets edge-$1..$3"
  operator "$site" --embedded-broker "127.0.0.1:$broker" \
    --fl-bind-address "127.0.0.1:$fl" --fl-public-url "http://127.0.0.1:$fl"
  local names=()
  for i in "$@"; do
    "$BIN/proplet-sim" --mqtt-address "tcp://127.0.0.1:$broker" --domain-id demo-domain \
      --channel-id demo-channel --client-ids "edge-$i" --password "edge-$i-key" --liveliness-interval 2 \
      --registry-poll-ms 500 >"$BASE/$site/proplet-$i.log" 2>&1 &
    pids+=($!)
    kc "$site" apply -f - >/dev/null <<YAML
apiVersion: propeller.propeller.abstractmachines.fr/v1
kind: Proplet
metadata: {name: edge-$i}
spec:
  type: external
  external: {deviceType: proplet-sim, capabilities: [wasm]}
  connectionConfig: {domainId: demo-domain, channelId: demo-channel, clientId: edge-$i, clientKey: edge-$i-key, mqttAddress: "tcp://127.0.0.1:$broker"}
YAML
    names+=("proplet/edge-$i")
  done
  kc "$site" create configmap fl-client --from-file=module.wasm="$MODULE" --dry-run=client -o yaml \
    | kc "$site" apply -f - >/dev/null
  kc "$site" label configmap fl-client --overwrite propeller.propeller.abstractmachines.fr/module=true >/dev/null
  kc "$site" annotate configmap fl-client --overwrite \
    propeller.propeller.abstractmachines.fr/module-name=registry.example/fl-client.wasm:1 >/dev/null
  kc "$site" apply -f "$data" >/dev/null
  kc "$site" wait --for=jsonpath='{.status.phase}'=Running "${names[@]}" --timeout=60s >/dev/null
}
member site-a examples/fl-datasets.yaml 1 2 3
member site-b examples/multicluster/site-b-datasets.yaml 4 5 6

echo "== hub: operator --hub, members registered by kubeconfig Secrets"
operator hub --hub --member-namespace default --member-probe-interval 2s --embedded-broker "127.0.0.1:$(free_port)"
for site in site-a site-b; do
  kc hub create secret generic "$site" --from-file=kubeconfig="$BASE/$site/cluster/kubeconfig" \
    --dry-run=client -o yaml | kc hub apply -f - >/dev/null
  kc hub label secret "$site" --overwrite propeller.propeller.abstractmachines.fr/member=true >/dev/null
done
for site in site-a site-b; do
  for _ in $(seq 60); do
    [ "$(kc hub get membercluster "$site" -o jsonpath='{.status.conditions[?(@.type=="Reachable")].status}' 2>/dev/null)" = True ] && break
    sleep 0.5
  done
done
kc hub get members

echo "== hub FederatedJob fl-hub-demo (2 rounds over site-a and site-b)"
kc hub delete --ignore-not-found -f examples/multicluster/hub-federated-job.yaml >/dev/null
kc hub apply -f examples/multicluster/hub-federated-job.yaml
if ! kc hub wait --for=jsonpath='{.status.phase}'=Completed federatedjob/fl-hub-demo --timeout=300s; then
  kc hub get federatedjob fl-hub-demo -o yaml; tail -30 "$BASE/hub/operator.log"; exit 1
fi
echo
echo "-- on the hub"
kc hub get federatedjob fl-hub-demo
for site in site-a site-b; do echo "-- on $site"; kc "$site" get federatedjobs,trainingrounds; done
echo
echo "round  members  samples  mean loss"
rounds=$(kc hub get federatedjob fl-hub-demo \
  -o jsonpath='{range .status.roundMetrics[*]}{.round} {.updates} {.totalSamples} {.metrics.loss}{"\n"}{end}')
echo "$rounds" | awk '{printf "%5s  %7s  %7s  %s\n", $1, $2, $3, $4}'
echo
model=$(kc hub get configmap fl-hub-demo-model-v2 -o jsonpath='{.data.model\.json}')
echo "global model v2 (stored on the hub): $model"
echo "$rounds" | awk '$2 != 2 { bad = 1 } END { exit bad + (NR != 2) }' \
  || { echo "demo-multicluster: every round should have both members' models"; exit 1; }
echo "$rounds" | awk 'NR > 1 && $4 >= prev { bad = 1 } { prev = $4 } END { exit bad }' \
  || { echo "demo-multicluster: the loss did not fall"; exit 1; }
echo "demo-multicluster: ok (both members in every round; the loss fell)"
