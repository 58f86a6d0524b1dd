#!/usr/bin/env bash
# Smoke test of the locally built control plane (no kubelet, no scheduler):
# etcd + kube-apiserver (RBAC, client certs) + kube-controller-manager (job, GC,
# ttl-after-finished, namespace controllers). Creates Jobs, plays "kubelet" by
# writing pod status through the pods/status subresource, and checks that the
# real Job controller marks the Jobs Complete / Failed, that the garbage
# collector deletes a Job's pods, and that namespace deletion finishes.
#
#   e2e/k8s/smoke.sh            # builds/reuses binaries via build.sh
#   BIN=/path/to/bin KEEP=1 e2e/k8s/smoke.sh   # keep the temp dir and logs
#   SMOKE_HOLD=600 e2e/k8s/smoke.sh              # leave it running 600s after PASS
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
BIN=${BIN:-$("$here/build.sh" | tail -1)}
work=$(mktemp -d "${TMPDIR:-/tmp}/ckpt-k8s-smoke.XXXXXX")
pids=()
cleanup() {
  local rc=$? pid
  local i t
  # Stop in reverse start order, one at a time: kube-apiserver hangs in its
  # shutdown (lease cleanup) forever if etcd is already gone.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    pid=${pids[i]}
    kill "$pid" 2>/dev/null || continue
    for ((t = 0; t < 150; t++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ $rc -ne 0 || ${KEEP:-0} == 1 ]]; then
    echo "smoke: logs and state kept in $work (rc=$rc)" >&2
    [[ $rc -ne 0 ]] && tail -n 20 "$work"/*.log >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
log() { echo "smoke: $*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() { # wait_for SECONDS DESCRIPTION CMD...
  local deadline=$((SECONDS + $1)) what=$2 pid; shift 2
  until "$@" >/dev/null 2>&1; do
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null || { log "process $pid exited while waiting for $what"; return 1; }
    done
    ((SECONDS < deadline)) || { log "timed out waiting for $what"; return 1; }
    sleep 0.5
  done
  log "ok: $what"
}

# ---- certificates (openssl) -------------------------------------------------
cd "$work"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -keyout ca.key -out ca.crt -subj "/CN=ckpt-smoke-ca" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
  -extfile <(printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n') \
  -out apiserver.crt 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=admin" 2>/dev/null
openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
  -extfile <(printf 'extendedKeyUsage=clientAuth\n') -out admin.crt 2>/dev/null
openssl genrsa -out sa.key 2048 2>/dev/null
openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null

# ---- etcd ----------------------------------------------------------------------
etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port)
etcd_url=http://127.0.0.1:$etcd_port
"$BIN/etcd" --name=smoke --data-dir="$work/etcd" \
  --listen-client-urls="$etcd_url" --advertise-client-urls="$etcd_url" \
  --listen-peer-urls="http://127.0.0.1:$peer_port" \
  --initial-advertise-peer-urls="http://127.0.0.1:$peer_port" \
  --initial-cluster="smoke=http://127.0.0.1:$peer_port" \
  --unsafe-no-fsync=true --log-level=warn >etcd.log 2>&1 &
pids+=($!)
wait_for 30 "etcd $etcd_url/health" curl -fsS "$etcd_url/health"

# ---- kube-apiserver --------------------------------------------------------------
"$BIN/kube-apiserver" \
  --etcd-servers="$etcd_url" \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api_port" \
  --endpoint-reconciler-type=none \
  --tls-cert-file=apiserver.crt --tls-private-key-file=apiserver.key \
  --client-ca-file=ca.crt \
  --authorization-mode=RBAC \
  --service-account-issuer=https://kubernetes.default.svc \
  --service-account-key-file=sa.pub --service-account-signing-key-file=sa.key \
  --service-cluster-ip-range=10.0.0.0/24 \
  --disable-admission-plugins=ServiceAccount \
  --allow-privileged=true \
  --cert-dir="$work/apiserver-certs" >apiserver.log 2>&1 &
pids+=($!)

cat >kubeconfig <<EOF
apiVersion: v1
kind: Config
clusters:
- name: smoke
  cluster: {server: "https://127.0.0.1:$api_port", certificate-authority: "$work/ca.crt"}
users:
- name: admin
  user: {client-certificate: "$work/admin.crt", client-key: "$work/admin.key"}
contexts:
- name: smoke
  context: {cluster: smoke, user: admin}
current-context: smoke
EOF
export KUBECONFIG=$work/kubeconfig
k() { "$BIN/kubectl" "$@"; }
wait_for 90 "kube-apiserver /readyz" k get --raw /readyz
k get ns

# ---- kube-controller-manager ---------------------------------------------------
"$BIN/kube-controller-manager" --kubeconfig="$KUBECONFIG" \
  --controllers=job-controller,garbage-collector-controller,ttl-after-finished-controller,namespace-controller \
  --leader-elect=false --use-service-account-credentials=false \
  --secure-port=0 >controller-manager.log 2>&1 &
pids+=($!)

# ---- Jobs: play kubelet through pods/status ---------------------------------------
ns=smoke
k create namespace $ns
job() { # job NAME
  k -n $ns apply -f - <<EOF
apiVersion: batch/v1
kind: Job
metadata: {name: $1}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
      - {name: main, image: example.invalid/converter:latest, command: ["true"]}
EOF
}
pod_of() { k -n $ns get pods -l "batch.kubernetes.io/job-name=$1" -o name | head -1 | grep .; }
job_cond() { # job_cond NAME TYPE
  [[ $(k -n $ns get job "$1" -o jsonpath="{.status.conditions[?(@.type==\"$2\")].status}") == True ]]
}
# pods/status PATCH body: phase + a terminated container state, as a kubelet would write.
status_body() { # status_body PHASE EXIT_CODE REASON MESSAGE
  local now; now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  jq -nc --arg phase "$1" --argjson code "$2" --arg reason "$3" --arg msg "$4" --arg now "$now" '{status: {
    phase: $phase,
    conditions: [{type: "Ready", status: "False", reason: "PodCompleted", lastTransitionTime: $now}],
    containerStatuses: [{
      name: "main", image: "example.invalid/converter:latest", imageID: "", ready: false, restartCount: 0,
      started: false,
      state: {terminated: {exitCode: $code, reason: $reason, message: $msg, startedAt: $now, finishedAt: $now}}
    }]}}'
}

# 1) Succeeded pod, never scheduled (no nodeName, no Node object).
job ok
wait_for 60 "job controller created a pod for job/ok" pod_of ok
pod=$(pod_of ok)
k -n $ns get "$pod" -o jsonpath='{.metadata.finalizers} nodeName={.spec.nodeName}{"\n"}'
k -n $ns patch "$pod" --subresource=status --type=merge \
  -p "$(status_body Succeeded 0 Completed '{"result":"converted"}')"
k -n $ns get "$pod" -o jsonpath='phase={.status.phase} exit={.status.containerStatuses[0].state.terminated.exitCode} msg={.status.containerStatuses[0].state.terminated.message}{"\n"}'
wait_for 60 "job/ok Complete" job_cond ok Complete
k -n $ns get job ok -o jsonpath='{.status.succeeded} succeeded; conditions: {range .status.conditions[*]}{.type}={.status} {end}{"\n"}'

# 2) Failed pod (exit code 3), written with a raw merge PATCH on .../pods/NAME/status (curl, client cert).
job bad
wait_for 60 "job controller created a pod for job/bad" pod_of bad
pod=$(pod_of bad)
name=${pod#pod/}
status_body Failed 3 Error '{"error":"bad checkpoint"}' >bad-status.json
curl -fsS --cacert ca.crt --cert admin.crt --key admin.key -X PATCH \
  -H 'Content-Type: application/merge-patch+json' --data-binary @bad-status.json \
  "https://127.0.0.1:$api_port/api/v1/namespaces/$ns/pods/$name/status" >/dev/null
wait_for 60 "job/bad Failed" job_cond bad Failed
k -n $ns get job bad -o jsonpath='{.status.failed} failed; conditions: {range .status.conditions[*]}{.type}={.status}({.reason}) {end}{"\n"}'

# 3) Garbage collector: background-delete job/ok, its pod must go away.
k -n $ns delete job ok --cascade=background
no_pods_of() { [[ -z $(k -n $ns get pods -l batch.kubernetes.io/job-name=ok -o name) ]]; }
wait_for 60 "GC deleted the pods of job/ok" no_pods_of

# 4) Namespace controller: deleting the namespace finishes.
k delete namespace $ns --wait=false
ns_gone() { ! k get namespace $ns; }
wait_for 120 "namespace $ns deleted" ns_gone

log "PASS (bin: $BIN)"
if [[ -n ${SMOKE_HOLD:-} ]]; then # keep the control plane up for manual poking
  log "holding for ${SMOKE_HOLD}s: export KUBECONFIG=$KUBECONFIG"
  sleep "$SMOKE_HOLD" || true
fi
